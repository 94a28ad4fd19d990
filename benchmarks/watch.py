"""The driver's processes as the benchmark sees them from outside: the pid listening on a
socket, their memory (each physical page once: benchmarks.procmem) and their CPU over a
run, sampled while the run goes on."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time

import psutil

from . import procmem
from .common import MIB


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


def settle(pid: int, processes: int, timeout: float = 60.0) -> float:
    """Wait until the driver is down to `processes` processes again (its idle workers
    exit after --worker-idle-seconds); return the seconds waited."""
    t0 = time.monotonic()
    while len(procmem.driver_processes(pid)) > processes and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    return time.monotonic() - t0
