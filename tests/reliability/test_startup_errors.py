"""Bad settings and a node that cannot run the driver stop `python -m csi_driver` at start
with one line naming the flag (or the THINLOOP_* variable that set it) or the path, and the
fix; a non-zero exit; and nothing started: no socket, no data dir, no log line (the worker
spawner and the server log as they start), no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_driver.serving import preflight
from csi_driver.serving.flags import FLAGS, parse_settings
from csi_driver.settings import MAX_SOCKET_PATH_BYTES
from tests.conftest import Driver
from tests.operator.test_doctor import path_without

pytestmark = pytest.mark.root


@dataclass
class Case:
    root: Path
    args: list[str]
    env: dict[str, str]
    mounts: list[Path] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "csi.sock"


def run(case: Case) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "csi_driver", "--node-id", "n1", "--kubelet-dir", str(case.root),
            *case.args]
    defaults = {"--endpoint": f"unix://{case.socket}", "--data-dir": str(case.data_dir)}
    for flag, value in defaults.items():
        if flag not in case.args and flag.upper().replace("--", "THINLOOP_").replace("-", "_") not in case.env:
            argv += [flag, value]
    env = {**os.environ, **case.env}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


def read_only_dir(c: Case) -> None:
    ro = c.root / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "thinloop-test-ro", str(ro)], check=True)
    c.mounts.append(ro)
    c.args += ["--data-dir", str(ro / "data")]


def data_dir_is_file(c: Case) -> None:
    (c.root / "file").write_text("x")
    c.args += ["--data-dir", str(c.root / "file")]


def data_dir_file_from_env(c: Case) -> None:
    (c.root / "file").write_text("x")
    c.env["THINLOOP_DATA_DIR"] = str(c.root / "file")


def endpoint_is_dir(c: Case) -> None:
    (c.root / "sockdir").mkdir()
    c.args += ["--endpoint", f"unix://{c.root / 'sockdir'}"]


def endpoint_under_file(c: Case) -> None:
    (c.root / "file").write_text("x")
    c.args += ["--endpoint", f"unix://{c.root / 'file' / 'csi.sock'}"]


def socket_path_too_long(c: Case) -> None:
    c.args += ["--endpoint", f"unix://{c.root / ('s' * 120)}.sock"]


def metrics_port_only(c: Case) -> None:
    c.args += ["--metrics-address", "9809"]


def metrics_from_env(c: Case) -> None:
    c.env["THINLOOP_METRICS_ADDRESS"] = "9809"


def tool_missing(c: Case) -> None:
    c.env["PATH"] = path_without(c.root, "mkfs.xfs")


def unknown_flag(c: Case) -> None:
    c.args += ["--data-dri", "/x"]


@pytest.mark.parametrize(("make", "words"), [
    (read_only_dir, ["--data-dir", "/ro/data", "read-only filesystem"]),
    (data_dir_is_file, ["--data-dir", "/file", "regular file"]),
    (data_dir_file_from_env, ["THINLOOP_DATA_DIR", "/file", "regular file"]),
    (endpoint_is_dir, ["--endpoint", "/sockdir", "is not a socket (a directory)"]),
    (endpoint_under_file, ["--endpoint", "/file is not a directory"]),
    (socket_path_too_long, ["--endpoint", "at most 107"]),
    (metrics_port_only, ["--metrics-address '9809'", "host:port or :port"]),
    (metrics_from_env, ["THINLOOP_METRICS_ADDRESS '9809'", "host:port"]),
    (tool_missing, ["mkfs.xfs", "apt-get install xfsprogs"]),
    (unknown_flag, ["unrecognized arguments: --data-dri", "thinloop-csi --help"]),
], ids=lambda v: getattr(v, "__name__", ""))
def test_refused_at_start_with_one_line(workdir: Path, make: Callable[[Case], None], words: list[str]) -> None:
    case = Case(workdir, [], {})
    try:
        make(case)
        before = sorted(p.name for p in workdir.iterdir())
        res = run(case)
        after = sorted(p.name for p in workdir.iterdir())
    finally:
        for m in case.mounts:
            subprocess.run(["umount", str(m)], check=True)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("thinloop-csi: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert res.stdout == ""
    assert after == before, "something was made before the refusal"


@pytest.fixture
def listener() -> Iterator[int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_metrics_port_in_use_is_refused_before_the_spawner_starts(workdir: Path, listener: int) -> None:
    case = Case(workdir, ["--metrics-address", f"127.0.0.1:{listener}", "--workers", "2"], {})
    res = run(case)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"thinloop-csi: --metrics-address '127.0.0.1:{listener}': cannot listen there (Address already in "
        "use): choose another port, or stop what holds it"]
    assert "spawner" not in res.stderr and not case.socket.exists() and not case.data_dir.exists()


def test_missing_loop_control_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "LOOP_CONTROL", str(tmp_path / "loop-control"))
    settings = parse_settings(["--node-id", "n", "--endpoint", f"unix://{tmp_path}/csi.sock",
                               "--data-dir", str(tmp_path / "data")], {})
    with pytest.raises(preflight.StartupError, match="loop-control is missing: load the loop module"):
        preflight.check(settings)
    assert not (tmp_path / "data").exists()


def test_controller_mode_needs_no_data_dir_or_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller Deployment touches no files: its data dir and tools are not checked."""
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "file").write_text("x")
    settings = parse_settings(["--node-id", "n", "--mode", "controller", "--endpoint",
                               f"unix://{tmp_path}/csi.sock", "--data-dir", str(tmp_path / "file")], {})
    preflight.check(settings)


def test_help_gives_meaning_default_and_variable_of_every_flag() -> None:
    res = subprocess.run([sys.executable, "-m", "csi_driver", "--help"], capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "200"})
    text = " ".join(res.stdout.split("options:", 1)[1].split())
    for flag in FLAGS:
        # The option's own entry ("--datastore NAME ..."), not another flag's help naming it.
        start = text.index(f"{flag.name} {flag.metavar}" if flag.metavar else flag.name)
        entry = text[start:text.index("]", start) + 1]
        assert "default:" in entry and flag.env in entry, entry
        assert len(flag.help.split()) >= 3, flag.name  # a meaning, not just a word
    version = subprocess.run([sys.executable, "-m", "csi_driver", "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.strip() == "thinloop-csi 0.1.0"


@dataclass
class DriverAt(Driver):
    """The test driver on a socket path of our choosing."""

    at: Path = Path("/nonexistent")

    @property
    def socket(self) -> Path:
        return self.at


def test_a_socket_path_at_the_limit_is_served_and_dialled(workdir: Path, short_tmp: Path) -> None:
    """A socket path of exactly MAX_SOCKET_PATH_BYTES passes the check, and then the driver
    binds it and thinloopctl reaches it: the limit the check applies is the one gRPC keeps
    (its unix:/// URI form stops two bytes short; settings.grpc_target)."""
    prefix = f"{short_tmp}/run/"
    sock = Path(prefix + "s" * (MAX_SOCKET_PATH_BYTES - len(os.fsencode(prefix))))
    assert len(os.fsencode(str(sock))) == MAX_SOCKET_PATH_BYTES
    drv = DriverAt(workdir, at=sock).start()
    try:
        res = subprocess.run([sys.executable, "-m", "csi_driver.ops.ctl", "--endpoint", f"unix://{sock}",
                              "info"], capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, (res.stderr, drv.log())
        assert "ready" in res.stdout
    finally:
        drv.shutdown()
