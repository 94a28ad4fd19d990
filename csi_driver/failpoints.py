"""Failpoints for crash tests. Off unless the THINLOOP_FAILPOINTS environment variable names
them ("create.after_image=kill,stage.after_attach=error"), which only tests set.

Actions: kill (SIGKILL this process, as a crash would), error (raise an internal error),
stop (SIGSTOP this process until the test sends SIGCONT: an operation held half-way).

A foundation module: the model and the CSI faces hit failpoints; it imports no layer."""

from __future__ import annotations

import os
import signal

from .errors import Internal


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        out[name] = action or "kill"
    return out


_ACTIVE = _parse(os.environ.get("THINLOOP_FAILPOINTS", ""))


def hit(name: str) -> None:
    if not _ACTIVE:
        return
    action = _ACTIVE.get(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "error":
        raise Internal(f"failpoint {name}")
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
