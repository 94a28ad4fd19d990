"""csi-sanity, the CSI conformance suite, against the real driver (scripts/sanity.sh).
Skipped, and reported as skipped, when the csi-sanity binary is not on PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.skipif(shutil.which("csi-sanity") is None,
                    reason="csi-sanity not on PATH (build it from kubernetes-csi/csi-test cmd/csi-sanity)")
def test_csi_sanity_passes_for_mount_and_block_volumes() -> None:
    run = subprocess.run(["bash", str(ROOT / "scripts" / "sanity.sh")], capture_output=True, text=True,
                         timeout=1200, check=False, env={**os.environ, "PYTHON": sys.executable})
    summaries = re.findall(r"Ran \d+ of \d+ Specs.*", run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert len(summaries) == 2, run.stdout
    for line in summaries:
        assert "| 0 Failed |" in line, line
