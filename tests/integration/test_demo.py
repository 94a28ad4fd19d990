"""The README's first command: the demo walks a volume through its life and leaves nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import kernel

pytestmark = pytest.mark.root


def test_demo_runs_and_cleans_up(workdir: Path) -> None:
    root = workdir / "demo"
    run = subprocess.run([sys.executable, "-m", "csi_driver.demo", "--data-dir", str(root)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for step in ("CreateVolume: 1 GiB, thin, ext4", "apparent size: 1.00 GiB", "payload identical: True",
                 "volumes left: []", "nothing left behind"):
        assert step in out, step
    assert not root.exists()
    assert kernel.loops_under(workdir) == [] and kernel.mounts_under(workdir) == []
