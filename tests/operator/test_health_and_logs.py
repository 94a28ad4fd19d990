"""Health and logs: Probe as the livenessprobe sidecar sees it, a not-ready reason made
visible (log, metric, thinloopctl info), and one JSON log line per RPC with no secrets."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from tests.conftest import NODE_ID, Driver
from tests.helpers import MIB, cap_for
from tests.operator.conftest import Ctl, log_records, wait_for_metrics_port
from tests.operator.test_doctor import path_without
from tests.operator.test_metrics import scrape, value

pytestmark = pytest.mark.root

SECRET = "hunter2"


def test_rpc_log_lines_are_json_and_never_carry_secrets(json_driver: Driver) -> None:
    c = json_driver.client
    secrets = {"password": SECRET}
    vol = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="logged", volume_capabilities=[cap_for("ext4")], secrets=secrets,
        capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MIB))).volume
    with pytest.raises(grpc.RpcError):
        c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id="missing", staging_target_path=json_driver.path("s"),
            volume_capability=cap_for("ext4"), secrets=secrets))
    c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=secrets))

    text = json_driver.log()
    assert SECRET not in text
    records = log_records(json_driver)
    create_line = next(r for r in records if r.get("method") == "CreateVolume")
    assert {"time", "level", "logger", "msg", "method", "code", "duration_ms", "req_name"} <= set(create_line)
    assert create_line["code"] == "OK" and create_line["level"] == "info"
    assert create_line["req_name"] == "logged"
    assert isinstance(create_line["duration_ms"], float | int) and create_line["duration_ms"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", create_line["time"])
    failed = next(r for r in records if r.get("method") == "NodeStageVolume")
    assert failed["code"] == "NOT_FOUND" and failed["level"] == "warning" and failed["volume_id"] == "missing"
    deleted = next(r for r in records if r.get("method") == "DeleteVolume")
    assert deleted["volume_id"] == vol.volume_id and deleted["code"] == "OK"


def test_probe_is_ready_for_the_livenessprobe_sidecar(driver: Driver) -> None:
    assert driver.client.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_not_ready_reason_is_logged_exported_and_shown(workdir: Path, run_ctl: Ctl) -> None:
    # A tool missing at start stops the driver there (tests/reliability/test_startup_errors.py);
    # one that goes missing later makes Probe answer not ready.
    tools = path_without(workdir, "")
    d = Driver(workdir, extra_args=["--metrics-address", "127.0.0.1:0"], env={"PATH": tools}).start()
    (Path(tools) / "mkfs.xfs").unlink()
    try:
        port = wait_for_metrics_port(d)
        assert d.client.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
        assert "not ready: missing tools: mkfs.xfs" in d.log()
        s = scrape(port)
        assert value(s, "thinloop_ready", node=NODE_ID) == 0
        assert value(s, "thinloop_not_ready", node=NODE_ID, reason="missing tools: mkfs.xfs") == 1

        # The reason is the one that very Probe found, as the driver gives it: thinloopctl
        # need not share the driver's host, PATH or data dir (this test process has mkfs.xfs).
        info = run_ctl(f"--endpoint=unix://{d.socket}", "-o", "json", "info")
        assert info.code == 0
        assert info.json()["ready"] is False
        assert info.json()["not_ready_reason"] == "missing tools: mkfs.xfs"
        table = run_ctl(f"--endpoint=unix://{d.socket}", "info")
        assert "ready                no: missing tools: mkfs.xfs" in table.out
        # Current, not stale: once the tool is back, the next info says ready.
        (Path(tools) / "mkfs.xfs").symlink_to(shutil.which("mkfs.xfs") or "/sbin/mkfs.xfs")
        again = run_ctl(f"--endpoint=unix://{d.socket}", "-o", "json", "info")
        assert again.json()["ready"] is True and again.json()["not_ready_reason"] is None
    finally:
        d.stop()
        d.kill()

