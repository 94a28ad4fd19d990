"""thinloopctl: drive a thinloop (or any CSI) endpoint and look after a thinloop node.

Tables for people (sizes in KiB/MiB/GiB, topology as key=value), `-o json` or `-o yaml`
for scripts (sizes in bytes, as integers, everywhere; errors as an `error` object). The CSI
subcommands talk to the driver's socket, each call with a deadline (--timeout); `node ...`,
`datastore ...` and `doctor` read the data dir, sysfs and mountinfo directly and need no
running driver. Global options (--endpoint, -o, --timeout) go before or after the
subcommand.

Exit codes: 0 done; 1 failed (an RPC failed and its gRPC code is printed, no driver
answers, a node operation failed, or a doctor check failed); 2 bad usage; 3 found and left
in place (`node orphans`: orphans; `datastore holders`: records that do not add up); 4
nothing done: the named volume or snapshot does not exist; 5 nothing changed: it was
already as asked, or the change needs a step this call cannot take (the message says
which); 130 interrupted (Ctrl-C)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from .. import __version__
from ..cliparse import HelpFormatter, OneLineParser, UsageError
from ..errors import DriverError
from ..proto import csi_pb2
from ..settings import (
    DEFAULT_DATA_DIR,
    DEFAULT_DRIVER_NAME,
    DEFAULT_ENDPOINT,
    DEFAULT_KUBELET_DIR,
    Settings,
    SettingsError,
    socket_path_from_endpoint,
)
from ..volumes.params import parse_quantity
from ..volumes.readiness import NOT_READY_REASON_KEY
from .client import CsiClient, capability
from .outcome import (
    EXIT_FAILED,
    EXIT_FOUND,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNCHANGED,
    EXIT_USAGE,
    Failure,
    Outcome,
    table,
)

AccessMode = csi_pb2.VolumeCapability.AccessMode
PluginService = csi_pb2.PluginCapability.Service
ControllerRPC = csi_pb2.ControllerServiceCapability.RPC

DEFAULT_TIMEOUT = 120.0
"""Seconds each CSI call may take: mkfs of a large preallocated image, or a snapshot copy,
take tens of seconds; a driver that says nothing for two minutes is stuck."""
OUTPUTS = ("table", "json", "yaml")


# -- plain values for json and yaml -----------------------------------------------------------


def plain(msg: Message) -> dict[str, Any]:
    """A protobuf message as JSON-ready values, every field present: int64 stays an int
    (proto3's JSON mapping writes it as a string), enums by name, an unset message field
    is None, timestamps in RFC 3339."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and not fd.is_repeated and not msg.HasField(fd.name):
            out[fd.name] = None
        elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            out[fd.name] = {k: _plain_value(fd.message_type.fields_by_name["value"], v) for k, v in value.items()}
        elif fd.is_repeated:
            out[fd.name] = [_plain_value(fd, v) for v in value]
        else:
            out[fd.name] = _plain_value(fd, value)
    return out


def _plain_value(fd: Any, value: Any) -> Any:
    if isinstance(value, Message):
        name = value.DESCRIPTOR.full_name
        if name == "google.protobuf.Timestamp":
            return value.ToJsonString()  # type: ignore[attr-defined]
        if name.startswith("google.protobuf.") and name.endswith("Value"):
            return value.value  # type: ignore[attr-defined]
        return plain(value)
    if fd.enum_type is not None:
        return fd.enum_type.values_by_number[value].name
    return value


def topology_text(segments: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(segments.items())) or "-"


def human(n: int | str | None) -> str:
    """Bytes in binary units for people: 512B, 64.0MiB, 1.0GiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


# -- talking to a driver ------------------------------------------------------------------------


class Timed:
    """A gRPC stub whose every call carries the deadline, and that remembers the last
    method called (for what to tell a user who stopped waiting)."""

    def __init__(self, stub: Any, session: Session) -> None:
        self._stub = stub
        self._session = session

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        session = self._session

        def call(request: Message) -> Any:
            session.rpc = name
            return method(request, timeout=session.timeout)

        def with_call(request: Message) -> Any:
            session.rpc = name
            return method.with_call(request, timeout=session.timeout)

        call.with_call = with_call  # type: ignore[attr-defined]
        return call


@dataclass
class Session:
    """One connection to a driver, its deadline and what it is doing."""

    endpoint: str
    timeout: float
    client: CsiClient | None = None
    rpc: str = ""
    """The CSI method last called: the one in flight when the user presses Ctrl-C."""
    identity: Any = None
    controller: Any = None
    node: Any = None
    group: Any = None
    _caps: dict[str, set[int]] = field(default_factory=dict)

    def open(self, client: CsiClient) -> Session:
        self.client = client
        self.identity = Timed(client.identity, self)
        self.controller = Timed(client.controller, self)
        self.node = Timed(client.node, self)
        self.group = Timed(client.group, self)
        return self

    def controller_caps(self) -> set[int]:
        """The ControllerServiceCapability RPC types the driver offers (empty when it
        serves no Controller service)."""
        if "controller" not in self._caps:
            try:
                resp = self.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
                self._caps["controller"] = {c.rpc.type for c in resp.capabilities}
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._caps["controller"] = set()
        return self._caps["controller"]


def check_endpoint(endpoint: str, source: str) -> str:
    """The socket path, checked with the driver's own rules and then on disk, so that a
    wrong endpoint is one line at once instead of a wait for a channel that never forms."""
    try:
        path = str(socket_path_from_endpoint(endpoint, source))
    except SettingsError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Failure(f"no socket at {path} ({source}): is the driver running here? --endpoint or "
                      "THINLOOP_ENDPOINT names its socket") from None
    except PermissionError:
        raise Failure(f"{path}: permission denied: run as root or as the driver's user") from None
    except NotADirectoryError:
        raise Failure(f"no socket at {path}: a parent of it is not a directory (check {source})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise Failure(f"{path} is not a socket (check {source})", EXIT_USAGE)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(5)
        probe.connect(path)
    except PermissionError:
        raise Failure(f"{path}: permission denied: run as root or as the driver's user") from None
    except OSError as exc:
        raise Failure(f"nothing listens on {path} ({exc.strerror}): the driver that made it is not "
                      "running") from None
    finally:
        probe.close()
    return path


def _volume(s: Session, volume_id: str, expected: bool = True) -> csi_pb2.Volume | None:
    """The volume as the driver reports it, None when it has no such volume. Raises
    Failure when the driver cannot tell (no ControllerGetVolume and no ListVolumes).
    `expected=False` looks by listing: a driver logs a NOT_FOUND answer as a failed call,
    and a create's look for its name is not one."""
    caps = s.controller_caps()
    if ControllerRPC.GET_VOLUME in caps and expected:
        try:
            resp = s.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id))
            return resp.volume  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
    if ControllerRPC.LIST_VOLUMES in caps:
        token = ""
        while True:
            resp = s.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=token))
            for e in resp.entries:
                if e.volume.volume_id == volume_id:
                    return e.volume  # type: ignore[no-any-return]
            token = resp.next_token
            if not token:
                return None
    raise Failure(f"the driver at {s.endpoint} cannot list volumes (a controller-only driver?): run this "
                  "against the node's driver")


