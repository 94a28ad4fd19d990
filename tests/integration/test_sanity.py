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


def sanity(binary: str = "csi-sanity", args: str = "") -> list[str]:
    """Run scripts/sanity.sh; return its summary lines (node-local mount run, block run,
    then the shared-mode run)."""
    env = {**os.environ, "CSI_SANITY": binary, "SANITY_ARGS": args, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "sanity.sh")], capture_output=True, text=True,
                         timeout=1200, check=False, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summaries = re.findall(r"Ran \d+ of \d+ Specs.*", run.stdout)
    assert len(summaries) == 3, run.stdout
    return summaries


@pytest.mark.skipif(shutil.which("csi-sanity") is None,
                    reason="csi-sanity not on PATH (build it from kubernetes-csi/csi-test cmd/csi-sanity)")
def test_csi_sanity_passes_for_mount_and_block_volumes_and_in_shared_mode() -> None:
    summaries = sanity()
    for line in summaries:
        assert "| 0 Failed |" in line, line
    # Shared mode also runs the ten ControllerPublish/Unpublish specs the node-local driver skips.
    ran = [int(m.group(1)) for m in re.finditer(r"Ran (\d+) of", "\n".join(summaries))]
    assert ran[2] >= ran[0] + 10, summaries


@pytest.mark.parametrize("binary", ["csi-sanity", "csi-sanity-master"])
def test_csi_sanity_group_controller_specs_run_and_pass(binary: str) -> None:
    """The six GroupController specs run (the driver advertises GROUP_CONTROLLER_SERVICE),
    none is skipped, all pass, in every run (node-local mount and block, shared mode): with
    the release and, when it is installed, the main branch."""
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not on PATH")
    for line in sanity(binary, "-ginkgo.focus=GroupController"):
        # A spec skipped at run time (capability not advertised) is not counted as run.
        assert re.search(r"Ran 6 of \d+ Specs .* 6 Passed \| 0 Failed \|", line), line
