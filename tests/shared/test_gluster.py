"""Shared mode end to end on a real GlusterFS datastore: a controller and two node drivers,
each a separate process on its own FUSE client of one volume, real loop devices, mkfs,
mounts and data checksums. Node loss is a SIGKILLed FUSE client (the datastore drops its
locks at once) and a SIGKILLed driver."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from csi_driver.ops.client import CsiClient, capability
from csi_driver.proto import csi_pb2
from csi_driver.settings import DATASTORE_TOPOLOGY_KEY
from csi_driver.volumes.datastore import capabilities, imagelock
from csi_driver.volumes.datastore.records import GENERATION_KEY, Heartbeat, NodeRecord, NodeRegistry
from tests.helpers import MIB, Published, code_of, read_sum, write_data
from tests.operator.conftest import Ctl, wait_for_metrics_port
from tests.shared.conftest import DATASTORE, Cluster

pytestmark = [pytest.mark.root]
ROOT = Path(__file__).resolve().parents[2]

Mode = csi_pb2.VolumeCapability.AccessMode
SIZE = 64 * MIB
DATA = 8 * MIB


def cap(fs: str, mode: int = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return capability(block=fs == "block", fs_type="" if fs == "block" else fs, mode=mode)


def create(c: CsiClient, name: str, fs: str = "ext4", size: int = SIZE) -> str:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap(fs)],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=size))
    vol = c.controller.CreateVolume(req).volume
    assert dict(vol.accessible_topology[0].segments) == {DATASTORE_TOPOLOGY_KEY: DATASTORE}
    return vol.volume_id


def publish(c: CsiClient, vid: str, node: str, fs: str = "ext4", readonly: bool = False,
            mode: int = Mode.SINGLE_NODE_WRITER) -> dict[str, str]:
    resp = c.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=node, volume_capability=cap(fs, mode), readonly=readonly))
    return dict(resp.publish_context)


def unpublish(c: CsiClient, vid: str, node: str) -> None:
    c.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node))


def paths(cluster: Cluster, host: str, vid: str) -> tuple[str, str]:
    kubelet = cluster.drivers[host].kubelet_dir
    return str(kubelet / "plugins" / "staging" / vid), str(kubelet / "pods" / vid / "mount")


def stage(cluster: Cluster, host: str, vid: str, token: dict[str, str], fs: str = "ext4") -> None:
    staging, _ = paths(cluster, host, vid)
    os.makedirs(staging, exist_ok=True)
    cluster.drivers[host].client.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=cap(fs), publish_context=token))


def up(cluster: Cluster, host: str, vid: str, token: dict[str, str], fs: str = "ext4") -> Published:
    stage(cluster, host, vid, token, fs)
    staging, target = paths(cluster, host, vid)
    cluster.drivers[host].client.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap(fs),
        publish_context=token))
    return Published(vid, fs, staging, target)


def down(cluster: Cluster, host: str, p: Published) -> None:
    node = cluster.drivers[host].client.node
    node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=p.volume_id, target_path=p.target))
    node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=p.volume_id, staging_target_path=p.staging))


def image(cluster: Cluster, host: str, vid: str) -> Path:
    return cluster.data(host) / "volumes" / vid / "disk.img"


def three(cluster: Cluster, *extra: str) -> CsiClient:
    """The controller on host ctl, nodes on hosts a and b; returns the controller's client."""
    ctl = cluster.start("ctl", "controller", *extra)
    cluster.start("a", "node", *extra)
    cluster.start("b", "node", *extra)
    return ctl.client


# -- the datastore itself ------------------------------------------------------------------------

def _posix(fd: int, kind: int, ofd: bool) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK if ofd else fcntl.F_SETLK, struct.pack("hhqqi4x", kind, 0, 0, 0, 0))
    except OSError:
        return False
    return True