def _snapshot(s: Session, snapshot_id: str) -> csi_pb2.Snapshot | None:
    resp = s.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snapshot_id))
    return next((e.snapshot for e in resp.entries if e.snapshot.snapshot_id == snapshot_id), None)


# -- CSI commands ---------------------------------------------------------------------------------


def _cap(args: argparse.Namespace) -> csi_pb2.VolumeCapability:
    mode = AccessMode.SINGLE_NODE_READER_ONLY if getattr(args, "readonly", False) else \
        AccessMode.SINGLE_NODE_WRITER
    return capability(block=args.block, fs_type=getattr(args, "fs_type", "") or "", mode=mode)


def _params(values: list[str], what: str, example: str) -> dict[str, str]:
    bad = [v for v in values if "=" not in v or v.startswith("=")]
    if bad:
        raise Failure(f"{what} {bad[0]!r}: expected key=value (e.g. {example})", EXIT_USAGE)
    return dict(v.split("=", 1) for v in values)


def _size(text: str, what: str) -> int:
    try:
        return parse_quantity(text)
    except DriverError as exc:
        raise Failure(f"{what}: {exc.message}", EXIT_USAGE) from None


def cmd_info(s: Session, a: argparse.Namespace) -> Outcome:
    info = s.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    plugin_caps = s.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    has_controller = any(c.service.type == PluginService.CONTROLLER_SERVICE for c in plugin_caps.capabilities)
    probe, call = s.identity.Probe.with_call(csi_pb2.ProbeRequest())
    ready = probe.ready.value if probe.HasField("ready") else True  # CSI: unset means ready
    reason = None
    if not ready:
        told = [v for k, v in call.trailing_metadata() or () if k == NOT_READY_REASON_KEY]
        reason = bytes(told[0]).decode(errors="replace") if told else \
            "not given by the driver: see its log"
    try:
        node: csi_pb2.NodeGetInfoResponse | None = s.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        node = None  # a controller-only driver serves no Node service
    capacity = None
    if has_controller and ControllerRPC.GET_CAPACITY in s.controller_caps():
        capacity = int(s.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity)
    services = (["controller"] if has_controller else []) + (["node"] if node is not None else [])
    doc: dict[str, Any] = {
        "name": info.name, "version": info.vendor_version, "services": services, "ready": ready,
        "not_ready_reason": reason, "node_id": node.node_id if node is not None else None,
        "topology": dict(node.accessible_topology.segments) if node is not None else None,
        "available_capacity": capacity}
    if a.output != "table":
        return Outcome(doc)
    shown = {**doc, "services": ", ".join(services) or "identity only",
             "ready": "yes" if ready else f"no: {reason}",
             "node_id": doc["node_id"] or "- (no Node service)",
             "topology": topology_text(doc["topology"]) if node is not None else "-",
             "available_capacity": human(capacity) if capacity is not None else "- (no GetCapacity)"}
    del shown["not_ready_reason"]
    return Outcome("\n".join(f"{k:20} {v}" for k, v in shown.items()))


def cmd_create(s: Session, a: argparse.Namespace) -> Outcome:
    params = _params(a.param, "--param", "--param fsType=xfs")
    req = csi_pb2.CreateVolumeRequest(
        name=a.name, volume_capabilities=[_cap(a)], parameters=params,
        capacity_range=csi_pb2.CapacityRange(required_bytes=_size(a.size, "--size")))
    if a.from_snapshot:
        req.volume_content_source.snapshot.snapshot_id = a.from_snapshot
    if a.from_volume:
        req.volume_content_source.volume.volume_id = a.from_volume
    existed = _exists_quietly(lambda: _volume(s, a.name, expected=False))
    vol = s.controller.CreateVolume(req).volume
    doc = {**plain(vol), "created": not (existed and vol.volume_id == a.name)}
    kind = vol.volume_context.get("fsType", "block")
    text = (f"{vol.volume_id} ({human(vol.capacity_bytes)}, {kind}, "
            f"{vol.volume_context.get('diskformat', '?')}) on "
            f"{', '.join(topology_text(t.segments) for t in vol.accessible_topology) or 'any node'}")
    if not doc["created"]:
        return Outcome(doc if a.output != "table" else
                       f"volume {text} already exists with these parameters: nothing created", EXIT_UNCHANGED)
    return Outcome(doc if a.output != "table" else f"created {text}")


def _exists_quietly(find: Callable[[], Any]) -> bool:
    """Whether the object is already there, when the driver can say; False when it cannot
    (the create then reports what the driver answers)."""
    try:
        return find() is not None
    except (Failure, grpc.RpcError):
        return False


def cmd_list(s: Session, a: argparse.Namespace) -> Outcome:
    entries: list[dict[str, Any]] = []
    token = ""
    while True:
        resp = s.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=a.page, starting_token=token))
        for e in resp.entries:
            entries.append({
                "id": e.volume.volume_id, "size": int(e.volume.capacity_bytes),
                "fs": e.volume.volume_context.get("fsType", "block"),
                "diskformat": e.volume.volume_context.get("diskformat", ""),
                "in_use": bool(e.status.published_node_ids),
                "condition": e.status.volume_condition.message,
            })
        token = resp.next_token
        if not token:
            break
    if a.output != "table":
        return Outcome(entries)
    rows = [{**row, "size": human(row["size"]), "in_use": "yes" if row["in_use"] else "no"} for row in entries]
    return Outcome(table(rows, ["id", "size", "fs", "diskformat", "in_use", "condition"]))


