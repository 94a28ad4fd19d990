"""Images made by hand (issue 14, class 6): a static volume put in place by an
administrator, blank or already holding a filesystem, has no meta.json. Listing, node
status, ValidateVolumeCapabilities, snapshots and restores report the filesystem really in
the image, before and after a stage formats a blank one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from csi_driver.ops import ctl
from csi_driver.proto import csi_pb2
from csi_driver.volumes.store import Meta
from tests.conftest import Driver
from tests.helpers import MIB, cap_for, delete, down, read_sum, up, write_data

pytestmark = pytest.mark.root


def hand_made(d: Driver, vid: str, size: int, fs: str = "") -> Path:
    folder = d.data_dir / "volumes" / vid
    folder.mkdir(parents=True)
    with open(folder / "disk.img", "wb") as f:
        f.truncate(size)
    if fs:
        subprocess.run([f"mkfs.{fs}", "-q", str(folder / "disk.img")], check=True)
    return folder / "disk.img"


def listed(d: Driver) -> dict[str, str]:
    resp = d.client.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    return {e.volume.volume_id: e.volume.volume_context.get("fsType", "") for e in resp.entries}


def status(d: Driver, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    capsys.readouterr()
    assert ctl.main(["-o", "json", "node", "status", "--data-dir", str(d.data_dir)]) == 0
    return {v["id"]: v["fs_type"] for v in json.loads(capsys.readouterr().out)["volumes"]}


def test_listing_and_status_report_what_the_image_holds(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    c = driver.client
    hand_made(driver, "blank", 64 * MIB)
    hand_made(driver, "has-ext4", 64 * MIB, "ext4")
    hand_made(driver, "has-xfs", 320 * MIB, "xfs")
    assert listed(driver) == {"blank": "", "has-ext4": "ext4", "has-xfs": "xfs"}
    assert status(driver, capsys) == {"blank": "none", "has-ext4": "ext4", "has-xfs": "xfs"}
    got = c.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="has-ext4"))
    assert got.volume.volume_context["fsType"] == "ext4"
    check = c.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="has-ext4", volume_capabilities=[cap_for("xfs")]))
    assert not check.HasField("confirmed") and "holds ext4, not xfs" in check.message

    blank = up(c, "blank", str(driver.kubelet_dir), "ext4")  # the stage formats it
    digest = write_data(blank)
    ext4 = up(c, "has-ext4", str(driver.kubelet_dir), "ext4")
    xfs = up(c, "has-xfs", str(driver.kubelet_dir), "xfs")
    assert listed(driver) == {"blank": "ext4", "has-ext4": "ext4", "has-xfs": "xfs"}
    assert status(driver, capsys) == {"blank": "ext4", "has-ext4": "ext4", "has-xfs": "xfs"}
    for p, size in ((blank, 64 * MIB), (ext4, 64 * MIB), (xfs, 320 * MIB)):
        stats = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=p.volume_id, volume_path=p.target))
        total = next(u.total for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES)
        assert 0.75 * size < total <= size and not stats.volume_condition.abnormal
        assert {u.unit for u in stats.usage} == {csi_pb2.VolumeUsage.BYTES, csi_pb2.VolumeUsage.INODES}
    for p in (blank, ext4, xfs):
        down(c, p)
    assert listed(driver)["blank"] == "ext4", "unstaged, the image still holds what the stage made"
    assert not (driver.data_dir / "volumes" / "blank" / "meta.json").exists(), "the image stays hand-made"
    blank = up(c, "blank", str(driver.kubelet_dir), "ext4")
    assert read_sum(blank) == digest, "a second stage does not format again"
    down(c, blank)

    # A snapshot and a restore of a hand-made image know its filesystem too.
    c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="hm-snap", source_volume_id="has-xfs"))
    snap = Meta.from_json((driver.data_dir / "snapshots" / "hm-snap" / "meta.json").read_text())
    assert snap.fs_type == "xfs"
    req = csi_pb2.CreateVolumeRequest(name="hm-restored", volume_capabilities=[cap_for("ext4")],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=320 * MIB))
    req.volume_content_source.snapshot.snapshot_id = "hm-snap"
    with pytest.raises(grpc.RpcError) as info:
        c.controller.CreateVolume(req)  # ext4 asked for explicitly: the bytes hold xfs
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    req.volume_capabilities[0].mount.fs_type = ""
    assert c.controller.CreateVolume(req).volume.volume_context["fsType"] == "xfs"
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="hm-snap"))
    for vid in ("hm-restored", "blank", "has-ext4", "has-xfs"):
        delete(c, vid)