def test_glusterfs_passes_locks_between_clients_and_drops_them_with_the_client(cluster: Cluster) -> None:
    """What the fence rests on, checked on this GlusterFS: fcntl (POSIX and OFD) and flock
    locks taken through one client are refused through another, and a client that dies
    takes its locks with it at once."""
    a, b = cluster.data("a"), cluster.data("b")
    a.mkdir()
    (a / "f").write_bytes(b"\0" * 4096)
    fa, fb = os.open(a / "f", os.O_RDWR), os.open(b / "f", os.O_RDWR)
    try:
        assert _posix(fa, fcntl.F_WRLCK, ofd=True)
        assert not _posix(fb, fcntl.F_WRLCK, ofd=True)
        assert not _posix(fb, fcntl.F_RDLCK, ofd=False)  # POSIX locks see OFD locks too
        assert imagelock.path_lock_state(b / "f") == imagelock.EXCLUSIVE
        fa2 = os.open(a / "f", os.O_RDWR)
        assert not _posix(fa2, fcntl.F_WRLCK, ofd=True)  # another open on the same client
        os.close(fa2)
        assert _posix(fa, fcntl.F_UNLCK, ofd=True)
        fcntl.flock(fa, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fb, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fa, fcntl.LOCK_UN)
        assert _posix(fa, fcntl.F_WRLCK, ofd=True)
        cluster.lose_host("a")
        deadline = time.monotonic() + 10
        while not _posix(fb, fcntl.F_WRLCK, ofd=True):
            assert time.monotonic() < deadline, "the dead client's lock was never released"
            time.sleep(0.01)
    finally:
        for fd in (fa, fb):
            with contextlib.suppress(OSError):  # a's client is dead: ENOTCONN
                os.close(fd)


def test_probe_of_this_glusterfs(cluster: Cluster) -> None:
    """O_DIRECT, sparse files and locks across clients work; reflink does not (snapshots
    are sparse copies). What fallocate and hole punching do is reported as found."""
    a, b = cluster.data("a"), cluster.data("b")
    cluster.init("a")
    peer = Heartbeat(NodeRegistry(a), NodeRecord("peer", DATASTORE, interval=5))
    peer.register()
    try:
        caps = capabilities.probe(b, NodeRegistry(b), "me")
    finally:
        peer.stop()
    assert caps.fs_type == "fuse.glusterfs"
    assert (caps.o_direct, caps.sparse, caps.locks, caps.locks_across, caps.reflink) == (1, 1, 1, 1, 0)
    print(f"GlusterFS capabilities: {caps}")


# -- moving a volume ----------------------------------------------------------------------------

@pytest.mark.parametrize("fs", ["ext4", "block"])
def test_move_a_to_b_and_back_keeps_the_data(cluster: Cluster, fs: str) -> None:
    ctl = three(cluster)
    vid = create(ctl, "moving", fs)
    p = up(cluster, "a", vid, publish(ctl, vid, "a", fs), fs)
    first = write_data(p, DATA, seed=1)
    assert imagelock.path_lock_state(image(cluster, "b", vid)) == imagelock.EXCLUSIVE
    down(cluster, "a", p)
    unpublish(ctl, vid, "a")
    p = up(cluster, "b", vid, publish(ctl, vid, "b", fs), fs)
    assert read_sum(p, DATA) == first
    second = write_data(p, DATA, seed=2)
    assert imagelock.path_lock_state(image(cluster, "a", vid)) == imagelock.EXCLUSIVE
    down(cluster, "b", p)
    unpublish(ctl, vid, "b")
    p = up(cluster, "a", vid, publish(ctl, vid, "a", fs), fs)
    assert read_sum(p, DATA) == second
    down(cluster, "a", p)
    unpublish(ctl, vid, "a")
    assert imagelock.path_lock_state(image(cluster, "ctl", vid)) == imagelock.FREE
    ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert not image(cluster, "ctl", vid).exists()


# -- fencing ------------------------------------------------------------------------------------

def test_publish_elsewhere_and_stage_without_permission_are_refused(cluster: Cluster) -> None:
    ctl = three(cluster)
    vid = create(ctl, "fenced")
    assert code_of(publish, ctl, vid, "nowhere") == grpc.StatusCode.NOT_FOUND
    token_a = publish(ctl, vid, "a")
    assert publish(ctl, vid, "a") == token_a
    assert code_of(publish, ctl, vid, "b") == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stage, cluster, "b", vid, {}) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stage, cluster, "b", vid, token_a) == grpc.StatusCode.FAILED_PRECONDITION
    unpublish(ctl, vid, "a")
    token_a2 = publish(ctl, vid, "a")
    assert token_a2[GENERATION_KEY] != token_a[GENERATION_KEY]
    assert code_of(stage, cluster, "a", vid, token_a) == grpc.StatusCode.FAILED_PRECONDITION  # stale
    p = up(cluster, "a", vid, token_a2)
    with pytest.raises(grpc.RpcError) as info:
        ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The permission moves to b (as after a forced detach) while a still has the image:
    # the image lock refuses b, naming a.
    unpublish(ctl, vid, "a")
    token_b = publish(ctl, vid, "b")
    with pytest.raises(grpc.RpcError) as info:
        stage(cluster, "b", vid, token_b)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "node a" in str(info.value.details())
    down(cluster, "a", p)
    p = up(cluster, "b", vid, token_b)
    down(cluster, "b", p)