def cmd_stage(s: Session, a: argparse.Namespace) -> Outcome:
    s.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path, volume_capability=_cap(a)))
    return Outcome({"staged": a.volume_id} if a.output != "table" else f"staged {a.volume_id} at {a.staging_path}")


def cmd_publish(s: Session, a: argparse.Namespace) -> Outcome:
    s.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path, target_path=a.target_path,
        volume_capability=_cap(a), readonly=a.readonly))
    return Outcome({"published": a.volume_id} if a.output != "table" else
                   f"published {a.volume_id} at {a.target_path}")


def cmd_stats(s: Session, a: argparse.Namespace) -> Outcome:
    resp = s.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=a.volume_id, volume_path=a.path))
    if a.output != "table":
        return Outcome(plain(resp))
    rows = []
    for u in resp.usage:
        unit = csi_pb2.VolumeUsage.Unit.Name(u.unit)
        show: Callable[[int], str] = human if unit == "BYTES" else str
        rows.append({"unit": unit, "total": show(u.total), "used": show(u.used), "available": show(u.available)})
    cond = resp.volume_condition
    return Outcome(table(rows, ["unit", "total", "used", "available"]) +
                   f"\ncondition: {'ABNORMAL' if cond.abnormal else 'ok'} ({cond.message or 'healthy'})")


def cmd_expand(s: Session, a: argparse.Namespace) -> Outcome:
    size = _size(a.size, "size")
    rng = csi_pb2.CapacityRange(required_bytes=size)
    before = None
    if ControllerRPC.GET_VOLUME in s.controller_caps():  # a controller-only driver cannot look
        before = _volume(s, a.volume_id)
        if before is None:
            raise Failure(f"no volume {a.volume_id}: nothing expanded (thinloopctl list shows the volumes)",
                          EXIT_NOT_FOUND)
    previous = int(before.capacity_bytes) if before is not None else None
    fs = before.volume_context.get("fsType", "") if before is not None else ""
    ctrl = s.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=a.volume_id, capacity_range=rng))
    capacity = int(ctrl.capacity_bytes)
    node_done = False
    if ctrl.node_expansion_required and a.path:
        capacity = int(s.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=a.volume_id, volume_path=a.path, capacity_range=rng,
            staging_target_path=a.staging_path or "")).capacity_bytes)
        node_done = True
    grown = previous is None or capacity > previous
    what = f"{fs} filesystem" if fs else "block device"
    if ctrl.node_expansion_required and not node_done:
        code, message = EXIT_UNCHANGED, (
            f"{a.volume_id} is in use on its node, which grows it online: nothing changed; run again with "
            "--path set to its published (or staging) path" if before is not None else
            f"the driver at {s.endpoint} leaves growing {a.volume_id} to its node: nothing changed; run "
            "this against the node's driver with --path set to the published path")
    elif not grown:
        code, message = EXIT_UNCHANGED, f"{a.volume_id} is already {human(capacity)}: nothing changed"
    elif node_done:
        code, message = EXIT_OK, (f"grew {a.volume_id} from {human(previous)} to {human(capacity)}: image, "
                                  f"loop device and {what} online at {a.path}")
    else:
        later = (f"its {what} grows when it is next staged" if fs else
                 "the block device shows the new size when it is next staged")
        code, message = EXIT_OK, (f"grew the image of {a.volume_id} from {human(previous)} to {human(capacity)} "
                                  f"(controller side: not staged on its node); {later}")
    doc = {"volume_id": a.volume_id, "capacity_bytes": capacity, "previous_capacity_bytes": previous,
           "controller_expanded": grown and not ctrl.node_expansion_required,
           "node_expanded": node_done and grown, "message": message}
    return Outcome(doc if a.output != "table" else message, code)


def cmd_unpublish(s: Session, a: argparse.Namespace) -> Outcome:
    s.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id, target_path=a.target_path))
    return Outcome({"unpublished": a.volume_id} if a.output != "table" else f"unpublished {a.volume_id}")


def cmd_unstage(s: Session, a: argparse.Namespace) -> Outcome:
    s.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=a.volume_id, staging_target_path=a.staging_path))
    return Outcome({"unstaged": a.volume_id} if a.output != "table" else f"unstaged {a.volume_id}")


def cmd_delete(s: Session, a: argparse.Namespace) -> Outcome:
    if _volume(s, a.volume_id) is None:
        raise Failure(f"no volume {a.volume_id}: nothing deleted (thinloopctl list shows the volumes)",
                      EXIT_NOT_FOUND)
    s.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=a.volume_id))
    return Outcome({"deleted": a.volume_id} if a.output != "table" else f"deleted {a.volume_id}")


def cmd_snapshot(s: Session, a: argparse.Namespace) -> Outcome:
    existed = _exists_quietly(lambda: _snapshot(s, a.name))
    snap = s.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=a.name, source_volume_id=a.volume_id)).snapshot
    doc = {**plain(snap), "created": not (existed and snap.snapshot_id == a.name)}
    text = f"{snap.snapshot_id} of {snap.source_volume_id} ({human(snap.size_bytes)})"
    if not doc["created"]:
        return Outcome(doc if a.output != "table" else f"snapshot {text} already exists: nothing taken",
                       EXIT_UNCHANGED)
    return Outcome(doc if a.output != "table" else f"snapshot {text}")


def cmd_snapshots(s: Session, a: argparse.Namespace) -> Outcome:
    rows = []
    token = ""
    while True:
        resp = s.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(starting_token=token))
        rows += [{"id": e.snapshot.snapshot_id, "source": e.snapshot.source_volume_id,
                  "size": int(e.snapshot.size_bytes), "ready": e.snapshot.ready_to_use,
                  "group": e.snapshot.group_snapshot_id} for e in resp.entries]
        token = resp.next_token
        if not token:
            break
    if a.output != "table":
        return Outcome(rows)
    shown = [{**r, "size": human(r["size"]), "ready": "yes" if r["ready"] else "no", "group": r["group"] or "-"}
             for r in rows]
    return Outcome(table(shown, ["id", "source", "size", "ready", "group"]))


