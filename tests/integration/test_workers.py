"""The Controller and Node calls run in forked worker processes (csi_driver.workers): they
share the work, report errors with their codes, refuse a second call on a volume another
worker has in flight, and live and die with the server process."""

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

pytestmark = pytest.mark.root


def workers_of(d: Driver) -> list[psutil.Process]:
    assert d.proc is not None
    return [p for p in psutil.Process(d.proc.pid).children() if "csi_driver" in " ".join(p.cmdline())]


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    return alive


@pytest.fixture
def pooled(workdir: Path) -> Driver:
    d = Driver(workdir, extra_args=["--workers", "3"]).start()
    yield d  # type: ignore[misc]
    d.shutdown()


def test_calls_run_in_the_workers_and_a_lifecycle_works(pooled: Driver) -> None:
    workers = workers_of(pooled)
    assert len(workers) == 3
    cpu0 = {w.pid: sum(w.cpu_times()[:2]) for w in workers}
    c = pooled.client
    vols = [create(c, f"wk-{i}", 64 * MIB, "ext4").volume_id for i in range(6)]
    paths = [up(c, v, str(pooled.kubelet_dir), "ext4") for v in vols]
    for p in paths:
        write_data(p, MIB)
        down(c, p)
    for v in vols:
        delete(c, v)
    used = [w for w in workers if sum(w.cpu_times()[:2]) > cpu0[w.pid]]
    assert len(used) >= 2, "the calls were spread over the workers"
    assert kernel.loops_under(pooled.root) == [] and kernel.mounts_under(pooled.root) == []
    assert "started 3 handler worker processes" in pooled.log()


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
    victim, *others = workers_of(pooled)
    victim.kill()
    assert pooled.proc.wait(timeout=30) == -signal.SIGKILL
    pooled.proc = None
    assert wait_gone([w.pid for w in others]) == [], "the other workers die with the server"
    assert f"handler worker 0 (pid {victim.pid}) was killed by signal 9" in pooled.log()
    pooled.start()  # restarts clean
    delete(pooled.client, create(pooled.client, "after", 64 * MIB, "ext4").volume_id)
    assert len(workers_of(pooled)) == 3


def test_a_killed_server_takes_its_workers_with_it(pooled: Driver) -> None:
    pids = [w.pid for w in workers_of(pooled)]
    pooled.kill()
    assert wait_gone(pids) == []


def test_sigterm_stops_the_workers_cleanly(pooled: Driver) -> None:
    pids = [w.pid for w in workers_of(pooled)]
    assert pooled.stop() == 0
    assert wait_gone(pids) == []
    assert "stopped" in pooled.log()
    assert not os.path.exists(pooled.socket)


def test_without_workers_the_calls_run_in_the_server(workdir: Path) -> None:
    d = Driver(workdir, extra_args=["--workers", "0"]).start()
    try:
        assert workers_of(d) == []
        c = d.client
        p = up(c, create(c, "inproc", 64 * MIB, "ext4").volume_id, str(d.kubelet_dir), "ext4")
        write_data(p, MIB)
        down(c, p)
        delete(c, "inproc")
    finally:
        d.shutdown()
