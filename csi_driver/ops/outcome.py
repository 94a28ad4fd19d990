"""What every thinloopctl command hands back: an Outcome (the value printed and the exit
code), or a Failure (one line and its code); the exit codes themselves; the plain table
that values are printed in for people. Shared by csi_driver.ops.ctl and the commands it
gathers from beside it (csi_driver.ops.dsctl)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FOUND, EXIT_NOT_FOUND, EXIT_UNCHANGED = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


@dataclass(frozen=True)
class Outcome:
    """What a command returns: the value to print and the exit code."""

    value: Any
    code: int = EXIT_OK


class Failure(Exception):
    """A command that cannot do what was asked: one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED, kind: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind or {EXIT_USAGE: "USAGE", EXIT_NOT_FOUND: "NOT_FOUND",
                             EXIT_UNCHANGED: "UNCHANGED", EXIT_INTERRUPTED: "INTERRUPTED"}.get(code, "FAILED")


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(out)
