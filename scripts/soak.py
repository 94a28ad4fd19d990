#!/usr/bin/env python3
"""Soak: run N full volume lifecycles in a row against a driver this script starts on a
temporary directory, and print the driver's open fds, threads, loop devices, mounts and
RSS at the start (after a short warm-up) and at the end. Flat figures mean no leak.

    .venv/bin/python scripts/soak.py --lifecycles 1000      (as root, after scripts/install-deps.sh --test)

Each lifecycle: CreateVolume, NodeStageVolume, NodePublishVolume, a write and fsync
through the published path, NodeGetVolumeStats, NodeUnpublishVolume, NodeUnstageVolume,
DeleteVolume; every fifth one also CreateSnapshot and DeleteSnapshot. Volumes alternate
between ext4 and raw block. Needs root (real loop devices, mkfs, mount)."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import procmem  # noqa: E402
from csi_driver.host.sweep import loops_under, mounts_under, sweep  # noqa: E402
from csi_driver.ops.client import CsiClient, capability  # noqa: E402
from csi_driver.proto import csi_pb2  # noqa: E402

MIB = 1 << 20
WARMUP = 5
POOL_FILL = 32
"""Concurrent calls made in the warm-up: more than the server's worker pool holds."""


@dataclass(frozen=True)
class Figures:
    """What a leak would show in: the fds, threads and memory of the driver's processes
    (the server, the worker spawner and the workers, summed), and the loop devices and
    mounts under the soak directory. Memory as the physical pages they map, each counted
    once (procmem.resident_bytes), and as the RSS sum, which counts a shared page in each
    process that maps it."""

    fds: int
    threads: int
    loops: int
    mounts: int
    rss_bytes: int
    memory_bytes: int
    processes: int

    def line(self) -> str:
        return (f"processes={self.processes} fds={self.fds} threads={self.threads} loops={self.loops} "
                f"mounts={self.mounts} memory={self.memory_bytes / MIB:.1f}MiB rss-sum={self.rss_bytes / MIB:.1f}MiB")


@dataclass(frozen=True)
class Report:
    lifecycles: int
    start: Figures
    end: Figures
    seconds: float

    @property
    def flat(self) -> bool:
        s, e = self.start, self.end
        return ((e.processes, e.fds, e.threads, e.loops, e.mounts)
                == (s.processes, s.fds, s.threads, s.loops, s.mounts))


def measure(proc: psutil.Process, root: Path) -> Figures:
    pids = procmem.driver_processes(proc.pid)
    procs = [psutil.Process(p) for p in pids]
    mem = [p.memory_full_info() for p in procs]
    resident = procmem.resident_bytes(pids)
    return Figures(fds=sum(p.num_fds() for p in procs), threads=sum(p.num_threads() for p in procs),
                   loops=len(loops_under(root)), mounts=len(mounts_under(root)),
                   rss_bytes=sum(m.rss for m in mem),
                   memory_bytes=resident if resident is not None else mem[0].rss + sum(m.uss for m in mem[1:]),
                   processes=len(procs))


def settle(proc: psutil.Process, root: Path, start: Figures, wait: float = 10.0) -> Figures:
    """The end figures, once gRPC's event-engine threads that a burst of work started have
    gone idle and exited (they do within seconds); at most `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        now = measure(proc, root)
        if now.threads <= start.threads or time.monotonic() > deadline:
            return now
        time.sleep(0.25)


class SoakDriver:
    """The driver process under test, on root/data with kubelet paths under root/kubelet."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "run" / "csi.sock"
        self.kubelet = root / "kubelet"
        self.kubelet.mkdir(parents=True, exist_ok=True)
        self.log = open(root / "driver.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{self.socket}",
             "--data-dir", str(root / "data"), "--kubelet-dir", str(self.kubelet),
             "--node-id", "soak-node", "--log-level", "warning",
             # The same workers from start to end, so that a leak in them shows; that idle
             # workers exit is tested in tests/integration/test_workers.py.
             "--worker-idle-seconds", "3600"],
            cwd=ROOT, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the driver did not start; see {root / 'driver.log'}")
            time.sleep(0.05)
        self.client = CsiClient.connect(f"unix://{self.socket}")

    def stop(self) -> int:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


