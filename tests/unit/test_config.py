from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver.serving.flags import parse_settings
from csi_driver.settings import SettingsError


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


@pytest.mark.parametrize(("environ", "needle"), [
    ({"THINLOOP_MODE": "both"}, "THINLOOP_MODE 'both': expected one of all, controller, node"),
    ({"THINLOOP_WORKERS": "two"}, "THINLOOP_WORKERS 'two': not an integer"),
    ({"THINLOOP_DATA_DIR": "rel"}, "THINLOOP_DATA_DIR 'rel': must be an absolute path"),
    ({"THINLOOP_ENDPOINT": "tcp://h:1"}, "THINLOOP_ENDPOINT 'tcp://h:1': only unix://"),
    ({"THINLOOP_METRICS_ADDRESS": "9809"}, "THINLOOP_METRICS_ADDRESS '9809': expected host:port"),
])
def test_errors_name_the_environment_variable_that_set_the_value(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_settings(["--node-id", "n"], environ)
    assert str(info.value).startswith(needle)


def test_a_flag_wins_over_its_variable_and_is_named() -> None:
    with pytest.raises(SettingsError, match=r"^--mode 'x'"):
        parse_settings(["--node-id", "n", "--mode", "x"], {"THINLOOP_MODE": "node"})
    settings = parse_settings(["--node-id", "n", "--mode", "node"], {"THINLOOP_MODE": "x"})
    assert settings.mode == "node" and settings.source("mode") == "--mode"
    assert parse_settings(["--node-id", "n"], {"THINLOOP_DATA_DIR": "/d"}).source("data_dir") == "THINLOOP_DATA_DIR"


def test_socket_path_limit_is_the_kernel_one() -> None:
    ok = "/" + "a" * 106
    assert str(parse_settings(["--node-id", "n", "--endpoint", f"unix://{ok}"], {}).socket_path) == ok
    with pytest.raises(SettingsError, match="108 bytes; a unix socket path holds at most 107"):
        parse_settings(["--node-id", "n", "--endpoint", f"unix://{ok}b"], {})


def test_unknown_flag_is_one_line() -> None:
    with pytest.raises(SettingsError) as info:
        parse_settings(["--node-id", "n", "--bogus"], {})
    assert str(info.value) == "unrecognized arguments: --bogus (see thinloop-csi --help)"
