"""CSI Controller service. With distributed provisioning it runs on each node (mode all)
and handles the volumes of that node; in mode controller it answers only what needs no
file access (expansion requests, capability checks). In shared mode (--datastore) it runs
once for the datastore and also publishes volumes to nodes (attachment records with a
fencing token: csi_driver.volumes.datastore.records)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2, wrappers_pb2

from ..errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unimplemented,
)
from ..proto import csi_pb2, csi_pb2_grpc
from ..settings import Settings
from ..volumes.datastore import imagelock
from ..volumes.datastore.records import Datastore
from ..volumes.inflight import InFlight
from ..volumes.lifecycle import HostView, Volumes, fs_type_of
from ..volumes.params import DISKFORMATS, RECLAIM_MODES, VolumeParams
from ..volumes.snapshots import Snapshots
from ..volumes.store import Entry, check_id, grow_image
from .validation import (
    MULTI_NODE_MODES,
    SHARED_MODES,
    SUPPORTED_MODES,
    check_capabilities,
    check_capability,
    fits_range,
    is_read_only,
    require,
    resolve_params,
    size_from_range,
)

log = logging.getLogger(__name__)

Cap = csi_pb2.ControllerServiceCapability.RPC.Type
T = TypeVar("T")

# GET_SNAPSHOT is served but not advertised: csi-sanity v5.4.0 (the current release)
# fails any capability it does not know, and it does not know that one yet.
NODE_CAPS = (
    Cap.CREATE_DELETE_VOLUME, Cap.CREATE_DELETE_SNAPSHOT, Cap.LIST_SNAPSHOTS,
    Cap.CLONE_VOLUME, Cap.EXPAND_VOLUME, Cap.LIST_VOLUMES, Cap.GET_CAPACITY, Cap.GET_VOLUME,
    Cap.VOLUME_CONDITION, Cap.LIST_VOLUMES_PUBLISHED_NODES, Cap.SINGLE_NODE_MULTI_WRITER,
    Cap.MODIFY_VOLUME,
)
CONTROLLER_ONLY_CAPS = (Cap.EXPAND_VOLUME, Cap.SINGLE_NODE_MULTI_WRITER)
SHARED_CAPS = (*NODE_CAPS, Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.PUBLISH_READONLY)


def encode_token(next_id: str) -> str:
    return next_id.encode().hex()


def decode_token(token: str) -> str:
    try:
        value = bytes.fromhex(token).decode()
        return check_id(value, "starting_token")
    except (ValueError, InvalidArgument):
        raise Aborted(f"starting_token {token[:60]!r} is not one this driver issued") from None


def paginate(ids: Sequence[str], max_entries: int, token: str) -> tuple[list[str], str]:
    """A page of sorted ids starting at the token's id, and the token of the next page.
    Tokens name an id rather than an offset, so deletions between pages skip nothing."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    start = 0
    if token:
        first = decode_token(token)
        start = next((i for i, v in enumerate(ids) if v >= first), len(ids))
    end = len(ids) if max_entries == 0 else min(len(ids), start + max_entries)
    next_token = encode_token(ids[end]) if end < len(ids) else ""
    return list(ids[start:end]), next_token


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, settings: Settings, volumes: Volumes | None, snapshots: Snapshots | None,
                 inflight: InFlight) -> None:
        self.settings = settings
        self._volumes = volumes
        self._snapshots = snapshots
        self.inflight = inflight
        self.datastore: Datastore | None = volumes.datastore if volumes is not None else None
        self.modes = SHARED_MODES if settings.shared else SUPPORTED_MODES

    # Both are None in controller-only mode; RPCs that need files say so.
    @property
    def volumes(self) -> Volumes:
        if self._volumes is None:
            raise Unimplemented("this RPC needs the node's files; it is served by the node plugin")
        return self._volumes

    @property
    def snapshots(self) -> Snapshots:
        if self._snapshots is None:
            raise Unimplemented("snapshots are served by the node plugin")
        return self._snapshots

    def topology(self) -> csi_pb2.Topology:
        return csi_pb2.Topology(segments=self.settings.topology)

    @property
    def shared(self) -> Datastore:
        if self.datastore is None:
            raise Unimplemented("node-local volumes are not attached: ControllerPublishVolume is "
                                "served in shared mode (--datastore) only")
        return self.datastore

    def _volume_msg(self, entry: Entry) -> csi_pb2.Volume:
        meta = entry.meta
        ctx = {"diskformat": meta.diskformat, "reclaim": meta.reclaim}
        fs = fs_type_of(entry, self.volumes.os)
        if fs:
            ctx["fsType"] = fs
        vol = csi_pb2.Volume(volume_id=entry.id, capacity_bytes=entry.size_bytes(),
                             volume_context=ctx, accessible_topology=[self.topology()])
        if meta.source_kind == "snapshot":
            vol.content_source.snapshot.snapshot_id = meta.source_id
        elif meta.source_kind == "volume":
            vol.content_source.volume.volume_id = meta.source_id
        return vol

    # -- volumes --------------------------------------------------------------------------

    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
                     ) -> csi_pb2.CreateVolumeResponse:
        require(request.name, "name")
        volume_id = check_id(request.name, "name")
        # A VolumeAttributesClass named by the claim: its values win over the class's.
        mutable = self._check_mutable(request.mutable_parameters) if request.mutable_parameters else {}
        params = resolve_params({**request.parameters, **mutable}, request.volume_capabilities, self.modes)
        size = size_from_range(request.capacity_range if request.HasField("capacity_range") else None,
                               params.fs_type)
        self._check_topology(request)
        source_kind, source_id = "", ""
        if request.HasField("volume_content_source"):
            source_kind = request.volume_content_source.WhichOneof("type") or ""
            if source_kind == "snapshot":
                source_id = check_id(request.volume_content_source.snapshot.snapshot_id, "snapshot_id")
            elif source_kind == "volume":
                source_id = check_id(request.volume_content_source.volume.volume_id, "source volume_id")
            else:
                raise InvalidArgument("volume_content_source has no snapshot or volume")
        source_key = {"snapshot": f"snapshot:{source_id}", "volume": f"vol:{source_id}"}.get(source_kind, "")
        with self.inflight.hold(f"vol:{volume_id}", source_key):
            existing = self.volumes.store.volumes.get(volume_id)
            if existing is not None:
                self._check_compatible(existing, request, params, (source_kind, source_id))
                return csi_pb2.CreateVolumeResponse(volume=self._volume_msg(existing))
            source = None
            try:
                if source_kind == "snapshot":
                    source = ("snapshot", self.snapshots.get(source_id))
                elif source_kind == "volume":
                    source = ("volume", self.volumes.get(source_id))
            except NotFound as exc:
                if self.datastore is not None:
                    raise
                raise NotFound(f"{exc.message}. A restore or clone is made on the node that holds its "
                               "source; a source on another node cannot be used") from None
            if source is not None:
                params = self._params_for_copy(source[1], fs_type_of(source[1], self.volumes.os), size, params)
            entry = self.volumes.create(volume_id, size, params, source=source,
                                        parameters=dict(request.parameters))
            return csi_pb2.CreateVolumeResponse(volume=self._volume_msg(entry))

    def _check_topology(self, request: csi_pb2.CreateVolumeRequest) -> None:
        req = request.accessibility_requirements
        terms = list(req.requisite) or list(req.preferred)
        if not terms:
            return
        ((key, value),) = self.settings.topology.items()
        for topo in terms:
            if topo.segments.get(key) == value:
                return
        what = f"datastore {value}" if self.settings.shared else f"node {value}"
        raise ResourceExhausted(
            f"this driver instance serves {what}, which is not among the requested topologies")

    @staticmethod
    def _params_for_copy(source: Entry, src_fs: str, size: int, params: VolumeParams) -> VolumeParams:
        """A restore or clone holds its source's bytes: its filesystem is the source's
        (a defaulted fsType follows the source; a copy taken for raw block access still
        records the filesystem its bytes hold), and a raw block source is never made a
        filesystem volume, which would format the restored data at the first stage."""
        src_size = source.size_bytes()
        if size < src_size:
            raise OutOfRange(f"requested {size} bytes is smaller than the source's {src_size} bytes")
        if params.access_type == "block":
            return replace(params, fs_type=src_fs, fs_explicit=False)
        if source.meta.parameters.get("access_type") == "block":
            raise InvalidArgument(f"{source.id} is a raw block volume: restore or clone it as a block volume")
        if src_fs and src_fs != params.fs_type:
            if params.fs_explicit:
                raise InvalidArgument(f"the source holds {src_fs}; a copy cannot be {params.fs_type}")
            return replace(params, fs_type=src_fs)
        return params

    def _check_compatible(self, existing: Entry, request: csi_pb2.CreateVolumeRequest,
                          params: VolumeParams, source: tuple[str, str]) -> None:
        meta = existing.meta
        problems = []
        size = existing.size_bytes()
        if not fits_range(size, request.capacity_range if request.HasField("capacity_range") else None):
            problems.append(f"its size is {size} bytes")
        # A copy made with a defaulted fsType took its source's: compare with that.
        fs = params.fs_type if params.fs_explicit or not source[0] else meta.fs_type
        if fs != meta.fs_type:
            problems.append(f"it holds {meta.fs_type or 'no filesystem'}")
        if params.diskformat != meta.diskformat:
            problems.append(f"its diskformat is {meta.diskformat}")
        if source != (meta.source_kind, meta.source_id):
            problems.append("it was made from a different source")
        if problems:
            raise AlreadyExists(f"volume {existing.id} already exists and differs: {'; '.join(problems)}")

    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
                     ) -> csi_pb2.DeleteVolumeResponse:
        require(request.volume_id, "volume_id")
        try:
            volume_id = check_id(request.volume_id, "volume_id")
        except InvalidArgument:
            return csi_pb2.DeleteVolumeResponse()  # no such id can exist: already gone
        with self.inflight.hold(f"vol:{volume_id}"):
            entry = self.volumes.store.volumes.get(volume_id)
            if entry is not None:
                self.volumes.remove(entry)
            return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext
                                   ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        entry = self.volumes.get(volume_id) if self._volumes is not None else None
        try:
            kinds = check_capabilities(request.volume_capabilities, self.modes)
        except InvalidArgument as exc:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=exc.message)
        if entry is not None:
            fs = fs_type_of(entry, self.volumes.os)
            for cap in request.volume_capabilities:
                want = cap.mount.fs_type if cap.WhichOneof("access_type") == "mount" else ""
                if want and fs and want != fs:
                    return csi_pb2.ValidateVolumeCapabilitiesResponse(
                        message=f"volume holds {fs}, not {want}")
            if "mount" in kinds and entry.meta.parameters.get("access_type") == "block":
                return csi_pb2.ValidateVolumeCapabilitiesResponse(
                    message="volume was created for raw block access only")
        if request.parameters:
            try:
                resolve_params(request.parameters, request.volume_capabilities, self.modes)
            except InvalidArgument as exc:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=exc.message)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
            mutable_parameters=request.mutable_parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def _list_entry(self, entry: Entry, view: HostView | None = None) -> csi_pb2.ListVolumesResponse.Entry:
        usage = self.volumes.usage(entry, view)
        problems = self.volumes.health(entry, usage, view)
        if self.datastore is not None:
            published = self.datastore.attachments.published_nodes(entry.id)
        else:
            published = [self.settings.node_id] if usage.in_use else []
        status = csi_pb2.ListVolumesResponse.VolumeStatus(
            published_node_ids=published,
            volume_condition=csi_pb2.VolumeCondition(abnormal=bool(problems),
                                                     message="; ".join(problems) or "healthy"),
        )
        return csi_pb2.ListVolumesResponse.Entry(volume=self._volume_msg(entry), status=status)

    def ListVolumes(self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.ListVolumesResponse:
        # Read-only: no in-flight guard; a directory scan is a consistent-enough view because
        # objects appear and vanish by atomic renames.
        ids, token = paginate(self.volumes.store.volumes.ids(), request.max_entries,
                              request.starting_token)
        entries = []
        view = self.volumes.host_view()  # one read of the loop and mount tables per page
        for vid in ids:
            entry = self.volumes.store.volumes.get(vid)
            if entry is not None:
                entries.append(self._list_entry(entry, view))
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=token)

    def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext) -> csi_pb2.ControllerGetVolumeResponse:
        require(request.volume_id, "volume_id")
        entry = self.volumes.get(check_id(request.volume_id, "volume_id"))
        item = self._list_entry(entry)
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=item.status.published_node_ids,
            volume_condition=item.status.volume_condition)
        return csi_pb2.ControllerGetVolumeResponse(volume=item.volume, status=status)

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.GetCapacityResponse:
        if request.HasField("accessible_topology"):
            ((key, value),) = self.settings.topology.items()
            if request.accessible_topology.segments.get(key) != value:
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        if request.volume_capabilities:
            check_capabilities(request.volume_capabilities, self.modes)
        available = self.volumes.available_bytes()
        return csi_pb2.GetCapacityResponse(
            available_capacity=available,
            maximum_volume_size=wrappers_pb2.Int64Value(value=available),
            minimum_volume_size=wrappers_pb2.Int64Value(value=1 << 20),
        )

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        caps = SHARED_CAPS if self.settings.shared else NODE_CAPS if self.settings.touches_files \
            else CONTROLLER_ONLY_CAPS
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=c))
            for c in caps])

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext
                               ) -> csi_pb2.ControllerExpandVolumeResponse:
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        if request.HasField("volume_capability"):
            check_capabilities([request.volume_capability], self.modes)
        if self._volumes is None:
            # Controller-only: the node grows image and filesystem; nothing to touch here.
            size = size_from_range(request.capacity_range, "")
            return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=size,
                                                          node_expansion_required=True)
        with self.inflight.hold(f"vol:{volume_id}"), self._attachment_held(volume_id):
            entry = self.volumes.get(volume_id)
            current = entry.size_bytes()
            size = size_from_range(request.capacity_range, entry.meta.fs_type, current=current)
            if size < current:
                raise OutOfRange(f"volume {volume_id} is {current} bytes; shrinking to {size} is not supported")
            if size > current:
                self.volumes.check_room(size - current, f"growing volume {volume_id}")
            where = self._attached_where(entry)
            if where and self.datastore is None:
                # Attached or mounted here: NodeExpandVolume grows image, loop device and
                # filesystem together, online.
                return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=size, node_expansion_required=True)
            if where:
                # Shared mode, published to a node: the image lives on the datastore, so it
                # grows here; the node refreshes its loop device and grows the filesystem
                # (NodeExpandVolume), or the next stage does. Under the attachment record's
                # lock, so no publish and stage come between the check and the growth.
                if size > current:
                    if entry.meta.fs_type:
                        entry = self.volumes.store.volumes.save_meta(entry, replace(entry.meta, needs_fs_grow=True))
                    grow_image(entry.image, size, entry.meta.diskformat)
                    log.info("grew the image of %s (%s) to %d bytes; the node grows its filesystem",
                             volume_id, where, size)
                return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=size, node_expansion_required=True)
            if size > current:
                # In use nowhere: grow the image now. Its filesystem grows at the next stage
                # (ext unmounted, before the mount; xfs just after), so no node call is needed.
                # Marked first: a crash before the growth leaves a harmless no-op grow.
                if entry.meta.fs_type:
                    entry = self.volumes.store.volumes.save_meta(entry, replace(entry.meta, needs_fs_grow=True))
                grow_image(entry.image, size, entry.meta.diskformat)
                log.info("expanded unstaged volume %s to %d bytes; its filesystem grows at the next stage",
                         volume_id, size)
            return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=size, node_expansion_required=False)

    def _attachment_held(self, volume_id: str) -> AbstractContextManager[None]:
        """Shared mode: the volume's attachment record lock (what ControllerPublishVolume
        holds), across every controller of the datastore; node-local mode: nothing."""
        if self.datastore is None:
            return nullcontext()
        return self.datastore.attachments.hold(volume_id)

    def _attached_where(self, entry: Entry) -> str:
        """Where the volume is in use: attached or mounted on this node (node-local mode);
        published to a node, or its image locked by a client (shared mode). Empty: nowhere."""
        if self.datastore is None:
            usage = self.volumes.usage(entry)
            return usage.describe() if usage.in_use else ""
        published = self.datastore.attachments.published_nodes(entry.id)
        if published:
            return f"published to {', '.join(published)}"
        if imagelock.path_lock_state(entry.image) != imagelock.FREE:
            return "its image is locked by a client of the datastore"
        return ""

    # -- attach (shared mode) ------------------------------------------------------------

    def ControllerPublishVolume(self, request: csi_pb2.ControllerPublishVolumeRequest,
                                context: grpc.ServicerContext) -> csi_pb2.ControllerPublishVolumeResponse:
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        require(request.node_id, "node_id")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        check_capability(request.volume_capability, self.modes)
        datastore = self.shared
        entry = self.volumes.get(volume_id)
        readonly = request.readonly or is_read_only(request.volume_capability)
        multi_node = request.volume_capability.access_mode.mode in MULTI_NODE_MODES
        with self.inflight.hold(f"vol:{volume_id}"):
            rec = datastore.attachments.publish(volume_id, request.node_id, readonly=readonly,
                                                multi_node=multi_node, exists=entry.image.is_file)
        return csi_pb2.ControllerPublishVolumeResponse(publish_context=rec.token(request.node_id))

    def ControllerUnpublishVolume(self, request: csi_pb2.ControllerUnpublishVolumeRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        require(request.volume_id, "volume_id")
        datastore = self.shared
        try:
            volume_id = check_id(request.volume_id, "volume_id")
        except InvalidArgument:
            return csi_pb2.ControllerUnpublishVolumeResponse()  # no such id can exist: not published
        with self.inflight.hold(f"vol:{volume_id}"):
            nodes = [request.node_id] if request.node_id else datastore.attachments.published_nodes(volume_id)
            for node in nodes:
                datastore.attachments.unpublish(volume_id, node)
                held = datastore.holders.describe(volume_id)
                if held:
                    # The permission is gone; the image lock still fences the image until
                    # that node detaches it or its datastore client is gone.
                    log.warning("volume %s unpublished from node %s while the records say it is still "
                                "attached on %s: no other node can stage it while that lock is held",
                                volume_id, node, held)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def ControllerModifyVolume(self, request: csi_pb2.ControllerModifyVolumeRequest,
                               context: grpc.ServicerContext
                               ) -> csi_pb2.ControllerModifyVolumeResponse:
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        changes = self._check_mutable(request.mutable_parameters)
        with self.inflight.hold(f"vol:{volume_id}"):
            entry = self.volumes.get(volume_id)
            self.volumes.modify(entry, changes)
        return csi_pb2.ControllerModifyVolumeResponse()

    @staticmethod
    def _check_mutable(params: Mapping[str, str]) -> dict[str, str]:
        values = dict(params)
        allowed = {"diskformat": DISKFORMATS, "reclaim": RECLAIM_MODES}
        bad = sorted(k for k in values if k not in allowed)
        if bad:
            raise InvalidArgument(
                f"parameter(s) {', '.join(repr(k) for k in bad)} cannot be changed on a live volume; "
                "mutable: diskformat, reclaim")
        for key, value in values.items():
            if value not in allowed[key]:
                raise InvalidArgument(f"{key} {value!r} is not one of {', '.join(allowed[key])}")
        return values

    # -- snapshots -----------------------------------------------------------------------

    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
                       ) -> csi_pb2.CreateSnapshotResponse:
        require(request.name, "name")
        snap_id = check_id(request.name, "name")
        require(request.source_volume_id, "source_volume_id")
        source_id = check_id(request.source_volume_id, "source_volume_id")
        if request.parameters:
            raise InvalidArgument(
                f"unknown snapshot parameter(s) {', '.join(sorted(request.parameters))}; none are accepted")
        with self.inflight.hold(f"snapshot:{snap_id}", f"vol:{source_id}"):
            entry = self.snapshots.create(snap_id, source_id)
        return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_msg(entry))

    def _snapshot_msg(self, entry: Entry) -> csi_pb2.Snapshot:
        return snapshot_msg(entry, self.snapshots.group_of(entry) or "")

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
                       ) -> csi_pb2.DeleteSnapshotResponse:
        require(request.snapshot_id, "snapshot_id")
        try:
            snap_id = check_id(request.snapshot_id, "snapshot_id")
        except InvalidArgument:
            return csi_pb2.DeleteSnapshotResponse()
        with self.inflight.hold(f"snapshot:{snap_id}"):
            self.snapshots.delete(snap_id)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
                      ) -> csi_pb2.ListSnapshotsResponse:
        # Members of a volume group snapshot still being created or deleted are not listed
        # (the CSI spec: nothing that is not cut yet); the group view is read after the
        # entries (Snapshots.group_of says why).
        coll = self.snapshots.store.snapshots
        if request.snapshot_id:
            entry = _maybe(lambda: coll.get(request.snapshot_id))
            entries = [entry] if entry is not None else []
            if request.source_volume_id:
                entries = [e for e in entries if e.meta.source_id == request.source_volume_id]
            return csi_pb2.ListSnapshotsResponse(entries=self._listed(entries))
        ids = coll.ids()
        loaded: dict[str, Entry] = {}
        if request.source_volume_id:
            loaded = {e.id: e for e in coll.entries() if e.meta.source_id == request.source_volume_id}
            ids = sorted(loaded)
        page, token = paginate(ids, request.max_entries, request.starting_token)
        found = [e for e in (loaded.get(sid) or coll.get(sid) for sid in page) if e is not None]
        return csi_pb2.ListSnapshotsResponse(entries=self._listed(found), next_token=token)

    def _listed(self, entries: list[Entry]) -> list[csi_pb2.ListSnapshotsResponse.Entry]:
        grouped = any(e.meta.group_snapshot_id for e in entries)
        membership = self.snapshots.groups.membership() if grouped else None
        out = []
        for entry in entries:
            group = self.snapshots.group_of(entry, membership)
            if group is not None:
                out.append(csi_pb2.ListSnapshotsResponse.Entry(snapshot=snapshot_msg(entry, group)))
        return out

    def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.GetSnapshotResponse:
        require(request.snapshot_id, "snapshot_id")
        entry = self.snapshots.get(check_id(request.snapshot_id, "snapshot_id"))
        return csi_pb2.GetSnapshotResponse(snapshot=self._snapshot_msg(entry))


def snapshot_msg(entry: Entry, group_snapshot_id: str = "") -> csi_pb2.Snapshot:
    """A snapshot as CSI describes it; `group_snapshot_id` for a member of a volume group
    snapshot (CSI spec, Snapshot: a member that cannot be deleted alone names its group)."""
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(entry.meta.created * 1e9))
    return csi_pb2.Snapshot(snapshot_id=entry.id, source_volume_id=entry.meta.source_id,
                            size_bytes=entry.size_bytes(), creation_time=created,
                            ready_to_use=True, group_snapshot_id=group_snapshot_id)


def _maybe(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except (InvalidArgument, NotFound):
        return None

