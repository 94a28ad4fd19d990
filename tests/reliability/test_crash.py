"""Crash at every step: the driver is SIGKILLed (failpoints) inside each multi-step RPC.
After a restart the retried call succeeds, nothing half-made is listed or staged, no image
is formatted twice (its filesystem UUID stays), no loop device or mount is left that no
volume owns, and data written before the crash is intact."""

from __future__ import annotations

import os

import grpc
import pytest

from csi_driver.host.linux import HostOS
from csi_driver.ops.client import CsiClient
from csi_driver.proto import csi_pb2
from tests import kernel
from tests.conftest import Driver
from tests.helpers import (
    SIZES,
    Published,
    cap_for,
    create,
    delete,
    down,
    publish,
    read_sum,
    stage,
    up,
    write_data,
)
from tests.reliability.support import (
    assert_everything_owned,
    crash_then_retry,
    fs_uuid,
    image_of,
    is_frozen,
    listed_snapshots,
    listed_volumes,
    mounts_of,
    start_ready,
    thaw_quietly,
)

pytestmark = pytest.mark.root



def prepared(d: Driver, name: str, fs: str = "ext4") -> tuple[Published, str, str]:
    """A volume with data written through a publish, then unpublished and unstaged.
    Returns the publication (for paths), the data checksum and the filesystem UUID."""
    c = d.client
    vol = create(c, name, SIZES[fs], fs)
    p = up(c, vol.volume_id, str(d.kubelet_dir), fs)
    digest = write_data(p, seed=len(name))
    down(c, p)
    uuid = fs_uuid(image_of(d, vol.volume_id)) if fs != "block" else ""
    assert fs == "block" or uuid, "a filesystem volume has a UUID"
    return p, digest, uuid


def check_data(d: Driver, p: Published, digest: str, uuid: str) -> None:
    """Stage and publish (again), compare data and UUID, tear down, check ownership."""
    c = d.client
    stage(c, p.volume_id, p.staging, p.fs)
    publish(c, p.volume_id, p.staging, p.target, p.fs)
    assert read_sum(p) == digest, "data written before the crash changed"
    assert_everything_owned(d, c)
    down(c, p)
    if uuid:
        assert fs_uuid(image_of(d, p.volume_id)) == uuid, "the image was formatted again"
    assert_everything_owned(d, c)


# -- CreateVolume -------------------------------------------------------------------------

@pytest.mark.parametrize("failpoint", ["create.after_image", "meta.before_replace",
                                       "volume.create.after_build", "volume.create.before_rename"])
def test_create_volume(driver: Driver, failpoint: str) -> None:
    def action(c: CsiClient) -> csi_pb2.Volume:
        assert "crash-create" not in listed_volumes(c), "a half-made volume is listed"
        return create(c, "crash-create", SIZES["ext4"])

    vol = crash_then_retry(driver, failpoint, action)
    assert "recovery: removed unfinished volume .tmp-crash-create" in driver.log()
    c = driver.client
    assert listed_volumes(c) == ["crash-create"]
    uuid = fs_uuid(image_of(driver, vol.volume_id))
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    digest = write_data(p)
    down(c, p)
    check_data(driver, p, digest, uuid)
    delete(c, vol.volume_id)


def test_create_block_volume(driver: Driver) -> None:
    vol = crash_then_retry(driver, "volume.create.before_rename",
                           lambda c: create(c, "crash-blk", SIZES["block"], "block"))
    c = driver.client
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "block")
    digest = write_data(p)
    down(c, p)
    check_data(driver, p, digest, "")
    delete(c, vol.volume_id)


def test_half_made_volume_cannot_be_staged(driver: Driver) -> None:
    """Between the crash and the restart the temp directory exists; staging by the id
    finds nothing, and nothing is attached."""
    driver.stop()
    driver.env = {"THINLOOP_FAILPOINTS": "volume.create.before_rename=kill"}
    start_ready(driver)
    with pytest.raises(Exception):  # noqa: B017 - the driver dies; any RPC error
        create(driver.client, "halfmade", SIZES["ext4"])
    driver.kill()
    assert any(n.startswith(".tmp-halfmade") for n in os.listdir(driver.data_dir / "volumes"))
    driver.env = {"THINLOOP_FAILPOINTS": "stage.after_attach=kill"}  # proves no attach happens
    start_ready(driver)
    c = driver.client
    staging = driver.path("plugins/staging/halfmade")
    os.makedirs(staging)
    with pytest.raises(grpc.RpcError) as info:
        stage(c, "halfmade", staging, "ext4")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert listed_volumes(c) == []
    driver.stop()
    driver.env = {}


# -- DeleteVolume -------------------------------------------------------------------------

def test_delete_volume(driver: Driver) -> None:
    create(driver.client, "crash-del", SIZES["ext4"])
    crash_then_retry(driver, "volume.delete.after_rename", lambda c: delete(c, "crash-del"))
    assert "recovery: finished deleting volume .trash-crash-del" in driver.log()
    assert listed_volumes(driver.client) == []
    assert os.listdir(driver.data_dir / "volumes") == []


