"""`thinloopctl doctor` on this machine: every check has a status and a fix, a hidden tool
fails the run with a message naming it, and nothing is left attached."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from csi_driver.host.linux import REQUIRED_TOOLS
from tests import kernel
from tests.operator.conftest import Ctl

pytestmark = pytest.mark.root


def path_without(tmp: Path, hidden: str) -> str:
    """A PATH of links to every tool the driver uses, except `hidden`."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in REQUIRED_TOOLS:
        found = shutil.which(tool)
        if tool != hidden and found is not None and not (bindir / tool).exists():
            (bindir / tool).symlink_to(found)
    return str(bindir)


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(eff.split()[1], 16) & (1 << 24))


def test_doctor_checks_this_node(workdir: Path, run_ctl: Ctl) -> None:
    data = workdir / "data"
    data.mkdir()
    r = run_ctl("-o", "json", "doctor", "--data-dir", str(data), "--kubelet-dir", str(workdir))
    checks = {c["name"]: c for c in r.json()}
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks.values())
    assert all(c["status"] in ("ok", "warn", "fail") for c in checks.values())
    assert all(c["fix"] for c in checks.values() if c["status"] != "ok"), "every problem has a fix"
    assert checks["tools"]["status"] == "ok"
    assert checks["loop-control"]["status"] == "ok"
    assert checks["direct I/O"]["status"] in ("ok", "warn")
    assert checks["data dir free space"]["status"] in ("ok", "warn")
    assert checks["version util-linux"]["detail"].startswith("losetup from util-linux")
    expected_cap = "ok" if _has_cap_sys_resource() else "warn"
    assert checks["CAP_SYS_RESOURCE"]["status"] == expected_cap
    assert r.code == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)
    assert kernel.loops_under(workdir) == [], "the direct-I/O probe detaches its loop device"
    assert [p.name for p in data.iterdir()] == [], "and removes its image"


def test_doctor_fails_clearly_without_mkfs_xfs(workdir: Path, run_ctl: Ctl,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = workdir / "data"
    data.mkdir()
    monkeypatch.setenv("PATH", path_without(workdir, "mkfs.xfs"))
    r = run_ctl("doctor", "--data-dir", str(data), "--kubelet-dir", str(workdir))
    assert r.code == 1
    lines = r.out.splitlines()
    tools = next(i for i, line in enumerate(lines) if "] tools" in line)
    assert lines[tools].startswith("[FAIL]") and "mkfs.xfs" in lines[tools]
    assert "fix: install xfsprogs" in lines[tools + 1]
    assert any(line.startswith("[FAIL] probe readiness") and "missing tools: mkfs.xfs" in line
               for line in lines)
    assert "failed" in lines[-1]
    assert os.environ["PATH"].endswith("bin")
