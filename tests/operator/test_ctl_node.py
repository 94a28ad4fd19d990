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
    assert r.json()["capacity_bytes"] == 64 * MIB  # an int, as every size in -o json
    assert r.json()["created"] is True
    again = run_ctl(ep, "-o", "json", "create", "ctl-a", "--size", "64Mi", "--fs-type", "ext4")
    assert again.code == 5 and again.json()["created"] is False  # nothing created: said so

    info = run_ctl(ep, "-o", "json", "info")
    assert info.code == 0
    doc = info.json()
    assert doc["ready"] is True and doc["node_id"] == NODE_ID and doc["not_ready_reason"] is None
    assert doc["services"] == ["controller", "node"] and isinstance(doc["available_capacity"], int)
    assert f"topology.thinloop.csi.io/node={NODE_ID}" in run_ctl(ep, "info").out

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
    assert missing.code == 4 and "NodeStageVolume: NOT_FOUND" in missing.err

    # What did nothing says so, with its own exit code, in both output modes.
    assert run_ctl(ep, "delete", vid).code == 4
    gone = run_ctl(ep, "-o", "json", "delete", vid)
    assert gone.code == 4 and gone.json()["error"]["kind"] == "NOT_FOUND"
    assert "nothing deleted" in gone.json()["error"]["message"]
    nosnap = run_ctl(ep, "delete-snapshot", sid)
    assert nosnap.code == 4 and "no snapshot" in nosnap.err


def test_no_driver_and_bad_usage_exit_codes(tmp_path: object, run_ctl: Ctl) -> None:
    gone = run_ctl("--endpoint=unix:///nonexistent/csi.sock", "list")
    assert gone.code == 1 and "no socket at /nonexistent/csi.sock" in gone.err
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
        assert set(doc) == {"data_dir", "data_fs_type", "driver", "datastore", "volumes", "snapshots", "totals"}
        assert doc["datastore"] is None  # node-local
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


def test_group_snapshot_subcommands(driver: Driver, run_ctl: Ctl) -> None:
    ep = endpoint(driver)
    vols = [create(driver.client, f"ctl-g{i}", 64 * MIB).volume_id for i in range(2)]
    made = run_ctl(ep, "-o", "json", "group-snapshot", "ctl-group", *vols)
    assert made.code == 0, made.err
    assert made.json()["group_snapshot_id"] == "ctl-group" and made.json()["ready_to_use"] is True
    members = sorted(s["snapshot_id"] for s in made.json()["snapshots"])
    assert members == ["ctl-group-ctl-g0", "ctl-group-ctl-g1"]
    table = run_ctl(ep, "group-snapshot", "ctl-group", *vols)  # idempotent, and says so
    assert table.code == 5 and table.out.startswith(
        "group snapshot ctl-group already exists: nothing taken (ctl-group-ctl-g0 (ctl-g0)")
    missing = run_ctl(ep, "delete-group-snapshot", "no-such-group")
    assert missing.code == 4 and "no group snapshot no-such-group: nothing deleted" in missing.err

    listed = run_ctl(ep, "-o", "json", "group-snapshots").json()
    assert [(g["id"], g["volumes"], g["snapshots"], g["ready"]) for g in listed] == \
        [("ctl-group", vols, members, True)]
    lines = run_ctl(ep, "group-snapshots").out.splitlines()
    assert lines[0].split() == ["ID", "VOLUMES", "SNAPSHOTS", "CREATED", "READY"]
    assert lines[1].split()[:3] == ["ctl-group", ",".join(vols), ",".join(members)]
    assert {s["id"]: s["group"] for s in run_ctl(ep, "-o", "json", "snapshots").json()} == \
        dict.fromkeys(members, "ctl-group")

    alone = run_ctl(ep, "delete-snapshot", members[0])
    assert alone.code == 1 and "INVALID_ARGUMENT" in alone.err and "DeleteVolumeGroupSnapshot" in alone.err
    elsewhere = run_ctl(ep, "group-snapshot", "ctl-other", vols[0], "on-another-node")
    assert elsewhere.code == 1 and "FAILED_PRECONDITION" in elsewhere.err and "on-another-node" in elsewhere.err

    assert run_ctl(ep, "delete-group-snapshot", "ctl-group").out.strip() == \
        "deleted group snapshot ctl-group and its snapshots"
    assert run_ctl(ep, "-o", "json", "group-snapshots").json() == []
    assert run_ctl(ep, "-o", "json", "snapshots").json() == []
    for v in vols:
        delete(driver.client, v)