# -- NodeStageVolume / NodeUnstageVolume --------------------------------------------------

@pytest.mark.parametrize("fs", ["ext4", "xfs", "block"])
def test_stage_after_attach(driver: Driver, fs: str) -> None:
    p, digest, uuid = prepared(driver, f"crash-att-{fs}", fs)
    crash_then_retry(driver, "stage.after_attach", lambda c: stage(c, p.volume_id, p.staging, fs))
    assert_everything_owned(driver, driver.client)
    check_data(driver, p, digest, uuid)
    delete(driver.client, p.volume_id)


def test_stage_after_mount(driver: Driver) -> None:
    p, digest, uuid = prepared(driver, "crash-mnt")
    crash_then_retry(driver, "stage.after_mount", lambda c: stage(c, p.volume_id, p.staging, "ext4"))
    assert mounts_of(p.staging) == 1, "the retry stacked a second mount"
    check_data(driver, p, digest, uuid)
    delete(driver.client, p.volume_id)


def test_stage_after_mkfs_never_formats_twice(driver: Driver) -> None:
    """Only an image without a filesystem is formatted at stage: a hand-made (statically
    provisioned) one. The crash comes right after mkfs; the retry must keep that fs."""
    vdir = driver.data_dir / "volumes" / "static-1"
    vdir.mkdir(parents=True)
    with open(vdir / "disk.img", "wb") as f:
        f.truncate(SIZES["ext4"])
    staging = driver.path("plugins/staging/static-1")
    crash_then_retry(driver, "stage.after_mkfs", lambda c: stage(c, "static-1", staging, "ext4"))
    c = driver.client
    loop = next(lp for lp in HostOS().loop_devices()
                if lp.backing_file == os.path.realpath(vdir / "disk.img"))
    uuid = fs_uuid(loop.device)
    assert uuid, "the crash came after mkfs"
    p = Published("static-1", "ext4", staging, driver.path("pods/static-1/mount"))
    publish(c, p.volume_id, p.staging, p.target, "ext4")
    digest = write_data(p)
    down(c, p)
    check_data(driver, p, digest, uuid)
    delete(c, "static-1")


@pytest.mark.parametrize("fs", ["ext4", "block"])
def test_unstage_after_unmount(driver: Driver, fs: str) -> None:
    c = driver.client
    vol = create(c, f"crash-uns-{fs}", SIZES[fs], fs)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), fs)
    digest = write_data(p)
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=p.volume_id,
                                                                  target_path=p.target))
    uuid = fs_uuid(image_of(driver, p.volume_id)) if fs != "block" else ""
    crash_then_retry(driver, "unstage.after_unmount", lambda c: c.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=p.volume_id, staging_target_path=p.staging)))
    assert mounts_of(p.staging) == 0
    assert_everything_owned(driver, driver.client)
    assert kernel.loops_under(driver.root) == [], "the retried unstage detaches the loop"
    check_data(driver, p, digest, uuid)
    delete(driver.client, p.volume_id)


# -- NodeExpandVolume ---------------------------------------------------------------------

@pytest.mark.parametrize(("failpoint", "fs"), [("expand.after_grow_image", "ext4"),
                                               ("expand.after_refresh", "ext4"),
                                               ("expand.after_grow_image", "xfs"),
                                               ("expand.after_refresh", "xfs")])
def test_expand(driver: Driver, failpoint: str, fs: str) -> None:
    c = driver.client
    vol = create(c, f"crash-exp-{fs}", SIZES[fs], fs)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), fs)
    digest = write_data(p)
    uuid = fs_uuid(image_of(driver, p.volume_id))
    new_size = SIZES[fs] * 2
    before = os.statvfs(p.target)

    def expand(c: CsiClient) -> csi_pb2.NodeExpandVolumeResponse:
        return c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=p.volume_id, volume_path=p.target, staging_target_path=p.staging,
            volume_capability=cap_for(fs), capacity_range=csi_pb2.CapacityRange(required_bytes=new_size)))

    try:
        resp = crash_then_retry(driver, failpoint, expand)
        assert resp.capacity_bytes == new_size
    except grpc.RpcError as exc:
        # Without CAP_SYS_RESOURCE the kernel refuses ext4's online resize; the driver
        # then grows the filesystem at the next stage. Restage to get there.
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or "CAP_SYS_RESOURCE" not in str(exc.details()):
            raise
        down(driver.client, p)
        stage(driver.client, p.volume_id, p.staging, fs)
        publish(driver.client, p.volume_id, p.staging, p.target, fs)
    after = os.statvfs(p.target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize * 1.5, "fs did not grow"
    assert read_sum(p) == digest
    down(driver.client, p)
    check_data(driver, p, digest, uuid)
    delete(driver.client, p.volume_id)


def test_expand_deferred_growth_meta_write(driver: Driver) -> None:
    """Expanding a block-published volume that holds a filesystem records "grow the fs at
    the next stage" in meta (the driver never grows what a raw block user has); a crash
    before the replace leaves a half-written temp file, removed at start-up, and the retry
    records it."""
    p, digest, uuid = prepared(driver, "crash-meta")
    blk = up(driver.client, p.volume_id, str(driver.kubelet_dir), "block", name="crash-meta-raw")

    def expand(c: CsiClient) -> csi_pb2.NodeExpandVolumeResponse:
        return c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=p.volume_id, volume_path=blk.target,
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZES["ext4"])))

    crash_then_retry(driver, "meta.before_replace", expand)
    assert "recovery: removed half-written file" in driver.log()
    down(driver.client, blk)
    stage(driver.client, p.volume_id, p.staging, "ext4")
    st = os.statvfs(p.staging)
    assert st.f_blocks * st.f_frsize > 1.5 * SIZES["ext4"], "the fs grows at the next stage"
    driver.client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=p.volume_id, staging_target_path=p.staging))
    check_data(driver, p, digest, uuid)
    delete(driver.client, p.volume_id)


