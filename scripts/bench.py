#!/usr/bin/env python3
"""thinloop benchmarks: the CSI lifecycle against any endpoint, the same lifecycle done with
plain commands (the floor), both in alternation, the data path with fio, and the driver at
1,000 volumes.

    .venv/bin/python scripts/bench.py lifecycle --endpoint unix:///run/csi.sock --kubelet-dir /var/lib/kubelet
    .venv/bin/python scripts/bench.py raw --count 20 --concurrency 1,8
    .venv/bin/python scripts/bench.py compare --count 20 --rounds 3 --concurrency 1,2,4,8,16 --plot docs/img
    .venv/bin/python scripts/bench.py fio --runtime 10
    .venv/bin/python scripts/bench.py scale --volumes 1000
    .venv/bin/python scripts/bench.py shared --moves 20 --runtime 10   # shared mode on a GlusterFS of its own

Every mode takes --json FILE. Needs root, loop devices, mkfs and mount. Every run removes the
loop devices and mounts it made, also on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from csi_driver import benchstats, procmem  # noqa: E402
from csi_driver.host.linux import HostOS, sector_size_for  # noqa: E402
from csi_driver.host.sweep import loops_under, mounts_under, sweep  # noqa: E402
from csi_driver.ops.client import CsiClient, capability  # noqa: E402
from csi_driver.proto import csi_pb2, csi_pb2_grpc  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
DRIVER_NAME = "thinloop.csi.io"
STEPS = ("CreateVolume", "NodeStageVolume", "NodePublishVolume", "write", "NodeUnpublishVolume",
         "NodeUnstageVolume", "DeleteVolume")
LOOP_CTL_GET_FREE = 0x4C82
CMD_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C"}
WRITE_BYTES = 4096


class BenchError(RuntimeError):
    """The benchmark could not run; the message is one line for the user."""


# -- small helpers ------------------------------------------------------------------------

def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": MIB, "mi": MIB, "g": GIB, "gi": GIB,
             "t": 1 << 40, "ti": 1 << 40}
    t = text.strip().lower().removesuffix("b")
    digits = t.rstrip("kmgti")
    unit = t[len(digits):]
    if not digits or unit not in units:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64Mi or 1Gi")
    return int(float(digits) * units[unit])


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad list {text!r}: use e.g. 1,2,4,8") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"bad list {text!r}: positive integers, comma-separated")
    return values


def run_cmd(argv: Sequence[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run one plain command (no shell) the way the driver's runner does."""
    proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=CMD_ENV, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def umount_retrying(path: Path, tries: int = 5) -> None:
    """umount; a short retry when the kernel says busy (a thread's forked child can hold a
    file on the mount for the moment before its exec closes it)."""
    for i in range(tries):
        try:
            run_cmd(["umount", str(path)], timeout=120)
            return
        except BenchError as exc:
            if "busy" not in str(exc) or i == tries - 1:
                raise
            time.sleep(0.02)


def mkfs_argv(fs: str, discard: bool) -> list[str]:
    """The driver's mkfs options (csi_driver/host/linux.py HostOS.mkfs)."""
    if fs in ("ext3", "ext4"):
        return [f"mkfs.{fs}", "-q", "-F", "-b", "4096", *([] if discard else ["-E", "nodiscard"])]
    if fs == "xfs":
        return ["mkfs.xfs", "-q", "-f", "-s", "size=4096", *([] if discard else ["-K"])]
    raise BenchError(f"unsupported filesystem {fs}")


def sweep_named(kubelet: Path, needle: str) -> list[str]:
    """Unmount what this run left under a driver's kubelet dir: only paths that carry the
    run's own volume names, never another workload's mounts."""
    points = sorted((p for p in mounts_under(kubelet) if needle in p), key=len, reverse=True)
    for p in points:
        subprocess.run(["umount", p], capture_output=True, check=False)
    return points


@contextlib.contextmanager
def bench_root(base: Path, keep: bool = False) -> Iterator[Path]:
    """A fresh temp dir, swept of loop devices and mounts and removed on the way out."""
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="thinloop-bench-", dir=base))
    try:
        yield root
    finally:
        left = sweep(root)
        if left:
            print(f"cleanup: removed what the run left behind: {', '.join(left)}", file=sys.stderr)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "memory_bytes": psutil.virtual_memory().total, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# -- the driver as a local process --------------------------------------------------------

def find_listener(socket_path: str) -> int | None:
    """Pid of the process listening on a unix socket, or None."""
    real = os.path.realpath(socket_path)
    try:
        for conn in psutil.net_connections(kind="unix"):
            # gRPC binds "unix:///p" as "///p": compare resolved paths.
            if conn.pid and isinstance(conn.laddr, str) and conn.laddr \
                    and os.path.realpath(conn.laddr) == real:
                return conn.pid
    except psutil.Error:
        return None
    return None


def tree_memory(pid: int, *, full: bool = True) -> dict[str, float]:
    """The memory of the driver's processes (procmem.driver_processes: the server, and the
    worker spawner and workers it forked). `resident`: every physical page any of them
    maps, counted once (procmem.resident_bytes, as root; otherwise the server's RSS plus
    the others' private pages, which misses pages two children still share). The RSS sum
    counts a shared page in each process. PSS splits each shared page among all its
    mappers, this benchmark's own gRPC client among them, so it reads low; it is kept for
    reference."""
    pids = procmem.driver_processes(pid)
    rss = fallback = pss = 0.0
    for i, p in enumerate(pids):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(p)
            if full:
                info = proc.memory_full_info()
                pss += info.pss
                fallback += info.rss if i == 0 else info.uss
                rss += info.rss
            else:
                rss += proc.memory_info().rss
    out = {"rss_bytes": rss, "processes": float(len(pids))}
    if full:
        resident = procmem.resident_bytes(pids)
        out["pss_bytes"] = pss
        out["resident_bytes"] = float(resident) if resident is not None else fallback
    return out


