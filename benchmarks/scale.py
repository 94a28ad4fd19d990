"""`bench.py scale`: the driver with many volumes (1,000 by default): start-up, GetCapacity,
a full ListVolumes walk, NodeStageVolume of one among them, and the driver's memory idle,
after the burst of creates and after a restart."""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from csi_driver.ops.client import CsiClient, capability
from csi_driver.proto import csi_pb2

from . import stats
from .common import MIB, BenchError, bench_root
from .driver import LocalDriver
from .lifecycle import Layout, Recorder, run_pool
from .watch import idle_memory, settle, tree_memory


def timings(fn: Callable[[], object], reps: int) -> dict[str, float]:
    values = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        values.append(time.perf_counter() - t0)
    return stats.summarize(values).as_dict()


def list_walk(client: CsiClient, page: int) -> int:
    token, seen = "", 0
    while True:
        resp = client.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=page, starting_token=token))
        seen += len(resp.entries)
        token = resp.next_token
        if not token:
            return seen


def mode_scale(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"volumes": args.volumes, "volume_size": args.size, "fs": args.fs}
    cap = capability(fs_type=args.fs)
    with bench_root(Path(args.base_dir)) as root:
        drv = LocalDriver(root)
        try:
            out["startup_empty_seconds"] = drv.start()
            with CsiClient.connect(drv.endpoint) as client:
                start_mem = tree_memory(drv.pid)
                out["idle_empty_bytes"] = start_mem["resident_bytes"]
                out["idle_rss_empty_bytes"] = start_mem["rss_bytes"]
                names = [f"scale-{i:05d}" for i in range(args.volumes)]

                def create(name: str, rec: Recorder, acc: list[float]) -> None:
                    with rec.timed("CreateVolume", acc):
                        client.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                            name=name, volume_capabilities=[cap],
                            capacity_range=csi_pb2.CapacityRange(required_bytes=args.size)))

                rec, wall = run_pool(names, args.concurrency, create)
                out["create"] = {"wall_seconds": wall, "volumes_per_second": args.volumes / wall,
                                 "latency": stats.summarize(rec.steps["CreateVolume"]).as_dict()}
                print(f"created {args.volumes} volumes in {wall:.1f} s")
                out["after_burst_bytes"], out["after_burst_rss_bytes"] = idle_memory(drv.pid)
                out["settle_seconds"] = settle(drv.pid, int(start_mem["processes"]))
                out["idle_bytes"], out["idle_rss_bytes"] = idle_memory(drv.pid)
                out["get_capacity"] = timings(lambda: client.controller.GetCapacity(
                    csi_pb2.GetCapacityRequest(volume_capabilities=[cap])), args.reps)
                walks = {}
                for page in (args.page_size, 0):
                    seen = list_walk(client, page)
                    if seen != args.volumes:
                        raise BenchError(f"ListVolumes walk saw {seen} volumes, not {args.volumes}")
                    walks[str(page)] = timings(functools.partial(list_walk, client, page), args.reps)
                out["list_walk"] = walks
            drv.stop()
            starts = []
            for _ in range(args.reps):
                starts.append(drv.start())
                out["idle_after_start_bytes"], out["idle_rss_after_start_bytes"] = idle_memory(drv.pid)
                drv.stop()
            out["startup"] = stats.summarize(starts).as_dict()
            drv.start()
            with CsiClient.connect(drv.endpoint) as client:
                layout = Layout(drv.kubelet_dir)
                name = names[len(names) // 2]
                staging = layout.staging(name)
                staging.mkdir(parents=True)
                stage_t, unstage_t = [], []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    client.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                        volume_id=name, staging_target_path=str(staging), volume_capability=cap))
                    t1 = time.perf_counter()
                    client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                        volume_id=name, staging_target_path=str(staging)))
                    stage_t.append(t1 - t0)
                    unstage_t.append(time.perf_counter() - t1)
                out["stage"] = stats.summarize(stage_t).as_dict()
                out["unstage"] = stats.summarize(unstage_t).as_dict()
        finally:
            drv.stop()
    ms = 1e3
    print(f"start-up with {args.volumes} volumes: p50 {out['startup']['p50']:.3f} s max "
          f"{out['startup']['max']:.3f} s (empty data dir: {out['startup_empty_seconds']:.3f} s)")
    print(f"GetCapacity: p50 {out['get_capacity']['p50'] * ms:.1f} ms p95 {out['get_capacity']['p95'] * ms:.1f} ms")
    for page, s in out["list_walk"].items():
        what = "one page" if page == "0" else f"pages of {page}"
        print(f"ListVolumes walk ({what}): p50 {s['p50'] * ms:.1f} ms p95 {s['p95'] * ms:.1f} ms")
    print(f"NodeStageVolume among {args.volumes}: p50 {out['stage']['p50'] * ms:.1f} ms; "
          f"unstage p50 {out['unstage']['p50'] * ms:.1f} ms")
    print(f"driver memory, resident with each page once (RSS sum): "
          f"{out['idle_empty_bytes'] / MIB:.1f} ({out['idle_rss_empty_bytes'] / MIB:.1f}) MiB idle empty, "
          f"{out['after_burst_bytes'] / MIB:.1f} ({out['after_burst_rss_bytes'] / MIB:.1f}) MiB just "
          f"after creating {args.volumes} volumes, {out['idle_bytes'] / MIB:.1f} "
          f"({out['idle_rss_bytes'] / MIB:.1f}) MiB idle again {out['settle_seconds']:.1f} s later, "
          f"{out['idle_after_start_bytes'] / MIB:.1f} ({out['idle_rss_after_start_bytes'] / MIB:.1f}) "
          f"MiB after a restart")
    return out
