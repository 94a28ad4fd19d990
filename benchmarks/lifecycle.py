"""`bench.py lifecycle`: volumes through the whole CSI lifecycle (create, stage, publish,
a 4 KiB write with fsync, unpublish, unstage, delete) on a number of threads, against the
driver this mode starts or any endpoint; and the machinery every lifecycle run shares:
kubelet's paths, step timings, the thread pool, the result's figures."""

from __future__ import annotations

import argparse
import contextlib
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from csi_driver.ops.client import CsiClient, capability
from csi_driver.proto import csi_pb2

from . import common, stats
from .common import DRIVER_NAME, MIB, STEPS, BenchError, bench_root, names_for, sweep_named
from .driver import local_driver
from .watch import ProcWatch, find_listener, memory_line, tree_memory


@dataclass(frozen=True)
class Layout:
    """Where a volume's staging and target paths go, as kubelet lays them out."""

    kubelet_dir: Path

    def staging(self, name: str) -> Path:
        return self.kubelet_dir / "plugins" / "kubernetes.io" / "csi" / DRIVER_NAME / name / "globalmount"

    def target(self, name: str) -> Path:
        return self.kubelet_dir / "pods" / f"pod-{name}" / "volumes" / "kubernetes.io~csi" / name / "mount"

    def volume_dirs(self, name: str) -> list[Path]:
        """What kubelet would remove after the pod and the staging are gone."""
        return [self.kubelet_dir / "plugins" / "kubernetes.io" / "csi" / DRIVER_NAME / name,
                self.kubelet_dir / "pods" / f"pod-{name}"]