def idle_memory(pid: int) -> tuple[float, float]:
    """(resident, RSS sum) of the driver's processes (see tree_memory)."""
    mem = tree_memory(pid)
    return mem["resident_bytes"], mem["rss_bytes"]


def memory_line(mem: dict[str, float]) -> str:
    n = int(mem["processes"])
    return (f"{mem['resident_bytes'] / MIB:.1f} MiB resident, each page once (RSS sum "
            f"{mem['rss_bytes'] / MIB:.1f}, PSS {mem['pss_bytes'] / MIB:.1f}) "
            f"over {n} process{'es' if n != 1 else ''}")


class _Cpu:
    """CPU seconds of a changing set of processes: each one's own time from when it is
    first seen to when it is last seen, and the time of the commands it ran and reaped
    (mkfs), except in a process that forked driver processes, whose reaped children's time
    is theirs, counted already. A worker that lives less than a sample apart is missed."""

    def __init__(self) -> None:
        self.since = time.time()
        self.first: dict[int, tuple[float, float]] = {}
        self.last: dict[int, tuple[float, float]] = {}
        self.parents: set[int] = set()

    def sample(self, procs: dict[int, psutil.Process]) -> None:
        for pid, proc in procs.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                now = (t.user + t.system, t.children_user + t.children_system)
                if pid not in self.first:  # one born since counts from nothing
                    self.first[pid] = (0.0, 0.0) if proc.create_time() > self.since else now
                self.last[pid] = now
                if proc.ppid() in procs:
                    self.parents.add(proc.ppid())

    def totals(self) -> tuple[float, float]:
        own = sum(self.last[p][0] - self.first[p][0] for p in self.last)
        kids = sum(self.last[p][1] - self.first[p][1] for p in self.last if p not in self.parents)
        return own, kids


class ProcWatch:
    """Memory and CPU of the driver's processes over a stretch of time. Workers come and
    go, so the set of processes is read again every 200 ms, with their CPU times; the RSS
    sum is sampled every 20 ms, the resident memory and PSS every second (reading page
    tables costs a few ms of CPU per process, which the driver would feel on 2 cores).
    Peaks are kept; see tree_memory."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = {"rss_bytes": 0.0, "pss_bytes": 0.0, "resident_bytes": 0.0}
        self.most_processes = 0
        self._procs: dict[int, psutil.Process] = {}
        self._cpu = _Cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._t0 = 0.0
        self.result: dict[str, float] = {}

    def _refresh(self) -> None:
        pids = procmem.driver_processes(self.pid)
        self._procs = {p: self._procs.get(p) or psutil.Process(p) for p in pids}
        self.most_processes = max(self.most_processes, len(pids))
        self._cpu.sample(self._procs)

    def _take(self, full: bool) -> dict[str, float]:
        if full:
            mem = tree_memory(self.pid)
        else:
            rss = 0.0
            for proc in self._procs.values():
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
            mem = {"rss_bytes": rss}
        for k in self.peak:
            self.peak[k] = max(self.peak[k], mem.get(k, 0.0))
        return mem

    def _sample(self) -> None:
        n = 0
        while not self._stop.wait(0.02):
            n += 1
            with contextlib.suppress(OSError, psutil.Error):  # the driver may be stopping
                if n % 10 == 0:
                    self._refresh()
                self._take(full=n % 50 == 0)

    def __enter__(self) -> ProcWatch:
        self._t0 = time.monotonic()
        self._refresh()
        self._take(full=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self._t0
        self._refresh()
        end = self._take(full=True)
        own, kids = self._cpu.totals()
        self.result = {**{f"peak_{k}": v for k, v in self.peak.items()},
                       **{f"end_{k}": end[k] for k in self.peak},
                       "processes": float(self.most_processes),
                       "cpu_seconds": own, "children_cpu_seconds": kids,
                       "cpu_percent": 100.0 * own / wall if wall else math.nan, "wall_seconds": wall}


@dataclass
class LocalDriver:
    """thinloop started by the benchmark on its own temp dirs."""

    root: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    data: Path | None = None
    """The data dir, when not root/data (shared mode: a datastore's mount)."""
    node_id: str = "bench-node"

    @property
    def data_dir(self) -> Path:
        return self.data or self.root / "data"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "csi.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 30.0) -> float:
        """Start the driver; return seconds from process start until Probe answers ready."""
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "csi_driver", "--endpoint", self.endpoint,
                "--data-dir", str(self.data_dir), "--kubelet-dir", str(self.kubelet_dir),
                "--node-id", self.node_id, *self.extra_args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.root / "driver.log", "ab") as log:
            t0 = time.monotonic()
            # Own session: a Ctrl-C in the terminal reaches the benchmark, which stops the
            # driver itself after tearing down what it made.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=ROOT,
                                         start_new_session=True)
        deadline = t0 + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"driver did not start; see {self.root / 'driver.log'}")
            time.sleep(0.002)
        channel = grpc.insecure_channel(self.endpoint)
        try:
            stub = csi_pb2_grpc.IdentityStub(channel)
            while True:
                try:
                    resp = stub.Probe(csi_pb2.ProbeRequest(), timeout=5, wait_for_ready=True)
                    if resp.ready.value:
                        return time.monotonic() - t0
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"driver never answered Probe ready; see {self.root / 'driver.log'}")
                time.sleep(0.005)
        finally:
            channel.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def local_driver(root: Path, extra_args: Sequence[str] = ()) -> Iterator[LocalDriver]:
    d = LocalDriver(root, list(extra_args))
    try:
        d.start()
        yield d
    finally:
        d.stop()


