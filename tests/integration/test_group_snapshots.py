"""Volume group snapshots on real kernel objects: three volumes (ext4, xfs, raw block) with
a writer running across all three, one group snapshot, a restore of each member, and
the data and filesystem checks that say the three copies are one point in time.

The writer appends record i to the ext4 volume, then to the xfs volume, then writes it to
the block volume (fsync'd: a raw block member is only as consistent as its writer keeps
it), then i+1, and so on. At any single instant the counts a, b, c of records on the
three volumes therefore satisfy a >= b >= c >= a - 1; copies of the three taken at
different moments would not (the later copy runs ahead)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from hashlib import sha256
from pathlib import Path

import pytest

from csi_driver.ops.client import CsiClient
from csi_driver.proto import csi_pb2
from tests.conftest import Driver
from tests.helpers import MIB, Published, cap_for, create, delete, down, up

pytestmark = [pytest.mark.root, pytest.mark.slow]

RECORD = 4096
SIZES = {"ext4": 256 * MIB, "xfs": 320 * MIB, "block": 256 * MIB}
MAX_RECORDS = 50_000  # 195 MiB: far more than the writer gets through before the cut

WRITER = r"""
import os, struct, sys
from hashlib import sha256
RECORD, MAX = int(sys.argv[1]), int(sys.argv[2])
paths = sys.argv[3:]
fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for p in paths[:2]]
blk = os.open(paths[2], os.O_WRONLY)
def record(i):
    head = struct.pack("<Q", i) + sha256(struct.pack("<Q", i)).digest()
    return head * (RECORD // len(head)) + head[: RECORD % len(head)]
for i in range(MAX):
    rec = record(i)
    for fd in fds:
        os.write(fd, rec)
    os.pwrite(blk, rec, i * RECORD)
    os.fsync(blk)
"""


def record(i: int) -> bytes:
    head = struct.pack("<Q", i) + sha256(struct.pack("<Q", i)).digest()
    return head * (RECORD // len(head)) + head[: RECORD % len(head)]


def count_records(p: Published) -> int:
    """How many records from 0 on are intact. A file holds nothing after them (no torn
    record); a device holds no later record after the first one missing."""
    n = 0
    with open(data_path(p), "rb") as f:
        while True:
            chunk = f.read(RECORD)
            if len(chunk) < RECORD or chunk != record(n):
                break
            n += 1
        if p.fs == "block":
            assert f.read(RECORD) != record(n + 1), f"{p.volume_id}: record {n + 1} follows a missing record {n}"
        else:
            assert chunk == b"", f"{p.volume_id}: a torn or foreign record after record {n}"
    return n


def data_path(p: Published) -> str:
    return p.target if p.fs == "block" else os.path.join(p.target, "records")


def wait_for(cond: object, what: str, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def group_snapshot(c: CsiClient, name: str, volumes: list[str]) -> csi_pb2.VolumeGroupSnapshot:
    return c.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=name, source_volume_ids=volumes)).group_snapshot


def restore(c: CsiClient, name: str, fs: str, snapshot_id: str) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap_for(fs)],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=SIZES[fs]))
    req.volume_content_source.snapshot.snapshot_id = snapshot_id
    return c.controller.CreateVolume(req).volume


def check_fs(image: Path, fs: str) -> None:
    """The restored filesystem is clean (its log was replayed by the mount at stage)."""
    argv = ["e2fsck", "-fn", str(image)] if fs == "ext4" else ["xfs_repair", "-n", "-f", str(image)]
    run = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"{' '.join(argv)}: {run.stdout[-2000:]}{run.stderr[-2000:]}"


def test_group_snapshot_of_busy_volumes_is_one_point_in_time(driver: Driver) -> None:
    c = driver.client
    kubelet = str(driver.kubelet_dir)
    vols = {fs: create(c, f"gs-{fs}", SIZES[fs], fs).volume_id for fs in ("ext4", "xfs", "block")}
    pubs = {fs: up(c, vid, kubelet, fs) for fs, vid in vols.items()}
    paths = [data_path(pubs[fs]) for fs in ("ext4", "xfs", "block")]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(RECORD), str(MAX_RECORDS), *paths])
    restored: dict[str, Published] = {}
    try:
        wait_for(lambda: os.path.exists(paths[1]) and os.path.getsize(paths[1]) >= 64 * RECORD,
                 "the writer to get going")
        group = group_snapshot(c, "busy", sorted(vols.values()))
        after_cut = os.path.getsize(paths[0])
        assert writer.poll() is None, "the writer was still writing at the cut"
        assert group.ready_to_use and len(group.snapshots) == 3
        wait_for(lambda: os.path.getsize(paths[0]) > after_cut, "writes after the cut")
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait(timeout=60)
    # What the writer wrote is intact on the sources, and it went on after the cut.
    written = {fs: count_records(p) for fs, p in pubs.items()}
    by_source = {s.source_volume_id: s for s in group.snapshots}
    counts = {}
    for fs, vid in vols.items():
        snap = by_source[vid]
        assert snap.group_snapshot_id == "busy" and snap.ready_to_use
        vol = restore(c, f"gs-restored-{fs}", fs, snap.snapshot_id)
        restored[fs] = up(c, vol.volume_id, kubelet, fs, name=f"restored-{fs}")
        counts[fs] = count_records(restored[fs])
    a, b, k = counts["ext4"], counts["xfs"], counts["block"]
    assert a >= 64, f"the cut came after the writer's first records: {counts}"
    assert a >= b >= k >= a - 1, f"the three copies are not one point in time: {counts}"
    assert written["ext4"] > a, f"the writer went on after the cut: {written} vs {counts}"
    for fs, p in restored.items():
        down(c, p)
        if fs != "block":
            check_fs(driver.data_dir / "volumes" / p.volume_id / "disk.img", fs)
    # The members are ordinary snapshots, listed with their group, deleted with it.
    listed = c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
    assert {(e.snapshot.snapshot_id, e.snapshot.group_snapshot_id) for e in listed} == \
        {(s.snapshot_id, "busy") for s in group.snapshots}
    c.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id="busy", snapshot_ids=[s.snapshot_id for s in group.snapshots]))
    assert c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries == []
    assert os.listdir(driver.data_dir / "group-snapshots") == []
    for p in restored.values():
        delete(c, p.volume_id)
    for p in pubs.values():
        down(c, p)
        delete(c, p.volume_id)


def test_group_snapshot_of_unmounted_volumes_and_repeat_is_idempotent(driver: Driver) -> None:
    """Volumes nobody mounts are copied as they are; the same call again returns the same
    group without copying again."""
    c = driver.client
    vols = [create(c, f"idle-{i}", 64 * MIB).volume_id for i in range(2)]
    first = group_snapshot(c, "idle", vols)
    stamp = {s.snapshot_id: os.stat(driver.data_dir / "snapshots" / s.snapshot_id / "disk.img").st_ino
             for s in first.snapshots}
    again = group_snapshot(c, "idle", list(reversed(vols)))
    assert again == first
    assert {s.snapshot_id: os.stat(driver.data_dir / "snapshots" / s.snapshot_id / "disk.img").st_ino
            for s in again.snapshots} == stamp
    got = c.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="idle"))
    assert got.group_snapshot == first
    c.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="idle"))
    for v in vols:
        delete(c, v)
