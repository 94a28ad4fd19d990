"""Prometheus metrics: scraped over HTTP from a real driver after a lifecycle, parsed with
prometheus_client's own parser; plus the collector alone over a fake OS layer."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.proto import csi_pb2
from csi_driver.serving.driver import Driver as ServerDriver
from csi_driver.serving.metrics import Metrics
from csi_driver.settings import Settings, parse_address
from tests.conftest import NODE_ID, Driver
from tests.fakeos import FakeOS
from tests.helpers import MIB, cap_for, create, delete, down, up
from tests.operator.conftest import wait_for_metrics_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.mark.root
def test_metrics_after_a_lifecycle(metrics_driver: tuple[Driver, int]) -> None:
    d, port = metrics_driver
    c = d.client
    vol = create(c, "metrics-vol", 64 * MIB, "ext4")
    p = up(c, vol.volume_id, str(d.kubelet_dir), "ext4")
    snap = c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="metrics-snap", source_volume_id=vol.volume_id)).snapshot
    with pytest.raises(grpc.RpcError):
        c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id="no-such-volume", staging_target_path=d.path("x"), volume_capability=cap_for("ext4")))
    try:
        s = scrape(port)
        rpc = "thinloop_rpc_requests_total"
        assert value(s, rpc, method="CreateVolume", code="OK") == 1
        assert value(s, rpc, method="NodeStageVolume", code="OK") == 1
        assert value(s, rpc, method="NodePublishVolume", code="OK") == 1
        assert value(s, rpc, method="CreateSnapshot", code="OK") == 1
        assert value(s, rpc, method="NodeStageVolume", code="NOT_FOUND") == 1
        hist = "thinloop_rpc_duration_seconds"
        assert value(s, f"{hist}_count", method="CreateVolume", code="OK") == 1
        assert value(s, f"{hist}_bucket", method="CreateVolume", code="OK", le="+Inf") == 1
        assert value(s, f"{hist}_sum", method="CreateVolume", code="OK") > 0
        assert value(s, "thinloop_volumes", node=NODE_ID) == 1
        assert value(s, "thinloop_snapshots", node=NODE_ID) == 1
        assert value(s, "thinloop_provisioned_bytes", node=NODE_ID) == 64 * MIB
        assert 0 < value(s, "thinloop_allocated_bytes", node=NODE_ID) < 64 * MIB
        assert value(s, "thinloop_capacity_bytes", node=NODE_ID) >= value(s, "thinloop_free_bytes", node=NODE_ID)
        assert value(s, "thinloop_available_bytes", node=NODE_ID) > 0
        assert value(s, "thinloop_operations_in_flight") == 0
        assert value(s, "thinloop_ready", node=NODE_ID) == 1
        assert not [k for k in s if k[0] == "thinloop_not_ready"]
        assert value(s, "thinloop_recovery_actions_total") == 0
        assert value(s, "thinloop_build_info", driver_name="thinloop.csi.io", mode="all", node=NODE_ID,
                      version="0.1.0") == 1
    finally:
        down(c, p)
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))

    # A leftover of an interrupted create is cleared at the next start, and counted.
    (d.data_dir / "volumes" / ".tmp-interrupted.abcd").mkdir()
    d.log_path.unlink()
    d.restart()
    s = scrape(wait_for_metrics_port(d))
    assert value(s, "thinloop_recovery_actions_total") == 1
    assert value(s, "thinloop_snapshots", node=NODE_ID) == 0
    delete(d.client, vol.volume_id)
    assert value(scrape(wait_for_metrics_port(d)), "thinloop_volumes", node=NODE_ID) == 0


def test_collector_reports_not_ready_with_its_reason(tmp_path: Path) -> None:
    fake = FakeOS()
    fake.missing = ["mkfs.xfs"]
    settings = Settings(socket_path=tmp_path / "csi.sock", node_id="n1", data_dir=tmp_path / "data")
    driver = ServerDriver.build(settings, oslayer=fake)
    metrics = Metrics.for_driver(driver, ["removed unfinished volume .tmp-x"])
    metrics.observe("Probe", "OK", 0.002)
    s = parse(generate_latest(metrics.registry).decode())
    assert value(s, "thinloop_ready", node="n1") == 0
    assert value(s, "thinloop_not_ready", node="n1", reason="missing tools: mkfs.xfs") == 1
    assert value(s, "thinloop_rpc_requests_total", method="Probe", code="OK") == 1
    assert value(s, "thinloop_recovery_actions_total") == 1
    assert value(s, "thinloop_volumes", node="n1") == 0


def test_controller_mode_has_no_node_gauges(tmp_path: Path) -> None:
    settings = Settings(socket_path=tmp_path / "csi.sock", node_id="n1", data_dir=tmp_path / "data",
                        mode="controller")
    s = parse(generate_latest(Metrics.for_driver(ServerDriver.build(settings)).registry).decode())
    assert value(s, "thinloop_ready", node="n1") == 1
    assert not [k for k in s if k[0] == "thinloop_volumes"]


@pytest.mark.parametrize(("address", "expected"), [
    (":9809", ("0.0.0.0", 9809)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:9809", ("::1", 9809))])
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9809", "host:port", ":99999"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError, match="metrics-address"):
        parse_address(address)
