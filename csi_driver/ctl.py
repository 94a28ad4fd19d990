"""thinloopctl: drive a thinloop (or any CSI) endpoint and look after a thinloop node.

Tables for people, `-o json` or `-o yaml` for scripts. The CSI subcommands talk to the
driver's socket; `node ...` and `doctor` read the data dir, sysfs and mountinfo directly and
need no running driver.

Exit codes: 0 success; 1 failure (an RPC failed and its gRPC code is printed, a node
operation failed, or a doctor check failed); 2 bad usage; 3 `node orphans` found orphans
and left (some of) them in place."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from .client import CsiClient, capability
from .config import DEFAULT_DATA_DIR, DEFAULT_DRIVER_NAME, DEFAULT_ENDPOINT, DEFAULT_KUBELET_DIR, Settings
from .errors import DriverError
from .proto import csi_pb2
from .validation import GIB, parse_quantity

AccessMode = csi_pb2.VolumeCapability.AccessMode

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FOUND = 0, 1, 2, 3


@dataclass(frozen=True)
class Outcome:
    """What a node command returns: the value to print and the exit code."""

    value: Any
    code: int = EXIT_OK


def _doc(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
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
    if not probe.ready.value:
        doc["not_ready_reason"] = _not_ready_reason(Path(a.data_dir))
    if a.output != "table":
        return doc
    return "\n".join(f"{k:20} {human(v) if k == 'available_capacity' else v}" for k, v in doc.items())


def _not_ready_reason(data_dir: Path) -> str:
    """Probe carries no reason; compute the driver's own one here when this host shares
    its data dir (thinloopctl run in the node pod or on the node)."""
    if not data_dir.is_dir():
        return (f"unknown here ({data_dir} not found): see the driver's log or the "
                "thinloop_not_ready metric")
    from .hostos import HostOS
    from .identity import readiness
    reason = readiness(_settings(data_dir), HostOS())
    return reason or "not ready when the driver probed, ready now"


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
    return _doc(vol) if a.output != "table" else f"created {vol.volume_id} ({human(vol.capacity_bytes)})"


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
    if a.output != "table":
        return entries
    for row in entries:
        row["size"] = human(row["size"])
    return _table(entries, ["id", "size", "fs", "diskformat", "in_use", "condition"])


def cmd_stage(c: CsiClient, a: argparse.Namespace) -> Any:
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path, volume_capability=_cap(a)))
    return {"staged": a.volume_id} if a.output != "table" else f"staged {a.volume_id} at {a.staging_path}"


def cmd_publish(c: CsiClient, a: argparse.Namespace) -> Any:
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path, target_path=a.target_path,
        volume_capability=_cap(a), readonly=a.readonly))
    return {"published": a.volume_id} if a.output != "table" else f"published {a.volume_id} at {a.target_path}"


def cmd_stats(c: CsiClient, a: argparse.Namespace) -> Any:
    resp = c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=a.volume_id, volume_path=a.path))
    if a.output != "table":
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
    return {"volume_id": a.volume_id, "capacity_bytes": size} if a.output != "table" else \
        f"expanded {a.volume_id} to {human(size)}"


def cmd_unpublish(c: CsiClient, a: argparse.Namespace) -> Any:
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id, target_path=a.target_path))
    return {"unpublished": a.volume_id} if a.output != "table" else f"unpublished {a.volume_id}"


def cmd_unstage(c: CsiClient, a: argparse.Namespace) -> Any:
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path))
    return {"unstaged": a.volume_id} if a.output != "table" else f"unstaged {a.volume_id}"


def cmd_delete(c: CsiClient, a: argparse.Namespace) -> Any:
    c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=a.volume_id))
    return {"deleted": a.volume_id} if a.output != "table" else f"deleted {a.volume_id}"


def cmd_snapshot(c: CsiClient, a: argparse.Namespace) -> Any:
    snap = c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=a.name, source_volume_id=a.volume_id)).snapshot
    if a.output != "table":
        return _doc(snap)
    return f"snapshot {snap.snapshot_id} of {a.volume_id} ({human(snap.size_bytes)})"


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
    return rows if a.output != "table" else _table(rows, ["id", "source", "size", "ready"])


def cmd_delete_snapshot(c: CsiClient, a: argparse.Namespace) -> Any:
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=a.snapshot_id))
    return {"deleted": a.snapshot_id} if a.output != "table" else f"deleted snapshot {a.snapshot_id}"


def cmd_modify(c: CsiClient, a: argparse.Namespace) -> Any:
    bad = [p for p in a.param if "=" not in p]
    if bad:
        raise ValueError(f"expected key=value, got {', '.join(bad)}")
    params = dict(p.split("=", 1) for p in a.param)
    c.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
        volume_id=a.volume_id, mutable_parameters=params))
    return {"modified": a.volume_id, "parameters": params} if a.output != "table" else \
        f"modified {a.volume_id}: {', '.join(f'{k}={v}' for k, v in params.items())}"


# -- node commands: read the node directly, no driver needed ------------------------------------


def _settings(data_dir: Path, node_id: str = "", driver_name: str = DEFAULT_DRIVER_NAME,
              kubelet_dir: Path = Path(DEFAULT_KUBELET_DIR)) -> Settings:
    return Settings(socket_path=Path("/nonexistent/csi.sock"), node_id=node_id or socket.gethostname(),
                    data_dir=data_dir, driver_name=driver_name, kubelet_dir=kubelet_dir)


@dataclass
class Local:
    """The project's own Store, HostOS and Volumes over a data dir on this host."""

    settings: Settings
    store: Any
    hostos: Any
    volumes: Any

    @classmethod
    def open(cls, a: argparse.Namespace) -> Local:
        from .hostos import HostOS
        from .store import Store
        from .volumes import Volumes
        data_dir = Path(a.data_dir)
        if not (data_dir / "volumes").is_dir():
            raise ValueError(f"{data_dir} is not a thinloop data dir (no volumes/ inside); "
                             "pass --data-dir or set THINLOOP_DATA_DIR")
        settings = _settings(data_dir, getattr(a, "node_id", ""),
                             getattr(a, "driver_name", DEFAULT_DRIVER_NAME))
        store = Store(data_dir)
        hostos = HostOS()
        return cls(settings, store, hostos, Volumes(settings, store, hostos))


