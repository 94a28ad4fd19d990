"""Snapshots of volumes in use, on a real GlusterFS datastore: the controller asks the node
that has the volume attached to freeze it (csi_driver.volumes.datastore.freeze), copies, and the node thaws.
A pod-like writer appends fsync'd records through the node's published mount all along; the
restore, on the other node, must hold a clean filesystem (e2fsck -fn, xfs_repair -n) and
every record the writer had made durable before the snapshot's creation time, with no torn
record after them. Then the failure paths: the hold expiring while the controller is stopped,
the controller killed mid-copy, the node's driver killed while frozen, a node that does not
run or does not answer. Crashes come from failpoints (csi_driver/failpoints.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import grpc
import pytest

from csi_driver.ops.client import CsiClient
from csi_driver.proto import csi_pb2
from tests.helpers import MIB, Published
from tests.operator.conftest import wait_for_metrics_port
from tests.shared.conftest import Cluster
from tests.shared.test_gluster import cap, create, down, image, publish, unpublish, up

pytestmark = [pytest.mark.root]

RECORD = 4096
SIZES = {"ext4": 64 * MIB, "xfs": 320 * MIB}

WRITER = r"""
import os, signal, struct, sys, time
from hashlib import sha256
RECORD = 4096
book = open(sys.argv[1], "a", buffering=1)
fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for p in sys.argv[2:]]
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
i = 0
while True:
    head = struct.pack("<Q", i) + sha256(struct.pack("<Q", i)).digest()
    rec = head * (RECORD // len(head)) + head[: RECORD % len(head)]
    for fd in fds:
        os.write(fd, rec)
        os.fsync(fd)
    book.write(f"{i} {time.time():.6f}\n")  # after every copy of record i is durable
    i += 1
"""


def record(i: int) -> bytes:
    head = struct.pack("<Q", i) + sha256(struct.pack("<Q", i)).digest()
    return head * (RECORD // len(head)) + head[: RECORD % len(head)]


@dataclass
class Writer:
    """The pod: appends record i to each of its files, fsyncs each, then notes i and the time
    in its book (on the test's local disk, not the volume)."""

    proc: subprocess.Popen[bytes]
    book: Path

    def durable(self) -> list[tuple[int, float]]:
        """(record, time its last copy was durable), in order."""
        out: list[tuple[int, float]] = []
        if not self.book.exists():
            return out  # not started yet
        for line in self.book.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit():
                with contextlib.suppress(ValueError):
                    out.append((int(parts[0]), float(parts[1])))
        return out

    def count(self) -> int:
        return len(self.durable())

    def wait_for(self, n: int, what: str, seconds: float = 60.0) -> None:
        wait_for(lambda: self.count() >= n, what, seconds)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


@contextlib.contextmanager
def writing(tmp: Path, *pubs: Published) -> Iterator[Writer]:
    book = tmp / f"book-{'-'.join(p.volume_id for p in pubs)}"
    files = [os.path.join(p.target, "records") for p in pubs]
    with subprocess.Popen([sys.executable, "-c", WRITER, str(book), *files]) as proc:
        w = Writer(proc, book)
        try:
            w.wait_for(16, "the writer to get going")
            yield w
        finally:
            for p in pubs:  # a failed test may leave one frozen: the writer could not end
                subprocess.run(["fsfreeze", "--unfreeze", p.staging], capture_output=True, check=False)
            if proc.poll() is None:
                proc.kill()


def wait_for(cond: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def count_records(path: str) -> int:
    """Records from 0 on that are intact; nothing after them (no torn or foreign record)."""
    n = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(RECORD)
            if len(chunk) < RECORD or chunk != record(n):
                break
            n += 1
    assert chunk == b"", f"{path}: a torn or foreign record after record {n}"
    return n


def stamp(ts: object) -> float:
    return ts.seconds + ts.nanos / 1e9  # type: ignore[attr-defined,no-any-return]


def check_fs(img: Path, fs: str) -> None:
    """A clean filesystem. ext4's freeze leaves none of its journal to replay, so the copy is
    checked as it lies; xfs's leaves its log to replay (its lazy superblock counters are
    written at unmount), so an xfs copy is checked after its first mount and unmount, as
    any crash-consistent xfs image is (xfs_repair -n refuses a dirty log)."""
    argv = ["e2fsck", "-fn", str(img)] if fs == "ext4" else ["xfs_repair", "-n", str(img)]
    run = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, f"{' '.join(argv)}: {run.stdout[-2000:]}{run.stderr[-2000:]}"


def restore_on(cluster: Cluster, ctl: CsiClient, host: str, snap: csi_pb2.Snapshot, fs: str,
               name: str) -> Published:
    """The snapshot as a new volume: checked as it lies on the datastore, then staged on host."""
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap(fs)],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=SIZES[fs]))
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    rid = ctl.controller.CreateVolume(req).volume.volume_id
    if fs == "ext4":
        check_fs(image(cluster, "ctl", rid), fs)
    return up(cluster, host, rid, publish(ctl, rid, host, fs), fs)