def test_two_controllers_racing_publish_exactly_one_wins(cluster: Cluster) -> None:
    """Two controller processes on two hosts publish the same volume to a and to b at the
    same moment, round after round: each round exactly one wins and the record agrees."""
    ctl = three(cluster)
    ctl2 = cluster.start("ctl2", "controller").client
    rounds = 40
    for i in range(rounds):
        vid = create(ctl, f"race-{i}", "block", 1 * MIB)
        outcome: dict[str, grpc.StatusCode] = {}
        barrier = threading.Barrier(2)

        def go(c: CsiClient, node: str, vid: str = vid, outcome: dict[str, grpc.StatusCode] = outcome,
               barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                publish(c, vid, node, "block")
                outcome[node] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                outcome[node] = exc.code()

        threads = [threading.Thread(target=go, args=(ctl, "a")), threading.Thread(target=go, args=(ctl2, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(c.name for c in outcome.values()) == ["FAILED_PRECONDITION", "OK"], (i, outcome)
        winner = next(n for n, c in outcome.items() if c == grpc.StatusCode.OK)
        got = ctl2.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
        assert list(got.status.published_node_ids) == [winner]


def test_lock_outlives_idle_workers_and_a_killed_driver(cluster: Cluster) -> None:
    """The image lock is held by the loop device's own open file: it outlives the handler
    worker that took it (workers exit after --worker-idle-seconds) and the driver itself
    (kill -9); the restarted driver finds it held before serving, and b stays refused."""
    ctl = cluster.start("ctl", "controller").client
    a = cluster.start("a", "node", "--workers", "2", "--worker-idle-seconds", "0.5")
    cluster.start("b", "node")
    vid = create(ctl, "kept")
    p = up(cluster, "a", vid, publish(ctl, vid, "a"))
    digest = write_data(p, DATA)
    assert a.proc is not None
    spawner = _children(a.proc.pid)
    assert len(spawner) == 1
    deadline = time.monotonic() + 30
    while _children(spawner[0]):  # the workers, until they have been idle long enough
        assert time.monotonic() < deadline, "workers never went idle"
        time.sleep(0.1)
    assert imagelock.path_lock_state(image(cluster, "b", vid)) == imagelock.EXCLUSIVE
    a.kill()
    assert imagelock.path_lock_state(image(cluster, "b", vid)) == imagelock.EXCLUSIVE
    unpublish(ctl, vid, "a")  # as a forced detach would, while a is down
    token_b = publish(ctl, vid, "b")
    assert code_of(stage, cluster, "b", vid, token_b) == grpc.StatusCode.FAILED_PRECONDITION
    unpublish(ctl, vid, "b")
    token_a = publish(ctl, vid, "a")
    a = cluster.start("a", "node")
    assert re.search(rf"recovery: volume {vid}: its image lock is held by /dev/loop\d+", a.log()), a.log()[-3000:]
    assert imagelock.path_lock_state(image(cluster, "b", vid)) == imagelock.EXCLUSIVE
    p = up(cluster, "a", vid, token_a)  # kubelet stages and publishes again: idempotent
    assert read_sum(p, DATA) == digest
    down(cluster, "a", p)
    unpublish(ctl, vid, "a")
    p = up(cluster, "b", vid, publish(ctl, vid, "b"))
    assert read_sum(p, DATA) == digest
    down(cluster, "b", p)


def test_restart_finds_a_split_brain_and_does_not_serve_it(cluster: Cluster) -> None:
    """A volume attached on a whose attachment record now names b (released while a was
    down, without fencing a): a's restarted driver says so loudly and refuses to publish
    it again; unstaging it still works."""
    ctl = three(cluster)
    vid = create(ctl, "split")
    p = up(cluster, "a", vid, publish(ctl, vid, "a"))
    cluster.drivers["a"].kill()
    unpublish(ctl, vid, "a")
    publish(ctl, vid, "b")
    a = cluster.start("a", "node", "--metrics-address", "127.0.0.1:0")
    assert f"SPLIT BRAIN in the making for volume {vid}" in a.log()
    port = wait_for_metrics_port(a)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert re.search(rf'thinloop_datastore_split_brain{{[^}}]*volume="{vid}"[^}}]*}} 1', metrics), metrics
    assert re.search(r'thinloop_datastore_capability{[^}]*capability="locks_across"[^}]*} 1', metrics)
    _, target = paths(cluster, "a", vid)
    with pytest.raises(grpc.RpcError) as info:
        a.client.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=p.staging, target_path=target + "2", volume_capability=cap("ext4")))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not served" in str(info.value.details())
    down(cluster, "a", p)


# -- node failure --------------------------------------------------------------------------------

def test_non_graceful_node_shutdown_flow(cluster: Cluster) -> None:
    """Kubernetes' non-graceful node shutdown, step by step, with what holds at each one:
    node a dies (its datastore client and its driver are killed) with the volume staged;
    until its VolumeAttachment is deleted, the volume cannot be published elsewhere;
    ControllerUnpublishVolume then releases it; b publishes and stages it (the dead
    client's lock is gone) and finds every byte a had written and flushed."""
    ctl = three(cluster)
    vid = create(ctl, "survivor")
    p = up(cluster, "a", vid, publish(ctl, vid, "a"))
    digest = write_data(p, DATA)  # fsynced: acknowledged by the datastore
    # The node is lost: its datastore client dies, its driver (and kubelet) with it.
    cluster.lose_host("a")
    cluster.drivers["a"].kill()
    # Out-of-service taint, pods force-deleted: the attachment still names a.
    assert code_of(publish, ctl, vid, "b") == grpc.StatusCode.FAILED_PRECONDITION
    got = ctl.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
    assert list(got.status.published_node_ids) == ["a"]
    # The attach-detach controller deletes the VolumeAttachment: ControllerUnpublishVolume.
    unpublish(ctl, vid, "a")
    unpublish(ctl, vid, "a")
    # The pod starts on b.
    p_b = up(cluster, "b", vid, publish(ctl, vid, "b"))
    assert read_sum(p_b, DATA) == digest
    write_data(p_b, DATA, seed=3)
    down(cluster, "b", p_b)
    # What the dead node left (a loop device on a dead client, its mounts) goes with its reboot.
    gone = cluster.reboot("a")
    assert any(g.startswith("loop") for g in gone) and any(p.target in g for g in gone), gone


def test_partitioned_node_keeps_the_fence_until_its_client_is_gone(cluster: Cluster) -> None:
    """A node cut off from Kubernetes but still connected to the datastore keeps its lock:
    after the attachment is released, b's stage is refused until a's client is gone."""
    ctl = three(cluster)
    vid = create(ctl, "partitioned")
    up(cluster, "a", vid, publish(ctl, vid, "a"))
    unpublish(ctl, vid, "a")
    token = publish(ctl, vid, "b")
    with pytest.raises(grpc.RpcError) as info:
        stage(cluster, "b", vid, token)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "node a" in str(info.value.details())
    cluster.lose_host("a")  # fenced: its datastore client is gone
    stage(cluster, "b", vid, token)
    staging, _ = paths(cluster, "b", vid)
    cluster.drivers["b"].client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vid, staging_target_path=staging))
    cluster.reboot("a")