def cmd_delete_snapshot(s: Session, a: argparse.Namespace) -> Outcome:
    if _snapshot(s, a.snapshot_id) is None:
        raise Failure(f"no snapshot {a.snapshot_id}: nothing deleted (thinloopctl snapshots lists them)",
                      EXIT_NOT_FOUND)
    s.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=a.snapshot_id))
    return Outcome({"deleted": a.snapshot_id} if a.output != "table" else f"deleted snapshot {a.snapshot_id}")


def _group_ids(s: Session) -> set[str]:
    """Group snapshot ids, found through their members (CSI has no call that lists groups)."""
    ids: set[str] = set()
    token = ""
    while True:
        resp = s.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(starting_token=token))
        ids |= {e.snapshot.group_snapshot_id for e in resp.entries if e.snapshot.group_snapshot_id}
        token = resp.next_token
        if not token:
            return ids


def cmd_group_snapshot(s: Session, a: argparse.Namespace) -> Outcome:
    existed = a.name in _group_ids(s)
    group = s.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=a.name, source_volume_ids=a.volume_id)).group_snapshot
    members = ", ".join(f"{m.snapshot_id} ({m.source_volume_id})" for m in group.snapshots)
    if a.output != "table":
        return Outcome({**plain(group), "created": not existed}, EXIT_UNCHANGED if existed else EXIT_OK)
    if existed:
        return Outcome(f"group snapshot {group.group_snapshot_id} already exists: nothing taken ({members})",
                       EXIT_UNCHANGED)
    return Outcome(f"group snapshot {group.group_snapshot_id}: {members}")


def cmd_group_snapshots(s: Session, a: argparse.Namespace) -> Outcome:
    rows = []
    for gid in sorted(_group_ids(s)):
        try:
            group = s.group.GetVolumeGroupSnapshot(
                csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid)).group_snapshot
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                continue  # deleted since it was listed
            raise
        rows.append({"id": gid, "created": group.creation_time.ToJsonString(), "ready": group.ready_to_use,
                     "snapshots": [m.snapshot_id for m in group.snapshots],
                     "volumes": [m.source_volume_id for m in group.snapshots]})
    if a.output != "table":
        return Outcome(rows)
    shown = [{**r, "snapshots": ",".join(r["snapshots"]), "volumes": ",".join(r["volumes"]),
              "ready": "yes" if r["ready"] else "no"} for r in rows]
    return Outcome(table(shown, ["id", "volumes", "snapshots", "created", "ready"]))


def cmd_delete_group_snapshot(s: Session, a: argparse.Namespace) -> Outcome:
    if a.group_id not in _group_ids(s):
        raise Failure(f"no group snapshot {a.group_id}: nothing deleted (thinloopctl group-snapshots lists them)",
                      EXIT_NOT_FOUND)
    s.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=a.group_id))
    return Outcome({"deleted": a.group_id} if a.output != "table"
                   else f"deleted group snapshot {a.group_id} and its snapshots")


def cmd_modify(s: Session, a: argparse.Namespace) -> Outcome:
    params = _params(a.param, "parameter", "reclaim=none")
    s.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
        volume_id=a.volume_id, mutable_parameters=params))
    return Outcome({"modified": a.volume_id, "parameters": params} if a.output != "table" else
                   f"modified {a.volume_id}: {', '.join(f'{k}={v}' for k, v in params.items())}")


# -- node commands: read the node directly, no driver needed ------------------------------------


def _settings(data_dir: Path, node_id: str = "", driver_name: str = DEFAULT_DRIVER_NAME,
              kubelet_dir: Path = Path(DEFAULT_KUBELET_DIR), datastore: str = "") -> Settings:
    return Settings(socket_path=Path("/nonexistent/csi.sock"), node_id=node_id or socket.gethostname(),
                    data_dir=data_dir, driver_name=driver_name, kubelet_dir=kubelet_dir,
                    datastore=datastore)