# -- CreateSnapshot and restore -----------------------------------------------------------

def snapshot(c: CsiClient, name: str, source: str) -> csi_pb2.Snapshot:
    return c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=source)).snapshot


@pytest.mark.parametrize("failpoint", ["snapshot.after_copy", "snapshot.create.after_build",
                                       "snapshot.create.before_rename"])
def test_create_snapshot(driver: Driver, failpoint: str) -> None:
    c = driver.client
    vol = create(c, "crash-snapsrc", SIZES["ext4"])
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    digest = write_data(p)
    try:
        def action(c: CsiClient) -> csi_pb2.Snapshot:
            assert listed_snapshots(c) == [], "a half-made snapshot is listed"
            return snapshot(c, "crash-snap", vol.volume_id)

        snap = crash_then_retry(driver, failpoint, action)
        assert "recovery: removed unfinished snapshot .tmp-crash-snap" in driver.log()
        assert not is_frozen(p.staging), "the source filesystem was left frozen"
        c = driver.client
        assert listed_snapshots(c) == [snap.snapshot_id]
        write_data(p, seed=99)  # writes go through after recovery
        restored = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="crash-snaprest", volume_capabilities=[cap_for("ext4")],
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZES["ext4"]),
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
        )).volume
        q = up(c, restored.volume_id, str(driver.kubelet_dir), "ext4")
        assert read_sum(q) == digest, "the snapshot holds the data of its moment"
        down(c, q)
        delete(c, restored.volume_id)
    finally:
        thaw_quietly(p.staging)
    down(driver.client, p)
    driver.client.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="crash-snap"))
    delete(driver.client, vol.volume_id)


def test_frozen_filesystem_is_thawed_at_start(driver: Driver) -> None:
    """The crash comes while the snapshot has the source frozen: before the restart the
    filesystem is frozen (any writer would hang); start-up recovery thaws it and says so."""
    c = driver.client
    vol = create(c, "crash-frozen", SIZES["ext4"])
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    digest = write_data(p)
    try:
        driver.stop()
        driver.env = {"THINLOOP_FAILPOINTS": "copy.while_frozen=kill"}
        start_ready(driver)
        with pytest.raises(Exception):  # noqa: B017 - the driver dies mid-call
            snapshot(driver.client, "frozen-snap", vol.volume_id)
        driver.kill()
        assert is_frozen(p.staging), "the failpoint comes while the source is frozen"
        driver.env = {}
        start_ready(driver)
        assert not is_frozen(p.staging)
        assert f"recovery: thawed {os.path.realpath(p.staging)}" in driver.log()
        assert read_sum(p) == digest
        write_data(p, seed=5)
    finally:
        thaw_quietly(p.staging)
    down(driver.client, p)
    delete(driver.client, vol.volume_id)


def test_restore(driver: Driver) -> None:
    c = driver.client
    p, digest, _ = prepared(driver, "crash-rsrc")
    snap = snapshot(c, "crash-rsnap", p.volume_id)

    def restore(c: CsiClient) -> csi_pb2.Volume:
        assert "crash-rdst" not in listed_volumes(c)
        return c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="crash-rdst", volume_capabilities=[cap_for("ext4")],
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZES["ext4"]),
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))).volume

    vol = crash_then_retry(driver, "restore.after_copy", restore)
    assert "recovery: removed unfinished volume .tmp-crash-rdst" in driver.log()
    c = driver.client
    q = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4", name="rdst")
    assert read_sum(q) == digest
    st = os.statvfs(q.target)
    assert st.f_blocks * st.f_frsize > 1.5 * SIZES["ext4"], "restore into a bigger size grows the fs"
    uuid = fs_uuid(image_of(driver, vol.volume_id))
    down(c, q)
    check_data(driver, q, digest, uuid)
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    delete(c, vol.volume_id)
    delete(c, p.volume_id)
