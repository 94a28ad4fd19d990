"""Fixtures for the operator tools: thinloopctl run in-process, and drivers started with
extra flags (metrics, JSON logs)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi_driver.ops import ctl
from tests.conftest import Driver


@dataclass
class CtlResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def yaml(self) -> Any:
        return yaml.safe_load(self.out)


Ctl = Callable[..., CtlResult]


@pytest.fixture
def run_ctl(capsys: pytest.CaptureFixture[str]) -> Ctl:
    """Run thinloopctl in this process; return its exit code and what it printed."""

    def run(*argv: str) -> CtlResult:
        capsys.readouterr()
        code = ctl.main(list(argv))
        captured = capsys.readouterr()
        return CtlResult(code, captured.out, captured.err)

    return run


def start_driver(root: Path, *extra: str) -> Driver:
    return Driver(root, extra_args=list(extra)).start()


@pytest.fixture
def metrics_driver(workdir: Path) -> Iterator[tuple[Driver, int]]:
    """A driver serving metrics on a free port of 127.0.0.1, and that port."""
    d = start_driver(workdir, "--metrics-address", "127.0.0.1:0", "--log-format", "json")
    try:
        yield d, wait_for_metrics_port(d)
    finally:
        d.shutdown()


@pytest.fixture
def json_driver(workdir: Path) -> Iterator[Driver]:
    d = start_driver(workdir, "--log-format", "json")
    try:
        yield d
    finally:
        d.shutdown()


def wait_for_metrics_port(d: Driver, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"serving Prometheus metrics on \S+ \(port (\d+)\)", d.log())
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(f"the driver never said where metrics are served:\n{d.log()}")


def log_records(d: Driver) -> list[dict[str, Any]]:
    """The driver's JSON log lines (anything else, such as a traceback, is skipped)."""
    out = []
    for line in d.log().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
