"""Path confinement: staging and target paths must lie under --kubelet-dir, with symlinks
resolved, so no mount, directory creation or removal can be led outside it."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from tests import kernel
from tests.conftest import Driver
from tests.helpers import MIB, cap_for, code_of, create, delete, down, publish, tree, up
from tests.reliability.support import assert_everything_owned

pytestmark = pytest.mark.root

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def outside_dir(d: Driver) -> Path:
    out = d.root / "outside"
    (out / "dir").mkdir(parents=True, exist_ok=True)
    (out / "file").write_text("not kubelet's")
    return out


@pytest.mark.parametrize("fs", ["ext4", "block"])
def test_symlinks_cannot_lead_out(driver: Driver, fs: str) -> None:
    c = driver.client
    out = outside_dir(driver)
    vol = create(c, f"conf-{fs}", 32 * MIB, fs)
    k = driver.kubelet_dir
    (k / "pods").mkdir()
    os.symlink(out / "dir", k / "pods" / "link-target")          # the target itself
    os.symlink(out, k / "pods" / "link-parent")                   # a parent of the target
    os.symlink(out / "missing", k / "pods" / "dangling")          # dangling: would be created
    os.symlink(out / "dir", k / "link-staging")
    bad_targets = [str(k / "pods" / "link-target"), str(k / "pods" / "link-parent" / "dir"),
                   str(k / "pods" / "link-parent" / "new" / "mount"), str(k / "pods" / "dangling"),
                   str(k / "pods" / ".." / ".." / "outside" / "dir"), str(out / "dir"), "/etc",
                   "relative/target"]
    before_out = tree(str(out))

    # Staging through a link out is refused (called directly: the helper would mkdir)...
    for staging in (k / "link-staging", k / "link-staging" / "sub"):
        assert code_of(c.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging),
            volume_capability=cap_for(fs))) == INVALID
    assert kernel.loops_under(driver.root) == [], "a refused stage attaches nothing"
    # ...and so is publishing through one, or unpublishing/unstaging through one.
    p = up(c, vol.volume_id, str(k), fs)
    for target in bad_targets:
        assert code_of(publish, c, vol.volume_id, p.staging, target, fs) == INVALID, target
        assert code_of(c.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target)) == INVALID, target
        assert code_of(c.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=target)) == INVALID, target
        assert code_of(c.node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=target)) in (INVALID, grpc.StatusCode.NOT_FOUND)
        assert code_of(c.node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=target,
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MIB))) in \
            (INVALID, grpc.StatusCode.NOT_FOUND)
    assert tree(str(out)) == before_out, "something outside the kubelet dir changed"
    assert (out / "file").read_text() == "not kubelet's"
    assert_everything_owned(driver, c)
    assert not kernel.mounts_under(out)
    down(c, p)
    delete(c, vol.volume_id)


def test_kubelet_dir_itself_is_not_a_target(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "conf-root", 32 * MIB)
    k = str(driver.kubelet_dir)
    for path in (k, k + "/", k + "/.", k + "/pods/.."):
        assert code_of(c.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=path, volume_capability=cap_for("ext4"))) == INVALID
    delete(c, vol.volume_id)


def test_links_inside_the_kubelet_dir_are_followed(driver: Driver) -> None:
    """A link that stays inside the kubelet dir is fine: the driver works on the real path
    (this is what kubelet's own bind-mounted layouts look like)."""
    c = driver.client
    vol = create(c, "conf-in", 32 * MIB)
    k = driver.kubelet_dir
    (k / "real-pods").mkdir()
    os.symlink(k / "real-pods", k / "pods")
    p = up(c, vol.volume_id, str(k), "ext4")
    assert kernel.mounts_under(k / "real-pods"), "mounted at the resolved path"
    down(c, p)
    assert not kernel.mounts_under(k)
    delete(c, vol.volume_id)