def done_with(cluster: Cluster, host: str, r: Published) -> None:
    """Unstage a restore and check its filesystem again (after the log replay of its mount)."""
    down(cluster, host, r)
    check_fs(image(cluster, "ctl", r.volume_id), r.fs)


def check_restore(p: Published, writer: Writer, created: float) -> int:
    """Every record made durable before `created` is there; returns how many are."""
    n = count_records(os.path.join(p.target, "records"))
    before = [i for i, t in writer.durable() if t < created]
    assert before, "the writer had made nothing durable before the snapshot"
    assert n > max(before), f"the copy holds {n} records; record {max(before)} was durable before it was cut"
    return n


def freeze_files(cluster: Cluster, host: str = "ctl") -> list[str]:
    root = cluster.data(host) / "freeze"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def snapshot(ctl: CsiClient, name: str, vid: str) -> csi_pb2.Snapshot:
    return ctl.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=vid)).snapshot


def setup(cluster: Cluster, fs: str = "ext4", *, ctl_args: tuple[str, ...] = (), ctl_env: dict[str, str] | None = None,
          a_args: tuple[str, ...] = (), a_env: dict[str, str] | None = None) -> tuple[CsiClient, str, Published]:
    """Controller on ctl, nodes a and b; a volume staged and published on a."""
    ctl = cluster.start("ctl", "controller", *ctl_args, env=ctl_env).client
    cluster.start("a", "node", *a_args, env=a_env)
    cluster.start("b", "node")
    vid = create(ctl, f"busy-{fs}", fs, SIZES[fs])
    return ctl, vid, up(cluster, "a", vid, publish(ctl, vid, "a", fs), fs)


def metric(port: int, pattern: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(pattern + r" ([0-9.e+]+)", text)
    assert m, (pattern, text[-3000:])
    return float(m.group(1))


# -- the normal case -------------------------------------------------------------------------------

@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_snapshot_of_a_volume_in_use_on_a_restores_on_b_consistent_and_complete(
        cluster: Cluster, tmp_path: Path, fs: str) -> None:
    ctl, vid, p = setup(cluster, fs, a_args=("--metrics-address", "127.0.0.1:0"))
    with writing(tmp_path, p) as w:
        snap = snapshot(ctl, "live", vid)
        returned_at = w.count()
        assert snap.ready_to_use and w.proc.poll() is None
        w.wait_for(returned_at + 16, "writes after the snapshot: the node thawed")
    log = cluster.drivers["a"].log()
    assert len(re.findall(rf"freeze {vid}@\w+: froze {re.escape(p.staging)} ", log)) == 1, log[-3000:]
    assert len(re.findall(rf"freeze {vid}@\w+: thawed {re.escape(p.staging)} .*withdrew its request", log)) == 1
    port = wait_for_metrics_port(cluster.drivers["a"])
    assert metric(port, r'thinloop_datastore_freeze_requests_total{[^}]*outcome="frozen"[^}]*}') == 1
    assert metric(port, r"thinloop_datastore_frozen_volumes{[^}]*}") == 0
    wait_for(lambda: freeze_files(cluster) == [], "the node to remove its answer")
    r = restore_on(cluster, ctl, "b", snap, fs, f"restored-{fs}")
    n = check_restore(r, w, stamp(snap.creation_time))
    assert n < w.count(), "the writer went on after the snapshot"
    done_with(cluster, "b", r)
    down(cluster, "a", p)


def test_group_snapshot_of_volumes_in_use_on_a_and_b_is_one_point_in_time(cluster: Cluster, tmp_path: Path) -> None:
    """x (ext4) on node a, y (xfs) on node b, one writer appending record i to x then to y:
    copies of both frozen at once hold counts n_x >= n_y >= n_x - 1; copies taken at two
    moments would not (the later one runs ahead)."""
    ctl = cluster.start("ctl", "controller").client
    cluster.start("a", "node")
    cluster.start("b", "node")
    x, y = create(ctl, "x", "ext4", SIZES["ext4"]), create(ctl, "y", "xfs", SIZES["xfs"])
    px = up(cluster, "a", x, publish(ctl, x, "a", "ext4"), "ext4")
    py = up(cluster, "b", y, publish(ctl, y, "b", "xfs"), "xfs")
    with writing(tmp_path, px, py) as w:
        group = ctl.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name="across", source_volume_ids=[y, x])).group_snapshot
        returned_at = w.count()
        assert group.ready_to_use and len(group.snapshots) == 2
        w.wait_for(returned_at + 16, "writes after the group snapshot: both nodes thawed")
    for host, vid, staging in (("a", x, px.staging), ("b", y, py.staging)):
        log = cluster.drivers[host].log()
        assert re.search(rf"freeze {vid}@\w+: froze {re.escape(staging)} ", log), log[-3000:]
    by_source = {s.source_volume_id: s for s in group.snapshots}
    rx = restore_on(cluster, ctl, "b", by_source[x], "ext4", "rx")
    ry = restore_on(cluster, ctl, "a", by_source[y], "xfs", "ry")
    created = stamp(group.creation_time)
    nx, ny = check_restore(rx, w, created), check_restore(ry, w, created)
    assert nx >= ny >= nx - 1, f"the two copies are not one point in time: x {nx}, y {ny}"
    done_with(cluster, "b", rx)
    done_with(cluster, "a", ry)
    down(cluster, "a", px)
    down(cluster, "b", py)


