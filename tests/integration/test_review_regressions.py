"""Regression tests for bugs an independent review found (each once lost or corrupted data,
or took something away from a pod)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from csi_driver.ops.client import capability
from csi_driver.proto import csi_pb2
from tests import kernel
from tests.conftest import Driver
from tests.helpers import MIB, cap_for, code_of, create, delete, down, up, write_data

pytestmark = pytest.mark.root


def test_read_only_block_publish_cannot_take_writes_from_another_pod(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "shared-block", 16 * MIB, "block")
    a = up(c, vol.volume_id, str(driver.kubelet_dir), "block", "pod-a")
    target_b = str(driver.kubelet_dir / "pods" / "pod-b" / "dev")
    assert code_of(c.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=a.staging, target_path=target_b,
        volume_capability=cap_for("block"), readonly=True)) == grpc.StatusCode.FAILED_PRECONDITION
    write_data(a, MIB)  # pod A still writes
    assert not os.path.exists(target_b)
    down(c, a)
    delete(c, vol.volume_id)


def _ext4_blocks(device: str) -> int:
    out = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True, check=True).stdout
    return int(next(line.split(":")[1] for line in out.splitlines() if line.startswith("Block count")))


def test_expanding_a_block_volume_never_touches_what_the_app_put_on_it(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "app-fs", 32 * MIB, "block")
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "block")
    subprocess.run(["mkfs.ext4", "-q", "-F", p.target], check=True)  # the application's own filesystem
    before = _ext4_blocks(p.target)
    rng = csi_pb2.CapacityRange(required_bytes=64 * MIB)
    c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=p.target, staging_target_path=p.staging, capacity_range=rng))
    with open(p.target, "rb") as dev:
        assert dev.seek(0, os.SEEK_END) == 64 * MIB  # the device grew ...
    assert _ext4_blocks(p.target) == before  # ... and the app's filesystem was left alone
    down(c, p)
    delete(c, vol.volume_id)


def test_unpublish_leaves_files_and_mounts_it_did_not_make(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "v", 32 * MIB)
    config = driver.kubelet_dir / "config.yaml"
    config.write_text("kubelet: config\n")
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="v", target_path=str(config)))
    assert config.read_text() == "kubelet: config\n"
    other = driver.kubelet_dir / "pods" / "other" / "volumes" / "kubernetes.io~nfs" / "data"
    other.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        for vid in ("v", "nosuch"):
            assert code_of(c.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=vid, target_path=str(other))) == grpc.StatusCode.FAILED_PRECONDITION
            assert code_of(c.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
                volume_id=vid, staging_target_path=str(other))) == grpc.StatusCode.FAILED_PRECONDITION
        assert str(other) in kernel.mounts_under(driver.kubelet_dir)
    finally:
        subprocess.run(["umount", str(other)], check=True)
    delete(c, vol.volume_id)


def test_failed_ephemeral_retry_keeps_the_volume_and_its_data(driver: Driver) -> None:
    c = driver.client
    target = str(driver.kubelet_dir / "pods" / "eph" / "volumes" / "v" / "mount")
    os.makedirs(os.path.dirname(target))
    ctx = {"csi.storage.k8s.io/ephemeral": "true", "size": "64Mi"}
    req = csi_pb2.NodePublishVolumeRequest(volume_id="csi-eph1", target_path=target,
                                           volume_capability=capability(fs_type="ext4"), volume_context=ctx)
    c.node.NodePublishVolume(req)
    with open(os.path.join(target, "f"), "w") as f:
        f.write("pod data")
    driver.kill()
    kernel.cleanup(driver.root)  # a reboot
    driver.start()
    bad = csi_pb2.NodePublishVolumeRequest()
    bad.CopyFrom(req)
    bad.volume_capability.mount.mount_flags.append("nosuchoption")
    with pytest.raises(grpc.RpcError):
        driver.client.node.NodePublishVolume(bad)
    assert (driver.data_dir / "volumes" / "csi-eph1" / "disk.img").exists(), "the retry deleted the volume"
    driver.client.node.NodePublishVolume(req)
    with open(os.path.join(target, "f")) as f:
        assert f.read() == "pod data"
    driver.client.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-eph1", target_path=target))
    assert not (driver.data_dir / "volumes" / "csi-eph1").exists()


def test_incompatible_restage_is_already_exists(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "restage", 64 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    for cap in (cap_for("xfs"), capability(fs_type="ext4", mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)):
        assert code_of(c.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=p.staging, volume_capability=cap)) == \
            grpc.StatusCode.ALREADY_EXISTS
    down(c, p)
    delete(c, vol.volume_id)


def test_clone_of_a_volume_being_written_is_filesystem_consistent(driver: Driver) -> None:
    """The clone's filesystem is frozen while copied: it checks clean with e2fsck."""
    c = driver.client
    vol = create(c, "busy", 128 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    writer = subprocess.Popen(["sh", "-c", f"i=0; while [ $i -lt 400 ]; do echo $i > {p.target}/f$i; i=$((i+1)); done"])
    req = csi_pb2.CreateVolumeRequest(name="busy-clone", volume_capabilities=[cap_for("ext4")],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MIB))
    req.volume_content_source.volume.volume_id = vol.volume_id
    c.controller.CreateVolume(req)
    writer.wait(timeout=60)
    image = driver.data_dir / "volumes" / "busy-clone" / "disk.img"
    fsck = subprocess.run(["e2fsck", "-n", "-f", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    down(c, p)
    delete(c, "busy-clone")
    delete(c, vol.volume_id)


def test_a_device_attached_through_another_path_is_still_this_volumes(driver: Driver) -> None:
    """sysfs shows a loop device's backing path as the mount namespace that attached it
    saw it: after the driver's container restarts the path no longer matches the data
    dir. The driver must still know the device is this volume's (by the file's identity):
    refuse to delete it, re-stage onto it, and unstage it."""
    c = driver.client
    vol = create(c, "other-ns", 32 * MIB)
    alt = driver.root / "alt"
    alt.mkdir()
    subprocess.run(["mount", "--bind", str(driver.data_dir), str(alt)], check=True)
    try:
        device = subprocess.run(["losetup", "--find", "--show", str(alt / "volumes" / "other-ns" / "disk.img")],
                                capture_output=True, text=True, check=True).stdout.strip()
    finally:
        subprocess.run(["umount", "--lazy", str(alt)], check=True)
    staging = str(driver.kubelet_dir / "st")
    os.makedirs(staging)
    subprocess.run(["mount", device, staging], check=True)  # staged by "the previous container"
    backing = Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read_text().strip()
    assert not backing.startswith(str(driver.data_dir)), backing
    assert code_of(c.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id="other-ns")) == \
        grpc.StatusCode.FAILED_PRECONDITION
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="other-ns", staging_target_path=staging, volume_capability=cap_for("ext4")))
    target = str(driver.kubelet_dir / "pods" / "p" / "mount")
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id="other-ns", staging_target_path=staging, target_path=target, volume_capability=cap_for("ext4")))
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="other-ns", target_path=target))
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id="other-ns", staging_target_path=staging))
    assert not os.path.exists(f"/sys/block/{os.path.basename(device)}/loop/backing_file"), "the device was detached"
    delete(c, vol.volume_id)


def test_a_volume_staged_read_only_by_mount_flag_restages_and_republishes(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "ro-flag", 64 * MIB)
    cap = capability(fs_type="ext4", mount_flags=("ro",))
    staging = str(driver.kubelet_dir / "st")
    target = str(driver.kubelet_dir / "pods" / "p" / "mount")
    os.makedirs(staging)
    for _ in range(2):  # kubelet repeats both after a restart
        c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id="ro-flag", staging_target_path=staging, volume_capability=cap))
        c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id="ro-flag", staging_target_path=staging, target_path=target, volume_capability=cap))
    with pytest.raises(OSError):
        Path(target, "f").write_text("x")
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="ro-flag", target_path=target))
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id="ro-flag", staging_target_path=staging))
    delete(c, vol.volume_id)
