"""thinloopctl against a real driver on a temp data dir: the CSI subcommands still work,
`node status` and `node trim` read the node as it is, and every -o format parses."""

from __future__ import annotations

import os

import pytest

from csi_driver.proto import csi_pb2
from tests.conftest import NODE_ID, Driver
from tests.helpers import MIB, create, delete, down, stage, up, write_data
from tests.operator.conftest import Ctl

pytestmark = pytest.mark.root

VOLUME_KEYS = {"kind", "id", "name", "apparent_bytes", "allocated_bytes", "fs_type", "diskformat",
               "created", "source", "ephemeral", "state", "loop_device", "direct_io", "staged_at",
               "published_at"}
TOTAL_KEYS = {"volumes", "snapshots", "provisioned_bytes", "allocated_bytes", "snapshot_allocated_bytes",
              "capacity_bytes", "free_bytes", "unused_promises_bytes", "thin_saving_bytes", "overcommit"}


def endpoint(d: Driver) -> str:
    return f"--endpoint=unix://{d.socket}"


def test_csi_subcommands_keep_working(driver: Driver, run_ctl: Ctl) -> None:
    ep = endpoint(driver)
    r = run_ctl(ep, "-o", "json", "create", "ctl-a", "--size", "64Mi", "--fs-type", "ext4")
    assert r.code == 0, r.err
    vid = r.json()["volume_id"]
    assert r.json()["capacity_bytes"] == str(64 * MIB)  # proto JSON writes int64 as a string

    info = run_ctl(ep, "-o", "json", "info")
    assert info.code == 0
    doc = info.json()
    assert doc["ready"] is True and doc["node_id"] == NODE_ID and "not_ready_reason" not in doc

    listed = run_ctl(ep, "-o", "yaml", "list")
    assert listed.code == 0
    assert [e["id"] for e in listed.yaml()] == [vid]
    assert listed.yaml()[0]["fs"] == "ext4"

    table = run_ctl(ep, "list")
    assert table.out.splitlines()[0].split() == ["ID", "SIZE", "FS", "DISKFORMAT", "IN_USE", "CONDITION"]

    snap = run_ctl(ep, "-o", "json", "snapshot", vid, "ctl-snap")
    assert snap.code == 0
    sid = snap.json()["snapshot_id"]
    assert [s["id"] for s in run_ctl(ep, "-o", "json", "snapshots").json()] == [sid]
    assert run_ctl(ep, "delete-snapshot", sid).code == 0
    assert run_ctl(ep, "delete", vid).code == 0

    missing = run_ctl(ep, "stage", "no-such-volume", driver.path("st"), "--fs-type", "ext4")
    assert missing.code == 1 and "NOT_FOUND" in missing.err


def test_no_driver_and_bad_usage_exit_codes(tmp_path: object, run_ctl: Ctl) -> None:
    gone = run_ctl("--endpoint=unix:///nonexistent/csi.sock", "list")
    assert gone.code == 1 and "no driver answers" in gone.err
    assert run_ctl("node", "status", "--data-dir", "/nonexistent").code == 2