class Recorder:
    """Step durations from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps: dict[str, list[float]] = {s: [] for s in STEPS}
        self.per_volume: list[float] = []

    @contextlib.contextmanager
    def timed(self, step: str, acc: list[float]) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        acc.append(dt)
        with self._lock:
            self.steps[step].append(dt)

    def volume_done(self, seconds: float) -> None:
        with self._lock:
            self.per_volume.append(seconds)


Worker = Callable[[str, Recorder, list[float]], None]


def run_pool(names: Sequence[str], concurrency: int, worker: Worker) -> tuple[Recorder, float]:
    """Run worker(name) for every name on `concurrency` threads; return the recorder and the
    wall time. A failure stops the others from starting new volumes and is re-raised; so is
    Ctrl-C, after every worker has torn its volume down."""
    rec = Recorder()
    work: queue.Queue[str] = queue.Queue()
    for n in names:
        work.put(n)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                name = work.get_nowait()
            except queue.Empty:
                return
            acc: list[float] = []
            try:
                worker(name, rec, acc)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                stop.set()
                return
            rec.volume_done(sum(acc))

    threads = [threading.Thread(target=loop, name=f"bench-{i}", daemon=True)
               for i in range(min(concurrency, len(names)))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.1)  # short joins keep Ctrl-C deliverable
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join()
        raise
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return rec, wall


def csi_worker(client: CsiClient, layout: Layout, size: int, fs: str) -> Worker:
    cap = capability(fs_type=fs)

    def one(name: str, rec: Recorder, acc: list[float]) -> None:
        staging, target = layout.staging(name), layout.target(name)
        staging.mkdir(parents=True, exist_ok=True)  # kubelet makes the staging dir
        created = staged = published = False
        try:
            with rec.timed("CreateVolume", acc):
                vid = client.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                    name=name, volume_capabilities=[cap],
                    capacity_range=csi_pb2.CapacityRange(required_bytes=size))).volume.volume_id
            created = True
            with rec.timed("NodeStageVolume", acc):
                client.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                    volume_id=vid, staging_target_path=str(staging), volume_capability=cap))
            staged = True
            with rec.timed("NodePublishVolume", acc):
                client.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                    volume_id=vid, staging_target_path=str(staging), target_path=str(target),
                    volume_capability=cap))
            published = True
            with rec.timed("write", acc):
                common.write_small_file(target)
            with rec.timed("NodeUnpublishVolume", acc):
                client.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=vid, target_path=str(target)))
            published = False
            with rec.timed("NodeUnstageVolume", acc):
                client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=vid, staging_target_path=str(staging)))
            staged = False
            with rec.timed("DeleteVolume", acc):
                client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
            created = False
        finally:
            # Best-effort teardown of whatever a failure left, through the driver itself.
            if published:
                with contextlib.suppress(grpc.RpcError):
                    client.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                        volume_id=name, target_path=str(target)), timeout=120)
            if staged or published:
                with contextlib.suppress(grpc.RpcError):
                    client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                        volume_id=name, staging_target_path=str(staging)), timeout=120)
            if created:
                with contextlib.suppress(grpc.RpcError):
                    client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=name), timeout=120)
            for d in layout.volume_dirs(name):
                shutil.rmtree(d, ignore_errors=True)

    return one


def run_result(rec: Recorder, wall: float, count: int) -> dict[str, Any]:
    return {
        "volumes": count,
        "wall_seconds": wall,
        "volumes_per_second": stats.ratio(count, wall),
        "lifecycle": stats.summarize(rec.per_volume).as_dict(),
        "steps": {s: stats.summarize(v).as_dict() for s, v in rec.steps.items() if v},
    }


def print_run(label: str, res: dict[str, Any]) -> None:
    lc = res["lifecycle"]
    print(f"{label}: {res['volumes']} volumes in {res['wall_seconds']:.2f} s = "
          f"{res['volumes_per_second']:.2f} vol/s; lifecycle p50 {lc['p50'] * 1e3:.1f} ms "
          f"p95 {lc['p95'] * 1e3:.1f} ms max {lc['max'] * 1e3:.1f} ms")
    for step, s in res["steps"].items():
        print(f"    {step:<20} p50 {s['p50'] * 1e3:8.2f} ms  p95 {s['p95'] * 1e3:8.2f} ms  "
              f"max {s['max'] * 1e3:8.2f} ms")
    proc = res.get("driver")
    if proc:
        print(f"    driver ({int(proc['processes'])} processes): peak memory {proc['peak_resident_bytes'] / MIB:.1f} MiB, "
              f"peak RSS {proc['peak_rss_bytes'] / MIB:.1f} MiB, CPU {proc['cpu_seconds']:.2f} s "
              f"({proc['cpu_percent']:.0f}% of one core), children {proc['children_cpu_seconds']:.2f} s")


def thinloop_run(client: CsiClient, layout: Layout, names: list[str], size: int, fs: str,
                 concurrency: int, pid: int | None) -> dict[str, Any]:
    watch = ProcWatch(pid) if pid else None
    with watch if watch is not None else contextlib.nullcontext():
        rec, wall = run_pool(names, concurrency, csi_worker(client, layout, size, fs))
    res = run_result(rec, wall, len(names))
    res["concurrency"] = concurrency
    if watch is not None:
        res["driver"] = watch.result
    return res


def mode_lifecycle(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    with contextlib.ExitStack() as stack:
        if args.endpoint:
            if not args.kubelet_dir:
                raise BenchError("--kubelet-dir is required with --endpoint: staging and target "
                                 "paths must lie where the driver accepts them")
            endpoint, kubelet = args.endpoint, Path(args.kubelet_dir)
            pid = args.pid or find_listener(endpoint.removeprefix("unix://"))
        else:
            root = stack.enter_context(bench_root(Path(args.base_dir)))
            drv = stack.enter_context(local_driver(root))
            endpoint, kubelet, pid = drv.endpoint, drv.kubelet_dir, drv.pid
        client = stack.enter_context(CsiClient.connect(endpoint))
        tag = uuid.uuid4().hex[:6]
        # Mounts the run makes live under these two dirs; sweep them whatever happens.
        layout = Layout(kubelet)
        stack.callback(sweep_named, kubelet, f"bench-{tag}-")
        if pid:
            mem = tree_memory(pid)
            out["driver_idle_bytes"], out["driver_idle_rss_bytes"] = mem["resident_bytes"], mem["rss_bytes"]
            print(f"driver pid {pid}: idle {memory_line(mem)}")
        for c in args.concurrency:
            res = thinloop_run(client, layout, names_for(f"{tag}-c{c}", args.count), args.size,
                               args.fs, c, pid)
            print_run(f"thinloop c={c}", res)
            out["runs"].append(res)
    return out
