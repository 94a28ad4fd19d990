"""The README's first command: the demo walks a volume through its life and leaves nothing."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import kernel

pytestmark = pytest.mark.root


def test_demo_runs_and_cleans_up(workdir: Path) -> None:
    root = workdir / "demo"
    run = subprocess.run([sys.executable, "-m", "csi_driver.ops.demo", "--data-dir", str(root)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for step in ("CreateVolume: 1 GiB, thin, ext4", "apparent size: 1.00 GiB", "payload identical: True",
                 "list\n(none)\n", "nothing left behind"):
        assert step in out, step
    # Every command shown is one a user can paste: whole, quoted, its program found.
    commands = [shlex.split(line[2:].removesuffix(" &")) for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) >= 15
    for argv in commands:
        assert shutil.which(argv[0]) or os.access(argv[0], os.X_OK), argv
    assert any(a[0].endswith("thinloopctl") and a[-1] == "list" for a in commands)
    assert any(a[0].endswith("thinloop-csi") or a[1:3] == ["-m", "csi_driver"] for a in commands)
    assert not root.exists()
    assert kernel.loops_under(workdir) == [] and kernel.mounts_under(workdir) == []


def test_demo_cleans_up_when_its_reader_goes_away(workdir: Path) -> None:
    """`scripts/demo.sh | head`: the demo's output closes under it; it must still stop its
    driver and leave no loop device, mount or file."""
    root = workdir / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "csi_driver.ops.demo", "--data-dir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if line.startswith("==> NodeStageVolume"):
            break
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=300) != 0
    assert "Traceback" not in err, err
    assert not root.exists()
    assert kernel.loops_under(workdir) == [] and kernel.mounts_under(workdir) == []
