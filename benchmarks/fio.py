"""`bench.py fio`: the data path. fio with direct I/O on a file in a thinloop volume,
against the same on a loop device made by hand and on a plain directory of the host
filesystem that holds the data dir, the jobs in alternation."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import grpc

from csi_driver.host.linux import HostOS
from csi_driver.host.sweep import sweep
from csi_driver.ops.client import CsiClient, capability
from csi_driver.proto import csi_pb2

from . import stats
from .common import MIB, BenchError, bench_root, mkfs_argv, run_cmd
from .driver import local_driver
from .lifecycle import Layout
from .raw import RawFloor

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



def fio_rounds(files: dict[str, Path], rounds: int, file_size: int, runtime: int,
               layout_timeout: float) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Lay each file out once (untimed), then run every job on every file in alternation
    (A B, A B, ...), `rounds` times; results per job, per file's name."""
    for f in files.values():
        run_cmd(["fio", "--name=layout", f"--filename={f}", "--rw=write", "--bs=1M", "--direct=1",
                 f"--size={file_size}", "--ioengine=libaio", "--output-format=json"], timeout=layout_timeout)
    per: dict[str, dict[str, list[dict[str, float]]]] = {}
    for r in range(rounds):
        for job in FIO_JOBS:
            for kind, f in files.items():
                res = fio_run(f, job, file_size, runtime)
                per.setdefault(job, {}).setdefault(kind, []).append(res)
                print(f"round {r + 1} {job:<13} {kind:<9} {res['iops']:10.0f} IOPS "
                      f"{res['bw_bytes'] / MIB:9.1f} MiB/s  p50 {res['lat_p50_us']:.0f} us")
    return per


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
            per = fio_rounds(files, args.rounds, args.file_size, args.runtime, layout_timeout=900)
            for job, kinds in per.items():
                med = {k: stats.median_of_dicts(v) for k, v in kinds.items()}
                key = "bw_bytes" if job.startswith("seq") else "iops"
                out["jobs"][job] = {"median": med, "rounds": kinds,
                                    "ratio": stats.ratio(med["thinloop"][key], med["host"][key]),
                                    "ratio_rawloop_host": stats.ratio(med["rawloop"][key], med["host"][key]),
                                    "ratio_thinloop_rawloop": stats.ratio(med["thinloop"][key],
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
