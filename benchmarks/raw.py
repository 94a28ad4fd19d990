"""`bench.py raw`: the floor. The same lifecycle with the plain commands the driver's steps
stand for, with the driver's options and layout: truncate, mkfs, LOOP_CTL_GET_FREE then
losetup --direct-io=on, mount -o discard, mount --bind, umount and rmdir, umount and
losetup --detach, rm -rf."""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from csi_driver.host.linux import sector_size_for

from . import common
from .common import LOOP_CTL_GET_FREE, BenchError, bench_root, mkfs_argv, names_for, run_cmd, umount_retrying
from .lifecycle import Layout, Recorder, Worker, print_run, run_pool, run_result


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
                    common.write_small_file(target)
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


def raw_run(root: Path, names: list[str], size: int, fs: str, concurrency: int) -> dict[str, Any]:
    floor = RawFloor(root, size, fs)
    rec, wall = run_pool(names, concurrency, floor.worker())
    res = run_result(rec, wall, len(names))
    res["concurrency"] = concurrency
    return res


def mode_raw(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    with bench_root(Path(args.base_dir)) as root:
        for c in args.concurrency:
            res = raw_run(root, names_for(f"raw-c{c}", args.count), args.size, args.fs, c)
            print_run(f"raw c={c}", res)
            out["runs"].append(res)
    return out
