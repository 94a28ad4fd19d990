"""Socket hygiene: the endpoint is created owner-only (0600); the driver refuses to start
on an endpoint that is a symlink, not a socket, someone else's socket, or a live socket,
with a non-zero exit and one clear line; a stale socket of its own is replaced."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NODE_ID, Driver
from tests.reliability.support import start_ready

pytestmark = pytest.mark.root


def run_driver(root: Path, endpoint: Path) -> subprocess.CompletedProcess[str]:
    """Start `python -m csi_driver` on endpoint; it is expected to refuse and exit."""
    return subprocess.run(
        [sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{endpoint}",
         "--data-dir", str(root / "data"), "--kubelet-dir", str(root / "kubelet"),
         "--node-id", NODE_ID, "--log-level", "debug"],
        capture_output=True, text=True, timeout=60, check=False)


def bound_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


def make_symlink_to_socket(path: Path) -> None:
    bound_socket(path.with_name("real.sock")).close()
    os.symlink(path.with_name("real.sock"), path)


def make_symlink_to_file(path: Path) -> None:
    path.with_name("victim").write_text("do not replace")
    os.symlink(path.with_name("victim"), path)


def make_file(path: Path) -> None:
    path.write_text("not a socket")


def make_dir(path: Path) -> None:
    path.mkdir()


def make_foreign_socket(path: Path) -> None:
    bound_socket(path).close()
    os.chown(path, 65534, 65534)


@pytest.mark.parametrize(("make", "words"), [
    (make_symlink_to_socket, "is a symlink"),
    (make_symlink_to_file, "is a symlink"),
    (make_file, "is not a socket"),
    (make_dir, "is not a socket"),
    (make_foreign_socket, "belongs to uid 65534"),
])
def test_refuses_unsafe_endpoint(workdir: Path, make: Callable[[Path], None], words: str) -> None:
    run = workdir / "run"
    run.mkdir()
    endpoint = run / "csi.sock"
    make(endpoint)
    before = os.lstat(endpoint)
    res = run_driver(workdir, endpoint)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("thinloop-csi: ") and words in lines[0] and str(endpoint) in lines[0], lines
    after = os.lstat(endpoint)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode), "the endpoint was touched"
    assert not (workdir / "data").exists(), "nothing was set up before the refusal"
    if endpoint.with_name("victim").exists():
        assert endpoint.with_name("victim").read_text() == "do not replace"


def test_refuses_a_live_socket(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir()
    endpoint = run / "csi.sock"
    listener = bound_socket(endpoint)
    listener.listen(1)
    try:
        res = run_driver(workdir, endpoint)
    finally:
        listener.close()
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "another process is serving" in lines[0], res.stderr


def test_stale_socket_is_replaced_and_owner_only(workdir: Path) -> None:
    d = Driver(workdir)
    d.socket.parent.mkdir(parents=True)
    bound_socket(d.socket).close()  # bound once, nobody listens: stale
    start_ready(d)  # the driver answers at the path, so the socket there is its own
    try:
        # (Not compared by inode: the filesystem may give the new socket the stale one's
        # freed inode number, as ext4 did here once.)
        st = os.lstat(d.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == os.geteuid()
        assert "removed stale socket" in d.log()
    finally:
        assert d.stop() == 0
    assert not d.socket.exists(), "a clean stop removes the socket"


def test_killed_driver_socket_is_taken_over(workdir: Path) -> None:
    d = Driver(workdir)
    start_ready(d)
    d.kill()
    assert d.socket.exists()
    start_ready(d)
    assert stat.S_IMODE(os.lstat(d.socket).st_mode) == 0o600
    assert d.stop() == 0