def test_snapshot_of_a_raw_block_volume_in_use_is_flushed_not_frozen(cluster: Cluster) -> None:
    ctl = cluster.start("ctl", "controller").client
    cluster.start("a", "node")
    vid = create(ctl, "raw", "block", SIZES["ext4"])
    p = up(cluster, "a", vid, publish(ctl, vid, "a", "block"), "block")
    fd = os.open(p.target, os.O_WRONLY)
    try:
        os.pwrite(fd, record(7), 0)  # buffered in node a's page cache of the device: flushed by the freeze request
        snap = snapshot(ctl, "raw", vid)
    finally:
        os.close(fd)
    assert re.search(rf"freeze {vid}@\w+: flushed /dev/loop\d+ \(volume {vid}: raw block", cluster.drivers["a"].log())
    snap_image = cluster.data("ctl") / "snapshots" / snap.snapshot_id / "disk.img"
    with open(snap_image, "rb") as f:
        assert f.read(RECORD) == record(7)
    down(cluster, "a", p)


# -- failures ----------------------------------------------------------------------------------------

def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_the_hold_expires_while_the_controller_is_stopped(cluster: Cluster, tmp_path: Path) -> None:
    """The controller stops mid-copy (SIGSTOP, failpoint copy.while_frozen=stop) and stays
    stopped past its 2 s hold: node a records the early thaw, thaws (the writer goes on
    while the controller is still stopped), and the controller, let go on, discards its copy
    and fails UNAVAILABLE. A controller without the failpoint then takes the snapshot."""
    ctl, vid, p = setup(cluster, ctl_args=("--workers", "0", "--freeze-hold-seconds", "2"),
                        ctl_env={"THINLOOP_FAILPOINTS": "copy.while_frozen=stop"},
                        a_args=("--metrics-address", "127.0.0.1:0"))
    controller = cluster.drivers["ctl"].proc
    assert controller is not None
    outcome: list[BaseException | csi_pb2.Snapshot] = []

    def call() -> None:
        try:
            outcome.append(snapshot(ctl, "held", vid))
        except grpc.RpcError as exc:
            outcome.append(exc)

    with writing(tmp_path, p) as w:
        t = threading.Thread(target=call)
        t.start()
        try:
            wait_for(lambda: _stopped(controller.pid), "the controller to stop mid-copy")
            at_stop = w.count()
            w.wait_for(at_stop + 16, "writes while the controller is stopped: the hold expired")
        finally:
            controller.send_signal(signal.SIGCONT)
            t.join(timeout=120)
    (err,) = outcome
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert "node a thawed volume" in str(err.details()) and "the hold expired" in str(err.details())
    log = cluster.drivers["a"].log()
    assert re.search(rf"freeze {vid}@\w+: AUTO-THAW of {re.escape(p.staging)} .*the hold expired", log), log[-3000:]
    port = wait_for_metrics_port(cluster.drivers["a"])
    assert metric(port, r'thinloop_datastore_auto_thaws_total{[^}]*reason="hold_expired"[^}]*}') == 1
    assert [s for s in (cluster.data("ctl") / "snapshots").iterdir()] == []  # the copy is discarded
    wait_for(lambda: freeze_files(cluster) == [], "the requests and answers to go")
    ctl = cluster.start("ctl", "controller").client
    assert snapshot(ctl, "held", vid).ready_to_use
    down(cluster, "a", p)