def test_expand_says_which_part_it_did(driver: Driver, run_ctl: Ctl) -> None:
    ep = endpoint(driver)
    c = driver.client
    vol = create(c, "ctl-grow", 320 * MIB, "xfs")
    # In use nowhere: the controller side grows the image; the filesystem follows at stage.
    r = run_ctl(ep, "-o", "json", "expand", vol.volume_id, "400Mi")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["capacity_bytes"] == 400 * MIB and doc["previous_capacity_bytes"] == 320 * MIB
    assert doc["controller_expanded"] is True and doc["node_expanded"] is False
    assert "controller side: not staged" in doc["message"] and "grows when it is next staged" in doc["message"]
    assert os.path.getsize(driver.data_dir / "volumes" / vol.volume_id / "disk.img") == 400 * MIB
    same = run_ctl(ep, "expand", vol.volume_id, "400Mi")
    assert same.code == 5 and "already 400.0MiB: nothing changed" in same.out
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "xfs")
    try:
        # xfs keeps its 64 MiB log out of f_blocks: made at 320 MiB it shows 256 MiB.
        st = os.statvfs(p.target)
        assert st.f_blocks * st.f_frsize > 320 * MIB, "the filesystem grew at stage"
        # Staged: growing is the node's work, online, and needs the path.
        staged = run_ctl(ep, "expand", vol.volume_id, "480Mi")
        assert staged.code == 5 and "nothing changed" in staged.out and "--path" in staged.out
        assert os.path.getsize(driver.data_dir / "volumes" / vol.volume_id / "disk.img") == 400 * MIB
        online = run_ctl(ep, "expand", vol.volume_id, "480Mi", "--path", p.target, "--staging-path", p.staging)
        assert online.code == 0, online.err
        assert online.out.strip() == (f"grew {vol.volume_id} from 400.0MiB to 480.0MiB: image, loop device and "
                                      f"xfs filesystem online at {p.target}")
        st = os.statvfs(p.target)
        assert st.f_blocks * st.f_frsize > 400 * MIB
        missing = run_ctl(ep, "expand", "no-such-volume", "1Gi")
        assert missing.code == 4 and "nothing expanded" in missing.err
    finally:
        down(c, p)
        delete(c, vol.volume_id)


def test_trim_of_unknown_or_untrimmable_names_says_so(driver: Driver, run_ctl: Ctl) -> None:
    c = driver.client
    vol = create(c, "trim-idle", 64 * MIB, "ext4")
    try:
        unknown = run_ctl("node", "trim", "--data-dir", str(driver.data_dir), vol.volume_id, "no-such")
        assert unknown.code == 4
        assert unknown.err.strip() == (f"thinloopctl: no volume no-such in {driver.data_dir}: nothing trimmed "
                                       "(thinloopctl node status lists the volumes here)")
        idle = run_ctl("-o", "json", "node", "trim", "--data-dir", str(driver.data_dir), vol.volume_id)
        assert idle.code == 5
        assert idle.json()[0]["result"] == "skipped: not staged on this node"
    finally:
        delete(c, vol.volume_id)


@pytest.mark.parametrize(("mode", "services", "has_node", "has_capacity"), [
    ("controller", ["controller"], False, False),
    ("node", ["node"], True, False),
])
def test_info_calls_only_what_the_mode_serves(workdir: object, run_ctl: Ctl, mode: str, services: list[str],
                                             has_node: bool, has_capacity: bool) -> None:
    from pathlib import Path
    d = Driver(Path(str(workdir)), extra_args=["--mode", mode]).start()
    try:
        r = run_ctl(endpoint(d), "-o", "json", "info")
        assert r.code == 0, r.err
        doc = r.json()
        assert doc["services"] == services and doc["ready"] is True
        assert (doc["node_id"] == NODE_ID) if has_node else doc["node_id"] is None
        assert (doc["available_capacity"] is not None) == has_capacity
        table = run_ctl(endpoint(d), "info")
        assert table.code == 0 and ("no Node service" in table.out) != has_node
    finally:
        d.stop()
