"""Volume mechanics shared by the Controller and Node services: making an image, finding
its loop device and mounts, making sure a filesystem is on it, health, removal. All host
work goes through the OS layer; all files through the store."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from . import baton, failpoints
from .config import Settings
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .oslayer import FileId, LoopDevice, MountEntry, OSLayer, file_id, real_path
from .runner import CommandError
from .store import TRASH_PREFIX, Entry, Meta, Store, create_image, extend, fsync, fsync_path, room_for
from .validation import VolumeParams, check_reclaim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    """Where a volume is in use on this node."""

    loop: LoopDevice | None
    mounts: list[MountEntry]

    @property
    def in_use(self) -> bool:
        return self.loop is not None or bool(self.mounts)

    def describe(self) -> str:
        parts = []
        if self.loop is not None:
            parts.append(f"attached as {self.loop.device}")
        parts += [f"mounted at {m.mount_point}" for m in self.mounts]
        return ", ".join(parts) or "not in use"


@dataclass(frozen=True)
class HostView:
    """What the host looks like at one moment: loop devices, mounts, free bytes."""

    loops: list[LoopDevice]
    mounts: list[MountEntry]
    free_bytes: int

    def loop_for(self, image: Path) -> LoopDevice | None:
        path, ident = real_path(image), file_id(image)
        return next((d for d in self.loops if d.backs(path, ident)), None)


_IMAGE_TAIL = r"/volumes/(?:{trash}{id}\.[0-9a-f]{{8}}|{id})/disk\.img(?: \(deleted\))?$"


def names_volume(backing_file: str, volume_id: str) -> bool:
    """Whether a loop device's backing path is this volume's image, as any mount namespace
    would show it, including after the image was deleted or moved to the trash."""
    pattern = _IMAGE_TAIL.format(trash=re.escape(TRASH_PREFIX), id=re.escape(volume_id))
    return re.search(pattern, backing_file) is not None


STAGED_DEVICE = "thinloop-device"
"""A block volume is staged by binding its loop device onto this file in the staging
directory: the mount table then shows every staging path of the volume, as it does for a
filesystem volume's staging mounts, and a staging path survives a driver restart."""


DETACH_WHEN_UNUSED = "detach-when-unused"
"""In a volume's directory while its loop device was left attached by an unstage because
a publish (or another staging path) still used it: the NodeUnpublish that leaves the device
unused detaches it. Only an unstage writes it, so a device staged by a driver before block
staging paths were mounts (attached with no mount) is never detached by an unpublish."""


def device_mounts(mounts: list[MountEntry], loop: LoopDevice) -> list[MountEntry]:
    """Mounts of the loop's filesystem and bind mounts of its device node."""
    name = "/" + Path(loop.device).name
    return [m for m in mounts if m.major_minor == loop.major_minor
            or (m.root == name and m.fstype in ("devtmpfs", "tmpfs"))]


def is_block_staging(mount: MountEntry) -> bool:
    """Whether a mount is a block volume's staging bind (STAGED_DEVICE)."""
    return os.path.basename(mount.mount_point) == STAGED_DEVICE


def publish_mounts(mounts: list[MountEntry], loop: LoopDevice) -> list[MountEntry]:
    """device_mounts less block staging binds: the mounts through which a pod may write."""
    return [m for m in device_mounts(mounts, loop) if not is_block_staging(m)]


@dataclass(frozen=True)
class Identity:
    """How to tell a volume's loop devices from any other's: by the image's identity
    (its file's device and inode, which LOOP_GET_STATUS64 reports for the device), and,
    where that cannot be known (the image is gone: deleted while mounted, or moved to the
    trash), by the path shape of this volume's image."""

    volume_id: str
    image: str
    """The image's real path; empty when the volume does not exist."""
    image_id: FileId | None

    def owns(self, loop: LoopDevice | None) -> bool:
        if loop is None:
            return False
        if self.image and loop.backs(self.image, self.image_id):
            return True
        unknown = loop.backing_id is None or loop.backing_file.endswith(" (deleted)")
        return unknown and names_volume(loop.backing_file, self.volume_id)

    def is_current(self, loop: LoopDevice | None) -> bool:
        """The device of the image as it is now (not of a deleted one)."""
        return loop is not None and bool(self.image) and loop.backs(self.image, self.image_id)


def fs_type_of(entry: Entry, oslayer: OSLayer) -> str:
    """The filesystem the volume's image holds, "" for none. The metadata's for a volume
    this driver made (it made that filesystem, or none for a raw block volume); for an
    image made by hand, whatever is really there now: the superblock (ext3/ext4/xfs, one
    read) or else blkid -p (any other type), so listings agree with the image before and
    after a stage formats it."""
    if not entry.hand_made:
        return entry.meta.fs_type
    found = oslayer.superblock_fs(str(entry.image))
    if found is None:
        try:
            found = oslayer.probe_fs(str(entry.image))
        except CommandError as exc:
            log.warning("cannot tell what %s holds: %s", entry.image, exc)
    return found or ""