@pytest.mark.parametrize("failpoint", ["freeze.after_ack", "copy.while_frozen"])
def test_the_controller_killed_while_frozen(cluster: Cluster, tmp_path: Path, failpoint: str) -> None:
    """kill -9 of the controller while node a holds the freeze, before the copy
    (freeze.after_ack) or after it, before its checks (copy.while_frozen): node a sees the
    request's lock go, records the early thaw and thaws at once (not after the 300 s hold);
    the restarted controller removes the partial copy; the retry restores consistent and
    complete."""
    ctl, vid, p = setup(cluster, ctl_env={"THINLOOP_FAILPOINTS": f"{failpoint}=kill"})
    with writing(tmp_path, p) as w:
        with pytest.raises(grpc.RpcError):
            snapshot(ctl, "again", vid)
        at_kill = w.count()
        w.wait_for(at_kill + 16, "writes after the controller died: node a thawed")
        log = cluster.drivers["a"].log()
        assert re.search(rf"AUTO-THAW of {re.escape(p.staging)} .*its controller is gone", log), log[-3000:]
        wait_for(lambda: freeze_files(cluster) == [], "node a to remove the abandoned request and its answers")
        leftovers = [s.name for s in (cluster.data("ctl") / "snapshots").iterdir()]
        assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-again.")  # the partial copy
        ctl = cluster.start("ctl", "controller").client
        assert "recovery: removed" in cluster.drivers["ctl"].log()
        assert list((cluster.data("ctl") / "snapshots").iterdir()) == []
        snap = snapshot(ctl, "again", vid)
        w.wait_for(w.count() + 16, "writes after the retry")
    r = restore_on(cluster, ctl, "b", snap, "ext4", "restored")
    check_restore(r, w, stamp(snap.creation_time))
    done_with(cluster, "b", r)
    down(cluster, "a", p)


@pytest.mark.parametrize("failpoint", ["freeze.node.after_freeze", "freeze.node.after_ack"])
def test_the_node_driver_killed_while_frozen(cluster: Cluster, tmp_path: Path, failpoint: str) -> None:
    """kill -9 of node a's driver with the filesystem frozen: before its ack the controller
    sees the driver gone and fails UNAVAILABLE naming it; after its ack the filesystem stays
    frozen through the copy, so the snapshot is good. Either way the writer waits until the
    restarted driver's recovery thaws the filesystem."""
    ctl, vid, p = setup(cluster, a_env={"THINLOOP_FAILPOINTS": f"{failpoint}=kill"})
    node = cluster.drivers["a"]
    with writing(tmp_path, p) as w:
        if failpoint.endswith("after_freeze"):
            with pytest.raises(grpc.RpcError) as info:
                snapshot(ctl, "node-died", vid)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "node a's driver stopped before it answered" in str(info.value.details())
        else:
            snap = snapshot(ctl, "node-died", vid)
        assert node.proc is not None and node.proc.wait(timeout=60) == -signal.SIGKILL
        node.proc = None
        stuck = w.count()
        time.sleep(1)  # nothing thaws it meanwhile: the writer is still held
        assert w.count() <= stuck + 1
        a = cluster.start("a", "node")
        assert re.search(rf"recovery: thawed {re.escape(p.staging)} \(/dev/loop\d+\), left frozen", a.log()), \
            a.log()[-3000:]
        w.wait_for(stuck + 16, "writes after node a's driver came back")
        wait_for(lambda: freeze_files(cluster) == [], "the request and answers to go")
        if failpoint.endswith("after_freeze"):
            snap = snapshot(ctl, "node-died", vid)  # the retry
    r = restore_on(cluster, ctl, "b", snap, "ext4", "restored")
    check_restore(r, w, stamp(snap.creation_time))
    done_with(cluster, "b", r)
    down(cluster, "a", p)


def test_a_node_that_does_not_run_or_does_not_answer_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    """Still refused, and named: node a's driver killed (nothing holds its node lock), then
    node a's driver stopped (SIGSTOP: it holds its lock but reads nothing). The request is
    withdrawn, so the node, let go on, never freezes for it."""
    ctl, vid, p = setup(cluster)
    node = cluster.drivers["a"]
    with writing(tmp_path, p):
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                snapshot(ctl, "refused", vid)
            waited = time.monotonic() - started
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "node a did not answer the request to freeze volume" in str(info.value.details())
        assert "withdrawn" in str(info.value.details())
        assert waited >= 10, waited  # at least ACK_GRACE_SECONDS
        assert freeze_files(cluster) == []
        time.sleep(2)  # the node's polls after SIGCONT: nothing to freeze
        assert "froze" not in node.log()
        node.kill()
        with pytest.raises(grpc.RpcError) as info:
            snapshot(ctl, "refused", vid)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "attached read-write to node a" in str(info.value.details())
        assert "driver is not running" in str(info.value.details())
    assert [s.name for s in (cluster.data("ctl") / "snapshots").iterdir()] == []
    cluster.start("a", "node")
    down(cluster, "a", p)
    unpublish(ctl, vid, "a")
