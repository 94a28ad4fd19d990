"""One driver per data dir (issue 14, class 1). A second driver on the same data dir used to
run start-up recovery over the first one's work in progress (removing its unfinished
volume); now it refuses to start, with one line naming the holder, before it touches
anything. The lock lives exactly as long as the driver's processes, and operator commands
that change the data dir coordinate with a running driver through the in-flight keys."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from csi_driver.volumes.datalock import LOCK_FILE, DataDirLock, DataDirLocked
from tests.conftest import NODE_ID, Driver
from tests.helpers import MIB, create, delete
from tests.reliability.support import listed_volumes, start_ready

O_CLOEXEC_OCTAL = 0o2000000  # fdinfo "flags:" is octal


def _children(pid: int) -> set[int]:
    """Every live descendant of pid."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            parents[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _wait_for(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _second_driver(first: Driver) -> list[str]:
    return [sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{first.root}/run2/csi.sock",
            "--data-dir", str(first.data_dir), "--kubelet-dir", str(first.kubelet_dir),
            "--node-id", NODE_ID]


@pytest.mark.root
def test_second_driver_refuses_and_leaves_the_first_ones_create_alone(workdir: Path) -> None:
    """The issue's case: a create is half-way (held there by a failpoint) when a second
    driver starts on the same data dir with its own socket."""
    first = Driver(workdir, env={"THINLOOP_FAILPOINTS": "create.after_image=stop"}).start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    stopped: list[int] = []
    try:
        pending = pool.submit(create, first.client, "slow", 64 * MIB, "ext4", diskformat="zeroedthick")
        assert first.proc is not None
        _wait_for("the create to stop half-way", lambda: stopped.extend(
            p for p in _children(first.proc.pid) if _state(p) == "T") or stopped)  # type: ignore[union-attr]
        unfinished = [n for n in os.listdir(first.data_dir / "volumes") if n.startswith(".tmp-slow")]
        assert unfinished, "the create has not begun its image"

        second = subprocess.Popen(_second_driver(first), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            _wait_for("the second driver to exit (or to remove the first one's work)",
                      lambda: second.poll() is not None
                      or not (first.data_dir / "volumes" / unfinished[0]).exists())
        finally:
            if second.poll() is None:
                second.kill()
            out, err = second.communicate(timeout=30)
        assert (first.data_dir / "volumes" / unfinished[0]).exists(), \
            "the second driver's recovery removed the first one's unfinished volume"
        assert second.returncode == 1, (out, err)
        assert len(err.strip().splitlines()) == 1, err
        assert f"pid {first.proc.pid} host " in err and str(first.data_dir) in err, err
        assert "Traceback" not in err
        assert not (first.root / "run2" / "csi.sock").exists(), "the second driver served"

        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        vol = pending.result(timeout=120)
        assert vol.volume_id == "slow"
        assert listed_volumes(first.client) == ["slow"]
        delete(first.client, "slow")
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        pool.shutdown(wait=False, cancel_futures=True)
        first.shutdown()


@pytest.mark.root
def test_a_second_driver_on_the_same_endpoint_names_the_holder_too(driver: Driver) -> None:
    """A hand-started copy with the node pod's very flags: the data dir is what is named."""
    res = subprocess.run(driver.args(), capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert driver.proc is not None
    assert len(lines) == 1 and f"pid {driver.proc.pid} host " in lines[0], res.stderr
    driver.client.identity.Probe(csi_pb2.ProbeRequest())  # the first one still serves its socket


def _holders(lock: Path) -> dict[int, int]:
    """pid -> fdinfo flags of every descriptor open on the lock file, in any process."""
    want = os.path.realpath(lock)
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") != want:
                    continue
                info = Path(f"/proc/{name}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            flags = next(line.split()[1] for line in info.splitlines() if line.startswith("flags:"))
            found[int(name)] = int(flags, 8)
    return found


@pytest.mark.root
def test_lock_is_held_by_the_drivers_processes_only_and_dies_with_them(workdir: Path) -> None:
    d = Driver(workdir).start()
    try:
        create(d.client, "warm", 16 * MIB, "ext4")  # starts a handler worker
        assert d.proc is not None
        front = d.proc.pid
        tree = _children(front) | {front}
        lock = d.data_dir / LOCK_FILE
        holders = _holders(lock)
        assert front in holders and len(holders) >= 3, "front, spawner and a worker share it"
        assert set(holders) <= tree, f"a process outside the driver holds the lock: {holders}"
        assert all(flags & O_CLOEXEC_OCTAL for flags in holders.values()), \
            "the lock descriptor must be close-on-exec: no program the driver runs may keep it"
        assert DataDirLock(lock).holder() == lock.read_text().strip()
        assert lock.read_text().startswith(f"pid {front} host ")

        os.kill(front, signal.SIGKILL)  # a crash: the spawner and workers follow it
        d.proc.wait(timeout=30)
        d.proc = None
        d.kill()
        # The kernel drops the lock as the last of them exits (its descriptors are
        # released a moment after /proc stops listing them).
        _wait_for("the dead driver's lock to be free", lambda: DataDirLock(lock).holder() is None)
        assert not (tree & set(_holders(lock)))
        start_ready(d)
        assert d.proc is not None
        assert lock.read_text().startswith(f"pid {d.proc.pid} host ")
        assert listed_volumes(d.client) == ["warm"]
        delete(d.client, "warm")
    finally:
        d.shutdown()


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    first = DataDirLock(path)
    first.acquire()
    try:
        with pytest.raises(DataDirLocked) as info:
            DataDirLock(path).acquire()
        assert info.value.holder.startswith(f"pid {os.getpid()} host ")
        assert str(path) in str(info.value)
    finally:
        first.release()
    again = DataDirLock(path)
    again.acquire()  # released: free again
    again.release()
    assert DataDirLock(path).holder() is None


@pytest.mark.root
def test_a_killed_driver_restarts_on_its_data_dir(workdir: Path) -> None:
    """What the lock must never do: keep a restarted driver out after a crash. Killed with
    a handler worker and a call mid-flight, the driver restarts at once on the same dir."""
    d = Driver(workdir, env={"THINLOOP_FAILPOINTS": "stage.after_attach=kill"}).start()
    try:
        vol = create(d.client, "k", 32 * MIB, "ext4")
        staging = d.path("st")
        os.makedirs(staging)
        with pytest.raises(grpc.RpcError):
            d.client.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=staging,
                volume_capability=csi_pb2.VolumeCapability(
                    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                    access_mode=csi_pb2.VolumeCapability.AccessMode(
                        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))))
        assert d.proc is not None and d.proc.wait(timeout=30) == -signal.SIGKILL
        d.proc = None
        d.kill()
        d.env = {}
        start_ready(d)
        d.client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging))
        delete(d.client, vol.volume_id)
    finally:
        d.shutdown()