def _progress(a: argparse.Namespace, text: str) -> None:
    """Progress lines for people, on stderr; scripts asking for json/yaml get none."""
    if a.output == "table":
        print(text, file=sys.stderr, flush=True)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def cmd_node_status(a: argparse.Namespace) -> Outcome:
    from .nodestatus import collect
    local = Local.open(a)
    status = collect(local.store, local.hostos)
    if a.output != "table":
        return Outcome(status.to_dict())
    vols = [{"id": v.id, "size": human(v.apparent_bytes), "allocated": human(v.allocated_bytes),
             "fs": v.fs_type, "diskformat": v.diskformat, "state": v.state,
             "loop": v.loop_device + ("" if v.direct_io or not v.loop_device else " (buffered)"),
             "staged_at": ",".join(v.staged_at), "published_at": ",".join(v.published_at)}
            for v in status.volumes]
    snaps = [{"id": s.id, "source": s.source, "size": human(s.apparent_bytes),
              "allocated": human(s.allocated_bytes), "fs": s.fs_type} for s in status.snapshots]
    t = status.totals
    over = "unbounded (disk full)" if t.overcommit == float("inf") else f"{t.overcommit:.2f}"
    lines = [
        "VOLUMES", _table(vols, ["id", "size", "allocated", "fs", "diskformat", "state", "loop",
                                 "staged_at", "published_at"]),
        "", "SNAPSHOTS", _table(snaps, ["id", "source", "size", "allocated", "fs"]), "",
        f"{'data dir':14}{status.data_dir} ({status.data_fs_type})",
        f"{'provisioned':14}{human(t.provisioned_bytes)} in {t.volumes} volume(s)",
        f"{'allocated':14}{human(t.allocated_bytes)} "
        f"(thin saving {human(t.thin_saving_bytes)}, {_pct(t.thin_saving_bytes, t.provisioned_bytes)});"
        f" snapshots {human(t.snapshot_allocated_bytes)} in {t.snapshots}",
        f"{'free':14}{human(t.free_bytes)} of {human(t.capacity_bytes)}",
        f"{'overcommit':14}{over} (unused thin promises {human(t.unused_promises_bytes)} "
        f"over free space; above 1.00 the disk fills before the volumes do)",
    ]
    return Outcome("\n".join(lines))