def test_a_node_that_loses_the_datastore_stops_offering_it(cluster: Cluster) -> None:
    three(cluster)
    a = cluster.drivers["a"].client
    info = a.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert dict(info.accessible_topology.segments) == {DATASTORE_TOPOLOGY_KEY: DATASTORE}
    assert a.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    cluster.lose_host("a")
    info = a.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "a" and not info.accessible_topology.segments
    assert not a.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_expand_on_the_controller_then_the_node(cluster: Cluster) -> None:
    """The controller grows the image on the datastore; the node that has it attached
    refreshes its loop device and grows the filesystem online (xfs: ext4's online resize
    needs CAP_SYS_RESOURCE, which a sandbox may lack)."""
    ctl = three(cluster)
    size = 320 * MIB
    vid = create(ctl, "grow", "xfs", size)
    p = up(cluster, "a", vid, publish(ctl, vid, "a", "xfs"), "xfs")
    resp = ctl.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * size)))
    assert resp.node_expansion_required and resp.capacity_bytes == 2 * size
    assert image(cluster, "ctl", vid).stat().st_size == 2 * size
    cluster.drivers["a"].client.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=p.target, staging_target_path=p.staging,
        capacity_range=csi_pb2.CapacityRange(required_bytes=2 * size)))
    st = os.statvfs(p.target)
    assert st.f_blocks * st.f_frsize > 1.5 * size
    down(cluster, "a", p)