@dataclass
class Local:
    """The project's own Store, HostOS and Volumes over a data dir on this host."""

    settings: Settings
    store: Any
    hostos: Any
    volumes: Any

    @classmethod
    def open(cls, a: argparse.Namespace) -> Local:
        from ..host.linux import HostOS
        from ..volumes.lifecycle import Volumes
        from ..volumes.store import Store
        data_dir = Path(a.data_dir)
        if not (data_dir / "volumes").is_dir():
            raise ValueError(f"{data_dir} is not a thinloop data dir (no volumes/ inside); "
                             "pass --data-dir or set THINLOOP_DATA_DIR")
        from ..volumes.datastore.records import read_marker
        settings = _settings(data_dir, getattr(a, "node_id", ""),
                             getattr(a, "driver_name", DEFAULT_DRIVER_NAME), datastore=read_marker(data_dir) or "")
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
    from ..volumes.datalock import node_lock_path
    from ..volumes.status import collect
    local = Local.open(a)
    shared = local.settings.shared
    lock = node_lock_path(local.settings.data_dir, local.settings.node_id) if shared else None
    status = collect(local.store, local.hostos, lock, local.settings.datastore if shared else None)
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
        "VOLUMES", table(vols, ["id", "size", "allocated", "fs", "diskformat", "state", "loop",
                                 "staged_at", "published_at"]),
        "", "SNAPSHOTS", table(snaps, ["id", "source", "size", "allocated", "fs"]), "",
        f"{'data dir':14}{status.data_dir} ({status.data_fs_type})"
        + (f": datastore {status.datastore}, shared with other nodes" if shared else ""),
        f"{'driver':14}{status.driver or 'none running on this data dir'}" if not shared else
        f"{'driver':14}{status.driver or f'none running as node {local.settings.node_id}'}",
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
    """fstrim every staged thin filesystem volume so the image gives freed blocks back.
    Thick volumes are skipped: their promise is to keep their whole size allocated. Each
    volume is trimmed holding its in-flight key, so a running driver's operation on it
    (unstage, expand, snapshot) and the trim never overlap; a busy volume is skipped."""
    from ..errors import Aborted
    from ..host.runner import CommandError
    from ..volumes.lifecycle import fs_type_of
    local = Local.open(a)
    known = set(local.store.volumes.ids())
    unknown = [v for v in a.volume if v not in known]
    if unknown:
        raise Failure(f"no volume {', '.join(unknown)} in {local.settings.data_dir}: nothing trimmed "
                      "(thinloopctl node status lists the volumes here)", EXIT_NOT_FOUND)
    inflight = _driver_keys(a, local.settings)
    entries = [e for e in local.store.volumes.entries() if not a.volume or e.id in a.volume]
    rows: list[dict[str, Any]] = []
    code = EXIT_OK
    for i, entry in enumerate(entries, 1):
        row: dict[str, Any] = {"id": entry.id, "mount_point": "", "trimmed_bytes": 0,
                               "allocated_before": entry.allocated_bytes(), "allocated_after": None,
                               "result": ""}
        rows.append(row)
        if entry.meta.diskformat != "thin":
            row["result"] = (f"skipped: {entry.meta.diskformat} volume (thick volumes keep their "
                             "whole size allocated; trimming would give it away)")
            continue
        try:
            with inflight.hold(f"vol:{entry.id}"):
                usage = local.volumes.usage(entry)
                mount_point = row["mount_point"] = local.volumes.fs_mount_point(usage)
                if not mount_point:
                    row["result"] = ("skipped: raw block volume (the filesystem inside trims itself)"
                                     if not fs_type_of(entry, local.hostos) else "skipped: not staged on this node")
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
        except Aborted:
            row["result"] = "skipped: busy (the driver is working on this volume); run again later"
    if a.volume and code == EXIT_OK and not any(r["result"] == "trimmed" for r in rows):
        code = EXIT_UNCHANGED  # named volumes, none of which could be trimmed: the rows say why
    if a.output != "table":
        return Outcome(rows, code)
    before = sum(r["allocated_before"] for r in rows if r["allocated_after"] is not None)
    after = sum(r["allocated_after"] for r in rows if r["allocated_after"] is not None)
    shown = [{**r, "trimmed_bytes": human(r["trimmed_bytes"]), "allocated_before": human(r["allocated_before"]),
              "allocated_after": "" if r["allocated_after"] is None else human(r["allocated_after"])}
             for r in rows]
    text = table(shown, ["id", "mount_point", "trimmed_bytes", "allocated_before", "allocated_after",
                         "result"])
    return Outcome(f"{text}\nallocation of trimmed volumes: {human(before)} -> {human(after)} "
                   f"({human(max(0, before - after))} given back to the host)", code)


def _driver_keys(a: argparse.Namespace, settings: Settings) -> Any:
    """The in-flight keys shared with the driver of this data dir (csi_driver.volumes.inflight):
    in shared mode those of the node driver at --endpoint, none when it is not running."""
    from ..volumes.inflight import InFlight, driver_keys
    if not settings.shared:
        return driver_keys(settings.data_dir, settings.socket_path, shared=False)
    socket_path = socket_path_from_endpoint(getattr(a, "endpoint", None) or DEFAULT_ENDPOINT, "--endpoint")
    if not socket_path.parent.is_dir():
        return InFlight()  # no driver has run here: nothing to stay clear of
    return driver_keys(settings.data_dir, socket_path, shared=True)