# -- one lifecycle run --------------------------------------------------------------------

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


def write_small_file(target: Path) -> None:
    fd = os.open(target / "bench.dat", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, os.urandom(WRITE_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)


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
                write_small_file(target)
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


class RawFloor:
    """The lifecycle with the plain commands the driver runs, same options, same layout:
    <data>/volumes/<id>/disk.img, the kubelet's staging and target paths."""

    def __init__(self, root: Path, size: int, fs: str, diskformat: str = "thin") -> None:
        self.data = root / "data" / "volumes"
        self.layout = Layout(root / "kubelet")
        self.size = size
        self.fs = fs
        self.diskformat = diskformat
        self.data.mkdir(parents=True, exist_ok=True)
        self.sector = sector_size_for(self.data)

    def attach(self, image: Path) -> str:
        """LOOP_CTL_GET_FREE, then losetup on that device: the command-line form of the
        driver's LOOP_CONFIGURE (retrying when another thread took the device first)."""
        last = ""
        for _ in range(20):
            fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                index = int(fcntl.ioctl(fd, LOOP_CTL_GET_FREE))
            finally:
                os.close(fd)
            device = f"/dev/loop{index}"
            argv = ["losetup", "--direct-io=on"]
            if self.sector > 512:
                argv += ["--sector-size", str(self.sector)]
            try:
                run_cmd([*argv, device, str(image)], timeout=60)
                return device
            except BenchError as exc:
                last = str(exc)
                if "busy" not in last.lower():
                    raise
        raise BenchError(f"no free loop device: {last}")

    def worker(self) -> Worker:
        def one(name: str, rec: Recorder, acc: list[float]) -> None:
            vdir = self.data / name
            image = vdir / "disk.img"
            staging, target = self.layout.staging(name), self.layout.target(name)
            staging.mkdir(parents=True, exist_ok=True)
            device = ""
            mounted: list[Path] = []
            try:
                with rec.timed("CreateVolume", acc):
                    vdir.mkdir(mode=0o700)
                    if self.diskformat == "thin":
                        run_cmd(["truncate", "-s", str(self.size), str(image)])
                    else:
                        run_cmd(["fallocate", "-l", str(self.size), str(image)])
                    run_cmd([*mkfs_argv(self.fs, self.diskformat == "thin"), str(image)])
                with rec.timed("NodeStageVolume", acc):
                    device = self.attach(image)
                    opts = ["discard"] if self.diskformat == "thin" else []
                    if self.fs == "xfs":
                        opts.append("nouuid")
                    run_cmd(["mount", "-t", self.fs, *(["-o", ",".join(opts)] if opts else []),
                             device, str(staging)], timeout=120)
                    mounted.append(staging)
                with rec.timed("NodePublishVolume", acc):
                    target.mkdir(mode=0o750, parents=True, exist_ok=True)
                    run_cmd(["mount", "--bind", str(staging), str(target)], timeout=60)
                    mounted.append(target)
                with rec.timed("write", acc):
                    write_small_file(target)
                with rec.timed("NodeUnpublishVolume", acc):
                    umount_retrying(target)
                    mounted.remove(target)
                    target.rmdir()
                with rec.timed("NodeUnstageVolume", acc):
                    umount_retrying(staging)
                    mounted.remove(staging)
                    run_cmd(["losetup", "--detach", device], timeout=60)
                    device = ""
                with rec.timed("DeleteVolume", acc):
                    run_cmd(["rm", "-rf", str(vdir)])
            finally:
                for m in reversed(mounted):
                    subprocess.run(["umount", str(m)], capture_output=True, check=False)
                if device:
                    subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)
                shutil.rmtree(vdir, ignore_errors=True)
                for d in self.layout.volume_dirs(name):
                    shutil.rmtree(d, ignore_errors=True)

        return one