def test_snapshot_of_an_attached_volume_restores_elsewhere(cluster: Cluster) -> None:
    """A snapshot while a has the volume attached (a freezes it at the controller's request:
    tests/shared/test_freeze_gluster.py has the busy cases), and one after it is detached
    (copied under a shared lock, with the controller's cached pages dropped first): both
    restore on b with a's data."""
    ctl = three(cluster)
    vid = create(ctl, "snapped")
    p = up(cluster, "a", vid, publish(ctl, vid, "a"))
    digest = write_data(p)
    ctl.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="while-attached", source_volume_id=vid))
    down(cluster, "a", p)
    unpublish(ctl, vid, "a")
    ctl.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="detached", source_volume_id=vid))
    for snap in ("while-attached", "detached"):
        restore = csi_pb2.CreateVolumeRequest(name=f"restored-{snap}", volume_capabilities=[cap("ext4")],
                                              capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE))
        restore.volume_content_source.snapshot.snapshot_id = snap
        rid = ctl.controller.CreateVolume(restore).volume.volume_id
        r = up(cluster, "b", rid, publish(ctl, rid, "b"))
        assert read_sum(r) == digest, snap
        down(cluster, "b", r)
        unpublish(ctl, rid, "b")


def test_thinloopctl_shows_holders_and_releases_only_a_fenced_node(cluster: Cluster, run_ctl: Ctl) -> None:
    ctl = three(cluster)
    vid = create(ctl, "held")
    up(cluster, "a", vid, publish(ctl, vid, "a"))
    data = f"--data-dir={cluster.data('ctl')}"
    shown = run_ctl("-o", "json", "datastore", "holders", data)
    assert shown.code == 0, shown.err
    (row,) = shown.json()["volumes"]
    assert row["volume"] == vid and row["lock"] == "exclusive" and row["note"] == ""
    assert row["attached_to"][0].startswith("a (read-write") and row["holders"][0].startswith("a (/dev/loop")
    alive = {n["node"]: n["alive"] for n in run_ctl("-o", "json", "datastore", "nodes", data).json()["nodes"]}
    assert alive == {"a": True, "b": True}
    refused = run_ctl("datastore", "release", vid, "--node", "a", data)
    assert refused.code == 2 and "--node-fenced" in refused.err
    as_json = run_ctl("-o", "json", "datastore", "release", vid, "--node", "a", data)
    assert as_json.code == 2 and as_json.json()["error"]["kind"] == "USAGE"
    refused = run_ctl("datastore", "release", vid, "--node", "a", "--node-fenced", data)
    assert refused.code == 1 and "not fenced" in refused.err  # a's driver and client are alive
    table = run_ctl("datastore", "holders", data)
    assert table.code == 0 and vid in table.out and "NODES" in table.out
    # Node a is lost, and fenced: its client and its driver are gone.
    cluster.lose_host("a")
    cluster.drivers["a"].kill()
    noted = run_ctl("-o", "json", "datastore", "holders", data)
    assert noted.code == 3  # something that does not add up
    (row,) = noted.json()["volumes"]
    assert row["lock"] == "free" and "stale records" in row["note"]
    released = run_ctl("datastore", "release", vid, "--node", "a", "--node-fenced", data)
    assert released.code == 0, released.err
    assert "removed the attachment" in released.out
    again = run_ctl("datastore", "release", vid, "--node", "a", "--node-fenced", data)
    assert again.code == 5 and "nothing to release" in again.out
    assert run_ctl("datastore", "release", "ghost", "--node", "a", "--node-fenced", data).code == 4
    p = up(cluster, "b", vid, publish(ctl, vid, "b"))
    down(cluster, "b", p)
    cluster.reboot("a")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("csi-sanity") is None, reason="csi-sanity not on PATH")
