"""Operator commands and a running driver (issue 14, class 1): `node status` only reads and
works while the driver runs, naming it; `node trim` and `node orphans --delete` change the
data dir, so they hold each volume's in-flight key (the same keys the driver's calls hold,
across processes) and skip what the driver is working on."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi_driver.ops import ctl, orphans
from csi_driver.proto import csi_pb2
from csi_driver.volumes.inflight import InFlight
from csi_driver.volumes.store import Meta, Store
from tests.conftest import Driver
from tests.helpers import MIB, create, delete, down, up, write_data
from tests.operator.conftest import Ctl


@pytest.mark.root
def test_node_status_reads_while_the_driver_runs_and_names_it(driver: Driver, run_ctl: Ctl) -> None:
    vol = create(driver.client, "st-lock", 32 * MIB, "ext4")
    r = run_ctl("-o", "json", "node", "status", "--data-dir", str(driver.data_dir))
    assert r.code == 0, r.err
    assert driver.proc is not None
    assert r.json()["driver"].startswith(f"pid {driver.proc.pid} host ")
    assert [v["id"] for v in r.json()["volumes"]] == [vol.volume_id]
    table = run_ctl("node", "status", "--data-dir", str(driver.data_dir))
    assert f"pid {driver.proc.pid} host " in table.out
    delete(driver.client, vol.volume_id)
    driver.stop()
    idle = run_ctl("-o", "json", "node", "status", "--data-dir", str(driver.data_dir))
    assert idle.code == 0 and idle.json()["driver"] is None


@pytest.mark.root
def test_trim_skips_a_volume_the_driver_is_working_on(driver: Driver, run_ctl: Ctl) -> None:
    c = driver.client
    vol = create(c, "trim-busy", 96 * MIB, "ext4", reclaim="none")
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    try:
        write_data(p, 48 * MIB)
        os.unlink(p.data_path)
        os.sync()
        image = driver.data_dir / "volumes" / vol.volume_id / "disk.img"
        before = os.stat(image).st_blocks
        with InFlight(driver.data_dir).hold(f"vol:{vol.volume_id}"):  # as the driver holds it mid-call
            busy = run_ctl("-o", "json", "node", "trim", "--data-dir", str(driver.data_dir))
            assert busy.code == 0, busy.err
            assert busy.json()[0]["result"].startswith("skipped: busy"), busy.json()
            assert os.stat(image).st_blocks == before, "a busy volume was trimmed"
            # ...and the driver, for its part, answers ABORTED while the trim holds the key
        done = run_ctl("-o", "json", "node", "trim", "--data-dir", str(driver.data_dir))
        assert done.json()[0]["result"] == "trimmed"
        with InFlight(driver.data_dir).hold(f"vol:{vol.volume_id}"):
            with pytest.raises(grpc.RpcError) as info:
                c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=vol.volume_id, target_path=p.target))
            assert info.value.code() == grpc.StatusCode.ABORTED
    finally:
        down(c, p)
        delete(c, vol.volume_id)


def test_orphans_delete_skips_an_image_the_driver_is_working_on(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    for vid in ("v-busy", "v-free"):
        store.volumes.create(vid, Meta(name=vid, fs_type="ext4"), lambda image: image.write_bytes(b""))
    store.snapshots.create("s-busy", Meta(name="s-busy", kind="snapshot"), lambda image: image.write_bytes(b""))
    view = orphans.ClusterView([orphans.PersistentVolume("pv-x", "thinloop.csi.io", "v-elsewhere", "Bound")],
                               set(), [].append)
    args = ctl.build_parser().parse_args(
        ["-o", "json", "node", "orphans", "--data-dir", str(store.data_dir), "--delete", "--yes"])
    with InFlight(store.data_dir).hold("vol:v-busy", "snapshot:s-busy"):
        out = ctl.cmd_node_orphans(args, cluster=view)
    results = {r["id"]: r for r in out.value["results"]}
    assert results["v-free"]["deleted"] and results["v-free"]["message"] == "deleted"
    for busy in ("v-busy", "s-busy"):
        assert not results[busy]["deleted"] and results[busy]["message"].startswith("skipped: busy")
    assert out.code == ctl.EXIT_FOUND
    assert store.volumes.ids() == ["v-busy"] and store.snapshots.ids() == ["s-busy"]
    again = ctl.cmd_node_orphans(args, cluster=view)
    assert again.code == ctl.EXIT_OK and store.volumes.ids() == [] and store.snapshots.ids() == []