def run_result(rec: Recorder, wall: float, count: int) -> dict[str, Any]:
    return {
        "volumes": count,
        "wall_seconds": wall,
        "volumes_per_second": benchstats.ratio(count, wall),
        "lifecycle": benchstats.summarize(rec.per_volume).as_dict(),
        "steps": {s: benchstats.summarize(v).as_dict() for s, v in rec.steps.items() if v},
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


def raw_run(root: Path, names: list[str], size: int, fs: str, concurrency: int) -> dict[str, Any]:
    floor = RawFloor(root, size, fs)
    rec, wall = run_pool(names, concurrency, floor.worker())
    res = run_result(rec, wall, len(names))
    res["concurrency"] = concurrency
    return res


def names_for(tag: str, count: int) -> list[str]:
    return [f"bench-{tag}-{i:04d}" for i in range(count)]


# -- modes --------------------------------------------------------------------------------

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


def mode_raw(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    with bench_root(Path(args.base_dir)) as root:
        for c in args.concurrency:
            res = raw_run(root, names_for(f"raw-c{c}", args.count), args.size, args.fs, c)
            print_run(f"raw c={c}", res)
            out["runs"].append(res)
    return out


def headline(res: dict[str, Any]) -> dict[str, float]:
    """The figures of one run that are compared across rounds."""
    figs = {"volumes_per_second": res["volumes_per_second"],
            "seconds_per_volume": benchstats.ratio(res["wall_seconds"], res["volumes"]),
            "lifecycle_p50": res["lifecycle"]["p50"]}
    for step, s in res["steps"].items():
        figs[f"{step}_p50"] = s["p50"]
        figs[f"{step}_p95"] = s["p95"]
    for k, v in res.get("driver", {}).items():
        figs[f"driver_{k}"] = v
    return figs


def mode_compare(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": args.rounds, "concurrency": args.concurrency, "per_round": []}
    per: dict[tuple[str, int], list[dict[str, float]]] = {}
    paired: dict[int, list[float]] = {c: [] for c in args.concurrency}
    with bench_root(Path(args.base_dir)) as root, local_driver(root) as drv, \
            CsiClient.connect(drv.endpoint) as client:
        mem = tree_memory(drv.pid)
        out["driver_idle_bytes"], out["driver_idle_rss_bytes"] = mem["resident_bytes"], mem["rss_bytes"]
        print(f"thinloop pid {drv.pid}: idle {memory_line(mem)}; "
              f"{os.cpu_count()} CPUs")
        layout = Layout(drv.kubelet_dir)
        raw_root = root / "raw"
        for r in range(args.rounds):
            for c in args.concurrency:
                a = thinloop_run(client, layout, names_for(f"r{r}-c{c}", args.count), args.size,
                                 args.fs, c, drv.pid)
                b = raw_run(raw_root, names_for(f"r{r}-c{c}", args.count), args.size, args.fs, c)
                print_run(f"round {r + 1} thinloop c={c}", a)
                print_run(f"round {r + 1} raw      c={c}", b)
                out["per_round"].append({"round": r, "concurrency": c, "thinloop": a, "raw": b})
                per.setdefault(("thinloop", c), []).append(headline(a))
                per.setdefault(("raw", c), []).append(headline(b))
                paired[c].append(benchstats.ratio(b["volumes_per_second"], a["volumes_per_second"]))
    medians = {f"{kind}/c{c}": benchstats.median_of_dicts(v) for (kind, c), v in per.items()}
    out["medians"] = medians
    out["ratio_time_thinloop_over_raw"] = {str(c): benchstats.median(v) for c, v in paired.items()}
    seq = min(args.concurrency)
    thin_seq_rate = medians[f"thinloop/c{seq}"]["volumes_per_second"]
    print(f"\nmedians over {args.rounds} rounds ({args.count} volumes of {args.size} bytes, {args.fs}):")
    print(f"{'':14}{'vol/s':>8}{'lifecycle p50':>15}" + "".join(f"{s[:14]:>16}" for s in STEPS))
    for c in args.concurrency:
        for kind in ("thinloop", "raw"):
            m = medians[f"{kind}/c{c}"]
            print(f"{kind:>8} c={c:<3}{m['volumes_per_second']:8.2f}{m['lifecycle_p50'] * 1e3:12.1f} ms"
                  + "".join(f"{m.get(f'{s}_p50', math.nan) * 1e3:13.2f} ms" for s in STEPS))
        t, w = medians[f"thinloop/c{c}"], medians[f"raw/c{c}"]
        peak = t.get("driver_peak_resident_bytes", math.nan) / MIB
        print(f"   c={c}: vol/s thinloop/raw {benchstats.ratio(t['volumes_per_second'], w['volumes_per_second']):.2f}"
              f", thinloop vs its own c={seq}: "
              f"{benchstats.ratio(t['volumes_per_second'], thin_seq_rate):.2f}x, driver peak memory {peak:.1f} MiB")
    if args.plot:
        plot_compare(out, Path(args.plot))
    for c in sorted(args.concurrency, reverse=True):
        if c != seq:
            print(benchstats.format_ratio(f"time per volume, concurrency {c}",
                                          out["ratio_time_thinloop_over_raw"][str(c)]))
    print(benchstats.format_ratio("sequential" if seq == 1 else f"concurrency {seq}",
                                  out["ratio_time_thinloop_over_raw"][str(seq)]))
    return out


# -- fio ----------------------------------------------------------------------------------

FIO_JOBS: dict[str, list[str]] = {
    "randread_4k": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "randwrite_4k": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "seqwrite_1m": ["--rw=write", "--bs=1M", "--iodepth=8"],
}


def fio_run(path: Path, job: str, size: int, runtime: int) -> dict[str, float]:
    argv = ["fio", "--name=" + job, f"--filename={path}", "--direct=1", "--ioengine=libaio",
            f"--size={size}", f"--runtime={runtime}", "--time_based", "--group_reporting",
            "--output-format=json", *FIO_JOBS[job]]
    doc = json.loads(run_cmd(argv, timeout=runtime + 600).stdout)
    j = doc["jobs"][0]
    side = j["read"] if "read" in job else j["write"]
    return {"iops": float(side["iops"]), "bw_bytes": float(side["bw_bytes"]),
            "lat_p50_us": float(side["clat_ns"]["percentile"].get("50.000000", 0)) / 1e3}


def mode_fio(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("fio") is None:
        raise BenchError("fio is not installed")
    out: dict[str, Any] = {"jobs": {}, "runtime": args.runtime, "file_size": args.file_size}
    with bench_root(Path(args.base_dir)) as root, local_driver(root) as drv, \
            CsiClient.connect(drv.endpoint) as client:
        layout = Layout(drv.kubelet_dir)
        name = "bench-fio"
        cap = capability(fs_type=args.fs)
        staging, target = layout.staging(name), layout.target(name)
        staging.mkdir(parents=True)
        host = root / "host"  # a directory on the filesystem that holds the data dir
        host.mkdir()
        client.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[cap], capacity_range=csi_pb2.CapacityRange(required_bytes=args.size)))
        try:
            client.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=name, staging_target_path=str(staging), volume_capability=cap))
            client.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=name, staging_target_path=str(staging), target_path=str(target),
                volume_capability=cap))
            loop = HostOS().find_loop(drv.data_dir / "volumes" / name / "disk.img")
            out["loop_direct_io"] = bool(loop and loop.direct_io)
            print(f"thinloop volume {args.size} bytes {args.fs} at {target}, loop {loop.device if loop else '?'}"
                  f" direct-io={out['loop_direct_io']}; host dir {host}")
            # The floor of any loop device: the same image, options and mount made by hand.
            floor = RawFloor(root / "rawloop", args.size, args.fs)
            raw_image = floor.data / "disk.img"
            run_cmd(["truncate", "-s", str(args.size), str(raw_image)])
            run_cmd([*mkfs_argv(args.fs, True), str(raw_image)])
            raw_mnt = root / "rawloop" / "mnt"
            raw_mnt.mkdir()
            raw_device = floor.attach(raw_image)
            run_cmd(["mount", "-t", args.fs, "-o", "discard", raw_device, str(raw_mnt)])
            print(f"raw loop {raw_device} (losetup --direct-io=on, mount -o discard) at {raw_mnt}")
            files = {"thinloop": target / "fio.dat", "rawloop": raw_mnt / "fio.dat", "host": host / "fio.dat"}
            for f in files.values():  # lay the files out once, untimed
                run_cmd(["fio", "--name=layout", f"--filename={f}", "--rw=write", "--bs=1M", "--direct=1",
                         f"--size={args.file_size}", "--ioengine=libaio", "--output-format=json"],
                        timeout=900)
            per: dict[str, dict[str, list[dict[str, float]]]] = {}
            for r in range(args.rounds):
                for job in FIO_JOBS:
                    for kind, f in files.items():  # A B, A B, ...
                        res = fio_run(f, job, args.file_size, args.runtime)
                        per.setdefault(job, {}).setdefault(kind, []).append(res)
                        print(f"round {r + 1} {job:<13} {kind:<9} {res['iops']:10.0f} IOPS "
                              f"{res['bw_bytes'] / MIB:9.1f} MiB/s  p50 {res['lat_p50_us']:.0f} us")
            for job, kinds in per.items():
                med = {k: benchstats.median_of_dicts(v) for k, v in kinds.items()}
                key = "bw_bytes" if job.startswith("seq") else "iops"
                out["jobs"][job] = {"median": med, "rounds": kinds,
                                    "ratio": benchstats.ratio(med["thinloop"][key], med["host"][key]),
                                    "ratio_rawloop_host": benchstats.ratio(med["rawloop"][key], med["host"][key]),
                                    "ratio_thinloop_rawloop": benchstats.ratio(med["thinloop"][key],
                                                                               med["rawloop"][key])}
            for job, j in out["jobs"].items():
                unit = "MiB/s" if job.startswith("seq") else "IOPS"
                scale = 1 / MIB if job.startswith("seq") else 1.0
                key = "bw_bytes" if job.startswith("seq") else "iops"
                print(f"{job:<13} thinloop {j['median']['thinloop'][key] * scale:10.1f} {unit}  raw loop "
                      f"{j['median']['rawloop'][key] * scale:10.1f} {unit}  host "
                      f"{j['median']['host'][key] * scale:10.1f} {unit}  "
                      f"ratio thinloop/host {j['ratio']:.2f}  raw loop/host {j['ratio_rawloop_host']:.2f}  "
                      f"thinloop/raw loop {j['ratio_thinloop_rawloop']:.2f}")
        finally:
            sweep(root / "rawloop")  # the hand-made loop device and its mount
            with contextlib.suppress(grpc.RpcError):
                client.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=name, target_path=str(target)))
            with contextlib.suppress(grpc.RpcError):
                client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=name, staging_target_path=str(staging)))
            with contextlib.suppress(grpc.RpcError):
                client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=name))
    worst = min(j["ratio"] for j in out["jobs"].values())
    print(f"ratio thinloop/host (worst of {len(out['jobs'])} jobs): {worst:.2f}")
    return out