def test_csi_sanity_in_shared_mode_on_glusterfs(cluster: Cluster) -> None:
    """scripts/sanity.sh's shared-mode run with its datastore on this GlusterFS volume."""
    env = {**os.environ, "SANITY_RUNS": "shared", "SANITY_DATASTORE_DIR": str(cluster.data("ctl")),
           "PYTHON": sys.executable}
    cluster.data("ctl").mkdir()
    run = subprocess.run(["bash", str(ROOT / "scripts" / "sanity.sh")], capture_output=True, text=True,
                         timeout=1200, check=False, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    (line,) = re.findall(r"Ran \d+ of \d+ Specs.*", run.stdout)
    assert "| 0 Failed |" in line and int(line.split()[1]) >= 85, line
    print(line)


def test_bench_shared_mode_runs_and_leaves_nothing(cluster: Cluster, tmp_path: Path, short_tmp: Path) -> None:
    """A tiny run of `bench.py shared` on three of this datastore's clients (no timing
    assertions): it moves a volume, runs fio both ways, and removes what it made."""
    from tests.integration.test_bench_smoke import load_bench
    cluster.data("ctl").mkdir()
    dirs = ",".join(str(cluster.data(h)) for h in ("ctl", "a", "b"))
    out = tmp_path / "shared.json"
    rc = load_bench().main(["shared", "--datastore-dirs", dirs, "--moves", "2", "--runtime", "1", "--rounds", "1",
                            "--size", "64Mi", "--file-size", "16Mi", "--base-dir", str(short_tmp / "bench"),
                            "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["result"]
    assert res["move"]["n"] == 2 and res["raw_move"]["n"] == 2
    assert set(res["move_steps"]) == {"NodeUnpublishVolume", "NodeUnstageVolume", "ControllerUnpublishVolume",
                                      "ControllerPublishVolume", "NodeStageVolume", "NodePublishVolume"}
    assert set(res["jobs"]) == {"randread_4k", "randwrite_4k", "seqwrite_1m"}
    assert res["filesystem"] == "fuse.glusterfs"
    assert [p.name for p in cluster.data("ctl").iterdir()] == [], "the run removes its data"
    assert not any((short_tmp / "bench").iterdir())


def test_readers_on_two_nodes_never_beside_a_writer(cluster: Cluster) -> None:
    """MULTI_NODE_READER_ONLY: a and b attach read-only at once (shared locks, read-only
    loop devices) and read the same bytes; a writer is refused while they do."""
    ctl = three(cluster)
    vid = create(ctl, "shelf")
    p = up(cluster, "a", vid, publish(ctl, vid, "a"))
    digest = write_data(p, DATA)
    down(cluster, "a", p)
    unpublish(ctl, vid, "a")
    ro = Mode.MULTI_NODE_READER_ONLY
    readers = {}
    for host in ("a", "b"):
        token = publish(ctl, vid, host, mode=ro)
        staging, target = paths(cluster, host, vid)
        os.makedirs(staging, exist_ok=True)
        node = cluster.drivers[host].client.node
        node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=cap("ext4", ro), publish_context=token))
        node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap("ext4", ro),
            publish_context=token, readonly=True))
        readers[host] = Published(vid, "ext4", staging, target)
    assert imagelock.path_lock_state(image(cluster, "ctl", vid)) == imagelock.SHARED
    for host, r in readers.items():
        assert read_sum(r, DATA) == digest, host
        with pytest.raises(OSError):
            write_data(r, 4096)
    cluster.start("c", "node")
    assert code_of(publish, ctl, vid, "c") == grpc.StatusCode.FAILED_PRECONDITION
    for host, r in readers.items():
        down(cluster, host, r)
        unpublish(ctl, vid, host)
    assert imagelock.path_lock_state(image(cluster, "ctl", vid)) == imagelock.FREE