def cmd_node_trim(a: argparse.Namespace) -> Outcome:
    """fstrim every staged filesystem volume so the image gives freed blocks back."""
    from .runner import CommandError
    local = Local.open(a)
    entries = [e for e in local.store.volumes.entries() if not a.volume or e.id in a.volume]
    rows: list[dict[str, Any]] = []
    code = EXIT_OK
    for i, entry in enumerate(entries, 1):
        usage = local.volumes.usage(entry)
        mount_point = local.volumes.fs_mount_point(usage)
        row: dict[str, Any] = {"id": entry.id, "mount_point": mount_point, "trimmed_bytes": 0,
                               "allocated_before": entry.allocated_bytes(), "allocated_after": None,
                               "result": ""}
        rows.append(row)
        if not mount_point:
            row["result"] = ("skipped: raw block volume (the filesystem inside trims itself)"
                             if not entry.meta.fs_type else "skipped: not staged on this node")
            continue
        if any(m.mount_point == mount_point and m.readonly for m in usage.mounts):
            row["result"] = "skipped: mounted read-only"
            continue
        _progress(a, f"[{i}/{len(entries)}] trimming {entry.id} at {mount_point}")
        try:
            row["trimmed_bytes"] = local.hostos.trim(mount_point)
            row["result"] = "trimmed"
        except CommandError as exc:
            row["result"] = f"failed: {exc}"
            code = EXIT_FAILED
        row["allocated_after"] = entry.allocated_bytes()
    if a.output != "table":
        return Outcome(rows, code)
    before = sum(r["allocated_before"] for r in rows if r["allocated_after"] is not None)
    after = sum(r["allocated_after"] for r in rows if r["allocated_after"] is not None)
    shown = [{**r, "trimmed_bytes": human(r["trimmed_bytes"]), "allocated_before": human(r["allocated_before"]),
              "allocated_after": "" if r["allocated_after"] is None else human(r["allocated_after"])}
             for r in rows]
    table = _table(shown, ["id", "mount_point", "trimmed_bytes", "allocated_before", "allocated_after",
                           "result"])
    return Outcome(f"{table}\nallocation of trimmed volumes: {human(before)} -> {human(after)} "
                   f"({human(max(0, before - after))} given back to the host)", code)


def _confirm(prompt: str) -> bool:
    print(f"{prompt} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_node_orphans(a: argparse.Namespace, cluster: Any = None) -> Outcome:
    """`cluster`: a ClusterView or a reason string to use instead of the real API (a seam
    for tests); None reads the cluster."""
    from . import orphans
    if (Path(a.data_dir) / "datastore.json").exists():
        raise ValueError(f"{a.data_dir} is a shared datastore: its images are attached on other nodes too, "
                         "so orphans are not judged from one node (see thinloopctl datastore holders)")
    local = Local.open(a)
    view = orphans.load_cluster(a.kubeconfig) if cluster is None else cluster
    report = orphans.find(local.store, local.hostos, local.settings.driver_name,
                          local.settings.node_id, view)
    if report.cluster_note:
        print(f"thinloopctl: note: {report.cluster_note}", file=sys.stderr)
    rows = [o.to_dict() for o in report.orphans]
    if not a.delete or not report.orphans:
        code = EXIT_FOUND if report.orphans else EXIT_OK
        if a.output != "table":
            return Outcome(report.to_dict(), code)
        cols = ["kind", "id", "detail", "deletable", "reason"]
        return Outcome(_table(rows, cols) if rows else "no orphans found", code)
    deletable = [o for o in report.orphans if o.deletable]
    if deletable and not a.yes:
        print(_table([o.to_dict() for o in deletable], ["kind", "id", "detail"]), file=sys.stderr)
        if not _confirm(f"Delete these {len(deletable)} object(s)?"):
            return Outcome(report.to_dict() if a.output != "table" else "nothing deleted", EXIT_FOUND)
    outcomes = orphans.remove(report, local.store, local.hostos, view,
                              progress=lambda o: _progress(a, f"removing {o.kind} {o.id}"))
    failed = any(x.message.startswith("failed") for x in outcomes)
    left = any(not x.deleted for x in outcomes)
    code = EXIT_FAILED if failed else EXIT_FOUND if left else EXIT_OK
    docs = [x.to_dict() for x in outcomes]
    if a.output != "table":
        return Outcome({**report.to_dict(), "results": docs}, code)
    return Outcome(_table(docs, ["kind", "id", "deleted", "message"]), code)


def cmd_doctor(a: argparse.Namespace) -> Outcome:
    from . import doctor

    def probe_driver() -> doctor.Check:
        path = a.endpoint.removeprefix("unix://")
        if not os.path.exists(path):
            return doctor.Check("driver", doctor.WARN, f"no socket at {path}: the driver is not running here",
                                "start the node pod, or pass --endpoint with its socket")
        try:
            with CsiClient.connect(a.endpoint, timeout=3) as c:
                ready = c.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
        except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
            return doctor.Check("driver", doctor.FAIL, f"{path} does not answer: {exc}",
                                "look at the driver container's log; restart the pod")
        if not ready:
            return doctor.Check("driver", doctor.FAIL, "the driver answers Probe: not ready",
                                "see the probe readiness check above and the driver's log")
        return doctor.Check("driver", doctor.OK, f"{path} answers Probe: ready")

    checks = doctor.run(Path(a.data_dir), Path(a.kubelet_dir), driver_probe=probe_driver)
    code = EXIT_FAILED if doctor.failed(checks) else EXIT_OK
    if a.output != "table":
        return Outcome([c.to_dict() for c in checks], code)
    marks = {doctor.OK: "ok  ", doctor.WARN: "WARN", doctor.FAIL: "FAIL"}
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"[{marks[c.status]}] {c.name:{width}}  {c.detail}")
        if c.fix and c.status != doctor.OK:
            lines.append(f"       {'':{width}}  fix: {c.fix}")
    fails = sum(c.status == doctor.FAIL for c in checks)
    warns = sum(c.status == doctor.WARN for c in checks)
    lines.append(f"{fails} failed, {warns} warning(s), {len(checks) - fails - warns} ok")
    return Outcome("\n".join(lines), code)