# -- shared mode ----------------------------------------------------------------------------

MOVE_STEPS = ("NodeUnpublishVolume", "NodeUnstageVolume", "ControllerUnpublishVolume",
              "ControllerPublishVolume", "NodeStageVolume", "NodePublishVolume")


@contextlib.contextmanager
def shared_mounts(root: Path, given: str) -> Iterator[dict[str, Path]]:
    """Three hosts' views of one shared filesystem: the controller's and nodes a and b.
    Given as three mounts (any shared filesystem), or a GlusterFS volume of the benchmark's
    own (tests/gluster.py: glusterd, one brick, one FUSE client per host)."""
    if given:
        parts = [Path(x) for x in given.split(",")]
        if len(parts) != 3 or not all(x.is_dir() for x in parts):
            raise BenchError("--datastore-dirs wants three existing directories: controller,a,b")
        sub = f"thinloop-bench-{uuid.uuid4().hex[:8]}"
        try:
            yield {h: x / sub for h, x in zip(("ctl", "a", "b"), parts, strict=True)}
        finally:
            shutil.rmtree(parts[0] / sub, ignore_errors=True)
        return
    from tests.gluster import GlusterBed, GlusterError
    bed = GlusterBed(root / "gluster")
    try:
        bed.start()
        yield {h: bed.mount(h) / "data" for h in ("ctl", "a", "b")}
    except GlusterError as exc:
        raise BenchError(f"GlusterFS datastore: {exc}") from None
    finally:
        sweep(root / "a")  # the volume's mounts and loop devices, before the clients go
        sweep(root / "b")
        for dev in loops_under(root / "gluster"):
            subprocess.run(["losetup", "--detach", dev], capture_output=True, check=False)
        bed.stop()