def mount_at(mounts: list[MountEntry], path: str) -> MountEntry | None:
    """The top-most mount at exactly this path (the last one listed wins)."""
    found = None
    for m in mounts:
        if m.mount_point == path:
            found = m
    return found


class Volumes:
    def __init__(self, settings: Settings, store: Store, oslayer: OSLayer) -> None:
        self.settings = settings
        self.store = store
        self.os = oslayer

    # -- lookup -------------------------------------------------------------------------

    def identity(self, volume_id: str, entry: Entry | None) -> Identity:
        if entry is None:
            return Identity(volume_id, "", None)
        image = real_path(entry.image)
        return Identity(volume_id, image, file_id(image))

    def get(self, volume_id: str) -> Entry:
        entry = self.store.volumes.get(volume_id)
        if entry is None:
            raise NotFound(f"volume {volume_id} does not exist on node {self.settings.node_id}")
        return entry

    def usage(self, entry: Entry, view: HostView | None = None) -> Usage:
        if view is None:
            loop = self.os.find_loop(entry.image)
            mounts = device_mounts(self.os.mounts(), loop) if loop is not None else []
        else:
            loop = view.loop_for(entry.image)
            mounts = device_mounts(view.mounts, loop) if loop is not None else []
        return Usage(loop, mounts)

    def host_view(self) -> HostView:
        """Loop table, mount table and free space read once, for calls over many volumes."""
        return HostView(self.os.loop_devices(), self.os.mounts(), self.store.free_bytes())

    # -- capacity -----------------------------------------------------------------------

    def available_bytes(self) -> int:
        """Free space of the data dir's filesystem minus what thin images may still claim
        (divided by the overcommit ratio)."""
        free = self.store.free_bytes()
        promised = self.store.unused_promises()
        return max(0, int(free - promised / self.settings.overcommit_ratio))

    def check_room(self, size: int, what: str) -> None:
        room = self.available_bytes()
        if size > room:
            raise ResourceExhausted(
                f"{what} needs {size} bytes but node {self.settings.node_id} has {room} available "
                f"(free space minus unused thin promises, overcommit ratio {self.settings.overcommit_ratio})")

    # -- creation -----------------------------------------------------------------------

    def create(self, volume_id: str, size: int, params: VolumeParams, *,
               source: tuple[str, Entry] | None = None, ephemeral: bool = False,
               parameters: dict[str, str] | None = None) -> Entry:
        """Make a complete volume (image, filesystem, metadata) under a temporary name,
        then rename it into place: it is listed only once whole."""
        self.check_room(size, f"volume {volume_id}")
        meta = Meta(
            name=volume_id, kind="volume", fs_type=params.fs_type, diskformat=params.diskformat,
            reclaim=params.reclaim, requested_bytes=size, created=time.time(),
            source_kind=source[0] if source else "", source_id=source[1].id if source else "",
            ephemeral=ephemeral, parameters=dict(parameters or {}), node_id=self.settings.node_id,
        )
        meta.parameters["access_type"] = params.access_type

        def build(image: Path) -> None:
            if source is not None:
                self._build_from(image, source[1], size, params)
            else:
                create_image(image, size, params.diskformat)
                failpoints.hit("create.after_image")
                if params.fs_type:
                    thin = params.diskformat == "thin"
                    self.os.mkfs(str(image), params.fs_type, discard=thin, prezeroed=not thin)

        if source is not None:
            # The copy's filesystem is the source's, grown at the first stage when the copy
            # is larger or the source still owed a growth (deferred, e.g. refused online).
            owed = source[1].meta.needs_fs_grow or size > source[1].size_bytes()
            meta = replace(meta, needs_fs_grow=bool(params.fs_type) and owed)
        entry = self.store.volumes.create(volume_id, meta, build)
        log.info("created volume %s: %d bytes, %s, %s", volume_id, size,
                 params.fs_type or "block", params.diskformat)
        return entry

    def copy_consistent(self, source: Entry, dest: Path, diskformat: str = "thin") -> None:
        """Copy the source's image with its filesystem frozen when it is mounted, so the
        copy is filesystem-consistent; then make the copy durable. (A volume in use as a
        raw block device cannot be frozen: its copy is only as consistent as the writer
        makes it; the README says so.) The copy is made for `diskformat`: thin keeps
        holes and shares blocks (reflink) where it can; a thick copy gets blocks of its
        own, and an eagerzeroedthick one has every byte written."""
        with self.frozen([source]):
            self.os.copy_image(source.image, dest, sparse=diskformat != "eagerzeroedthick",
                               shared=diskformat == "thin")
            failpoints.hit("copy.while_frozen")
        fsync_path(dest)

    @contextmanager
    def frozen(self, entries: Sequence[Entry]) -> Iterator[list[str]]:
        """Freeze the filesystem of every entry that is mounted on this node, in the order
        given, and thaw them all (in the reverse order) when the block ends, however it
        ends. Yields the mount points frozen. A failure to freeze one thaws those already
        frozen. Callers that freeze several volumes pass them in a stable order (sorted by
        id), so two calls over overlapping sets cannot wait on each other. Raw block
        volumes, and volumes not mounted here, are not frozen (FIFREEZE needs a mounted
        filesystem: Documentation/filesystems/vfs.rst, freeze_fs)."""
        points: list[str] = []
        failed = False
        try:
            for entry in entries:
                point = self.fs_mount_point(self.usage(entry))
                if point and point not in points:
                    self.os.freeze(point)
                    points.append(point)
            yield points
        except BaseException:
            failed = True
            raise
        finally:
            first: BaseException | None = None
            for point in reversed(points):
                try:
                    self.os.thaw(point)
                except Exception as exc:  # thaw the rest whatever one of them did
                    log.error("cannot thaw %s: %s", point, exc)
                    first = first or exc
            if first is not None and not failed:
                raise first

    def _build_from(self, image: Path, source: Entry, size: int, params: VolumeParams) -> None:
        self.copy_consistent(source, image, params.diskformat)
        failpoints.hit("restore.after_copy")
        fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)
        try:
            with room_for(f"to copy {source.id}"):
                copied = os.fstat(fd).st_size
                if size > copied:
                    extend(fd, copied, size, params.diskformat)
                if params.diskformat != "thin":
                    with baton.blocking():
                        os.posix_fallocate(fd, 0, size)  # the copy's holes too; never overwrites data
                fsync(fd)
        finally:
            os.close(fd)

    # -- node-side helpers --------------------------------------------------------------

    def attach(self, entry: Entry, *, readonly: bool) -> tuple[LoopDevice, bool]:
        """The loop device of this image, attaching one if there is none. A thick
        volume's device refuses discards (OSLayer.disable_discard), whoever attached it.
        Returns (device, newly_attached)."""
        thin = entry.meta.diskformat == "thin"
        loop = self.os.find_loop(entry.image)
        if loop is not None:
            if not thin:
                self.os.disable_discard(loop.device)
            return loop, False
        return self.os.attach_loop(entry.image, readonly=readonly, discard=thin), True

    def ensure_filesystem(self, entry: Entry, loop: LoopDevice, requested: str) -> str:
        """The filesystem on the device. Makes one only when blkid finds none and the
        volume was not created as a raw block volume; never reformats."""
        quick = self.os.superblock_fs(str(entry.image))
        if quick is not None and quick == entry.meta.fs_type and requested in ("", quick):
            return quick  # the superblock agrees with what CreateVolume made: no blkid needed
        found = self.os.probe_fs(loop.device)
        if found is None:
            if entry.meta.parameters.get("access_type") == "block":
                raise FailedPrecondition(
                    f"volume {entry.id} was created as a raw block volume and holds no filesystem; "
                    "refusing to format it for a mount")
            if entry.meta.fs_type:
                # CreateVolume made this filesystem: not finding it means damage, and
                # formatting would destroy what fsck might still recover.
                raise FailedPrecondition(
                    f"volume {entry.id} should hold the {entry.meta.fs_type} made when it was created, "
                    f"but blkid finds no filesystem on {loop.device}; refusing to format it "
                    "(check it with e2fsck/xfs_repair on the image)")
            fs = requested or entry.meta.fs_type or "ext4"
            log.info("volume %s has no filesystem: making %s", entry.id, fs)
            self.os.mkfs(loop.device, fs, discard=entry.meta.diskformat == "thin")
            failpoints.hit("stage.after_mkfs")
            return fs
        if requested and found != requested:
            raise FailedPrecondition(
                f"volume {entry.id} holds an existing filesystem of type {found}, not the {requested} requested; "
                "it will not be reformatted")
        return found

    def detach_if_unused(self, loop: LoopDevice) -> list[str]:
        """Detach the device unless a staging path or publish still uses it (a mount of
        its filesystem, a bind of its node); returns where it is still used."""
        still = [m.mount_point for m in device_mounts(self.os.mounts(), loop)]
        if still:
            log.info("%s stays attached: still used at %s", loop.device, ", ".join(still))
            return still
        self.os.detach_loop(loop.device)
        return []

    def mark_detach_when_unused(self, entry: Entry, on: bool) -> None:
        """Record (or clear) that the volume's device outlived its staging paths
        (DETACH_WHEN_UNUSED). Not made durable: lost in a crash, the device merely stays
        attached until the volume is staged and unstaged again."""
        mark = entry.path / DETACH_WHEN_UNUSED
        if on:
            with baton.blocking():
                os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        else:
            mark.unlink(missing_ok=True)

    def detach_when_unused(self, entry: Entry) -> bool:
        return (entry.path / DETACH_WHEN_UNUSED).exists()

    def health(self, entry: Entry, usage: Usage | None = None, view: HostView | None = None) -> list[str]:
        """Problems with the volume, empty when it is healthy."""
        problems: list[str] = []
        if not entry.image.is_file():
            return [f"image {entry.image} is missing"]
        usage = usage or self.usage(entry, view)
        if usage.loop is not None:
            errors = self.os.fs_error_count(usage.loop.device)
            if errors:
                problems.append(f"filesystem reports {errors} error(s); run fsck after unmounting")
            # Found by identity, the device holds this very image; only a device whose
            # identity is unknown is judged by its (namespace-relative) path.
            if usage.loop.backing_id is None and not os.path.exists(usage.loop.backing_file):
                problems.append("the loop device's backing file was removed")
        st = os.stat(entry.image)
        unwritten = st.st_size - st.st_blocks * 512
        free = view.free_bytes if view is not None else self.store.free_bytes()
        if unwritten > 0 and free < min(unwritten, 64 << 20):
            problems.append(
                f"the node's data filesystem is full ({free} bytes free): writes to unallocated "
                "parts of this thin volume fail")
        return problems

    def remove(self, entry: Entry) -> None:
        """Delete the volume's directory; refuse while it is attached or mounted."""
        usage = self.usage(entry)
        if usage.in_use:
            raise FailedPrecondition(f"volume {entry.id} is in use: {usage.describe()}")
        prefix = str(entry.path) + "/"
        inside = [m.mount_point for m in self.os.mounts() if m.mount_point.startswith(prefix)]
        if inside:
            raise FailedPrecondition(f"volume {entry.id} has mounts inside its directory: {inside}")
        self.store.volumes.delete(entry.id)
        log.info("deleted volume %s", entry.id)

    def fs_mount(self, usage: Usage) -> MountEntry | None:
        """The mount of the volume's own filesystem (not a bind of it), if any."""
        if usage.loop is None:
            return None
        return next((m for m in usage.mounts if m.major_minor == usage.loop.major_minor and m.root == "/"), None)

    def fs_mount_point(self, usage: Usage) -> str:
        mount = self.fs_mount(usage)
        return mount.mount_point if mount is not None else ""

    def modify(self, entry: Entry, changes: dict[str, str]) -> Entry:
        """Apply mutable parameters to a live volume: thin -> zeroedthick preallocates the
        image (and the volume's reclaim becomes none, its device stops discarding);
        reclaim switches online discard on or off (remounting if mounted). Every change is
        checked before any is made: a refused call changes nothing."""
        meta = entry.meta
        target = changes.get("diskformat", meta.diskformat)
        if target != meta.diskformat and (meta.diskformat, target) != ("thin", "zeroedthick"):
            raise InvalidArgument(
                f"diskformat can change from thin to zeroedthick on a live volume, "
                f"not from {meta.diskformat} to {target}")
        # A thick volume's reclaim is none unless discard is asked for, which is refused.
        reclaim = check_reclaim(target, changes.get("reclaim", meta.reclaim if target == "thin" else None))
        st = os.stat(entry.image)
        if target != meta.diskformat:
            self.check_room(max(0, st.st_size - st.st_blocks * 512), f"preallocating {entry.id}")
        usage = self.usage(entry)
        if target != meta.diskformat:
            fd = os.open(entry.image, os.O_WRONLY | os.O_CLOEXEC)
            try:
                with room_for(f"to preallocate {entry.id}"):
                    with baton.blocking():
                        os.posix_fallocate(fd, 0, st.st_size)
                    fsync(fd)
            finally:
                os.close(fd)
            if usage.loop is not None:
                self.os.disable_discard(usage.loop.device)
        if reclaim != meta.reclaim:
            mount_point = self.fs_mount_point(usage)
            if mount_point:
                self.os.remount(mount_point, ["discard" if reclaim == "discard" else "nodiscard"])
        return self.store.volumes.save_meta(entry, replace(meta, diskformat=target, reclaim=reclaim))
