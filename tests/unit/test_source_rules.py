"""Rules about the source tree itself."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_shell_no_os_system() -> None:
    offenders = []
    for path in (ROOT / "csi_driver").rglob("*.py"):
        if "proto" in path.parts:
            continue
        text = path.read_text()
        for pattern in (r"shell\s*=\s*True", r"os\.system\(", r"os\.popen\("):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert offenders == []


def test_subprocess_only_in_runner() -> None:
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csi_driver").rglob("*.py")
                   if "import subprocess" in p.read_text())
    assert users == ["csi_driver/host/runner.py", "csi_driver/ops/demo.py"], users


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    """The committed stubs equal what scripts/gen_proto.sh makes from protos/csi.proto."""
    out = tmp_path / "proto"
    out.mkdir()
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    for name in ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py"):
        assert filecmp.cmp(out / name, ROOT / "csi_driver" / "proto" / name, shallow=False), \
            f"{name} is stale: run scripts/gen_proto.sh"


def test_descriptor_realpath_only_on_paths_never_unmounted() -> None:
    """oslayer.real_path holds an O_PATH descriptor for an instant; a command spawned by
    another thread then inherits it and a mount under it cannot be unmounted (EBUSY, seen
    at concurrency 8 when it resolved staging paths). Kubelet paths use os.path.realpath."""
    calls = []
    for path in (ROOT / "csi_driver").rglob("*.py"):
        for arg in re.findall(r"(?<!def )\breal_path\(([^)]*)\)", path.read_text()):
            calls.append((path.name, arg))
    assert calls, "the rule checks nothing"
    wrong = [(name, arg) for name, arg in calls if "image" not in arg and "/sys/" not in arg]
    assert wrong == []