class MoveClock:
    """Durations of each step of the moves."""

    def __init__(self) -> None:
        self.steps: dict[str, list[float]] = {s: [] for s in MOVE_STEPS}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.steps[name].append(time.perf_counter() - t0)

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: benchstats.summarize(v).as_dict() for k, v in self.steps.items() if v}


class SharedRig:
    """The benchmark's controller and nodes a and b on one datastore, through CSI calls."""

    def __init__(self, clients: dict[str, CsiClient], layouts: dict[str, Layout], name: str,
                 cap: csi_pb2.VolumeCapability) -> None:
        self.clients, self.layouts, self.name, self.cap = clients, layouts, name, cap
        self.ctl = clients["ctl"].controller

    def place(self, host: str, clock: MoveClock) -> None:
        """ControllerPublishVolume, NodeStageVolume, NodePublishVolume on host."""
        name, cap, lay, node = self.name, self.cap, self.layouts[host], self.clients[host].node
        with clock.step("ControllerPublishVolume"):
            token = self.ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
                volume_id=name, node_id=host, volume_capability=cap)).publish_context
        lay.staging(name).mkdir(parents=True, exist_ok=True)
        with clock.step("NodeStageVolume"):
            node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=name, staging_target_path=str(lay.staging(name)), volume_capability=cap,
                publish_context=token))
        with clock.step("NodePublishVolume"):
            node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=name, staging_target_path=str(lay.staging(name)), target_path=str(lay.target(name)),
                volume_capability=cap, publish_context=token))

    def leave(self, host: str, clock: MoveClock) -> None:
        """NodeUnpublishVolume, NodeUnstageVolume, ControllerUnpublishVolume from host."""
        name, lay, node = self.name, self.layouts[host], self.clients[host].node
        with clock.step("NodeUnpublishVolume"):
            node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=name,
                                                                        target_path=str(lay.target(name))))
        with clock.step("NodeUnstageVolume"):
            node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=name,
                                                                    staging_target_path=str(lay.staging(name))))
        with clock.step("ControllerUnpublishVolume"):
            self.ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=name,
                                                                                        node_id=host))


def raw_moves(root: Path, images: dict[str, Path], size: int, fs: str, moves: int) -> list[float]:
    """The floor of a move: the same steps with plain commands on an image of the same
    size (unmount target and staging, detach; attach with direct I/O through the other
    host's view, mount, bind), without any record or lock."""
    images["a"].parent.mkdir(parents=True, exist_ok=True)
    run_cmd(["truncate", "-s", str(size), str(images["a"])])
    run_cmd([*mkfs_argv(fs, True), str(images["a"])])
    floor = RawFloor(root / "raw-floor", size, fs)
    lay = {h: Layout(root / f"raw-{h}") for h in ("a", "b")}
    for layout in lay.values():
        layout.staging("raw").mkdir(parents=True)
        layout.target("raw").mkdir(parents=True)

    def mount(host: str, device: str) -> None:
        run_cmd(["mount", "-t", fs, "-o", "discard", device, str(lay[host].staging("raw"))], timeout=120)
        run_cmd(["mount", "--bind", str(lay[host].staging("raw")), str(lay[host].target("raw"))])

    device = floor.attach(images["a"])
    totals, at = [], "a"
    try:
        mount("a", device)
        for _ in range(moves):
            to = "b" if at == "a" else "a"
            t0 = time.monotonic()
            umount_retrying(lay[at].target("raw"))
            umount_retrying(lay[at].staging("raw"))
            run_cmd(["losetup", "--detach", device])
            device = ""
            device = floor.attach(images[to])
            mount(to, device)
            totals.append(time.monotonic() - t0)
            at = to
    finally:
        sweep(root / "raw-a")
        sweep(root / "raw-b")
        if device:
            subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)
    return totals


