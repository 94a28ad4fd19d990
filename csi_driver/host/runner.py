"""The one way the driver runs programs: argv lists, never a shell, LC_ALL=C, a deadline
that kills the child, and a typed error carrying the argv, exit code and stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(Exception):
    """A program exited non-zero, could not be started, or ran past its deadline."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{' '.join(self.argv)} exited {returncode}: {self.stderr or '(no stderr)'}")


class Runner:
    """Runs commands. Tests replace it (or the OS layer above it) with fakes."""

    def __init__(self, default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.default_timeout = default_timeout
        # A small, fixed environment: tools need only PATH, and the C locale keeps their
        # messages parseable. (Copying the whole environment cost a re-encode per spawn.)
        self._env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C", "LANG": "C"}

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        args = [str(a) for a in argv]
        started = time.monotonic()
        try:
            proc = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self._env,
                timeout=timeout or self.default_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            # subprocess.run has already killed and reaped the child.
            raise CommandError(args, -9, f"timed out after {exc.timeout:.0f}s") from None
        except OSError as exc:
            raise CommandError(args, 127, f"cannot run: {exc.strerror or exc}") from None
        log.debug("ran %s -> %d in %.3fs", args, proc.returncode, time.monotonic() - started)
        result = CommandResult(tuple(args), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise CommandError(args, proc.returncode, proc.stderr or proc.stdout)
        return result
