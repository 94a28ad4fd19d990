"""Delete safety: no delete while the volume is in use, unknown ids are already deleted,
and nothing outside the volume's own directory is ever removed, whatever links are planted
in it."""

from __future__ import annotations

import os

import grpc
import pytest

from csi_driver.proto import csi_pb2
from tests.conftest import Driver
from tests.helpers import MIB, cap_for, code_of, create, delete, down, read_sum, stage, up, write_data
from tests.reliability.support import leftovers, listed_volumes

pytestmark = pytest.mark.root


@pytest.mark.parametrize("fs", ["ext4", "block"])
def test_refused_while_staged_or_published(driver: Driver, fs: str) -> None:
    c = driver.client
    vol = create(c, f"busy-{fs}", 32 * MIB, fs)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), fs)
    digest = write_data(p)
    assert code_of(delete, c, vol.volume_id) == grpc.StatusCode.FAILED_PRECONDITION  # published
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                  target_path=p.target))
    assert code_of(delete, c, vol.volume_id) == grpc.StatusCode.FAILED_PRECONDITION  # staged
    assert listed_volumes(c) == [vol.volume_id]
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=p.staging, target_path=p.target,
        volume_capability=cap_for(fs)))
    assert read_sum(p) == digest, "a refused delete touched nothing"
    down(c, p)
    delete(c, vol.volume_id)
    assert listed_volumes(c) == []


def test_unknown_and_malformed_ids_are_already_deleted(driver: Driver) -> None:
    c = driver.client
    for vid in ("never-made", "x" * 128, "../../etc", "a/b", "x" * 5000, "bad\nid"):
        c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=vid))
    assert code_of(c.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest()) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_planted_links_are_removed_not_followed(driver: Driver) -> None:
    c = driver.client
    outside = driver.root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "file").write_text("precious")
    (outside / "dir" / "inner").write_text("precious too")
    vol = create(c, "linked", 32 * MIB)
    vdir = driver.data_dir / "volumes" / vol.volume_id
    os.symlink(outside / "file", vdir / "to-file")
    os.symlink(outside / "dir", vdir / "to-dir")
    os.symlink(outside, vdir / "sub-link")
    (vdir / "nested").mkdir()
    os.symlink(outside / "dir", vdir / "nested" / "deeper")
    delete(c, vol.volume_id)
    assert not vdir.exists()
    assert (outside / "file").read_text() == "precious"
    assert (outside / "dir" / "inner").read_text() == "precious too"
    assert leftovers(driver) == []


def test_image_that_is_a_link_outside(driver: Driver) -> None:
    """A hand-made volume whose disk.img is a link: delete removes the link only."""
    outside = driver.root / "outside.img"
    with open(outside, "wb") as f:
        f.truncate(16 * MIB)
    vdir = driver.data_dir / "volumes" / "static-link"
    vdir.mkdir(parents=True)
    os.symlink(outside, vdir / "disk.img")
    assert listed_volumes(driver.client) == ["static-link"]
    delete(driver.client, "static-link")
    assert outside.stat().st_size == 16 * MIB
    assert listed_volumes(driver.client) == []


def test_volume_dir_that_is_a_link_outside(driver: Driver) -> None:
    """A volume directory that is itself a symlink: delete removes the link and keeps the
    directory it pointed to (before the fix, rmtree refused the link: INTERNAL, and the
    trash entry stayed forever)."""
    outside = driver.root / "elsewhere"
    outside.mkdir()
    with open(outside / "disk.img", "wb") as f:
        f.truncate(16 * MIB)
    (outside / ".tmp-keep").write_text("not the driver's")
    os.symlink(outside, driver.data_dir / "volumes" / "dir-link")
    driver.restart()  # recovery must not reach through the link either
    assert (outside / ".tmp-keep").exists()
    delete(driver.client, "dir-link")
    assert (outside / "disk.img").stat().st_size == 16 * MIB
    assert (outside / ".tmp-keep").exists()
    assert listed_volumes(driver.client) == [] and leftovers(driver) == []


def test_unpublish_does_not_remove_foreign_files(driver: Driver) -> None:
    """Unpublish removes the target the driver made; a symlink planted at the target is
    removed as a link, and the file it points to (inside the kubelet dir) survives."""
    c = driver.client
    vol = create(c, "unpub", 32 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    down(c, p)
    keep = driver.kubelet_dir / "keep.txt"
    keep.write_text("kubelet's")
    os.makedirs(os.path.dirname(p.target), exist_ok=True)
    os.symlink(keep, p.target)
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                  target_path=p.target))
    assert keep.read_text() == "kubelet's"
    stage(c, vol.volume_id, p.staging, "ext4")
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id,
                                                              staging_target_path=p.staging))
    delete(c, vol.volume_id)
