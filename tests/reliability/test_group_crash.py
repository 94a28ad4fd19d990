"""Volume group snapshots under failure and kill -9 at every step (failpoints): nothing is
left frozen, no partial copy, member or record is left or listed, the retried call cuts
the group, and every member restores the data of its moment. Deletion likewise."""

from __future__ import annotations

import os

import grpc
import pytest

from csi_driver.ops.client import CsiClient
from csi_driver.proto import csi_pb2
from tests.conftest import Driver
from tests.helpers import MIB, Published, cap_for, create, delete, down, read_sum, up, write_data
from tests.reliability.support import (
    assert_everything_owned,
    crash_then_retry,
    is_frozen,
    leftovers,
    listed_snapshots,
    start_ready,
    thaw_quietly,
)

pytestmark = pytest.mark.root

SIZES = {"ext4": 64 * MIB, "xfs": 320 * MIB, "block": 32 * MIB}
CREATE_STEPS = ["group.after_freeze", "group.while_frozen", "group.after_thaw", "group.after_record",
                "group.after_member", "group.before_commit"]
DELETE_STEPS = ["group.delete.after_rename", "group.delete.after_member"]


def busy_volumes(d: Driver) -> tuple[dict[str, Published], dict[str, str]]:
    """Three published volumes (ext4, xfs, block) holding data; returns them and the data's
    checksums."""
    c = d.client
    pubs, sums = {}, {}
    for i, fs in enumerate(("ext4", "xfs", "block")):
        vol = create(c, f"grp-{fs}", SIZES[fs], fs)
        pubs[fs] = up(c, vol.volume_id, str(d.kubelet_dir), fs)
        sums[fs] = write_data(pubs[fs], seed=i + 10)
    return pubs, sums


def cut(c: CsiClient, pubs: dict[str, Published]) -> csi_pb2.VolumeGroupSnapshot:
    return c.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="crash-group", source_volume_ids=sorted(p.volume_id for p in pubs.values()))).group_snapshot


def assert_thawed(pubs: dict[str, Published]) -> None:
    for fs in ("ext4", "xfs"):
        assert not is_frozen(pubs[fs].staging), f"the {fs} member was left frozen"


def check_members(d: Driver, group: csi_pb2.VolumeGroupSnapshot, pubs: dict[str, Published],
                  sums: dict[str, str]) -> None:
    """Every member restores the data written before the cut; then the group is deleted."""
    c = d.client
    assert group.ready_to_use
    assert listed_snapshots(c) == sorted(s.snapshot_id for s in group.snapshots)
    by_source = {s.source_volume_id: s.snapshot_id for s in group.snapshots}
    for fs, p in pubs.items():
        req = csi_pb2.CreateVolumeRequest(name=f"back-{fs}", volume_capabilities=[cap_for(fs)],
                                          capacity_range=csi_pb2.CapacityRange(required_bytes=SIZES[fs]))
        req.volume_content_source.snapshot.snapshot_id = by_source[p.volume_id]
        vol = c.controller.CreateVolume(req).volume
        q = up(c, vol.volume_id, str(d.kubelet_dir), fs, name=f"back-{fs}")
        assert read_sum(q) == sums[fs], f"the {fs} member does not hold the data of its moment"
        down(c, q)
        delete(c, vol.volume_id)
    c.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="crash-group"))
    assert listed_snapshots(c) == []


def teardown(d: Driver, pubs: dict[str, Published]) -> None:
    for p in pubs.values():
        thaw_quietly(p.staging)
    c = d.client
    for p in pubs.values():
        down(c, p)
        delete(c, p.volume_id)


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_kill_at_each_create_step(driver: Driver, step: str) -> None:
    pubs, sums = busy_volumes(driver)
    try:
        def action(c: CsiClient) -> csi_pb2.VolumeGroupSnapshot:
            assert listed_snapshots(c) == [], "a member of an unfinished group is listed"
            return cut(c, pubs)

        group = crash_then_retry(driver, step, action)
        log = driver.log()
        placed = {"group.after_member": 1, "group.before_commit": 3}.get(step, 0)  # members renamed in
        assert f"recovery: removed unfinished volume group snapshot crash-group ({placed} member(s) removed)" in log
        if step in ("group.after_freeze", "group.while_frozen"):
            assert "left frozen by an interrupted snapshot" in log, "start-up thawed the members"
        assert_thawed(pubs)
        assert_everything_owned(driver, driver.client)
        for fs, p in pubs.items():
            assert read_sum(p) == sums[fs]
        write_data(pubs["ext4"], seed=99)  # writers go on after recovery
        check_members(driver, group, pubs, sums)
    finally:
        teardown(driver, pubs)


@pytest.mark.parametrize("step", CREATE_STEPS)
def test_failure_at_each_create_step(driver: Driver, step: str) -> None:
    pubs, sums = busy_volumes(driver)
    try:
        driver.stop()
        driver.env = {"THINLOOP_FAILPOINTS": f"{step}=error"}
        start_ready(driver)
        with pytest.raises(grpc.RpcError) as info:
            cut(driver.client, pubs)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert f"failpoint {step}" in str(info.value.details())
        assert_thawed(pubs)
        assert leftovers(driver) == [], "a failed cut left temporary entries"
        assert os.listdir(driver.data_dir / "snapshots") == [], "a failed cut left a member"
        assert os.listdir(driver.data_dir / "group-snapshots") == []
        assert listed_snapshots(driver.client) == []
        driver.stop()
        driver.env = {}
        start_ready(driver)
        check_members(driver, cut(driver.client, pubs), pubs, sums)
    finally:
        teardown(driver, pubs)


@pytest.mark.parametrize("step", DELETE_STEPS)
def test_kill_at_each_delete_step(driver: Driver, step: str) -> None:
    c = driver.client
    vols = [create(c, f"del-{i}", SIZES["ext4"]).volume_id for i in range(3)]
    group = c.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="del-group", source_volume_ids=vols)).group_snapshot

    def action(c: CsiClient) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        assert listed_snapshots(c) in ([], sorted(s.snapshot_id for s in group.snapshots))
        return c.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id="del-group"))

    crash_then_retry(driver, step, action)
    left = {"group.delete.after_rename": 3, "group.delete.after_member": 2}[step]
    assert f"recovery: finished deleting volume group snapshot del-group ({left} member(s) removed)" in driver.log()
    c = driver.client
    assert listed_snapshots(c) == []
    assert os.listdir(driver.data_dir / "snapshots") == []
    assert os.listdir(driver.data_dir / "group-snapshots") == []
    with pytest.raises(grpc.RpcError) as info:
        c.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="del-group"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for v in vols:
        delete(c, v)
