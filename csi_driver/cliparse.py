"""Command-line parsing shared by `thinloop-csi` and `thinloopctl`: misuse is one line
naming the command and pointing at its --help, never a usage dump or a traceback.

A foundation module (serving's flags and ops' thinloopctl both use it); it imports no layer."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from typing import NoReturn


class UsageError(ValueError):
    """The command line is wrong; the message is one line, already prefixed by the program."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with errors raised as UsageError instead of printed with the usage block.
    Subparsers made by add_subparsers share the class (argparse uses type(self))."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions and epilogs wrap paragraph by paragraph; a paragraph whose lines are
    indented (an example, a list) is kept as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(100, shutil.get_terminal_size().columns))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.split("\n\n"):
            if any(line.startswith(" ") for line in para.splitlines()):
                out.append(para)
            else:
                out.append(textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)
