from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver.config import SettingsError, parse_settings


def test_defaults_and_env() -> None:
    s = parse_settings([], {"THINLOOP_NODE_ID": "n1", "THINLOOP_MODE": "controller"})
    assert s.node_id == "n1" and s.mode == "controller" and not s.touches_files
    assert s.driver_name == "thinloop.csi.io" and s.overcommit_ratio == 1.0
    assert s.socket_path == Path("/run/thinloop/csi.sock")
    assert s.workers == 2
    assert parse_settings([], {"THINLOOP_NODE_ID": "n", "THINLOOP_WORKERS": "0"}).workers == 0
    assert s.worker_idle_seconds == 10.0
    assert parse_settings(["--worker-idle-seconds", "0.5"], {"THINLOOP_NODE_ID": "n"}).worker_idle_seconds == 0.5


def test_flags_override_env() -> None:
    s = parse_settings(["--node-id", "flag", "--endpoint", "unix:///x/y.sock"], {"THINLOOP_NODE_ID": "env"})
    assert s.node_id == "flag" and s.socket_path == Path("/x/y.sock")


@pytest.mark.parametrize(("argv", "needle"), [
    (["--mode", "both"], "--mode"),
    (["--endpoint", "tcp://1.2.3.4:5"], "unix://"),
    (["--endpoint", "unix://relative.sock"], "absolute"),
    (["--overcommit-ratio", "0.5"], "overcommit"),
    (["--overcommit-ratio", "x"], "overcommit"),
    (["--max-volumes-per-node", "-1"], "max-volumes"),
    (["--data-dir", "rel"], "--data-dir"),
    (["--log-format", "xml"], "log-format"),
    (["--driver-name=-bad-"], "driver-name"),
    (["--workers", "-1"], "--workers"),
    (["--workers", "65"], "--workers"),
    (["--workers", "two"], "--workers"),
    (["--worker-idle-seconds", "0"], "--worker-idle-seconds"),
    (["--worker-idle-seconds", "nan"], "--worker-idle-seconds"),
    (["--worker-idle-seconds", "inf"], "--worker-idle-seconds"),
    (["--worker-idle-seconds", "soon"], "--worker-idle-seconds"),
])
def test_bad_settings_are_one_clear_line(argv: list[str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle) as info:
        parse_settings(["--node-id", "n", *argv], {})
    assert "\n" not in str(info.value)