def mode_shared(args: argparse.Namespace) -> dict[str, Any]:
    """Shared mode on a datastore: how long a volume takes to move from node a to node b
    (unpublish, unstage, controller unpublish, controller publish, stage, publish) against the
    same move with plain commands; then fio on the volume against fio on a plain file of the
    same datastore, through the same host's client."""
    if shutil.which("fio") is None:
        raise BenchError("fio is not installed")
    out: dict[str, Any] = {"moves": args.moves, "runtime": args.runtime, "file_size": args.file_size}
    name = "bench-move"
    cap = capability(fs_type=args.fs)
    with bench_root(Path(args.base_dir)) as root, shared_mounts(root, args.datastore_dirs) as data:
        for d in data.values():
            d.mkdir(parents=True, exist_ok=True)
        # A directory of the mount, not the mount point: made a datastore by hand, as
        # `thinloopctl datastore init` does (a controller makes one only on a mount point).
        from csi_driver.volumes.datastore.records import init_marker
        init_marker(data["ctl"], "bench", "bench.py")
        common = ["--datastore", "bench", "--log-level", "warning"]
        drivers = {h: LocalDriver(root / h, [*common, "--mode", "controller" if h == "ctl" else "node"],
                                  data=data[h], node_id=h) for h in ("ctl", "a", "b")}
        clients: dict[str, CsiClient] = {}
        try:
            for h, drv in drivers.items():
                drv.start()
                clients[h] = CsiClient.connect(drv.endpoint)
            from csi_driver.volumes.datastore.capabilities import fs_type_of
            out["filesystem"] = fs_type_of(data["a"])
            rig = SharedRig(clients, {h: Layout(drivers[h].kubelet_dir) for h in ("a", "b")}, name, cap)
            rig.ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=name, volume_capabilities=[cap], capacity_range=csi_pb2.CapacityRange(required_bytes=args.size)))
            rig.place("a", MoveClock())
            write_small_file(rig.layouts["a"].target(name))
            clock, totals, at = MoveClock(), [], "a"
            for i in range(args.moves):
                to = "b" if at == "a" else "a"
                t0 = time.perf_counter()
                rig.leave(at, clock)
                rig.place(to, clock)
                totals.append(time.perf_counter() - t0)
                print(f"move {i + 1:3d} {at}->{to} {totals[-1] * 1000:7.1f} ms")
                at = to
            out["move"] = benchstats.summarize(totals).as_dict()
            out["move_steps"] = clock.summary()
            raw = raw_moves(root, {h: data[h] / "raw" / "disk.img" for h in ("a", "b")}, args.size, args.fs,
                            args.moves)
            out["raw_move"] = benchstats.summarize(raw).as_dict()
            out["move_ratio"] = benchstats.ratio(out["move"]["p50"], out["raw_move"]["p50"])
            files = {"thinloop": rig.layouts[at].target(name) / "fio.dat", "datastore": data[at] / "plain-fio.dat"}
            for f in files.values():  # lay the files out once, untimed
                run_cmd(["fio", "--name=layout", f"--filename={f}", "--rw=write", "--bs=1M", "--direct=1",
                         f"--size={args.file_size}", "--ioengine=libaio", "--output-format=json"], timeout=1800)
            per: dict[str, dict[str, list[dict[str, float]]]] = {}
            for r in range(args.rounds):
                for job in FIO_JOBS:
                    for kind, f in files.items():  # A B, A B, ...
                        res = fio_run(f, job, args.file_size, args.runtime)
                        per.setdefault(job, {}).setdefault(kind, []).append(res)
                        print(f"round {r + 1} {job:<13} {kind:<9} {res['iops']:10.0f} IOPS "
                              f"{res['bw_bytes'] / MIB:9.1f} MiB/s  p50 {res['lat_p50_us']:.0f} us")
            out["jobs"] = {}
            for job, kinds in per.items():
                med = {k: benchstats.median_of_dicts(v) for k, v in kinds.items()}
                key = "bw_bytes" if job.startswith("seq") else "iops"
                out["jobs"][job] = {"median": med, "rounds": kinds,
                                    "ratio": benchstats.ratio(med["thinloop"][key], med["datastore"][key])}
            files["datastore"].unlink()
            rig.leave(at, MoveClock())
            rig.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=name))
        finally:
            for c in clients.values():
                c.close()
            for drv in drivers.values():
                drv.stop()
    m, r = out["move"], out["raw_move"]
    print(f"move between nodes ({args.moves}x, {out['filesystem']}): p50 {m['p50'] * 1000:.1f} ms, "
          f"p95 {m['p95'] * 1000:.1f} ms; plain commands p50 {r['p50'] * 1000:.1f} ms "
          f"(ratio {out['move_ratio']:.2f})")
    for step, st in out["move_steps"].items():
        print(f"  {step:<26} p50 {st['p50'] * 1000:7.1f} ms")
    for job, j in out["jobs"].items():
        unit, scale, key = ("MiB/s", 1 / MIB, "bw_bytes") if job.startswith("seq") else ("IOPS", 1.0, "iops")
        print(f"{job:<13} thinloop {j['median']['thinloop'][key] * scale:10.1f} {unit}  plain file on the "
              f"datastore {j['median']['datastore'][key] * scale:10.1f} {unit}  ratio {j['ratio']:.2f}")
    worst = min(j["ratio"] for j in out["jobs"].values())
    print(f"ratio thinloop/datastore file (worst of {len(out['jobs'])} jobs): {worst:.2f}")
    return out


# -- scale --------------------------------------------------------------------------------

def timings(fn: Callable[[], object], reps: int) -> dict[str, float]:
    values = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        values.append(time.perf_counter() - t0)
    return benchstats.summarize(values).as_dict()


def list_walk(client: CsiClient, page: int) -> int:
    token, seen = "", 0
    while True:
        resp = client.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=page, starting_token=token))
        seen += len(resp.entries)
        token = resp.next_token
        if not token:
            return seen


def settle(pid: int, processes: int, timeout: float = 60.0) -> float:
    """Wait until the driver is down to `processes` processes again (its idle workers
    exit after --worker-idle-seconds); return the seconds waited."""
    t0 = time.monotonic()
    while len(procmem.driver_processes(pid)) > processes and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    return time.monotonic() - t0


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
                                 "latency": benchstats.summarize(rec.steps["CreateVolume"]).as_dict()}
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
            out["startup"] = benchstats.summarize(starts).as_dict()
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
                out["stage"] = benchstats.summarize(stage_t).as_dict()
                out["unstage"] = benchstats.summarize(unstage_t).as_dict()
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


# -- plots --------------------------------------------------------------------------------