def lifecycle(c: CsiClient, kubelet: Path, i: int) -> None:
    block = i % 2 == 1
    name = f"soak-{i}"
    cap = capability(block=True) if block else capability(fs_type="ext4")
    size = 8 * MIB if block else 16 * MIB
    c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[cap], capacity_range=csi_pb2.CapacityRange(required_bytes=size)))
    staging = kubelet / "plugins" / "staging" / name
    target = kubelet / "pods" / name / "mount"
    staging.mkdir(parents=True)
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=name, staging_target_path=str(staging), volume_capability=cap))
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=name, staging_target_path=str(staging), target_path=str(target), volume_capability=cap))
    data = target if block else target / "data.bin"
    fd = os.open(data, os.O_WRONLY | (0 if block else os.O_CREAT), 0o644)
    try:
        os.write(fd, os.urandom(64 << 10))
        os.fsync(fd)
    finally:
        os.close(fd)
    c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=name, volume_path=str(target)))
    if i % 5 == 0:
        c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=f"{name}-snap", source_volume_id=name))
        c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=f"{name}-snap"))
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=name, target_path=str(target)))
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=name, staging_target_path=str(staging)))
    c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=name))
    staging.rmdir()  # kubelet removes the staging dir it made
    target.parent.rmdir()


def cleanup(root: Path) -> list[str]:
    """Unmount and detach anything left under root (there should be nothing)."""
    return sweep(root)


def run(lifecycles: int, root: Path, progress: Callable[[str], None] | None = None) -> Report:
    """Warm up, measure, run the lifecycles, measure again. The driver is stopped and
    everything under root torn down before returning."""
    driver = SoakDriver(root)
    try:
        proc = psutil.Process(driver.proc.pid)
        for i in range(WARMUP):
            lifecycle(driver.client, driver.kubelet, -1 - i)
        # The server's worker pool grows lazily up to its ceiling (a worker still busy
        # replying when the next call arrives makes it start another): fill it now so
        # that growth is not mistaken for a leak.
        # The workers' own pools too: their calls are the Controller and Node ones.
        with concurrent.futures.ThreadPoolExecutor(POOL_FILL) as pool:
            list(pool.map(lambda _: driver.client.identity.Probe(csi_pb2.ProbeRequest()), range(8 * POOL_FILL)))
            list(pool.map(lambda _: driver.client.node.NodeGetCapabilities(
                csi_pb2.NodeGetCapabilitiesRequest()), range(8 * POOL_FILL)))
        start = measure(proc, root)
        if progress:
            progress(f"start: {start.line()}")
        began = time.monotonic()
        for i in range(lifecycles):
            lifecycle(driver.client, driver.kubelet, i)
            if progress and (i + 1) % 100 == 0:
                progress(f"{i + 1:>6} lifecycles, {time.monotonic() - began:7.1f}s: {measure(proc, root).line()}")
        seconds = time.monotonic() - began
        end = settle(proc, root, start)
        if progress:
            progress(f"end:   {end.line()}")
    finally:
        driver.stop()
        cleanup(root)
    return Report(lifecycles, start, end, seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lifecycles", "-n", type=int, default=1000, help="how many (default 1000)")
    p.add_argument("--dir", type=Path, default=None, help="work dir (default: a new temp dir, removed after)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    root = a.dir or Path(tempfile.mkdtemp(prefix="thinloop-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = run(a.lifecycles, root, progress=lambda line: print(line, flush=True))
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    rate = report.lifecycles / report.seconds if report.seconds else 0.0
    print(f"{report.lifecycles} lifecycles in {report.seconds:.1f}s ({rate:.1f}/s)")
    growth = (report.end.memory_bytes - report.start.memory_bytes) / MIB
    print(f"memory growth: {growth:+.1f}MiB; processes/fds/threads/loops/mounts "
          f"{'flat' if report.flat else 'CHANGED'}")
    print("figures:", {"start": asdict(report.start), "end": asdict(report.end)})
    return 0 if report.flat else 1


if __name__ == "__main__":
    sys.exit(main())
