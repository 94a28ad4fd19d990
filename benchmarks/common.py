"""What every benchmark mode shares: sizes and names, the lifecycle's steps, running a
plain command the way the driver's runner does, a temp dir that is swept of loop devices
and mounts on the way out, and the machine's description for the JSON."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from csi_driver.host.sweep import mounts_under, sweep

ROOT = Path(__file__).resolve().parents[1]
"""The checkout: the driver the benchmark starts runs from it."""
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


def write_small_file(target: Path) -> None:
    fd = os.open(target / "bench.dat", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, os.urandom(WRITE_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)


def names_for(tag: str, count: int) -> list[str]:
    return [f"bench-{tag}-{i:04d}" for i in range(count)]
