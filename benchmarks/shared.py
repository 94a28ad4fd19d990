"""`bench.py shared`: shared mode on a datastore. A volume moving between two nodes
(unpublish, unstage, controller unpublish, controller publish, stage, publish) against
the same move with plain commands, then fio on the volume against a plain file of the
same datastore. The datastore is three given mounts, or a GlusterFS of the benchmark's
own (tests/gluster.py)."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from csi_driver.host.sweep import loops_under, sweep
from csi_driver.ops.client import CsiClient, capability
from csi_driver.proto import csi_pb2

from . import common, stats
from .common import MIB, BenchError, bench_root, mkfs_argv, run_cmd, umount_retrying
from .driver import LocalDriver
from .fio import fio_rounds
from .lifecycle import Layout
from .raw import RawFloor

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
        return {k: stats.summarize(v).as_dict() for k, v in self.steps.items() if v}


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
        flags = ["--datastore", "bench", "--log-level", "warning"]
        drivers = {h: LocalDriver(root / h, [*flags, "--mode", "controller" if h == "ctl" else "node"],
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
            common.write_small_file(rig.layouts["a"].target(name))
            clock, totals, at = MoveClock(), [], "a"
            for i in range(args.moves):
                to = "b" if at == "a" else "a"
                t0 = time.perf_counter()
                rig.leave(at, clock)
                rig.place(to, clock)
                totals.append(time.perf_counter() - t0)
                print(f"move {i + 1:3d} {at}->{to} {totals[-1] * 1000:7.1f} ms")
                at = to
            out["move"] = stats.summarize(totals).as_dict()
            out["move_steps"] = clock.summary()
            raw = raw_moves(root, {h: data[h] / "raw" / "disk.img" for h in ("a", "b")}, args.size, args.fs,
                            args.moves)
            out["raw_move"] = stats.summarize(raw).as_dict()
            out["move_ratio"] = stats.ratio(out["move"]["p50"], out["raw_move"]["p50"])
            files = {"thinloop": rig.layouts[at].target(name) / "fio.dat", "datastore": data[at] / "plain-fio.dat"}
            per = fio_rounds(files, args.rounds, args.file_size, args.runtime, layout_timeout=1800)
            out["jobs"] = {}
            for job, kinds in per.items():
                med = {k: stats.median_of_dicts(v) for k, v in kinds.items()}
                key = "bw_bytes" if job.startswith("seq") else "iops"
                out["jobs"][job] = {"median": med, "rounds": kinds,
                                    "ratio": stats.ratio(med["thinloop"][key], med["datastore"][key])}
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