# -- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinloopctl", description=__doc__.splitlines()[0],
                                epilog="Exit codes: 0 ok, 1 failed, 2 bad usage, 3 orphans found.")
    p.add_argument("--endpoint", default=os.environ.get("THINLOOP_ENDPOINT", DEFAULT_ENDPOINT))
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    sub = p.add_subparsers(dest="command", required=True)
    data_dir = os.environ.get("THINLOOP_DATA_DIR", DEFAULT_DATA_DIR)
    kubelet_dir = os.environ.get("THINLOOP_KUBELET_DIR", DEFAULT_KUBELET_DIR)

    def output(sp: argparse.ArgumentParser) -> None:
        """-o also after the subcommand (the global default stays when it is not given)."""
        sp.add_argument("-o", "--output", choices=("table", "json", "yaml"), default=argparse.SUPPRESS)

    def add(name: str, fn: Callable[[CsiClient, argparse.Namespace], Any], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        output(sp)
        return sp

    def access(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--block", action="store_true", help="raw block access")
        sp.add_argument("--fs-type", default="", help="ext3, ext4 or xfs")

    sp = add("info", cmd_info, "plugin, node, readiness and capacity")
    sp.add_argument("--data-dir", default=data_dir, help="to explain a not-ready driver (default %(default)s)")
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
    sp = add("modify", cmd_modify, "change a live volume's mutable parameters (diskformat, reclaim)")
    sp.add_argument("volume_id")
    sp.add_argument("param", nargs="+", help="key=value")

    node = sub.add_parser("node", help="inspect and tidy this node (reads the data dir; no driver needed)")
    node_sub = node.add_subparsers(dest="node_command", required=True)

    def local(name: str, fn: Callable[[argparse.Namespace], Outcome], help_: str) -> argparse.ArgumentParser:
        sp = node_sub.add_parser(name, help=help_, description=help_)
        output(sp)
        sp.set_defaults(local=fn)
        sp.add_argument("--data-dir", default=data_dir, help="the driver's data dir (default %(default)s)")
        return sp

    local("status", cmd_node_status, "volumes and snapshots here, with thin totals")
    sp = local("trim", cmd_node_trim, "give space freed inside volumes back to the host (fstrim)")
    sp.add_argument("volume", nargs="*", help="only these volume ids (default: every staged volume)")
    sp = local("orphans", cmd_node_orphans,
               "images, Released PVs, loop devices and mounts that nothing owns")
    sp.add_argument("--kubeconfig", default="", help="default: in-cluster, else $KUBECONFIG or ~/.kube/config")
    sp.add_argument("--driver-name", default=os.environ.get("THINLOOP_DRIVER_NAME", DEFAULT_DRIVER_NAME))
    sp.add_argument("--node-id", default=os.environ.get("THINLOOP_NODE_ID", os.environ.get("NODE_NAME", "")),
                    help="this node's id (default: the host name)")
    sp.add_argument("--delete", action="store_true", help="remove what is not in use, after confirmation")
    sp.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    from . import dsctl
    dsctl.add_commands(sub, output)

    sp = sub.add_parser("doctor", help="check that this node can run thinloop; a fix for each problem")
    sp.set_defaults(local=cmd_doctor)
    output(sp)
    sp.add_argument("--data-dir", default=data_dir)
    sp.add_argument("--kubelet-dir", default=kubelet_dir)
    return p


def emit(result: Any, output: str) -> None:
    if result is None:
        return  # a failure already said on stderr
    if output == "json":
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    elif output == "yaml":
        import yaml
        print(yaml.safe_dump(json.loads(json.dumps(result, default=str)), sort_keys=True), end="")
    else:
        print(result)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `thinloopctl ... | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "local", None) is not None:
            out: Outcome = args.local(args)
            emit(out.value, args.output)
            return out.code
        with CsiClient.connect(args.endpoint, timeout=10) as client:
            result = args.fn(client, args)
    except grpc.FutureTimeoutError:
        print(f"thinloopctl: no driver answers at {args.endpoint}", file=sys.stderr)
        return EXIT_FAILED
    except grpc.RpcError as exc:
        print(f"thinloopctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, DriverError) as exc:
        print(f"thinloopctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as exc:
        print(f"thinloopctl: {exc} (node commands need root)", file=sys.stderr)
        return EXIT_FAILED
    emit(result, args.output)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