def plot_compare(out: dict[str, Any], outdir: Path) -> list[Path]:
    """Latency per RPC (p50 bars, p95 whiskers) at the lowest concurrency, and volumes per
    second against concurrency. matplotlib is needed only here."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib (pip install matplotlib)") from None
    outdir.mkdir(parents=True, exist_ok=True)
    med = out["medians"]
    conc = sorted(out["concurrency"])
    seq = conc[0]
    made = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    xs = list(range(len(STEPS)))
    for i, kind in enumerate(("thinloop", "raw")):
        m = med[f"{kind}/c{seq}"]
        p50 = [m.get(f"{s}_p50", math.nan) * 1e3 for s in STEPS]
        p95 = [m.get(f"{s}_p95", math.nan) * 1e3 for s in STEPS]
        err = [[0.0] * len(STEPS), [max(0.0, b - a) for a, b in zip(p50, p95, strict=True)]]
        ax.bar([x + (i - 0.5) * width for x in xs], p50, width, yerr=err, capsize=3,
               label=f"{kind} (p50, whisker to p95)")
    ax.set_xticks(xs, [s.replace("Volume", "").replace("Node", "Node\n") for s in STEPS])
    ax.set_ylabel("ms")
    ax.set_title(f"Latency per step, concurrency {seq} (median of rounds)")
    ax.legend()
    fig.tight_layout()
    path = outdir / "latency_per_rpc.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("thinloop", "raw"):
        ax.plot(conc, [med[f"{kind}/c{c}"]["volumes_per_second"] for c in conc], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel(f"concurrency (this machine has {os.cpu_count()} CPUs)")
    ax.set_ylabel("volumes / second (full lifecycle)")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = outdir / "volumes_per_second.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    for p in made:
        print(f"plot: {p}")
    return made


# -- command line -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
        sp.add_argument("--base-dir", default="/var/tmp",
                        help="where the temp dirs (data, kubelet, images) go (default /var/tmp)")

    def volumes(sp: argparse.ArgumentParser, count: int, size: str) -> None:
        sp.add_argument("--count", type=int, default=count, help="volumes per run")
        sp.add_argument("--size", type=parse_size, default=parse_size(size))
        sp.add_argument("--fs", default="ext4", choices=("ext3", "ext4", "xfs"))
        sp.add_argument("--concurrency", type=parse_int_list, default=[1],
                        help="comma-separated list, one run each (e.g. 1,8)")

    sp = sub.add_parser("lifecycle", help="N volumes through the whole CSI lifecycle")
    common(sp)
    volumes(sp, 20, "1Gi")
    sp.add_argument("--endpoint", help="unix:///path.sock of a running driver (default: start "
                    "thinloop on a temp dir)")
    sp.add_argument("--kubelet-dir", help="the driver's --kubelet-dir (required with --endpoint)")
    sp.add_argument("--pid", type=int, help="driver pid for RSS/CPU (default: who listens on the socket)")

    sp = sub.add_parser("raw", help="the same lifecycle with plain commands (the floor)")
    common(sp)
    volumes(sp, 20, "1Gi")

    sp = sub.add_parser("compare", help="thinloop and raw in alternation; ratio as the last line")
    common(sp)
    volumes(sp, 20, "1Gi")
    sp.add_argument("--rounds", type=int, default=3)
    sp.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR (needs matplotlib)")

    sp = sub.add_parser("fio", help="direct I/O on a thinloop volume against the host directory")
    common(sp)
    sp.add_argument("--size", type=parse_size, default=parse_size("4Gi"), help="volume size")
    sp.add_argument("--file-size", type=parse_size, default=parse_size("1Gi"), help="fio file size")
    sp.add_argument("--fs", default="ext4", choices=("ext3", "ext4", "xfs"))
    sp.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    sp.add_argument("--rounds", type=int, default=2)

    sp = sub.add_parser("scale", help="1,000 volumes: start-up, GetCapacity, ListVolumes, stage")
    common(sp)
    sp.add_argument("--volumes", type=int, default=1000)
    sp.add_argument("--size", type=parse_size, default=parse_size("16Mi"),
                    help="thin size of each (the sum of sizes must fit the free space)")
    sp.add_argument("--fs", default="ext4", choices=("ext3", "ext4", "xfs"))
    sp.add_argument("--concurrency", type=int, default=4, help="parallel CreateVolume calls")
    sp.add_argument("--page-size", type=int, default=100, help="ListVolumes max_entries")
    sp.add_argument("--reps", type=int, default=5)

    sp = sub.add_parser("shared", help="shared mode: a volume moving between two nodes; fio on it "
                        "against a plain file of the same datastore")
    common(sp)
    sp.add_argument("--datastore-dirs", default="", metavar="CTL,A,B",
                    help="three mounts of one shared filesystem (the controller's, node a's, node b's); "
                    "default: a GlusterFS volume of the benchmark's own, one FUSE client per host")
    sp.add_argument("--moves", type=int, default=20)
    sp.add_argument("--size", type=parse_size, default=parse_size("4Gi"), help="volume size")
    sp.add_argument("--file-size", type=parse_size, default=parse_size("1Gi"), help="fio file size")
    sp.add_argument("--fs", default="ext4", choices=("ext3", "ext4", "xfs"))
    sp.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    sp.add_argument("--rounds", type=int, default=2)
    return p


MODES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "lifecycle": mode_lifecycle, "raw": mode_raw, "compare": mode_compare, "fio": mode_fio,
    "scale": mode_scale, "shared": mode_shared,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench.py: needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    try:
        result = MODES[args.mode](args)
    except BenchError as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.py: interrupted; everything it made was torn down", file=sys.stderr)
        return 130
    if args.json:
        doc = {"mode": args.mode, "machine": machine_info(),
               "args": {k: v for k, v in vars(args).items() if k != "json"}, "result": result}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
