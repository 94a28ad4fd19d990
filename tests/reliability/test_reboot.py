"""Node reboot: every loop device and mount vanishes behind the driver's back while the
images stay. kubelet's NodeStage and NodePublish calls must rebuild all of it from what is
on disk, for filesystem and block volumes alike, and survive a driver restart after."""

from __future__ import annotations

import pytest

from tests import kernel
from tests.conftest import Driver
from tests.helpers import MIB, Published, create, delete, down, publish, read_sum, stage, up, write_data
from tests.reliability.support import assert_everything_owned, fs_uuid, image_of, mounts_of, start_ready

pytestmark = pytest.mark.root

SIZES = {"ext3": 48 * MIB, "ext4": 48 * MIB, "xfs": 320 * MIB, "block": 24 * MIB}
PER_KIND = 2


def test_reboot_with_many_volumes_and_a_driver_restart(driver: Driver) -> None:
    c = driver.client
    pubs: list[Published] = []
    for fs, size in SIZES.items():
        for i in range(PER_KIND):
            vol = create(c, f"rb-{fs}-{i}", size, fs)
            pubs.append(up(c, vol.volume_id, str(driver.kubelet_dir), fs))
    sums = {p.volume_id: write_data(p, seed=i) for i, p in enumerate(pubs)}
    uuids = {p.volume_id: fs_uuid(image_of(driver, p.volume_id)) for p in pubs}
    assert len(kernel.loops_under(driver.root)) == len(pubs)

    # The "reboot": the driver dies and the kernel forgets every loop device and mount.
    driver.kill()
    torn = kernel.cleanup(driver.root)
    assert sum(t.startswith("loop ") for t in torn) == len(pubs)
    assert kernel.mounts_under(driver.root) == [] and kernel.loops_under(driver.root) == []

    start_ready(driver)
    c = driver.client
    for p in pubs:
        stage(c, p.volume_id, p.staging, p.fs)
        publish(c, p.volume_id, p.staging, p.target, p.fs)
    for p in pubs:
        assert read_sum(p) == sums[p.volume_id], f"{p.volume_id}: data changed across the reboot"
        assert fs_uuid(image_of(driver, p.volume_id)) == uuids[p.volume_id], "reformatted on restage"
    assert_everything_owned(driver, c)

    # A plugin restart after that: kubelet repeats its calls, which must be no-ops.
    driver.restart()
    c = driver.client
    for p in pubs:
        stage(c, p.volume_id, p.staging, p.fs)
        publish(c, p.volume_id, p.staging, p.target, p.fs)
        assert read_sum(p) == sums[p.volume_id]
        if p.fs != "block":
            assert mounts_of(p.staging) == 1 and mounts_of(p.target) == 1, "a repeated call stacked a mount"
    assert len(kernel.loops_under(driver.root)) == len(pubs), "one loop device per image"
    assert_everything_owned(driver, c)

    for p in pubs:
        down(c, p)
        delete(c, p.volume_id)
    assert kernel.loops_under(driver.root) == [] and kernel.mounts_under(driver.root) == []
