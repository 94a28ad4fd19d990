"""thinloopctl: drive a thinloop (or any CSI) endpoint from a shell.

Tables for people, `-o json` for scripts. Exit codes: 0 success, 1 the RPC failed
(the gRPC code is printed), 2 bad usage."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from .client import CsiClient, capability
from .config import DEFAULT_ENDPOINT
from .errors import DriverError
from .proto import csi_pb2
from .validation import GIB, parse_quantity

AccessMode = csi_pb2.VolumeCapability.AccessMode


def _doc(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def human(n: int | str) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def _cap(args: argparse.Namespace) -> csi_pb2.VolumeCapability:
    mode = AccessMode.SINGLE_NODE_READER_ONLY if getattr(args, "readonly", False) else \
        AccessMode.SINGLE_NODE_WRITER
    return capability(block=args.block, fs_type=getattr(args, "fs_type", "") or "", mode=mode)


def cmd_info(c: CsiClient, a: argparse.Namespace) -> Any:
    info = c.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    probe = c.identity.Probe(csi_pb2.ProbeRequest())
    node = c.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    cap = c.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    doc = {"name": info.name, "version": info.vendor_version, "ready": probe.ready.value,
           "node_id": node.node_id, "topology": dict(node.accessible_topology.segments),
           "available_capacity": cap.available_capacity}
    if a.output == "json":
        return doc
    return "\n".join(f"{k:20} {human(v) if k == 'available_capacity' else v}" for k, v in doc.items())


def cmd_create(c: CsiClient, a: argparse.Namespace) -> Any:
    params = dict(p.split("=", 1) for p in a.param)
    req = csi_pb2.CreateVolumeRequest(
        name=a.name, volume_capabilities=[_cap(a)], parameters=params,
        capacity_range=csi_pb2.CapacityRange(required_bytes=parse_quantity(a.size)))
    if a.from_snapshot:
        req.volume_content_source.snapshot.snapshot_id = a.from_snapshot
    if a.from_volume:
        req.volume_content_source.volume.volume_id = a.from_volume
    vol = c.controller.CreateVolume(req).volume
    return _doc(vol) if a.output == "json" else f"created {vol.volume_id} ({human(vol.capacity_bytes)})"


def cmd_list(c: CsiClient, a: argparse.Namespace) -> Any:
    entries: list[dict[str, Any]] = []
    token = ""
    while True:
        resp = c.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=a.page, starting_token=token))
        for e in resp.entries:
            entries.append({
                "id": e.volume.volume_id, "size": e.volume.capacity_bytes,
                "fs": e.volume.volume_context.get("fsType", "block"),
                "diskformat": e.volume.volume_context.get("diskformat", ""),
                "in_use": bool(e.status.published_node_ids),
                "condition": e.status.volume_condition.message,
            })
        token = resp.next_token
        if not token:
            break
    if a.output == "json":
        return entries
    for row in entries:
        row["size"] = human(row["size"])
    return _table(entries, ["id", "size", "fs", "diskformat", "in_use", "condition"])


def cmd_stage(c: CsiClient, a: argparse.Namespace) -> Any:
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path, volume_capability=_cap(a)))
    return {"staged": a.volume_id} if a.output == "json" else f"staged {a.volume_id} at {a.staging_path}"


def cmd_publish(c: CsiClient, a: argparse.Namespace) -> Any:
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path, target_path=a.target_path,
        volume_capability=_cap(a), readonly=a.readonly))
    return {"published": a.volume_id} if a.output == "json" else f"published {a.volume_id} at {a.target_path}"


def cmd_stats(c: CsiClient, a: argparse.Namespace) -> Any:
    resp = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=a.volume_id, volume_path=a.path))
    if a.output == "json":
        return _doc(resp)
    rows = [{"unit": csi_pb2.VolumeUsage.Unit.Name(u.unit), "total": u.total, "used": u.used,
             "available": u.available} for u in resp.usage]
    cond = resp.volume_condition
    return _table(rows, ["unit", "total", "used", "available"]) + \
        f"\ncondition: {'ABNORMAL' if cond.abnormal else 'ok'} ({cond.message})"


def cmd_expand(c: CsiClient, a: argparse.Namespace) -> Any:
    rng = csi_pb2.CapacityRange(required_bytes=parse_quantity(a.size))
    ctrl = c.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=a.volume_id, capacity_range=rng))
    size = ctrl.capacity_bytes
    if ctrl.node_expansion_required and a.path:
        size = c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=a.volume_id, volume_path=a.path, capacity_range=rng,
            staging_target_path=a.staging_path or "")).capacity_bytes
    return {"volume_id": a.volume_id, "capacity_bytes": size} if a.output == "json" else \
        f"expanded {a.volume_id} to {human(size)}"


def cmd_unpublish(c: CsiClient, a: argparse.Namespace) -> Any:
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id, target_path=a.target_path))
    return {"unpublished": a.volume_id} if a.output == "json" else f"unpublished {a.volume_id}"


def cmd_unstage(c: CsiClient, a: argparse.Namespace) -> Any:
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path))
    return {"unstaged": a.volume_id} if a.output == "json" else f"unstaged {a.volume_id}"


def cmd_delete(c: CsiClient, a: argparse.Namespace) -> Any:
    c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=a.volume_id))
    return {"deleted": a.volume_id} if a.output == "json" else f"deleted {a.volume_id}"


def cmd_snapshot(c: CsiClient, a: argparse.Namespace) -> Any:
    snap = c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=a.name, source_volume_id=a.volume_id)).snapshot
    return _doc(snap) if a.output == "json" else f"snapshot {snap.snapshot_id} of {a.volume_id} ({human(snap.size_bytes)})"


def cmd_snapshots(c: CsiClient, a: argparse.Namespace) -> Any:
    rows = []
    token = ""
    while True:
        resp = c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(starting_token=token))
        rows += [{"id": e.snapshot.snapshot_id, "source": e.snapshot.source_volume_id,
                  "size": e.snapshot.size_bytes, "ready": e.snapshot.ready_to_use} for e in resp.entries]
        token = resp.next_token
        if not token:
            break
    return rows if a.output == "json" else _table(rows, ["id", "source", "size", "ready"])


def cmd_delete_snapshot(c: CsiClient, a: argparse.Namespace) -> Any:
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=a.snapshot_id))
    return {"deleted": a.snapshot_id} if a.output == "json" else f"deleted snapshot {a.snapshot_id}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinloopctl", description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=os.environ.get("THINLOOP_ENDPOINT", DEFAULT_ENDPOINT))
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[CsiClient, argparse.Namespace], Any], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        return sp

    def access(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--block", action="store_true", help="raw block access")
        sp.add_argument("--fs-type", default="", help="ext3, ext4 or xfs")

    add("info", cmd_info, "plugin, node and capacity")
    sp = add("create", cmd_create, "create a volume")
    sp.add_argument("name")
    sp.add_argument("--size", default=str(GIB))
    sp.add_argument("--param", action="append", default=[], help="key=value (repeatable)")
    sp.add_argument("--from-snapshot", default="")
    sp.add_argument("--from-volume", default="")
    access(sp)
    sp = add("list", cmd_list, "list volumes")
    sp.add_argument("--page", type=int, default=100)
    for name, fn, hlp in (("stage", cmd_stage, "attach and mount at a staging path"),):
        sp = add(name, fn, hlp)
        sp.add_argument("volume_id")
        sp.add_argument("staging_path")
        access(sp)
        sp.add_argument("--readonly", action="store_true")
    sp = add("publish", cmd_publish, "bind the staged volume to a target path")
    sp.add_argument("volume_id")
    sp.add_argument("staging_path")
    sp.add_argument("target_path")
    sp.add_argument("--readonly", action="store_true")
    access(sp)
    sp = add("stats", cmd_stats, "usage and condition of a published volume")
    sp.add_argument("volume_id")
    sp.add_argument("path")
    sp = add("expand", cmd_expand, "grow a volume (and its filesystem when a path is given)")
    sp.add_argument("volume_id")
    sp.add_argument("size")
    sp.add_argument("--path", default="", help="published path: grow the filesystem online")
    sp.add_argument("--staging-path", default="")
    sp = add("unpublish", cmd_unpublish, "unmount a target path")
    sp.add_argument("volume_id")
    sp.add_argument("target_path")
    sp = add("unstage", cmd_unstage, "unmount the staging path and detach the loop device")
    sp.add_argument("volume_id")
    sp.add_argument("staging_path")
    sp = add("delete", cmd_delete, "delete a volume")
    sp.add_argument("volume_id")
    sp = add("snapshot", cmd_snapshot, "snapshot a volume")
    sp.add_argument("volume_id")
    sp.add_argument("name")
    add("snapshots", cmd_snapshots, "list snapshots")
    sp = add("delete-snapshot", cmd_delete_snapshot, "delete a snapshot")
    sp.add_argument("snapshot_id")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with CsiClient.connect(args.endpoint, timeout=10) as client:
            result = args.fn(client, args)
    except grpc.FutureTimeoutError:
        print(f"thinloopctl: no driver answers at {args.endpoint}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"thinloopctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ValueError, DriverError) as exc:
        print(f"thinloopctl: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
