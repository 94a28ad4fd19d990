"""A short soak (scripts/soak.py with 30 lifecycles): the fds and threads of the driver's
processes, and the loop devices and mounts under its dirs, come back to their baseline;
memory stays put."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.root

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
LIFECYCLES = 30
MEMORY_BOUND = 16 << 20
"""Generous: a leak of one small object per call would still be far below it at 30
lifecycles, but a leaked buffer per volume or per mount would cross it."""


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("thinloop_soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_short_soak_is_flat(workdir: Path) -> None:
    soak = load_soak()
    lines: list[str] = []
    report = soak.run(LIFECYCLES, workdir, progress=lines.append)
    start, end = report.start, report.end
    assert (start.loops, start.mounts) == (0, 0)
    assert start.processes == end.processes == 4, "the server, the spawner and two workers"
    assert end.fds == start.fds, lines
    assert end.threads == start.threads, lines
    assert (end.loops, end.mounts) == (0, 0), lines
    assert end.memory_bytes - start.memory_bytes < MEMORY_BOUND, lines
    assert report.flat
