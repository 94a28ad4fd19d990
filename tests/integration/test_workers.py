"""The Controller and Node calls run in worker processes (csi_driver.serving.workers): started on
demand by a spawner process, they share the work, report errors with their codes, refuse a
second call on a volume another worker has in flight, go away when idle, and live and die
with the server process."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from csi_driver.proto import csi_pb2
from tests import kernel
from tests.conftest import Driver
from tests.helpers import MIB, create, delete, down, up, write_data
from tests.reliability.support import start_ready

pytestmark = pytest.mark.root

IDLE = 2.0


def spawner_of(d: Driver) -> psutil.Process:
    assert d.proc is not None
    (spawner,) = [p for p in psutil.Process(d.proc.pid).children() if "csi_driver" in " ".join(p.cmdline())]
    return spawner


def workers_of(d: Driver) -> list[psutil.Process]:
    return [p for p in spawner_of(d).children() if p.status() != psutil.STATUS_ZOMBIE]


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


@pytest.fixture
def pooled(workdir: Path) -> Driver:
    d = Driver(workdir, extra_args=["--workers", "3", "--worker-idle-seconds", str(IDLE)]).start()
    yield d  # type: ignore[misc]
    d.shutdown()


def lifecycles(d: Driver, names: list[str]) -> None:
    """One whole lifecycle per name, all at once."""
    c = d.client
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            vid = create(c, name, 64 * MIB, "ext4").volume_id
            path = up(c, vid, str(d.kubelet_dir), "ext4")
            write_data(path, MIB)
            down(c, path)
            delete(c, vid)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_workers_start_on_demand_share_the_calls_and_stop_when_idle(pooled: Driver) -> None:
    assert workers_of(pooled) == [], "no worker before the first call"
    lifecycles(pooled, [f"wk-{i}" for i in range(6)])
    assert kernel.loops_under(pooled.root) == [] and kernel.mounts_under(pooled.root) == []
    log = pooled.log()
    started = log.count("started handler worker")
    assert 2 <= started <= 3, "six lifecycles at once used more than one worker, at most three"
    pids = [w.pid for w in workers_of(pooled)]
    assert 1 <= len(pids) <= 3
    assert wait_gone(pids, timeout=IDLE + 5) == [], "idle workers exit"
    assert "idle for 2 s" in pooled.log()
    assert spawner_of(pooled).is_running()
    # The next call brings one back.
    delete(pooled.client, create(pooled.client, "again", 64 * MIB, "ext4").volume_id)
    assert pooled.log().count("started handler worker") == started + 1


def test_sequential_calls_keep_one_worker(pooled: Driver) -> None:
    c = pooled.client
    for i in range(3):
        delete(c, create(c, f"seq-{i}", 64 * MIB, "ext4").volume_id)
    assert pooled.log().count("started handler worker") == 1
    assert len(workers_of(pooled)) == 1


def test_errors_keep_their_codes(pooled: Driver) -> None:
    c = pooled.client
    with pytest.raises(grpc.RpcError) as err:
        c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(volume_id="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        c.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id="ghost", capacity_range=csi_pb2.CapacityRange(required_bytes=MIB)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "NOT_FOUND" in pooled.log()


def test_one_volume_is_worked_on_by_one_worker_at_a_time(pooled: Driver) -> None:
    """Twelve same-name creates at once over three workers make one volume; the others
    succeed idempotently or are told ABORTED."""
    c = pooled.client
    req = csi_pb2.CreateVolumeRequest(
        name="same", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MIB),
        volume_capabilities=[csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))])
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            c.controller.CreateVolume(req, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}, codes
    assert grpc.StatusCode.OK in codes
    assert [p.name for p in (pooled.data_dir / "volumes").iterdir()] == ["same"]
    delete(c, "same")


def test_a_dead_worker_takes_the_driver_down(pooled: Driver) -> None:
    assert pooled.proc is not None
    lifecycles(pooled, ["busy-1", "busy-2"])  # leaves live workers for a moment
    spawner = spawner_of(pooled)
    victim, *others = workers_of(pooled)
    victim.kill()
    assert pooled.proc.wait(timeout=30) == -signal.SIGKILL
    pooled.proc = None
    assert wait_gone([spawner.pid, *(w.pid for w in others)]) == [], \
        "the spawner and the other workers die with the server"
    assert f"(pid {victim.pid}) was killed by signal 9" in pooled.log()
    pooled.kill()  # drops the client of the dead process
    start_ready(pooled)  # restarts clean
    delete(pooled.client, create(pooled.client, "after", 64 * MIB, "ext4").volume_id)
    assert len(workers_of(pooled)) == 1


def test_a_dead_spawner_takes_the_driver_down(pooled: Driver) -> None:
    assert pooled.proc is not None
    spawner = spawner_of(pooled)
    spawner.kill()
    assert pooled.proc.wait(timeout=30) == -signal.SIGKILL
    pooled.proc = None
    assert f"handler worker spawner (pid {spawner.pid}) was killed by signal 9" in pooled.log()


def test_a_killed_server_takes_its_workers_with_it(pooled: Driver) -> None:
    delete(pooled.client, create(pooled.client, "one", 64 * MIB, "ext4").volume_id)
    pids = [spawner_of(pooled).pid, *(w.pid for w in workers_of(pooled))]
    assert len(pids) == 2
    pooled.kill()
    assert wait_gone(pids) == []


def test_sigterm_stops_the_workers_cleanly(pooled: Driver) -> None:
    delete(pooled.client, create(pooled.client, "one", 64 * MIB, "ext4").volume_id)
    pids = [spawner_of(pooled).pid, *(w.pid for w in workers_of(pooled))]
    assert pooled.stop() == 0
    assert wait_gone(pids) == []
    assert "stopped" in pooled.log()
    assert not os.path.exists(pooled.socket)


def test_without_workers_the_calls_run_in_the_server(workdir: Path) -> None:
    d = Driver(workdir, extra_args=["--workers", "0"]).start()
    try:
        assert d.proc is not None and psutil.Process(d.proc.pid).children() == []
        c = d.client
        p = up(c, create(c, "inproc", 64 * MIB, "ext4").volume_id, str(d.kubelet_dir), "ext4")
        write_data(p, MIB)
        down(c, p)
        delete(c, "inproc")
    finally:
        d.shutdown()
