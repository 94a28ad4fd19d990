"""CSI Node service: loop devices, filesystems and mounts for kubelet."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import grpc

from .. import failpoints
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from ..host import caps
from ..host.oslayer import LoopDevice, MountEntry
from ..host.runner import CommandError
from ..proto import csi_pb2, csi_pb2_grpc
from ..settings import Settings
from ..volumes.datastore.fencing import fence_of
from ..volumes.datastore.records import health as datastore_health
from ..volumes.inflight import InFlight
from ..volumes.lifecycle import (
    STAGED_DEVICE,
    Identity,
    Usage,
    Volumes,
    device_mounts,
    mount_at,
    publish_mounts,
)
from ..volumes.params import parse_quantity
from ..volumes.store import Entry, check_id, grow_image
from .validation import (
    EPHEMERAL_KEY,
    SHARED_MODES,
    SUPPORTED_MODES,
    AccessMode,
    check_capability,
    check_mount_flags,
    confine,
    is_read_only,
    require,
    resolve_params,
    size_from_range,
)

log = logging.getLogger(__name__)

NodeCap = csi_pb2.NodeServiceCapability.RPC.Type
NODE_CAPS = (NodeCap.STAGE_UNSTAGE_VOLUME, NodeCap.GET_VOLUME_STATS, NodeCap.EXPAND_VOLUME,
             NodeCap.VOLUME_CONDITION, NodeCap.SINGLE_NODE_MULTI_WRITER)
DEFAULT_EPHEMERAL_SIZE = "1Gi"
EPHEMERAL_ATTRS = {"size", "fsType", "diskformat", "reclaim"}


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, settings: Settings, volumes: Volumes, inflight: InFlight,
                 fenced: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.volumes = volumes
        self.os = volumes.os
        self.inflight = inflight
        self.datastore = volumes.datastore
        """Shared mode: stage checks the attachment record and locks the image."""
        self.modes = SHARED_MODES if self.datastore is not None else SUPPORTED_MODES
        self.fenced = dict(fenced or {})
        """Shared mode: volumes that start-up recovery found held by another node as well
        as attached here (a split brain in the making), with the reason; not served."""

    def _check_served(self, volume_id: str) -> None:
        reason = fence_of(self.fenced, volume_id, self.volumes.store, self.os)
        if reason:
            raise FailedPrecondition(f"volume {volume_id} is not served on this node: {reason}")

    def _check_attachment(self, volume_id: str, publish_context: Mapping[str, str], readonly: bool
                          ) -> tuple[bool, int]:
        """Shared mode: the volume is served here and its attachment record names this
        node with the token in publish_context (datastore.Attachments.check_stage), else
        FAILED_PRECONDITION. Returns (read-only, the attachment's generation): a read-only
        attachment makes the stage read-only. Node-local mode: (readonly, 0)."""
        if self.datastore is None:
            return readonly, 0
        self._check_served(volume_id)
        mine = self.datastore.attachments.check_stage(volume_id, self.settings.node_id, dict(publish_context))
        return readonly or mine.readonly, mine.generation

    def _confine(self, path: str, what: str) -> str:
        return confine(path, self.settings.kubelet_dir, what)

    def _own_layers(self, ident: Identity, paths: list[str], mounts: list[MountEntry]
                    ) -> list[tuple[MountEntry, LoopDevice]]:
        """Every mount stacked at these paths, top-most first, each with its loop device,
        when all of them are this volume's. Anything else there (another volume, another
        driver's mount, above or below) is refused before anything is touched: a call
        naming one volume never takes something away from a pod, and a refused call
        leaves the node as it found it."""
        layers = []
        for path in paths:
            for m in reversed([m for m in mounts if m.mount_point == path]):
                loop = self.os.loop_of_mount(m)
                if not ident.owns(loop):
                    what = f"{loop.device} ({loop.backing_file})" if loop is not None else m.source
                    raise FailedPrecondition(f"{path} holds {what}, not volume {ident.volume_id}; "
                                             "refusing to unmount it")
                assert loop is not None
                layers.append((m, loop))
        return layers

    def _unmount_own(self, ident: Identity, paths: list[str]) -> LoopDevice | None:
        """Unmount what this volume has at these paths, every stacked layer of it, after
        checking all of them (_own_layers). Returns the volume's current loop device when
        one of its mounts was taken away here."""
        found: LoopDevice | None = None
        for m, loop in self._own_layers(ident, paths, self.os.mounts()):
            self.os.unmount(m.mount_point)
            if ident.is_current(loop):
                found = loop
        left = [m.mount_point for m in self.os.mounts() if m.mount_point in paths]
        if left:
            raise FailedPrecondition(f"{', '.join(left)} is still mounted after unmounting it")
        return found

    def _volume_at(self, volume_id: str, entry: Entry, path: str) -> tuple[LoopDevice, MountEntry]:
        """The volume's loop device and the mount through which `path` holds it: a mount of
        its filesystem, a bind of its device node, or (a block volume's staging directory)
        the staging bind inside it. NOT_FOUND when the path holds nothing, or something
        else: the spec's answer for a volume not found at the path."""
        mounts = self.os.mounts()
        mount = mount_at(mounts, path) or mount_at(mounts, os.path.join(path, STAGED_DEVICE))
        if mount is None:
            raise NotFound(f"volume {volume_id} is not mounted at {path}")
        loop = self.os.loop_of_mount(mount)
        if loop is None or not self.volumes.identity(volume_id, entry).is_current(loop):
            what = f"{loop.device} ({loop.backing_file})" if loop is not None else mount.source
            raise NotFound(f"volume {volume_id} is not at {path}: it holds {what}")
        return loop, mount

    @staticmethod
    def _remove_target(raw: str, target: str) -> None:
        """Remove the directory or file NodePublish made at the target, nothing else: a
        symlink is removed itself, a directory only when empty, a file only when empty
        (block targets are empty files)."""
        if os.path.islink(raw):
            os.unlink(raw)
        elif os.path.isdir(target):
            try:
                os.rmdir(target)
            except OSError as exc:
                log.warning("left %s in place: %s (not something this driver made)", target, exc.strerror)
        elif os.path.isfile(target):
            if os.path.getsize(target) == 0:
                os.unlink(target)
            else:
                log.warning("left %s in place: a non-empty file is not a target this driver made", target)

    def _volume_path(self, raw: str, what: str) -> str:
        """A stats or expand path: absolute, inside the kubelet dir, existing."""
        if not os.path.isabs(raw):
            raise NotFound(f"{what} {raw[:200]!r} does not exist (not an absolute path)")
        path = self._confine(raw, what)
        if not os.path.exists(path):
            raise NotFound(f"{what} {raw[:200]!r} does not exist")
        return path

    def _mount_options(self, flags: list[str], fs: str, reclaim: str, readonly: bool) -> list[str]:
        options = list(flags)
        if readonly:
            options.append("ro")
        elif reclaim == "discard" and self.volumes.can_discard:
            options.append("discard")
        if fs == "xfs":
            options.append("nouuid")  # clones and restores share their source's UUID
        return options

    # -- stage ----------------------------------------------------------------------------

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
                        ) -> csi_pb2.NodeStageVolumeResponse:
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        access = check_capability(request.volume_capability, self.modes)
        staging = self._confine(request.staging_target_path, "staging_target_path")
        readonly = is_read_only(request.volume_capability)
        with self.inflight.hold(f"vol:{volume_id}"):
            entry = self.volumes.get(volume_id)
            readonly, generation = self._check_attachment(volume_id, request.publish_context, readonly)
            # Look at the staging path before attaching: a refused stage changes nothing.
            if self._staged_already(entry, staging, access, request.volume_capability, readonly):
                return csi_pb2.NodeStageVolumeResponse()
            loop, fresh = self.volumes.attach(entry, readonly=readonly, generation=generation)
            failpoints.hit("stage.after_attach")
            try:
                if access == "mount":
                    self._stage_mount(entry, loop, staging, request.volume_capability, readonly)
                else:
                    self._stage_block(loop, staging)
            except BaseException:
                if fresh and not device_mounts(self.os.mounts(), loop):
                    self.volumes.detach(volume_id, loop)
                raise
        return csi_pb2.NodeStageVolumeResponse()

    def _staged_already(self, entry: Entry, staging: str, access: str, cap: csi_pb2.VolumeCapability,
                        readonly: bool) -> bool:
        """True when this volume is staged at the path, compatibly; AlreadyExists when the
        path holds something else or this volume otherwise than asked; False when the path
        is free."""
        if os.path.lexists(staging) and not os.path.isdir(staging):
            raise AlreadyExists(f"{staging} exists and is not a directory")
        mounts = self.os.mounts()
        ident = self.volumes.identity(entry.id, entry)
        current = mount_at(mounts, staging)
        marker = mount_at(mounts, os.path.join(staging, STAGED_DEVICE))
        if access == "block":
            if current is not None:
                raise AlreadyExists(f"{staging} has a filesystem mounted ({current.source}); a block "
                                    "volume is staged in a directory of its own")
            if marker is None:
                return False
            if not ident.is_current(self.os.loop_of_mount(marker)):
                raise AlreadyExists(f"{staging} already stages another block volume")
            return True
        if marker is not None:
            raise AlreadyExists(f"{staging} stages a block volume; it cannot also hold a filesystem")
        if current is None:
            return False
        if current.root != "/" or not ident.is_current(self.os.loop_of_mount(current)):
            raise AlreadyExists(f"{staging} already has another filesystem mounted ({current.source})")
        wanted = cap.mount.fs_type
        mounted_ro = readonly or "ro" in cap.mount.mount_flags  # read-only by mode or by flag
        if (wanted and wanted != current.fstype) or current.readonly != mounted_ro:
            raise AlreadyExists(
                f"volume {entry.id} is staged at {staging} as {current.fstype} "
                f"{'read-only' if current.readonly else 'read-write'}, not as requested")
        return True  # already staged here, compatibly

    def _stage_block(self, loop: LoopDevice, staging: str) -> None:
        """Bind the device onto STAGED_DEVICE in the staging directory: the mount table
        then records this staging path (volumes.STAGED_DEVICE)."""
        os.makedirs(staging, exist_ok=True)
        marker = os.path.join(staging, STAGED_DEVICE)
        created = not os.path.lexists(marker)
        fd = os.open(marker, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        try:
            self.os.bind_mount(loop.device, marker, readonly=False)
        except BaseException:
            if created:
                os.unlink(marker)
            raise

    def _stage_mount(self, entry: Entry, loop: LoopDevice, staging: str,
                     cap: csi_pb2.VolumeCapability, readonly: bool) -> None:
        fs = self.volumes.ensure_filesystem(entry, loop, cap.mount.fs_type)
        options = self._mount_options(check_mount_flags(cap.mount.mount_flags), fs, entry.meta.reclaim, readonly)
        grow = entry.meta.needs_fs_grow and not readonly
        if grow and fs != "xfs":
            self.os.grow_fs(fs, loop.device, "")  # ext grows offline, before the mount
        os.makedirs(staging, exist_ok=True)
        self.os.mount(loop.device, staging, fs, options)
        try:
            failpoints.hit("stage.after_mount")
            if grow:
                if fs == "xfs":
                    self.os.grow_fs(fs, loop.device, staging)  # xfs grows only while mounted
                self.volumes.store.volumes.save_meta(entry, replace(entry.meta, needs_fs_grow=False))
                log.info("grew %s on %s to the image size", fs, entry.id)
        except BaseException:
            # This call made the mount: a failed stage takes it away again, so that the
            # caller can detach the device (and, shared mode, let go of the image's lock).
            # The error is final to kubelet, which then never unstages.
            try:
                self.os.unmount(staging)
            except Exception as exc:  # the original error is the one to report
                log.error("stage of %s failed after its mount at %s, which could not be taken away: %s",
                          entry.id, staging, exc)
            raise

    def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodeUnstageVolumeResponse:
        """Take away what this staging path holds of the volume; detach the loop device
        only when no other staging path or publish of the volume still uses it (CSI lets
        a volume be staged at several paths on a node)."""
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        staging = self._confine(request.staging_target_path, "staging_target_path")
        with self.inflight.hold(f"vol:{volume_id}"):
            entry = self.volumes.store.volumes.get(volume_id)
            ident = self.volumes.identity(volume_id, entry)
            marker = os.path.join(staging, STAGED_DEVICE)
            loop = self._unmount_own(ident, [marker, staging])
            self._remove_target(marker, marker)
            failpoints.hit("unstage.after_unmount")
            if entry is None:
                return csi_pb2.NodeUnstageVolumeResponse()
            loop = loop or self.os.find_loop(entry.image)  # a retry finds nothing mounted
            still = self.volumes.detach_if_unused(loop, volume_id) if loop is not None else []
            if loop is None and self.datastore is not None:
                self.datastore.holders.remove(volume_id, self.settings.node_id)
            # Left attached for other users: the last of them to unpublish detaches it.
            self.volumes.mark_detach_when_unused(entry, bool(still))
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish --------------------------------------------------------------------------

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodePublishVolumeResponse:
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        access = check_capability(request.volume_capability, self.modes)
        ephemeral = request.volume_context.get(EPHEMERAL_KEY) == "true"
        if ephemeral and self.datastore is not None:
            raise InvalidArgument("inline ephemeral volumes are not served in shared mode (they are "
                                  "never attached through ControllerPublishVolume); use a generic "
                                  "ephemeral volume, or the node-local driver")
        if not ephemeral:
            require(request.staging_target_path, "staging_target_path")
        target = self._confine(request.target_path, "target_path")
        staging = "" if ephemeral else self._confine(request.staging_target_path, "staging_target_path")
        readonly = request.readonly or is_read_only(request.volume_capability)
        with self.inflight.hold(f"vol:{volume_id}"):
            if ephemeral:
                self._publish_ephemeral(volume_id, request, target, readonly)
                return csi_pb2.NodePublishVolumeResponse()
            entry = self.volumes.get(volume_id)
            # Shared mode: the attachment must still be this node's, with the token kubelet
            # passes to every node call (the volume may have been published elsewhere since
            # it was staged here). Node-local mode: nothing to check.
            self._check_attachment(volume_id, request.publish_context, readonly)
            loop = self.os.find_loop(entry.image)
            if loop is None:
                raise FailedPrecondition(f"volume {volume_id} is not staged: NodeStageVolume first")
            mounts = self.os.mounts()
            self._check_single_writer(request.volume_capability, loop, mounts, staging, target)
            if access == "block":
                self._publish_block(loop, target, readonly, mounts)
            else:
                self._publish_mount(loop, staging, target, readonly, mounts)
        return csi_pb2.NodePublishVolumeResponse()

    def _check_single_writer(self, cap: csi_pb2.VolumeCapability, loop: LoopDevice,
                             mounts: list[MountEntry], staging: str, target: str) -> None:
        if cap.access_mode.mode != AccessMode.SINGLE_NODE_SINGLE_WRITER:
            return
        others = [m.mount_point for m in publish_mounts(mounts, loop)
                  if m.mount_point not in (staging, target)]
        if others:
            raise FailedPrecondition(
                f"SINGLE_NODE_SINGLE_WRITER volume is already published at {', '.join(others)}")

    def _publish_block(self, loop: LoopDevice, target: str, readonly: bool,
                       mounts: list[MountEntry]) -> None:
        current = mount_at(mounts, target)
        if current is not None:
            if current.root != "/" + Path(loop.device).name:
                raise AlreadyExists(f"{target} already has something else mounted ({current.source})")
            if current.readonly != readonly:
                raise AlreadyExists(f"{target} is already published {'read-only' if current.readonly else 'writable'}")
            return
        if os.path.isdir(target):
            raise AlreadyExists(f"{target} is a directory; a block volume is published on a file")
        # Every refusal before anything is made or changed.
        flip: bool | None = None  # the device's read-only flag to set, if it changes
        if readonly and not loop.readonly:
            # A read-only bind of a device node still lets writers open it: the device
            # itself must be read-only, which would fail the writers already using it.
            if publish_mounts(mounts, loop):
                raise FailedPrecondition(
                    f"{loop.device} is published writable elsewhere; it cannot also be published "
                    "read-only (that makes the whole device read-only)")
            flip = True
        elif not readonly and loop.readonly:
            # Left read-only by an earlier read-only publish, or attached read-only.
            if publish_mounts(mounts, loop) or self.os.attached_read_only(loop.device):
                raise FailedPrecondition(
                    f"{loop.device} is read-only (staged for reading, or published read-only "
                    "elsewhere); it cannot also be published writable")
            flip = False
        os.makedirs(os.path.dirname(target), exist_ok=True)
        created = not os.path.exists(target)
        fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        try:
            if flip is not None:
                self.os.set_device_readonly(loop.device, flip)
            self.os.bind_mount(loop.device, target, readonly=readonly)
        except BaseException:
            if flip is not None:
                self.os.set_device_readonly(loop.device, not flip)
            if created:
                os.unlink(target)
            raise

    def _publish_mount(self, loop: LoopDevice, staging: str, target: str, readonly: bool,
                       mounts: list[MountEntry]) -> None:
        staged = mount_at(mounts, staging)
        if staged is None or staged.major_minor != loop.major_minor:
            raise FailedPrecondition(f"volume is not staged at {staging}")
        current = mount_at(mounts, target)
        if current is not None:
            # A bind of a read-only staging mount is read-only too.
            if current.major_minor == loop.major_minor and current.readonly == (readonly or staged.readonly):
                return
            raise AlreadyExists(f"{target} is already mounted with other options or another volume")
        if os.path.exists(target) and not os.path.isdir(target):
            raise AlreadyExists(f"{target} exists and is not a directory")
        created = not os.path.exists(target)
        os.makedirs(target, mode=0o750, exist_ok=True)
        try:
            self.os.bind_mount(staging, target, readonly=readonly)
        except BaseException:
            if created:
                os.rmdir(target)
            raise

    def _publish_ephemeral(self, volume_id: str, request: csi_pb2.NodePublishVolumeRequest,
                           target: str, readonly: bool) -> None:
        """Inline ephemeral volume: create, format and mount straight at the target."""
        if request.volume_capability.WhichOneof("access_type") != "mount":
            raise InvalidArgument("ephemeral volumes are filesystem volumes")
        ctx = request.volume_context
        unknown = sorted(k for k in ctx if k not in EPHEMERAL_ATTRS and not k.startswith("csi.storage.k8s.io/"))
        if unknown:
            raise InvalidArgument(f"unknown volume attribute(s) {', '.join(unknown)}; accepted: "
                                  f"{', '.join(sorted(EPHEMERAL_ATTRS))}")
        fs = ctx.get("fsType") or request.volume_capability.mount.fs_type or "ext4"
        params = resolve_params({k: ctx[k] for k in ("diskformat", "reclaim") if k in ctx} | {"fsType": fs},
                                [request.volume_capability])
        requested = parse_quantity(ctx.get("size", DEFAULT_EPHEMERAL_SIZE))
        rng = csi_pb2.CapacityRange(required_bytes=requested)
        size = size_from_range(rng, params.fs_type)
        flags = check_mount_flags(request.volume_capability.mount.mount_flags)
        entry = self.volumes.store.volumes.get(volume_id)
        created = entry is None
        if entry is None:
            entry = self.volumes.create(volume_id, size, params, ephemeral=True, parameters=dict(ctx))
        elif not entry.meta.ephemeral:
            raise AlreadyExists(f"volume {volume_id} exists and is not an ephemeral volume")
        fresh = False
        try:
            loop, fresh = self.volumes.attach(entry, readonly=False)
            current = mount_at(self.os.mounts(), target)
            if current is not None and current.major_minor == loop.major_minor:
                return
            if current is not None:
                raise AlreadyExists(f"{target} already has another filesystem mounted")
            found = self.volumes.ensure_filesystem(entry, loop, params.fs_type)
            os.makedirs(target, mode=0o750, exist_ok=True)
            self.os.mount(loop.device, target, found, self._mount_options(flags, found, params.reclaim, readonly))
        except BaseException:
            # Undo only what this call made: an existing ephemeral volume keeps its data
            # when a retry fails.
            if fresh:
                self.volumes.detach(volume_id, loop)
            if created:
                self.volumes.remove(entry)
            raise

    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext) -> csi_pb2.NodeUnpublishVolumeResponse:
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        target = self._confine(request.target_path, "target_path")
        with self.inflight.hold(f"vol:{volume_id}"):
            entry = self.volumes.store.volumes.get(volume_id)
            loop = self._unmount_own(self.volumes.identity(volume_id, entry), [target])
            self._remove_target(request.target_path, target)
            if entry is not None:
                loop = loop or self.os.find_loop(entry.image)  # a retry finds nothing mounted
            if loop is not None and loop.readonly and not publish_mounts(self.os.mounts(), loop) \
                    and not self.os.attached_read_only(loop.device):
                self.os.set_device_readonly(loop.device, False)  # set by a read-only block publish
            if entry is not None and entry.meta.ephemeral:
                loop = self.os.find_loop(entry.image)
                if loop is not None:
                    self.volumes.detach_if_unused(loop, volume_id)
                self.volumes.remove(entry)
            elif loop is not None and entry is not None and self.volumes.detach_when_unused(entry) \
                    and not self.volumes.detach_if_unused(loop, volume_id):
                # Its last staging path was unstaged while this publish still used the
                # device: nothing uses it now, and it has just been detached.
                self.volumes.mark_detach_when_unused(entry, False)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- stats and expansion --------------------------------------------------------------

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext) -> csi_pb2.NodeGetVolumeStatsResponse:
        """Usage of the volume at volume_path, which must hold this volume (NOT_FOUND
        otherwise: never the figures of whatever else is mounted there, or of the host
        disk under an empty directory)."""
        # Read-only: no in-flight guard, so kubelet's periodic stats never block an operation.
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        entry = self.volumes.get(volume_id)
        path = self._volume_path(request.volume_path, "volume_path")
        loop, mount = self._volume_at(volume_id, entry, path)
        usage = Usage(loop, device_mounts(self.os.mounts(), loop))
        problems = self.volumes.health(entry, usage)
        fence = fence_of(self.fenced, volume_id, self.volumes.store, self.os)
        if fence:
            problems.append(f"not served on this node: {fence}")
        condition = csi_pb2.VolumeCondition(abnormal=bool(problems),
                                            message="; ".join(problems) or "healthy")
        Unit = csi_pb2.VolumeUsage.Unit
        if mount.major_minor == loop.major_minor:  # the volume's filesystem is mounted there
            st = os.statvfs(path)
            usage_list = [
                csi_pb2.VolumeUsage(unit=Unit.BYTES, total=st.f_blocks * st.f_frsize,
                                    available=st.f_bavail * st.f_frsize,
                                    used=(st.f_blocks - st.f_bfree) * st.f_frsize),
                csi_pb2.VolumeUsage(unit=Unit.INODES, total=st.f_files, available=st.f_favail,
                                    used=st.f_files - st.f_ffree),
            ]
        else:  # the device itself (a block publish or staging)
            usage_list = [csi_pb2.VolumeUsage(unit=Unit.BYTES, total=loop.size_bytes)]
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage_list, volume_condition=condition)

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> csi_pb2.NodeExpandVolumeResponse:
        """Grow the image, its loop device and the filesystem this driver mounted on it.
        volume_path must hold this volume, as for NodeGetVolumeStats (NOT_FOUND, nothing
        changed, otherwise)."""
        require(request.volume_id, "volume_id")
        volume_id = check_id(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        if request.HasField("volume_capability"):
            check_capability(request.volume_capability, self.modes)
        self.volumes.get(volume_id)
        self._check_served(volume_id)
        path = self._volume_path(request.volume_path, "volume_path")
        if request.staging_target_path:
            self._confine(request.staging_target_path, "staging_target_path")
        with self.inflight.hold(f"vol:{volume_id}"):
            entry = self.volumes.get(volume_id)  # read under the guard: no stale metadata
            loop, _ = self._volume_at(volume_id, entry, path)
            current = entry.size_bytes()
            rng = request.capacity_range if request.HasField("capacity_range") else None
            size = size_from_range(rng, entry.meta.fs_type, current=current)
            if size < current:
                raise OutOfRange(f"volume {volume_id} is {current} bytes; it cannot shrink to {size}")
            if size > current:
                self.volumes.check_room(size - current, f"growing volume {volume_id}")
                grow_image(entry.image, size, entry.meta.diskformat)
                failpoints.hit("expand.after_grow_image")
            if loop.size_bytes != size:
                self.os.refresh_loop(loop.device)
                failpoints.hit("expand.after_refresh")
            # Grow a filesystem only where this driver mounted one. A volume used as a raw
            # block device is the application's: whatever it put there is never touched.
            fs_mount = self.volumes.fs_mount(Usage(loop, device_mounts(self.os.mounts(), loop)))
            if fs_mount is not None:
                self._grow_online(entry, fs_mount.fstype, loop.device, fs_mount.mount_point)
            elif entry.meta.fs_type:
                self.volumes.store.volumes.save_meta(entry, replace(entry.meta, needs_fs_grow=True))
            log.info("expanded volume %s to %d bytes", volume_id, size)
            return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    def _grow_online(self, entry: Entry, fs: str, device: str, mount_point: str) -> None:
        try:
            self.os.grow_fs(fs, device, mount_point)
        except CommandError as exc:
            if "Permission denied" not in exc.stderr:
                raise
            # The kernel checks a capability to grow a mounted filesystem (caps.py). Grow at
            # the next stage instead, where ext3/ext4 grow unmounted.
            self.volumes.store.volumes.save_meta(entry, replace(entry.meta, needs_fs_grow=True))
            cap = caps.needed_to_grow(fs)
            why = caps.why_lacking(cap) or (f"the process has {caps.NAMES[cap]}, so the kernel's refusal "
                                            "has another cause: see the driver's log")
            raise FailedPrecondition(
                f"the kernel refused to grow {fs} online ({exc.stderr.splitlines()[-1]}): {why}. The image "
                "is already larger: the filesystem grows at the next stage") from None

    # -- info -----------------------------------------------------------------------------

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=c))
            for c in NODE_CAPS])

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
                    ) -> csi_pb2.NodeGetInfoResponse:
        topology = self.settings.topology
        if self.settings.shared:
            # Only a node that sees the datastore (mounted, the right one, taking writes) says
            # it can reach its volumes; the scheduler places their pods elsewhere otherwise.
            problem = datastore_health(self.settings.data_dir, self.settings.datastore)
            if problem:
                log.warning("NodeGetInfo: no datastore topology: %s", problem)
                topology = {}
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.settings.node_id,
            max_volumes_per_node=self.settings.max_volumes_per_node,
            accessible_topology=csi_pb2.Topology(segments=topology),
        )


