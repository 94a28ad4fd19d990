"""Volume mechanics shared by the Controller and Node services: making an image, finding
its loop device and mounts, making sure a filesystem is on it, health, removal. All host
work goes through the OS layer; all files through the store."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from .. import failpoints
from ..errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..host.oslayer import FileId, LoopDevice, MountEntry, OSLayer, file_id, real_path
from ..host.runner import CommandError
from ..settings import Settings
from .datastore import imagelock
from .datastore.capabilities import Capabilities
from .datastore.freeze import FreezeClient, Target
from .datastore.records import Datastore, Holder
from .params import VolumeParams, check_reclaim
from .store import TRASH_PREFIX, Entry, Meta, Store, create_image, extend, fsync_path, room_for

log = logging.getLogger(__name__)

LOCK_WAIT_SECONDS = 2.0
"""Shared mode: how long NodeStageVolume retries an image lock that another client holds
(one just let go of can take a moment to reach the datastore's server)."""


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
    def __init__(self, settings: Settings, store: Store, oslayer: OSLayer,
                 datastore: Datastore | None = None, caps: Capabilities | None = None) -> None:
        self.settings = settings
        self.store = store
        self.os = oslayer
        self.datastore = datastore
        """Shared mode: the datastore's records; images are then attached under a lock."""
        self.caps = caps
        """Shared mode: what the datastore's filesystem can do (None: assume everything)."""
        self.freezes = FreezeClient(datastore, settings.freeze_hold_seconds) if datastore is not None else None
        """Shared mode: asks the node that has a volume attached to freeze it for a copy."""

    @property
    def where(self) -> str:
        """Where this driver's volumes live, for messages."""
        if self.datastore is not None:
            return f"datastore {self.datastore.name}"
        return f"node {self.settings.node_id}"

    @property
    def can_discard(self) -> bool:
        """Online discard can give space back (the datastore punches holes)."""
        return self.caps is None or bool(self.caps.punch_hole)

    # -- lookup -------------------------------------------------------------------------

    def identity(self, volume_id: str, entry: Entry | None) -> Identity:
        if entry is None:
            return Identity(volume_id, "", None)
        image = real_path(entry.image)
        return Identity(volume_id, image, file_id(image))

    def get(self, volume_id: str) -> Entry:
        entry = self.store.volumes.get(volume_id)
        if entry is None:
            raise NotFound(f"volume {volume_id} does not exist in {self.where}")
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
                f"{what} needs {size} bytes but {self.where} has {room} available "
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
        own, and an eagerzeroedthick one has every byte written. Shared mode: see
        `frozen` (a source no node has attached read-write is copied under a shared lock;
        one that a node has is frozen by that node)."""
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
        filesystem: Documentation/filesystems/vfs.rst, freeze_fs).

        Shared mode: an entry this node has not attached may be attached on another node,
        whose filesystem only that node can freeze. An entry that no client holds
        read-write is held under a shared lock on its image (csi_driver.volumes.datastore.imagelock) for the
        whole block, so no node can attach it read-write meanwhile, and this host's cached
        pages of it are dropped first (they may predate what a node wrote through its own
        client). An entry that a node has attached read-write (its image locked exclusively)
        is frozen by that node at this driver's request, through the datastore
        (csi_driver.volumes.datastore.freeze): all such requests are answered before anything is frozen here,
        and when the block ends this checks that no node thawed early, else it raises
        UNAVAILABLE (the copy made in the block is not consistent). An entry locked by a
        client that no attachment record names is refused (FAILED_PRECONDITION), all named
        in one error, before anything is frozen."""
        guards, remote = self._copy_guards(entries)
        try:
            with self.freezes.frozen(remote) if remote and self.freezes is not None else nullcontext():
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
        finally:
            for fd in guards:
                os.close(fd)

    def _copy_guards(self, entries: Sequence[Entry]) -> tuple[list[int], list[Target]]:
        """Shared mode: for each entry this node's driver has not attached itself (see
        `frozen`), in the order given, a shared lock on its image, or, when a client holds it
        exclusively, the node whose attachment record names it read-write (to be asked to
        freeze it). Returns the descriptors holding the locks and those nodes' targets.
        FAILED_PRECONDITION naming every entry locked by a client no record names, holding
        none. Node-local mode: nothing."""
        if self.datastore is None or self.freezes is None:
            return [], []
        guards: list[int] = []
        remote: list[Target] = []
        refused: list[str] = []
        try:
            for entry in entries:
                if self.settings.runs_node and self.os.find_loop(entry.image) is not None:
                    continue  # attached by this node: frozen here if mounted
                try:
                    fd = imagelock.open_locked(entry.image, readonly=True, direct=False)
                except imagelock.LockHeld:
                    target = self.freezes.target(entry.id, entry.image)
                    if target is not None:
                        remote.append(target)
                    else:
                        held = self.datastore.holders.describe(entry.id) or "a client the records do not name"
                        refused.append(f"{entry.id} (locked read-write by {held}, without an attachment "
                                       "that names one node read-write)")
                    continue
                guards.append(fd)
                imagelock.drop_cache(fd)
            if refused:
                raise FailedPrecondition(
                    f"volume(s) {'; '.join(refused)}: a filesystem can only be frozen on the node that has it "
                    "attached, and no node can be asked, so a copy taken now would not be consistent")
        except BaseException:
            for fd in guards:
                os.close(fd)
            raise
        return guards, remote

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
                    os.posix_fallocate(fd, 0, size)  # the copy's holes too; never overwrites data
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- node-side helpers --------------------------------------------------------------

    def attach(self, entry: Entry, *, readonly: bool, generation: int = 0) -> tuple[LoopDevice, bool]:
        """The loop device of this image, attaching one if there is none. A thick
        volume's device refuses discards (OSLayer.disable_discard), whoever attached it.
        Returns (device, newly_attached). Shared mode: see attach_fenced (`generation` is
        the attachment's, for the holder record)."""
        thin = entry.meta.diskformat == "thin"
        loop = self.os.find_loop(entry.image)
        if loop is not None:
            if not thin:
                self.os.disable_discard(loop.device)
            if self.datastore is not None:
                self._hold(entry, loop, generation)
            return loop, False
        if self.datastore is None:
            return self.os.attach_loop(entry.image, readonly=readonly, discard=thin), True
        return self.attach_fenced(entry, readonly, generation, discard=thin), True

    def attach_fenced(self, entry: Entry, readonly: bool, generation: int, *, discard: bool) -> LoopDevice:
        """Lock the whole image through the datastore (exclusive, or shared for read-only)
        on one open of it, and give the loop device that very open file: the lock then
        lasts as long as the device is attached (csi_driver.volumes.datastore.imagelock). Another client's
        lock refuses it: FAILED_PRECONDITION naming the holder as far as the records know.
        Then record this node as a holder. `discard` as OSLayer.attach_loop."""
        assert self.datastore is not None
        direct = self.caps is None or bool(self.caps.o_direct)
        try:
            fd = imagelock.open_locked(entry.image, readonly=readonly, direct=direct, wait=LOCK_WAIT_SECONDS)
        except imagelock.LockHeld:
            raise FailedPrecondition(self._held_message(entry.id)) from None
        try:
            # Pages this host cached from an earlier attach predate what other nodes wrote
            # since (buffered I/O when the datastore has no O_DIRECT; the superblock read).
            imagelock.drop_cache(fd)
            loop = self.os.attach_loop_fd(fd, entry.image, readonly=readonly, direct_io=direct,
                                          discard=discard)
        finally:
            os.close(fd)
        try:
            self.datastore.holders.put(Holder(entry.id, self.settings.node_id, readonly, generation,
                                              time.time(), loop.device))
        except BaseException:
            self.os.detach_loop(loop.device)
            raise
        return loop

    def _hold(self, entry: Entry, loop: LoopDevice, generation: int) -> None:
        """Shared mode, a device already attached here (an earlier stage, or one whose call
        failed after the attach): make sure this node's holder record names it, so that
        messages and ControllerUnpublishVolume's checks know who holds the image."""
        assert self.datastore is not None
        node = self.settings.node_id
        if not any(h.node_id == node for h in self.datastore.holders.of_volume(entry.id)):
            self.datastore.holders.put(Holder(entry.id, node, loop.readonly, generation, time.time(), loop.device))
            log.info("recorded this node as a holder of %s (%s was attached without the record)", entry.id,
                     loop.device)

    def _held_message(self, volume_id: str) -> str:
        assert self.datastore is not None
        others = self.datastore.holders.describe(volume_id, but=self.settings.node_id)
        if others:
            who = others
        elif self.datastore.holders.describe(volume_id):
            who = ("this node's driver itself (a lock re-taken at start-up for a device that has "
                   "since gone; it is let go within one heartbeat)")
        else:
            who = "a client the records do not name"
        return (f"volume {volume_id}'s image is locked through the datastore by {who}: it is still "
                "attached there. It can be staged here once that node detaches it, or once that "
                "node's datastore client is gone (node fenced)")

    def detach(self, volume_id: str | None, loop: LoopDevice) -> None:
        """Detach the device; in shared mode also drop this node's holder record."""
        self.os.detach_loop(loop.device)
        if self.datastore is not None and volume_id is not None:
            self.datastore.holders.remove(volume_id, self.settings.node_id)

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

    def detach_if_unused(self, loop: LoopDevice, volume_id: str | None = None) -> list[str]:
        """Detach the device unless a staging path or publish still uses it (a mount of
        its filesystem, a bind of its node); returns where it is still used. Shared mode:
        detach as `detach` does (the holder record of volume_id goes too)."""
        still = [m.mount_point for m in device_mounts(self.os.mounts(), loop)]
        if still:
            log.info("%s stays attached: still used at %s", loop.device, ", ".join(still))
            return still
        self.detach(volume_id, loop)
        return []

    def mark_detach_when_unused(self, entry: Entry, on: bool) -> None:
        """Record (or clear) that the volume's device outlived its staging paths
        (DETACH_WHEN_UNUSED). Not made durable: lost in a crash, the device merely stays
        attached until the volume is staged and unstaged again."""
        mark = entry.path / DETACH_WHEN_UNUSED
        if on:
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
        if self.datastore is None:
            self.store.volumes.delete(entry.id)
        else:
            # Under the record's lock, which ControllerPublishVolume also holds: a publish
            # on another controller either comes first (and this refuses) or finds it gone.
            with self.datastore.attachments.hold(entry.id):
                self._check_unattached(entry)
                self.store.volumes.delete(entry.id)
                self.datastore.forget_volume(entry.id)
        log.info("deleted volume %s", entry.id)

    def _check_unattached(self, entry: Entry) -> None:
        """Shared mode: not published to any node, and no client holds its image."""
        assert self.datastore is not None
        published = self.datastore.attachments.published_nodes(entry.id)
        if published:
            raise FailedPrecondition(f"volume {entry.id} is published to node(s) {', '.join(published)}: "
                                     "ControllerUnpublishVolume first")
        if imagelock.path_lock_state(entry.image) != imagelock.FREE:
            raise FailedPrecondition(f"volume {entry.id} is in use: {self._held_message(entry.id)}")

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
                    os.posix_fallocate(fd, 0, st.st_size)
                    os.fsync(fd)
            finally:
                os.close(fd)
            if usage.loop is not None:
                self.os.disable_discard(usage.loop.device)
        if reclaim != meta.reclaim:
            mount_point = self.fs_mount_point(usage)
            if mount_point:
                self.os.remount(mount_point, ["discard" if reclaim == "discard" else "nodiscard"])
        return self.store.volumes.save_meta(entry, replace(meta, diskformat=target, reclaim=reclaim))
