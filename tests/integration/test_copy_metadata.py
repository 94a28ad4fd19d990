"""State that must survive a copy (issue 14, class 5): every per-volume field of meta.json
through snapshot, restore and clone, each either carried from the source or recomputed for
the new volume. The case that was lost: a volume whose filesystem growth was deferred
(`needs_fs_grow`), snapshotted, gave a restore that never grew."""

from __future__ import annotations

import os
import time

import pytest

from csi_driver.proto import csi_pb2
from csi_driver.volumes.store import Meta
from tests.conftest import NODE_ID, Driver
from tests.helpers import MIB, cap_for, create, delete, down, read_sum, up, write_data

pytestmark = pytest.mark.root


def meta_of(d: Driver, kind: str, oid: str) -> Meta:
    return Meta.from_json((d.data_dir / kind / oid / "meta.json").read_text())


def fs_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def copy_of(c: object, name: str, fs: str, size: int, *, snap: str = "", vol: str = "",
            **params: str) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap_for(fs)], parameters=params,
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=size))
    if snap:
        req.volume_content_source.snapshot.snapshot_id = snap
    else:
        req.volume_content_source.volume.volume_id = vol
    return c.controller.CreateVolume(req).volume  # type: ignore[attr-defined, no-any-return]


def defer_growth(d: Driver, vid: str, size: int) -> None:
    """Grow a filesystem volume while it is published for raw block access: the driver
    grows the image and never touches a filesystem it did not mount, so the filesystem
    growth is owed (needs_fs_grow) until the next stage as a filesystem."""
    raw = up(d.client, vid, str(d.kubelet_dir), "block", name=f"{vid}-raw")
    d.client.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=raw.target, capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
    down(d.client, raw)
    assert meta_of(d, "volumes", vid).needs_fs_grow


def test_deferred_growth_survives_snapshot_restore_and_clone(driver: Driver) -> None:
    c = driver.client
    create(c, "owed", 64 * MIB, "ext4")
    p = up(c, "owed", str(driver.kubelet_dir), "ext4")
    digest = write_data(p)
    down(c, p)
    defer_growth(driver, "owed", 192 * MIB)
    c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="owed-snap", source_volume_id="owed"))
    copy_of(c, "owed-restored", "ext4", 192 * MIB, snap="owed-snap")  # same size as the snapshot
    copy_of(c, "owed-clone", "ext4", 192 * MIB, vol="owed")
    for vid in ("owed-restored", "owed-clone", "owed"):
        q = up(c, vid, str(driver.kubelet_dir), "ext4", name=vid)
        assert fs_bytes(q.target) > 150 * MIB, f"{vid}: the filesystem never grew to the image"
        assert read_sum(q) == digest
        down(c, q)
        q = up(c, vid, str(driver.kubelet_dir), "ext4", name=vid)  # restage: still grown
        assert fs_bytes(q.target) > 150 * MIB
        down(c, q)
        assert not meta_of(driver, "volumes", vid).needs_fs_grow
    assert meta_of(driver, "snapshots", "owed-snap").needs_fs_grow, "the snapshot's own bytes still owe it"
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="owed-snap"))
    for vid in ("owed-restored", "owed-clone", "owed"):
        delete(c, vid)


def test_every_field_through_snapshot_restore_and_clone(driver: Driver) -> None:
    c = driver.client
    started = time.time()
    pvc = {"csi.storage.k8s.io/pvc/name": "src-claim"}
    create(c, "src", 64 * MIB, "ext4", diskformat="zeroedthick", **pvc)
    src = meta_of(driver, "volumes", "src")
    assert (src.fs_type, src.diskformat, src.reclaim, src.requested_bytes) == ("ext4", "zeroedthick", "none", 64 * MIB)
    assert src.parameters == {"diskformat": "zeroedthick", **pvc, "access_type": "mount"}

    c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id="src"))
    snap = meta_of(driver, "snapshots", "snap")
    assert snap.kind == "snapshot" and snap.name == "snap"
    assert snap.fs_type == "ext4", "the snapshot's bytes hold the source's filesystem"
    assert snap.diskformat == "thin", "a snapshot is a sparse copy whatever its source"
    assert snap.requested_bytes == 64 * MIB, "the size the source had"
    assert (snap.source_kind, snap.source_id) == ("volume", "src")
    assert snap.needs_fs_grow is False
    assert snap.parameters == {"access_type": "mount"}
    assert snap.ephemeral is False and snap.node_id == NODE_ID and snap.created >= started

    # Restore with a defaulted fsType, thin, larger: follows the source's filesystem, the
    # new request for everything else, and owes a growth.
    copy_of(c, "restored", "ext4", 96 * MIB, snap="snap", **{"csi.storage.k8s.io/pvc/name": "r"})
    r = meta_of(driver, "volumes", "restored")
    assert (r.kind, r.name, r.fs_type) == ("volume", "restored", "ext4")
    assert (r.diskformat, r.reclaim) == ("thin", "discard"), "the new volume's diskformat and reclaim"
    assert r.requested_bytes == 96 * MIB
    assert (r.source_kind, r.source_id) == ("snapshot", "snap")
    assert r.needs_fs_grow is True
    assert r.parameters == {"csi.storage.k8s.io/pvc/name": "r", "access_type": "mount"}
    assert r.ephemeral is False and r.node_id == NODE_ID and r.created >= snap.created

    # Clone for raw block access, eagerzeroedthick: block access, but the bytes still hold
    # ext4, and that is what the clone records.
    copy_of(c, "cloned", "block", 64 * MIB, vol="src", diskformat="eagerzeroedthick")
    k = meta_of(driver, "volumes", "cloned")
    assert k.fs_type == "ext4" and k.parameters["access_type"] == "block"
    assert (k.diskformat, k.reclaim, k.requested_bytes) == ("eagerzeroedthick", "none", 64 * MIB)
    assert (k.source_kind, k.source_id, k.needs_fs_grow) == ("volume", "src", False)

    # A raw block volume's snapshot and restore stay raw block.
    create(c, "raw", 32 * MIB, "block")
    c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="raw-snap", source_volume_id="raw"))
    rs = meta_of(driver, "snapshots", "raw-snap")
    assert (rs.fs_type, rs.parameters) == ("", {"access_type": "block"})
    copy_of(c, "raw-restored", "block", 48 * MIB, snap="raw-snap")
    rr = meta_of(driver, "volumes", "raw-restored")
    assert (rr.fs_type, rr.parameters["access_type"], rr.needs_fs_grow) == ("", "block", False)
    assert rr.requested_bytes == 48 * MIB

    for sid in ("snap", "raw-snap"):
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
    for vid in ("restored", "cloned", "raw-restored", "raw", "src"):
        delete(c, vid)