def _confirm(prompt: str) -> bool:
    print(f"{prompt} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_node_orphans(a: argparse.Namespace, cluster: Any = None) -> Outcome:
    """`cluster`: a ClusterView or a reason string to use instead of the real API (a seam
    for tests); None reads the cluster."""
    from ..volumes.datastore.records import read_marker
    from . import orphans
    if read_marker(Path(a.data_dir)) is not None:
        raise Failure(f"{a.data_dir} is a shared datastore: its images are attached on other nodes too, "
                      "so orphans are not judged from one node (see thinloopctl datastore holders)",
                      EXIT_USAGE)
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
        return Outcome(table(rows, cols) if rows else "no orphans found", code)
    deletable = [o for o in report.orphans if o.deletable]
    if deletable and not a.yes:
        print(table([o.to_dict() for o in deletable], ["kind", "id", "detail"]), file=sys.stderr)
        if not _confirm(f"Delete these {len(deletable)} object(s)?"):
            return Outcome(report.to_dict() if a.output != "table" else "nothing deleted", EXIT_FOUND)
    outcomes = orphans.remove(report, local.store, local.hostos, view,
                              progress=lambda o: _progress(a, f"removing {o.kind} {o.id}"),
                              inflight=_driver_keys(a, local.settings))
    failed = any(x.message.startswith("failed") for x in outcomes)
    left = any(not x.deleted for x in outcomes)
    code = EXIT_FAILED if failed else EXIT_FOUND if left else EXIT_OK
    docs = [x.to_dict() for x in outcomes]
    if a.output != "table":
        return Outcome({**report.to_dict(), "results": docs}, code)
    return Outcome(table(docs, ["kind", "id", "deleted", "message"]), code)


def cmd_node_label_group_snapshots(a: argparse.Namespace, api: Any = None) -> Outcome:
    """`api`: a grouplabels.GroupContents to use instead of the cluster's (a seam for
    tests); None reads the cluster."""
    import logging
    import signal

    from ..logsetup import TextFormatter
    from . import grouplabels
    data_dir = Path(a.data_dir)
    grouplabels.check_settings(a.node_name, a.driver_name, data_dir)
    if api is None:
        try:
            api = grouplabels.KubeGroupContents.connect(a.kubeconfig)
        except ValueError as exc:
            raise Failure(str(exc)) from None
    labeller = grouplabels.Labeller(api, a.node_name, a.driver_name, grouplabels.NodeData(data_dir))
    if not a.watch:
        try:
            done = [d.to_dict() for d in labeller.sweep()]
        except grouplabels.ApiError as exc:
            raise Failure(f"Kubernetes API: {exc.explain()}") from None
        if a.output != "table":
            return Outcome(done)
        return Outcome(table(done, ["content", "node", "reason"]) if done else
                       f"nothing to label: no unlabelled {grouplabels.KIND} of {a.driver_name} is held here")
    # The sidecar's log: one line per label applied, on stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger(grouplabels.log.name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    previous = {s: signal.signal(s, labeller.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    stopped_by = ""
    try:
        grouplabels.log.info("labelling unlabelled %ss of %s held in %s with %s=%s", grouplabels.KIND,
                             a.driver_name, data_dir, grouplabels.MANAGED_BY, a.node_name)
        labeller.run()
    except grouplabels.Terminated as t:
        stopped_by = signal.Signals(t.signum).name
        grouplabels.log.info("stopped by %s after %d label(s)", stopped_by, len(labeller.labelled))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        logger.removeHandler(handler)
    summary = {"labelled": [d.to_dict() for d in labeller.labelled], "stopped_by": stopped_by}
    return Outcome(summary if a.output != "table" else
                   f"stopped{f' by {stopped_by}' if stopped_by else ''} after labelling "
                   f"{len(labeller.labelled)} {grouplabels.KIND}(s)")


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

SIZE_HELP = "bytes, or a quantity such as 512Mi, 10Gi or 1G"


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """--endpoint, -o and --timeout, on the top parser (with their defaults) and on every
    subcommand (defaults suppressed, so a value given before the subcommand survives)."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    env = os.environ.get("THINLOOP_ENDPOINT")
    now = f"; set to {env!r} here" if env else ""
    g = p.add_argument_group("global options (before or after the subcommand)")
    g.add_argument("--endpoint", default=default(None), metavar="URI",
                   help=f"the driver's CSI socket, unix:///path [default: {DEFAULT_ENDPOINT}; "
                   f"env THINLOOP_ENDPOINT{now}]")
    g.add_argument("-o", "--output", choices=OUTPUTS, default=default("table"),
                   help="table for people; json or yaml for scripts [default: table]")
    g.add_argument("--timeout", type=_seconds, default=default(DEFAULT_TIMEOUT), metavar="SECONDS",
                   help=f"deadline of each CSI call [default: {DEFAULT_TIMEOUT:.0f}]")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 0 and at most 86400")
    return value


def build_parser() -> OneLineParser:
    doc = __doc__ or ""
    p = OneLineParser(prog="thinloopctl", formatter_class=HelpFormatter,
                      description=doc.split("\n\n")[0].replace("\n", " ") + "\n\n" + doc.split("\n\n")[1],
                      epilog=doc.split("\n\n")[2])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands (thinloopctl COMMAND --help for each)")
    data_dir = os.environ.get("THINLOOP_DATA_DIR", DEFAULT_DATA_DIR)
    kubelet_dir = os.environ.get("THINLOOP_KUBELET_DIR", DEFAULT_KUBELET_DIR)

    def command(parent: Any, name: str, summary: str, description: str, check: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(
            name, help=summary, description=f"{summary}.\n\n{description}" if description else summary + ".",
            formatter_class=HelpFormatter)
        sp.set_defaults(check=check)
        _global_options(sp, top=False)
        return sp

    def csi(name: str, fn: Callable[[Session, argparse.Namespace], Outcome], summary: str, description: str,
            check: str = "thinloopctl list") -> argparse.ArgumentParser:
        sp = command(sub, name, summary, description, check)
        sp.set_defaults(fn=fn)
        return sp

    def access(sp: argparse.ArgumentParser, fs_default: str = "") -> None:
        group = sp.add_mutually_exclusive_group()
        group.add_argument("--block", action="store_true", help="raw block access: no filesystem")
        group.add_argument("--fs-type", default=fs_default, metavar="FS",
                           help="ext3, ext4 or xfs [default: the driver's, ext4 for thinloop]")

    csi("info", cmd_info, "show the plugin, its services, readiness, node and capacity",
        "Works against any mode of the driver: calls only what it serves (a controller-only "
        "driver has no node id; a node-only one no capacity). When it is not ready, shows the "
        "reason the driver gave in that very Probe.", check="thinloopctl info")
    sp = csi("create", cmd_create, "create a volume (CreateVolume)",
             "The name is also the volume id. Repeating a create with the same parameters "
             "changes nothing and says so (exit 5).")
    sp.add_argument("name", help="volume name: letters, digits, '-', '_' and '.', at most 128")
    sp.add_argument("--size", default="1Gi", help=f"{SIZE_HELP}; rounded up to a MiB [default: 1Gi]")
    sp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a StorageClass parameter, e.g. diskformat=zeroedthick (repeatable)")
    source = sp.add_mutually_exclusive_group()
    source.add_argument("--from-snapshot", default="", metavar="SNAPSHOT_ID", help="restore this snapshot")
    source.add_argument("--from-volume", default="", metavar="VOLUME_ID", help="clone this volume")
    access(sp)
    sp = csi("list", cmd_list, "list volumes with size, filesystem, diskformat, use and condition", "")
    sp.add_argument("--page", type=int, default=100, metavar="N",
                    help="volumes asked for per ListVolumes call [default: 100]")
    sp = csi("stage", cmd_stage, "attach a volume and mount it at a staging path (NodeStageVolume)",
             "Paths must lie under the driver's --kubelet-dir.", check="thinloopctl node status")
    sp.add_argument("volume_id", help="the volume to stage")
    sp.add_argument("staging_path", help="directory to mount it on (block volumes: only attached)")
    access(sp)
    sp.add_argument("--readonly", action="store_true", help="mount read-only")
    sp = csi("publish", cmd_publish, "bind a staged volume to a target path (NodePublishVolume)",
             "Paths must lie under the driver's --kubelet-dir; the target is created.",
             check="thinloopctl node status")
    sp.add_argument("volume_id", help="the staged volume")
    sp.add_argument("staging_path", help="where it was staged")
    sp.add_argument("target_path", help="where to publish it (a directory, or a file for --block)")
    sp.add_argument("--readonly", action="store_true", help="publish read-only")
    access(sp)
    sp = csi("stats", cmd_stats, "usage and condition of a published volume (NodeGetVolumeStats)",
             "Bytes and inodes used, available and in total, and whether the volume is healthy.",
             check="thinloopctl stats")
    sp.add_argument("volume_id", help="the volume")
    sp.add_argument("path", help="where it is published (the target path; its staging path works too)")
    sp = csi("expand", cmd_expand, "grow a volume (ControllerExpandVolume, then NodeExpandVolume)",
             "A volume in use nowhere is grown by the controller side at once; its filesystem grows "
             "when it is next staged. A volume staged on its node is grown online by the node, "
             "which needs --path. The output says which part was done; exit 5 when nothing "
             "changed.", check="thinloopctl list")
    sp.add_argument("volume_id", help="the volume")
    sp.add_argument("size", help=f"the new size, {SIZE_HELP}")
    sp.add_argument("--path", default="", help="where it is published (or staged): grow it online there")
    sp.add_argument("--staging-path", default="", help="its staging path, when it has one")
    sp = csi("unpublish", cmd_unpublish, "unmount a target path (NodeUnpublishVolume)", "",
             check="thinloopctl node status")
    sp.add_argument("volume_id", help="the volume")
    sp.add_argument("target_path", help="the target path it is published at")
    sp = csi("unstage", cmd_unstage, "unmount the staging path and detach the loop device (NodeUnstageVolume)",
             "", check="thinloopctl node status")
    sp.add_argument("volume_id", help="the volume")
    sp.add_argument("staging_path", help="the staging path it is mounted at")
    sp = csi("delete", cmd_delete, "delete a volume (DeleteVolume)",
             "Refused while the volume is attached or mounted. A volume that does not exist is "
             "reported (exit 4), not silently passed.")
    sp.add_argument("volume_id", help="the volume")
    sp = csi("snapshot", cmd_snapshot, "snapshot a volume (CreateSnapshot)",
             "A mounted volume is frozen (fsfreeze) while it is copied. The name is also the "
             "snapshot id.", check="thinloopctl snapshots")
    sp.add_argument("volume_id", help="the source volume")
    sp.add_argument("name", help="snapshot name")
    csi("snapshots", cmd_snapshots, "list snapshots with source, size and readiness", "",
        check="thinloopctl snapshots")
    sp = csi("delete-snapshot", cmd_delete_snapshot, "delete a snapshot (DeleteSnapshot)",
             "A snapshot that does not exist is reported (exit 4).", check="thinloopctl snapshots")
    sp.add_argument("snapshot_id", help="the snapshot")
    sp = csi("group-snapshot", cmd_group_snapshot,
             "snapshot several volumes of this node at one point in time (CreateVolumeGroupSnapshot)",
             "Every mounted member is frozen (in volume id order) while all are copied; a raw block "
             "member is only as consistent as its writer keeps it. The name is also the group id; "
             "repeating it with the same volumes changes nothing (exit 5).",
             check="thinloopctl group-snapshots")
    sp.add_argument("name", help="group snapshot name")
    sp.add_argument("volume_id", nargs="+", help="the member volumes")
    csi("group-snapshots", cmd_group_snapshots, "list volume group snapshots with their members",
        "Groups are found through their member snapshots.", check="thinloopctl group-snapshots")
    sp = csi("delete-group-snapshot", cmd_delete_group_snapshot,
             "delete a volume group snapshot and its snapshots (DeleteVolumeGroupSnapshot)",
             "A group that does not exist is reported (exit 4).", check="thinloopctl group-snapshots")
    sp.add_argument("group_id", help="the group snapshot")
    sp = csi("modify", cmd_modify, "change a live volume's mutable parameters (ControllerModifyVolume)",
             "diskformat thin -> zeroedthick preallocates the image; reclaim discard|none remounts "
             "with or without online discard.")
    sp.add_argument("volume_id", help="the volume")
    sp.add_argument("param", nargs="+", metavar="KEY=VALUE", help="e.g. reclaim=none or diskformat=zeroedthick")

    node = command(sub, "node", "inspect and tidy this node (reads the data dir; no driver needed)", "",
                   "thinloopctl node status")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="NODE_COMMAND",
                                   title="node commands")

    def local(name: str, fn: Callable[[argparse.Namespace], Outcome], summary: str,
              description: str = "") -> argparse.ArgumentParser:
        sp = command(node_sub, name, summary, description, "thinloopctl node status")
        sp.set_defaults(local=fn)
        sp.add_argument("--data-dir", default=data_dir,
                        help="the driver's data dir [default: %(default)s; env THINLOOP_DATA_DIR]")
        return sp

    node_id_help = ("this node's id, as its driver's --node-id (in shared mode it names this node's "
                    "driver) [default: the host name; env THINLOOP_NODE_ID or NODE_NAME]")
    node_id = os.environ.get("THINLOOP_NODE_ID", os.environ.get("NODE_NAME", ""))
    sp = local("status", cmd_node_status, "volumes and snapshots here, with thin totals",
               "Apparent size, allocated bytes, filesystem, diskformat, state, loop device and mount "
               "points of each, then what was promised, what is used, and the overcommit. On a "
               "shared datastore: every volume of it, in use on this host or not, and this node's "
               "driver.")
    sp.add_argument("--node-id", default=node_id, help=node_id_help)
    sp = local("trim", cmd_node_trim, "give space freed inside volumes back to the host (fstrim)",
               "Trims every staged filesystem volume, or the ones named. A name that is not a "
               "volume here stops it before anything is trimmed (exit 4); named volumes of which "
               "none could be trimmed give exit 5. On a shared datastore, the volumes staged on "
               "this host; a volume the node driver at --endpoint is working on is skipped.")
    sp.add_argument("volume", nargs="*", help="volume ids [default: every staged filesystem volume]")
    sp.add_argument("--node-id", default=node_id, help=node_id_help)
    sp = local("orphans", cmd_node_orphans, "images, Released PVs, loop devices and mounts that nothing owns",
               "Reads the cluster's PVs and VolumeSnapshotContents; without API access judges only loop "
               "devices and mounts. Exit 3 while orphans are left. Refused on a shared datastore "
               "(exit 2): from one node every image attached elsewhere would look like an orphan.")
    sp.add_argument("--kubeconfig", default="", help="[default: in-cluster, else $KUBECONFIG or ~/.kube/config]")
    sp.add_argument("--driver-name", default=os.environ.get("THINLOOP_DRIVER_NAME", DEFAULT_DRIVER_NAME),
                    help="the CSI driver name its PVs carry [default: %(default)s; env THINLOOP_DRIVER_NAME]")
    sp.add_argument("--node-id", default=node_id, help=node_id_help)
    sp.add_argument("--delete", action="store_true", help="remove what is not in use, after confirmation")
    sp.add_argument("--yes", "-y", action="store_true", help="with --delete: do not ask for confirmation")
    sp = local("label-group-snapshots", cmd_node_label_group_snapshots,
               "label this node's VolumeGroupSnapshotContents so its csi-snapshotter takes them",
               "snapshot-controller (external-snapshotter v8.6.0) leaves a new VolumeGroupSnapshotContent "
               "without the snapshot.storage.kubernetes.io/managed-by label that a csi-snapshotter run with "
               "--node-deployment selects on. This labels each unlabelled content of --driver-name whose "
               "volume that sorts first is in this node's data dir (pre-provisioned: whose group record, or "
               "else first member snapshot, is here) with managed-by=--node-name, by a patch that names the "
               "resourceVersion it judged, so two nodes never both label one. The data dir is only read. "
               "Once, or with --watch until SIGTERM (the node pod's sidecar).")
    sp.add_argument("--watch", action="store_true",
                    help="keep watching and label each new content; one log line per label; "
                    "exit 0 on SIGTERM or SIGINT")
    sp.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                    help="this node's Kubernetes name, the label's value [default: env NODE_NAME]")
    sp.add_argument("--driver-name", default=os.environ.get("THINLOOP_DRIVER_NAME", DEFAULT_DRIVER_NAME),
                    help="label only contents of this CSI driver [default: %(default)s; env THINLOOP_DRIVER_NAME]")
    sp.add_argument("--kubeconfig", default="", help="[default: in-cluster, else $KUBECONFIG or ~/.kube/config]")

    from . import dsctl
    dsctl.add_commands(sub, command, data_dir)

    sp = command(sub, "doctor", "check that this node can run thinloop; a fix for each problem",
                 "Loop devices, tools and versions, kernel filesystems, capabilities, the data dir's "
                 "filesystem and free space, direct I/O, mount propagation of the kubelet dir, "
                 "readiness, and whether the driver at --endpoint answers. Exit 1 when a check fails.",
                 "thinloopctl doctor")
    sp.set_defaults(local=cmd_doctor)
    sp.add_argument("--data-dir", default=data_dir, help="[default: %(default)s; env THINLOOP_DATA_DIR]")
    sp.add_argument("--kubelet-dir", default=kubelet_dir,
                    help="[default: %(default)s; env THINLOOP_KUBELET_DIR]")
    return p


def emit(result: Any, output: str, stream: Any = None) -> None:
    stream = stream or sys.stdout
    if output == "json":
        print(json.dumps(result, indent=2, sort_keys=True, default=str), file=stream)
    elif output == "yaml":
        import yaml
        print(yaml.safe_dump(json.loads(json.dumps(result, default=str)), sort_keys=True), end="", file=stream)
    else:
        print(result, file=stream)


def _output_of(argv: Sequence[str]) -> str:
    """-o as given, read before (or without) a successful parse, so that even a usage error
    is JSON for a script that asked for JSON."""
    out = "table"
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-o", "--output") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--output="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-o") and len(arg) > 2 and not arg.startswith("--"):
            value = arg[2:].lstrip("=")
        if value in OUTPUTS:
            out = value
    return out


def fail(message: str, code: int, kind: str, output: str) -> int:
    """One line on stderr for people; an `error` object on stdout in json/yaml mode."""
    if output in ("json", "yaml"):
        emit({"error": {"kind": kind, "message": message, "exit_code": code}}, output)
    else:
        print(message if message.startswith("thinloopctl") else f"thinloopctl: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except BrokenPipeError:  # `thinloopctl ... | head`: the reader left; not an error worth a traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _main(argv: list[str]) -> int:
    output = _output_of(argv)
    session: Session | None = None
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        output = args.output
        endpoint, source = _endpoint(args)
        if getattr(args, "local", None) is not None:
            args.endpoint = endpoint
            out: Outcome = args.local(args)
        else:
            path = check_endpoint(endpoint, source)
            session = Session(endpoint, args.timeout)
            with CsiClient.connect(f"unix://{path}", timeout=min(args.timeout, 10)) as client:
                out = args.fn(session.open(client), args)
        emit(out.value, output)
        return out.code
    except UsageError as exc:
        return fail(str(exc), EXIT_USAGE, "USAGE", output)
    except Failure as exc:
        return fail(exc.message, exc.code, exc.kind, output)
    except grpc.FutureTimeoutError:
        assert session is not None
        return fail(f"no driver answers at {session.endpoint} within {min(session.timeout, 10):.0f} s",
                    EXIT_FAILED, "UNAVAILABLE", output)
    except grpc.RpcError as exc:
        code = exc.code()
        rpc = session.rpc if session is not None else "the call"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and session is not None:
            return fail(f"{rpc} had no answer within {session.timeout:g} s (--timeout); the driver may still "
                        f"finish it: check with `{_check(args)}`", EXIT_FAILED, code.name, output)
        exit_code = EXIT_NOT_FOUND if code == grpc.StatusCode.NOT_FOUND else EXIT_FAILED
        return fail(f"{rpc}: {code.name}: {exc.details()}", exit_code, code.name, output)
    except KeyboardInterrupt:
        what = f"{session.rpc} was sent; the driver may still finish it" if session is not None and session.rpc \
            else "some of it may be done"
        return fail(f"interrupted: {what}: check with `{_check(args)}`", EXIT_INTERRUPTED, "INTERRUPTED", output)
    except PermissionError as exc:
        return fail(f"{exc} (node commands need root)", EXIT_FAILED, "FAILED", output)
    except (ValueError, DriverError) as exc:
        return fail(str(exc), EXIT_USAGE, "USAGE", output)


def _endpoint(args: argparse.Namespace) -> tuple[str, str]:
    """The endpoint and what set it: the flag, else THINLOOP_ENDPOINT, else the default."""
    if args.endpoint is not None:
        return args.endpoint, "--endpoint"
    if "THINLOOP_ENDPOINT" in os.environ:
        return os.environ["THINLOOP_ENDPOINT"], "THINLOOP_ENDPOINT"
    return DEFAULT_ENDPOINT, "--endpoint"


def _check(args: argparse.Namespace | None) -> str:
    return getattr(args, "check", "") or "thinloopctl list"


if __name__ == "__main__":
    sys.exit(main())