def test_node_status_shows_states_sizes_and_totals(driver: Driver, run_ctl: Ctl) -> None:
    c = driver.client
    mounted = create(c, "st-mounted", 64 * MIB, "ext4")
    block = create(c, "st-block", 32 * MIB, "block")
    idle = create(c, "st-idle", 48 * MIB, "ext4", diskformat="zeroedthick")
    p = up(c, mounted.volume_id, str(driver.kubelet_dir), "ext4")
    write_data(p, 8 * MIB)
    block_staging = driver.path("plugins/staging/blk")
    stage(c, block.volume_id, block_staging, "block")
    snap = c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="st-snap", source_volume_id=idle.volume_id)).snapshot
    try:
        r = run_ctl("-o", "json", "node", "status", "--data-dir", str(driver.data_dir))
        assert r.code == 0, r.err
        doc = r.json()
        assert set(doc) == {"data_dir", "data_fs_type", "driver", "volumes", "snapshots", "totals"}
        assert doc["driver"].startswith(f"pid {driver.proc.pid if driver.proc else 0} host ")
        assert doc["data_fs_type"] not in ("", "unknown")
        vols = {v["id"]: v for v in doc["volumes"]}
        assert set(vols) == {mounted.volume_id, block.volume_id, idle.volume_id}
        assert all(set(v) == VOLUME_KEYS for v in vols.values())

        m = vols[mounted.volume_id]
        assert m["state"] == "published" and m["fs_type"] == "ext4" and m["diskformat"] == "thin"
        assert m["staged_at"] == [p.staging] and m["published_at"] == [p.target]
        assert m["loop_device"].startswith("/dev/loop")
        assert m["apparent_bytes"] == 64 * MIB and 8 * MIB <= m["allocated_bytes"] < 64 * MIB

        b = vols[block.volume_id]
        assert b["state"] == "staged" and b["fs_type"] == "block" and b["published_at"] == []
        assert b["loop_device"].startswith("/dev/loop")

        i = vols[idle.volume_id]
        assert i["state"] == "idle" and i["loop_device"] == "" and i["diskformat"] == "zeroedthick"
        assert i["allocated_bytes"] >= 48 * MIB

        assert [s["id"] for s in doc["snapshots"]] == [snap.snapshot_id]
        assert doc["snapshots"][0]["source"] == f"volume/{idle.volume_id}"

        t = doc["totals"]
        assert set(t) == TOTAL_KEYS
        assert t["volumes"] == 3 and t["snapshots"] == 1
        assert t["provisioned_bytes"] == (64 + 32 + 48) * MIB
        assert t["allocated_bytes"] == sum(v["allocated_bytes"] for v in vols.values())
        assert t["thin_saving_bytes"] == t["provisioned_bytes"] - t["allocated_bytes"] > 0
        assert t["free_bytes"] > 0 and t["capacity_bytes"] >= t["free_bytes"]
        assert t["overcommit"] == pytest.approx(t["unused_promises_bytes"] / t["free_bytes"], rel=0.01)

        as_yaml = run_ctl("-o", "yaml", "node", "status", "--data-dir", str(driver.data_dir)).yaml()
        assert as_yaml["totals"]["volumes"] == 3
        after = run_ctl("node", "status", "--data-dir", str(driver.data_dir), "-o", "json").json()
        assert after["totals"]["volumes"] == 3, "-o is accepted after the subcommand too"

        table = run_ctl("node", "status", "--data-dir", str(driver.data_dir))
        assert table.code == 0
        for word in ("VOLUMES", "SNAPSHOTS", "thin saving", "overcommit", "published", p.target):
            assert word in table.out
    finally:
        down(c, p)
        c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=block.volume_id, staging_target_path=block_staging))
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        for v in (mounted, block, idle):
            delete(c, v.volume_id)


def test_node_trim_gives_deleted_space_back(driver: Driver, run_ctl: Ctl) -> None:
    c = driver.client
    # reclaim=none: no online discard, so freed blocks stay allocated until a trim
    vol = create(c, "trim-me", 96 * MIB, "ext4", reclaim="none")
    block = create(c, "trim-block", 16 * MIB, "block")
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    try:
        write_data(p, 48 * MIB)
        os.unlink(p.data_path)
        os.sync()
        r = run_ctl("-o", "json", "node", "trim", "--data-dir", str(driver.data_dir))
        assert r.code == 0, r.err
        rows = {row["id"]: row for row in r.json()}
        row = rows[vol.volume_id]
        assert row["result"] == "trimmed" and row["mount_point"] == p.staging
        assert row["trimmed_bytes"] > 32 * MIB
        assert row["allocated_after"] < row["allocated_before"] - 32 * MIB
        assert rows[block.volume_id]["result"].startswith("skipped")
        assert rows[block.volume_id]["allocated_after"] is None

        table = run_ctl("node", "trim", "--data-dir", str(driver.data_dir), vol.volume_id)
        assert table.code == 0 and "given back to the host" in table.out
        assert f"trimming {vol.volume_id}" in table.err  # progress, for people only
    finally:
        down(c, p)
        delete(c, vol.volume_id)
        delete(c, block.volume_id)
