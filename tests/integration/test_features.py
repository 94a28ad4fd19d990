"""Snapshots, restore, clone, expansion, ephemeral volumes, static volumes, thin reclaim,
ControllerModifyVolume, SnapshotMetadata and pagination, on real kernel objects."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import grpc
import pytest

from csi_driver.host import caps
from csi_driver.ops.client import CsiClient, capability
from csi_driver.proto import csi_pb2
from tests.conftest import Driver
from tests.helpers import GIB, MIB, SIZES, cap_for, code_of, create, delete, down, read_sum, tree, up, write_data

pytestmark = pytest.mark.root



def snapshot(c: CsiClient, vid: str, name: str) -> csi_pb2.Snapshot:
    return c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=vid)).snapshot


def restore(c: CsiClient, name: str, size: int, fs: str, snap: str = "", vol: str = "") -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap_for(fs)],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=size))
    if snap:
        req.volume_content_source.snapshot.snapshot_id = snap
    else:
        req.volume_content_source.volume.volume_id = vol
    return c.controller.CreateVolume(req).volume


def fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


@pytest.mark.parametrize("fs", ["ext4", "xfs", "block"])
def test_snapshot_restore_keeps_data_of_a_staged_volume(driver: Driver, fs: str) -> None:
    c = driver.client
    vol = create(c, f"src-{fs}", SIZES[fs], fs)
    src = up(c, vol.volume_id, str(driver.kubelet_dir), fs, "src")
    digest = write_data(src)
    snap = snapshot(c, vol.volume_id, f"snap-{fs}")  # taken while staged and published: fs frozen
    assert snap.ready_to_use and snap.size_bytes == SIZES[fs] and snap.creation_time.seconds > 0
    assert snap.source_volume_id == vol.volume_id
    write_data(src, seed=99)  # the source moves on; the snapshot must not
    new = restore(c, f"restored-{fs}", SIZES[fs], fs, snap=snap.snapshot_id)
    assert new.content_source.snapshot.snapshot_id == snap.snapshot_id
    dst = up(c, new.volume_id, str(driver.kubelet_dir), fs, "dst")
    assert read_sum(dst) == digest
    down(c, dst)
    down(c, src)
    for v in (new.volume_id, vol.volume_id):
        delete(c, v)
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert not (driver.data_dir / "snapshots" / snap.snapshot_id).exists()


def test_snapshot_of_thin_volume_is_sparse(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "big-thin", 10 * GIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    write_data(p, 64 * MIB)
    snap = snapshot(c, vol.volume_id, "big-thin-snap")
    image = driver.data_dir / "snapshots" / snap.snapshot_id / "disk.img"
    st = os.stat(image)
    assert st.st_size == 10 * GIB
    assert st.st_blocks * 512 < 300 * MIB, f"snapshot allocated {st.st_blocks * 512} bytes"
    # SnapshotMetadata knows exactly which ranges hold data
    ranges = [b for r in c.snapmeta.GetMetadataAllocated(csi_pb2.GetMetadataAllocatedRequest(
        snapshot_id=snap.snapshot_id, max_results=16)) for b in r.block_metadata]
    assert sum(b.size_bytes for b in ranges) == st.st_blocks * 512 or \
        abs(sum(b.size_bytes for b in ranges) - st.st_blocks * 512) < 16 * MIB
    down(c, p)
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    delete(c, vol.volume_id)


def test_snapshot_metadata_delta_finds_the_changed_blocks(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "cbt", 32 * MIB, "block")
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "block")
    with open(p.target, "r+b", buffering=0) as dev:
        dev.write(b"a" * MIB)
        os.fsync(dev.fileno())
    s1 = snapshot(c, vol.volume_id, "cbt-1")
    with open(p.target, "r+b", buffering=0) as dev:
        dev.seek(8 * MIB)
        dev.write(b"b" * (128 << 10))
        os.fsync(dev.fileno())
    s2 = snapshot(c, vol.volume_id, "cbt-2")
    responses = list(c.snapmeta.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(
        base_snapshot_id=s1.snapshot_id, target_snapshot_id=s2.snapshot_id)))
    ranges = [(b.byte_offset, b.size_bytes) for r in responses for b in r.block_metadata]
    assert ranges == [(8 * MIB, 128 << 10)]
    assert responses[0].volume_capacity_bytes == 32 * MIB
    # starting_offset past the change: nothing; max_results pages the allocated stream
    after = list(c.snapmeta.GetMetadataDelta(csi_pb2.GetMetadataDeltaRequest(
        base_snapshot_id=s1.snapshot_id, target_snapshot_id=s2.snapshot_id, starting_offset=9 * MIB)))
    assert [b for r in after for b in r.block_metadata] == []
    pages = list(c.snapmeta.GetMetadataAllocated(csi_pb2.GetMetadataAllocatedRequest(
        snapshot_id=s2.snapshot_id, max_results=1)))
    assert len(pages) == 2 and all(len(pg.block_metadata) == 1 for pg in pages)
    with pytest.raises(grpc.RpcError) as info:
        list(c.snapmeta.GetMetadataAllocated(csi_pb2.GetMetadataAllocatedRequest(snapshot_id="nope")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    down(c, p)
    for s in (s1, s2):
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    delete(c, vol.volume_id)


def test_clone_of_a_published_volume(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "clone-src", 64 * MIB)
    src = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4", "src")
    digest = write_data(src)
    clone = restore(c, "clone-dst", 64 * MIB, "ext4", vol=vol.volume_id)
    assert clone.content_source.volume.volume_id == vol.volume_id
    dst = up(c, clone.volume_id, str(driver.kubelet_dir), "ext4", "dst")
    assert read_sum(dst) == digest
    down(c, dst)
    down(c, src)
    delete(c, clone.volume_id)
    delete(c, vol.volume_id)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_restore_into_a_larger_volume_grows_the_filesystem(driver: Driver, fs: str) -> None:
    c = driver.client
    vol = create(c, f"small-{fs}", SIZES[fs], fs)
    snap = snapshot(c, vol.volume_id, f"small-snap-{fs}")
    big = restore(c, f"big-{fs}", SIZES[fs] * 3, fs, snap=snap.snapshot_id)
    assert big.capacity_bytes == SIZES[fs] * 3
    p = up(c, big.volume_id, str(driver.kubelet_dir), fs)
    assert fs_size(p.target) > SIZES[fs] * 2, "filesystem was not grown at first stage"
    down(c, p)
    delete(c, big.volume_id)
    delete(c, vol.volume_id)
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        capeff = next(line.split()[1] for line in f if line.startswith("CapEff"))
    return bool(int(capeff, 16) >> 24 & 1)


@pytest.mark.parametrize("fs", [
    "xfs", "block",
    pytest.param("ext4", marks=pytest.mark.skipif(
        not _has_cap_sys_resource(), reason="ext4 grows online only with CAP_SYS_RESOURCE, absent here")),
])
def test_online_expansion(driver: Driver, fs: str) -> None:
    c = driver.client
    vol = create(c, f"grow-{fs}", SIZES[fs], fs)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), fs)
    digest = write_data(p)
    new = 2 * SIZES[fs]
    rng = csi_pb2.CapacityRange(required_bytes=new)
    ctrl = c.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=rng))
    assert ctrl.node_expansion_required and ctrl.capacity_bytes == new
    resp = c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=p.target, staging_target_path=p.staging, capacity_range=rng))
    assert resp.capacity_bytes == new
    if fs == "block":
        with open(p.target, "rb") as dev:
            assert dev.seek(0, os.SEEK_END) == new
    else:
        assert fs_size(p.target) > SIZES[fs] * 1.5
    assert read_sum(p) == digest
    shrink = csi_pb2.CapacityRange(required_bytes=SIZES[fs])
    assert code_of(c.controller.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=shrink)) == grpc.StatusCode.OUT_OF_RANGE
    down(c, p)
    delete(c, vol.volume_id)


@pytest.mark.skipif(not caps.why_lacking(caps.CAP_SYS_RESOURCE),
                    reason="this host grants CAP_SYS_RESOURCE: ext4 grows online, nothing is refused")
def test_ext4_online_growth_refusal_says_which_capability_is_missing_and_what_grants_it(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "grow-refused", 64 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    rng = csi_pb2.CapacityRange(required_bytes=128 * MIB)
    with pytest.raises(grpc.RpcError) as err:
        c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=p.target, staging_target_path=p.staging, capacity_range=rng))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    detail = err.value.details() or ""
    assert caps.why_lacking(caps.CAP_SYS_RESOURCE) in detail, detail
    assert "run it privileged)" not in detail and "grows at the next stage" in detail
    down(c, p)
    delete(c, vol.volume_id)


def test_ext4_expansion_needs_the_volume_at_its_path_and_grows_by_the_next_stage(driver: Driver) -> None:
    """NodeExpandVolume grows the volume found at volume_path; an unstaged volume's old,
    empty target is not it (NOT_FOUND, nothing grown). Staged, it grows: online with
    CAP_SYS_RESOURCE, else the image now and the filesystem at the next stage."""
    c = driver.client
    vol = create(c, "grow-offline", 64 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    digest = write_data(p)
    down(c, p)
    os.makedirs(p.target)
    image = driver.data_dir / "volumes" / vol.volume_id / "disk.img"
    rng = csi_pb2.CapacityRange(required_bytes=192 * MIB)
    assert code_of(c.node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=p.target, capacity_range=rng)) == grpc.StatusCode.NOT_FOUND
    assert os.stat(image).st_size == 64 * MIB, "a refused expansion grew the image"
    os.rmdir(p.target)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    try:
        c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=p.staging, capacity_range=rng))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "CAP_SYS_RESOURCE" in str(exc.details())
        down(c, p)
        p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    assert fs_size(p.target) > 150 * MIB
    assert read_sum(p) == digest
    down(c, p)
    delete(c, vol.volume_id)


def test_inline_ephemeral_volume_lives_and_dies_with_the_pod(driver: Driver) -> None:
    c = driver.client
    target = str(driver.kubelet_dir / "pods" / "eph" / "volumes" / "v" / "mount")
    os.makedirs(os.path.dirname(target))
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-0123abcd", target_path=target, volume_capability=capability(fs_type="ext4"),
        volume_context={"csi.storage.k8s.io/ephemeral": "true", "size": "96Mi",
                        "csi.storage.k8s.io/pod.name": "eph"})
    c.node.NodePublishVolume(req)
    c.node.NodePublishVolume(req)  # idempotent
    assert 80 * MIB < fs_size(target) <= 96 * MIB
    with open(os.path.join(target, "f"), "w") as f:
        f.write("scratch")
    assert (driver.data_dir / "volumes" / "csi-0123abcd" / "disk.img").exists()
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-0123abcd", target_path=target))
    assert not os.path.exists(target)
    assert not (driver.data_dir / "volumes" / "csi-0123abcd").exists()
    bad = csi_pb2.NodePublishVolumeRequest()
    bad.CopyFrom(req)
    bad.volume_context["size"] = "lots"
    assert code_of(c.node.NodePublishVolume, bad) == grpc.StatusCode.INVALID_ARGUMENT
    assert not (driver.data_dir / "volumes" / "csi-0123abcd").exists()


def test_static_volume_made_by_hand_stages_like_a_dynamic_one(driver: Driver) -> None:
    c = driver.client
    d = driver.data_dir / "volumes" / "static-pv-1"
    d.mkdir(parents=True)
    with open(d / "disk.img", "wb") as f:
        f.truncate(128 * MIB)  # an administrator's blank image: no metadata, no filesystem
    p = up(c, "static-pv-1", str(driver.kubelet_dir), "ext4")
    digest = write_data(p)
    down(c, p)
    p = up(c, "static-pv-1", str(driver.kubelet_dir), "ext4")  # second stage: no reformat
    assert read_sum(p) == digest
    down(c, p)
    delete(c, "static-pv-1")


def test_block_volume_is_never_formatted_for_a_mount(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "raw", 32 * MIB, "block")
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "block")
    digest = write_data(p)
    down(c, p)
    staging = str(driver.kubelet_dir / "st-raw")
    os.makedirs(staging)
    assert code_of(c.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging,
        volume_capability=cap_for("ext4"))) == grpc.StatusCode.FAILED_PRECONDITION
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "block")
    assert read_sum(p) == digest
    down(c, p)
    delete(c, vol.volume_id)


def test_wrong_filesystem_is_refused_not_reformatted(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "is-ext4", 64 * MIB, "ext4")
    staging = str(driver.kubelet_dir / "st")
    os.makedirs(staging)
    assert code_of(c.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging,
        volume_capability=cap_for("xfs"))) == grpc.StatusCode.FAILED_PRECONDITION
    image = str(driver.data_dir / "volumes" / vol.volume_id / "disk.img")
    assert subprocess.run(["blkid", "-p", "-s", "TYPE", "-o", "value", image],
                          capture_output=True, text=True).stdout.strip() == "ext4"
    delete(c, vol.volume_id)


def _allocated(driver: Driver, vid: str) -> int:
    return os.stat(driver.data_dir / "volumes" / vid / "disk.img").st_blocks * 512


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_thin_reclaim_gives_deleted_space_back(driver: Driver, fs: str) -> None:
    c = driver.client
    vol = create(c, f"reclaim-{fs}", GIB, fs)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), fs)
    base = _allocated(driver, vol.volume_id)
    write_data(p, 256 * MIB)
    assert _allocated(driver, vol.volume_id) - base >= 256 * MIB
    os.unlink(p.data_path)
    # xfs issues online discards after its log checkpoint, asynchronously: wait for them.
    deadline = time.monotonic() + 20
    while _allocated(driver, vol.volume_id) - base >= 32 * MIB and time.monotonic() < deadline:
        subprocess.run(["sync", "-f", p.target], check=True)
        time.sleep(0.2)
    reclaimed = _allocated(driver, vol.volume_id) - base
    down(c, p)
    assert reclaimed < 32 * MIB, f"online discard did not punch the holes ({reclaimed} bytes still held)"
    delete(c, vol.volume_id)


def test_modify_volume_preallocates_and_switches_reclaim(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "modify", 128 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    assert _allocated(driver, vol.volume_id) < 64 * MIB
    c.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"diskformat": "zeroedthick", "reclaim": "none"}))
    assert _allocated(driver, vol.volume_id) >= 128 * MIB
    opts = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", p.staging], capture_output=True, text=True).stdout
    assert "discard" not in opts.split(",")
    listed = c.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert listed.volume.volume_context["diskformat"] == "zeroedthick"
    assert listed.status.published_node_ids == ["test-node"]
    for bad in ({"fsType": "xfs"}, {"diskformat": "thin"}, {"reclaim": "sometimes"}):
        assert code_of(c.controller.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters=bad)) == grpc.StatusCode.INVALID_ARGUMENT
    down(c, p)
    delete(c, vol.volume_id)


def test_pagination_of_volumes_and_snapshots(driver: Driver) -> None:
    c = driver.client
    ids = [create(c, f"page-{i:02d}", 16 * MIB).volume_id for i in range(7)]
    snaps = [snapshot(c, ids[0], f"page-snap-{i}").snapshot_id for i in range(5)]

    def walk_volumes(page: int) -> list[str]:
        out, token = [], ""
        while True:
            r = c.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=page, starting_token=token))
            assert page == 0 or len(r.entries) <= page
            out += [e.volume.volume_id for e in r.entries]
            token = r.next_token
            if not token:
                return out

    def walk_snapshots(page: int) -> list[str]:
        out, token = [], ""
        while True:
            r = c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=page, starting_token=token))
            out += [e.snapshot.snapshot_id for e in r.entries]
            token = r.next_token
            if not token:
                return out

    assert walk_volumes(3) == sorted(ids) and walk_volumes(0) == sorted(ids)
    assert walk_snapshots(2) == sorted(snaps)
    first = c.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=3))
    delete(c, first.entries[-1].volume.volume_id)  # deleted between pages: nothing is skipped
    rest = c.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=first.next_token))
    assert [e.volume.volume_id for e in rest.entries] == sorted(ids)[3:]
    assert code_of(c.controller.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="zz")) == \
        grpc.StatusCode.ABORTED
    assert code_of(c.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(starting_token="zz")) == \
        grpc.StatusCode.ABORTED
    by_source = c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=ids[0]))
    assert len(by_source.entries) == 5
    assert c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=ids[1])).entries == []
    for s in snaps:
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=s))
    for v in ids:
        delete(c, v)


def test_error_paths_have_their_codes_and_change_nothing(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "err-src", 64 * MIB)
    snapshot(c, vol.volume_id, "err-snap")
    before = tree(str(driver.data_dir)) + tree(str(driver.kubelet_dir))
    C = grpc.StatusCode
    cases = [
        (c.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="x", volume_capabilities=[cap_for("ext4")], parameters={"colour": "blue"}), C.INVALID_ARGUMENT),
        (c.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="err-src", volume_capabilities=[cap_for("xfs")]), C.ALREADY_EXISTS),
        (c.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="x", volume_capabilities=[cap_for("ext4")],
            capacity_range=csi_pb2.CapacityRange(limit_bytes=MIB)), C.OUT_OF_RANGE),
        (c.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="x", volume_capabilities=[cap_for("ext4")],
            capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 45)), C.RESOURCE_EXHAUSTED),
        (c.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name="x", volume_capabilities=[capability(mode=5)]), C.INVALID_ARGUMENT),
        (c.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
            name="err-snap", source_volume_id="other"), C.ALREADY_EXISTS),
        (c.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
            name="s2", source_volume_id="missing"), C.NOT_FOUND),
        (c.controller.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id="missing"), C.NOT_FOUND),
        (c.controller.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(volume_id="missing"), C.NOT_FOUND),
        (c.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id="missing", staging_target_path=str(driver.kubelet_dir / "s"),
            volume_capability=cap_for("ext4")), C.NOT_FOUND),
        (c.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id="err-src", staging_target_path=str(driver.kubelet_dir / "s"),
            target_path=str(driver.kubelet_dir / "t"), volume_capability=cap_for("ext4")),
         C.FAILED_PRECONDITION),
    ]
    for call, request, code in cases:
        assert code_of(call, request) == code, request
    src = csi_pb2.CreateVolumeRequest(name="from-nowhere", volume_capabilities=[cap_for("ext4")])
    src.volume_content_source.snapshot.snapshot_id = "missing"
    assert code_of(c.controller.CreateVolume, src) == C.NOT_FOUND
    assert tree(str(driver.data_dir)) + tree(str(driver.kubelet_dir)) == before
    got = c.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id="err-snap")).snapshot
    assert got.source_volume_id == "err-src"
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="err-snap"))
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="err-snap"))  # idempotent
    delete(c, vol.volume_id)
    delete(c, vol.volume_id)


def test_fsgroup_ownership_applied_by_kubelet_holds(driver: Driver) -> None:
    """fsGroupPolicy File: kubelet chowns the volume to the pod's fsGroup and sets setgid on
    directories. Do what kubelet does and check a non-root member of the group can write
    and that new files inherit the group."""
    c = driver.client
    vol = create(c, "fsgroup", 64 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    gid = 4321
    os.chown(p.target, -1, gid)
    os.chmod(p.target, 0o2775)
    # The pod process starts inside the volume (cwd set while still root), as uid 1000 whose
    # only group is the fsGroup, and writes by relative path.
    run = subprocess.run(["setpriv", "--reuid=1000", f"--regid={gid}", "--clear-groups", "sh", "-c",
                          "mkdir sub && echo hi > sub/by-pod && stat -c %g sub/by-pod"],
                         capture_output=True, text=True, cwd=p.target)
    if run.returncode != 0:
        down(c, p)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(gid)
    st = os.stat(os.path.join(p.target, "sub", "by-pod"))
    assert (st.st_uid, st.st_gid) == (1000, gid)
    down(c, p)
    delete(c, vol.volume_id)


def test_checksums_of_a_larger_payload_survive_snapshot(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "payload", 128 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    data = os.urandom(48 * MIB)
    with open(os.path.join(p.target, "blob"), "wb") as f:
        f.write(data)
    snap = snapshot(c, vol.volume_id, "payload-snap")  # no fsync: the freeze must flush it
    new = restore(c, "payload-copy", 128 * MIB, "ext4", snap=snap.snapshot_id)
    q = up(c, new.volume_id, str(driver.kubelet_dir), "ext4", "copy")
    with open(os.path.join(q.target, "blob"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    down(c, q)
    down(c, p)
    delete(c, new.volume_id)
    delete(c, vol.volume_id)
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))


def test_thinloopctl_modify_and_create_with_mutable_parameters(driver: Driver) -> None:
    from csi_driver.ops import ctl
    c = driver.client
    req = csi_pb2.CreateVolumeRequest(name="vac", volume_capabilities=[cap_for("ext4")],
                                      mutable_parameters={"reclaim": "none"},
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MIB))
    vol = c.controller.CreateVolume(req).volume
    assert vol.volume_context["reclaim"] == "none"  # the VolumeAttributesClass's value won
    assert ctl.main(["--endpoint", f"unix://{driver.socket}", "modify", "vac", "reclaim=discard"]) == 0
    got = c.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="vac")).volume
    assert got.volume_context["reclaim"] == "discard"
    assert ctl.main(["--endpoint", f"unix://{driver.socket}", "modify", "vac", "fsType=xfs"]) == 1
    delete(c, vol.volume_id)
