"""Full lifecycle on real loop devices, filesystems and mounts."""

from __future__ import annotations

import os
import subprocess

import pytest

from csi_driver.proto import csi_pb2
from tests import kernel
from tests.conftest import Driver
from tests.helpers import GIB, MIB, create, delete, down, publish, read_sum, stage, up, write_data

pytestmark = pytest.mark.root

FS_SIZES = {"ext3": 64 * MIB, "ext4": 64 * MIB, "xfs": 320 * MIB, "block": 32 * MIB}


@pytest.mark.parametrize("fs", ["ext3", "ext4", "xfs", "block"])
def test_data_survives_restage_and_driver_restart(driver: Driver, fs: str) -> None:
    c = driver.client
    vol = create(c, f"life-{fs}", FS_SIZES[fs], fs)
    assert vol.capacity_bytes == FS_SIZES[fs]
    assert dict(vol.accessible_topology[0].segments) == {"topology.thinloop.csi.io/node": "test-node"}
    p = up(c, vol.volume_id, str(driver.kubelet_dir), fs)
    if fs == "block":
        assert os.path.isfile(p.target) or os.path.exists(p.target)
    else:
        assert os.path.isdir(p.target)
        found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", p.target], capture_output=True, text=True)
        assert found.stdout.strip() == fs
    digest = write_data(p)

    down(c, p)
    assert not os.path.exists(p.target), "unpublish removes the target it made"
    assert kernel.loops_under(driver.root) == []
    stage(c, vol.volume_id, p.staging, fs)
    publish(c, vol.volume_id, p.staging, p.target, fs)
    assert read_sum(p) == digest

    driver.restart()
    c = driver.client
    # kubelet re-issues stage and publish after a plugin restart: both must be no-ops now
    stage(c, vol.volume_id, p.staging, fs)
    publish(c, vol.volume_id, p.staging, p.target, fs)
    assert read_sum(p) == digest
    assert len(kernel.loops_under(driver.root)) == 1, "one loop device per image, never two"

    down(c, p)
    delete(c, vol.volume_id)
    assert not (driver.data_dir / "volumes" / vol.volume_id).exists()
    assert kernel.loops_under(driver.root) == []
    assert kernel.mounts_under(driver.root) == []


def test_stats_report_real_usage(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "stats", 128 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    before = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=p.target))
    write_data(p, 16 * MIB)
    after = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=p.target))
    b_bytes = next(u for u in before.usage if u.unit == csi_pb2.VolumeUsage.BYTES)
    a_bytes = next(u for u in after.usage if u.unit == csi_pb2.VolumeUsage.BYTES)
    assert 100 * MIB < a_bytes.total <= 128 * MIB
    assert a_bytes.used - b_bytes.used >= 16 * MIB
    assert a_bytes.available < b_bytes.available
    inodes = next(u for u in after.usage if u.unit == csi_pb2.VolumeUsage.INODES)
    assert inodes.total > 0 and inodes.used > 0
    assert not after.volume_condition.abnormal, after.volume_condition.message
    down(c, p)
    delete(c, vol.volume_id)


def test_thin_volume_allocates_only_what_is_written(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "thin10g", 10 * GIB)
    image = driver.data_dir / "volumes" / vol.volume_id / "disk.img"
    st = os.stat(image)
    assert st.st_size == 10 * GIB
    empty_alloc = st.st_blocks * 512
    assert empty_alloc < 200 * MIB, f"a fresh 10 GiB thin ext4 image allocated {empty_alloc} bytes"
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    write_data(p, 64 * MIB)
    alloc = os.stat(image).st_blocks * 512
    assert 64 * MIB <= alloc - empty_alloc < 100 * MIB, (empty_alloc, alloc)
    down(c, p)
    delete(c, vol.volume_id)


@pytest.mark.parametrize("diskformat", ["zeroedthick", "eagerzeroedthick"])
def test_thick_volume_allocates_its_full_size(driver: Driver, diskformat: str) -> None:
    c = driver.client
    vol = create(c, f"thick-{diskformat}", 96 * MIB, diskformat=diskformat)
    image = driver.data_dir / "volumes" / vol.volume_id / "disk.img"
    st = os.stat(image)
    assert st.st_blocks * 512 >= 96 * MIB, "mkfs must not discard a preallocated image"
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    write_data(p)
    down(c, p)
    assert os.stat(image).st_blocks * 512 >= 96 * MIB
    delete(c, vol.volume_id)


def test_reboot_rebuilds_loop_and_mounts(driver: Driver) -> None:
    """Everything disappears behind the driver's back; kubelet's calls rebuild it."""
    c = driver.client
    vols = {fs: create(c, f"reboot-{fs}", FS_SIZES[fs], fs) for fs in ("ext4", "xfs", "block")}
    pubs = {fs: up(c, v.volume_id, str(driver.kubelet_dir), fs) for fs, v in vols.items()}
    sums = {fs: write_data(p, seed=len(fs)) for fs, p in pubs.items()}
    driver.kill()
    assert kernel.cleanup(driver.root), "there was something to tear down"
    assert kernel.loops_under(driver.root) == [] and kernel.mounts_under(driver.root) == []
    driver.start()
    c = driver.client
    for fs, p in pubs.items():
        stage(c, p.volume_id, p.staging, fs)
        publish(c, p.volume_id, p.staging, p.target, fs)
        assert read_sum(p) == sums[fs], f"{fs} data changed across the reboot"
    for p in pubs.values():
        down(c, p)
        delete(c, p.volume_id)


def test_read_only_block_publish_makes_the_device_read_only(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "ro-block", 16 * MIB, "block")
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "block")
    digest = write_data(p, MIB)
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=p.target))
    publish(c, vol.volume_id, p.staging, p.target, "block", readonly=True)
    with pytest.raises(OSError), open(p.target, "r+b", buffering=0) as dev:
        dev.write(b"x")  # the bind is read-only and so is the device behind it
    assert read_sum(p, MIB) == digest
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=p.target))
    publish(c, vol.volume_id, p.staging, p.target, "block")  # writable again
    write_data(p, MIB, seed=7)
    down(c, p)
    delete(c, vol.volume_id)


def test_sigterm_finishes_and_removes_the_socket(driver: Driver) -> None:
    driver.client.identity.Probe(csi_pb2.ProbeRequest())
    assert driver.stop() == 0
    assert not driver.socket.exists()
    driver.start()
