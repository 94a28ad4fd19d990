"""A tiny run of each scripts/bench.py mode (the modes are in benchmarks/) on real loop
devices: few volumes, small sizes, no timing assertions. Each run must leave no loop device
or mount behind, also when it fails half-way."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benchmarks import common
from tests import kernel
from tests.conftest import Driver

pytestmark = pytest.mark.root

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("thinloop_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench()


def run(bench: ModuleType, workdir: Path, *argv: str) -> dict[str, Any]:
    out = workdir / "result.json"
    rc = bench.main([*argv, "--base-dir", str(workdir / "bench"), "--json", str(out)])
    assert rc == 0
    assert kernel.loops_under(workdir) == [] and kernel.mounts_under(workdir) == []
    bench_dir = workdir / "bench"
    assert not bench_dir.exists() or not any(bench_dir.iterdir()), "the run removes its temp dir"
    doc: dict[str, Any] = json.loads(out.read_text())
    assert doc["machine"]["cpus"] >= 1
    result: dict[str, Any] = doc["result"]
    return result


def test_lifecycle_starting_its_own_driver(bench: ModuleType, workdir: Path) -> None:
    res = run(bench, workdir, "lifecycle", "--count", "2", "--size", "64Mi", "--concurrency", "1,2")
    assert [r["concurrency"] for r in res["runs"]] == [1, 2]
    for r in res["runs"]:
        assert r["volumes"] == 2 and r["volumes_per_second"] > 0
        assert set(r["steps"]) == set(common.STEPS)
        assert r["driver"]["peak_rss_bytes"] > 0
        assert 0 < r["driver"]["peak_resident_bytes"] <= r["driver"]["peak_rss_bytes"]
        assert 0 < r["driver"]["peak_pss_bytes"] <= r["driver"]["peak_rss_bytes"]
        # The server, the spawner and one worker (c=1) or two (c=2, two at once).
        assert r["driver"]["processes"] == 2 + r["concurrency"]
    assert 0 < res["driver_idle_bytes"] <= res["driver_idle_rss_bytes"]


def test_lifecycle_against_an_endpoint(bench: ModuleType, driver: Driver, workdir: Path) -> None:
    res = run(bench, workdir, "lifecycle", "--endpoint", f"unix://{driver.socket}",
              "--kubelet-dir", str(driver.kubelet_dir), "--count", "2", "--size", "64Mi", "--fs", "xfs")
    assert res["runs"][0]["driver"]["cpu_seconds"] >= 0, "found the driver by its socket"
    assert list((driver.data_dir / "volumes").iterdir()) == []


def test_raw_floor(bench: ModuleType, workdir: Path) -> None:
    res = run(bench, workdir, "raw", "--count", "3", "--size", "64Mi", "--concurrency", "2")
    assert res["runs"][0]["steps"]["NodeStageVolume"]["n"] == 3


def test_compare_prints_the_ratio_last(bench: ModuleType, workdir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    plots = workdir / "img"
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    extra = ["--plot", str(plots)] if have_mpl else []
    res = run(bench, workdir, "compare", "--count", "2", "--size", "64Mi", "--rounds", "2",
              "--concurrency", "1,2", *extra)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("ratio thinloop/raw (sequential): ")
    float(last.rsplit(" ", 1)[1])
    assert set(res["ratio_time_thinloop_over_raw"]) == {"1", "2"}
    assert len(res["per_round"]) == 4
    if have_mpl:
        assert sorted(p.name for p in plots.iterdir()) == ["latency_per_rpc.png", "volumes_per_second.png"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio(bench: ModuleType, workdir: Path) -> None:
    res = run(bench, workdir, "fio", "--size", "96Mi", "--file-size", "16Mi", "--runtime", "1",
              "--rounds", "1")
    assert set(res["jobs"]) == {"randread_4k", "randwrite_4k", "seqwrite_1m"}
    for job in res["jobs"].values():
        assert job["median"]["thinloop"]["iops"] > 0 and job["median"]["host"]["iops"] > 0


def test_scale(bench: ModuleType, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THINLOOP_WORKER_IDLE_SECONDS", "0.5")
    res = run(bench, workdir, "scale", "--volumes", "5", "--size", "16Mi", "--reps", "1",
              "--page-size", "2")
    assert res["startup"]["n"] == 1 and res["startup"]["p50"] > 0
    assert set(res["list_walk"]) == {"2", "0"}
    assert res["stage"]["n"] == 1
    assert res["settle_seconds"] < 30, "the workers went idle and exited"
    for resident, rss in (("idle_empty_bytes", "idle_rss_empty_bytes"),
                          ("after_burst_bytes", "after_burst_rss_bytes"),
                          ("idle_bytes", "idle_rss_bytes")):
        assert 0 < res[resident] <= res[rss]


@pytest.mark.parametrize("mode", ["lifecycle", "raw"])
def test_a_failure_half_way_leaves_nothing_behind(bench: ModuleType, workdir: Path,
                                                  monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The write step fails while volumes are staged and published on two threads."""
    calls: list[Path] = []

    def broken_write(target: Path) -> None:
        calls.append(target)
        raise OSError(5, "injected write failure")

    monkeypatch.setattr(common, "write_small_file", broken_write)
    with pytest.raises(OSError, match="injected"):
        bench.main([mode, "--count", "4", "--size", "64Mi", "--concurrency", "2",
                    "--base-dir", str(workdir / "bench")])
    assert calls, "the failure happened with volumes published"
    assert kernel.loops_under(workdir) == [] and kernel.mounts_under(workdir) == []
    assert not any((workdir / "bench").iterdir())
