"""What is on this node, read straight from the data dir, sysfs and mountinfo: every volume
and snapshot with its sizes, loop device and mounts, and the node's thin totals. Used by
`thinloopctl node status` and by the metrics collector; it changes nothing."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..host.oslayer import MountEntry, OSLayer
from .datalock import LOCK_FILE, DataDirLock
from .lifecycle import Usage, device_mounts, fs_type_of, is_block_staging
from .store import Collection, Entry, Store


@dataclass(frozen=True)
class ObjectStatus:
    """One volume or snapshot as found on disk and in the kernel."""

    kind: str
    id: str
    name: str
    apparent_bytes: int
    """The image's size: what the volume promises."""
    allocated_bytes: int
    """Blocks the image really occupies on the host filesystem."""
    fs_type: str
    """ext3, ext4, xfs (or what else an image made by hand holds), "block" for a raw block
    volume, "none" for an image made by hand that holds no filesystem."""
    diskformat: str
    created: float
    source: str
    """snapshot/<id> or volume/<id> when made from one."""
    ephemeral: bool
    state: str
    """idle, attached (loop device only), staged, or published."""
    loop_device: str
    direct_io: bool
    staged_at: list[str] = field(default_factory=list)
    published_at: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Totals:
    """Thin accounting for the node."""

    volumes: int
    snapshots: int
    provisioned_bytes: int
    """Sum of volume sizes: what has been promised to claims."""
    allocated_bytes: int
    """Host blocks used by volume images."""
    snapshot_allocated_bytes: int
    capacity_bytes: int
    """Size of the filesystem holding the data dir."""
    free_bytes: int
    """Free space on it, as an unprivileged writer sees it."""
    unused_promises_bytes: int
    """What thin volumes may still claim: provisioned minus allocated."""

    @property
    def thin_saving_bytes(self) -> int:
        return max(0, self.provisioned_bytes - self.allocated_bytes)

    @property
    def overcommit(self) -> float:
        """Unused promises over free space: above 1.0 the disk fills before every thin
        volume is full."""
        if self.free_bytes <= 0:
            return float("inf") if self.unused_promises_bytes else 0.0
        return self.unused_promises_bytes / self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["thin_saving_bytes"] = self.thin_saving_bytes
        over = self.overcommit
        doc["overcommit"] = None if over == float("inf") else over
        return doc


@dataclass(frozen=True)
class NodeStatus:
    data_dir: str
    data_fs_type: str
    volumes: list[ObjectStatus]
    snapshots: list[ObjectStatus]
    totals: Totals
    driver: str | None = None
    """The driver holding the data dir's lock ("pid <n> host <h> since <t>"), None when
    no driver runs on it (csi_driver.volumes.datalock); in shared mode, this node's driver."""
    datastore: str | None = None
    """Shared mode: the datastore's name (the data dir is its mount); None: node-local."""

    def to_dict(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir, "data_fs_type": self.data_fs_type, "driver": self.driver,
                "datastore": self.datastore,
                "volumes": [v.to_dict() for v in self.volumes],
                "snapshots": [s.to_dict() for s in self.snapshots],
                "totals": self.totals.to_dict()}


def _sizes(entry: Entry) -> tuple[int, int]:
    try:
        st = os.stat(entry.image)
    except FileNotFoundError:  # deleted between listing and stat
        return 0, 0
    return st.st_size, st.st_blocks * 512


def store_totals(store: Store) -> Totals:
    """Totals from the store alone (no kernel lookups): cheap enough for every scrape."""
    counts = {"volume": 0, "snapshot": 0}
    provisioned = allocated = snap_allocated = unused = 0
    coll: Collection
    for coll in (store.volumes, store.snapshots):
        for entry in coll.entries():
            apparent, alloc = _sizes(entry)
            counts[coll.kind] += 1
            if coll.kind == "volume":
                provisioned += apparent
                allocated += alloc
                unused += max(0, apparent - alloc)
            else:
                snap_allocated += alloc
    st = os.statvfs(store.data_dir)
    return Totals(volumes=counts["volume"], snapshots=counts["snapshot"],
                  provisioned_bytes=provisioned, allocated_bytes=allocated,
                  snapshot_allocated_bytes=snap_allocated,
                  capacity_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize,
                  unused_promises_bytes=unused)


def filesystem_of(path: Path, mounts: list[MountEntry]) -> MountEntry | None:
    """The mount holding path: the longest mount point that is a prefix of its real path."""
    real = os.path.realpath(path)
    best: MountEntry | None = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        if (real == mp or real.startswith(mp + "/") or mp == "/") and (
                best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = m
    return best


def _state(entry: Entry, usage: Usage) -> tuple[str, list[str], list[str]]:
    """Split the volume's mounts into staging and publish mounts.

    A mounted filesystem: its first mount (mountinfo lists mounts in the order they were
    made) is the staging mount, every later one a publish bind. Block volumes: a staging
    path holds a bind of the device node on STAGED_DEVICE inside it; every other bind of
    the device node is a publish. Inline ephemeral volumes are never staged: their one
    mount is the publish."""
    loop = usage.loop
    if loop is None:
        return "idle", [], []
    block_staged = [os.path.dirname(m.mount_point) for m in usage.mounts if is_block_staging(m)]
    points = [m.mount_point for m in usage.mounts if not is_block_staging(m)]
    fs_mounts = [m.mount_point for m in usage.mounts if m.major_minor == loop.major_minor]
    if entry.meta.ephemeral:
        staged, published = [], points
    elif fs_mounts:
        staged, published = fs_mounts[:1], [p for p in points if p != fs_mounts[0]]
    else:
        staged, published = [], points
    staged += block_staged
    if published:
        return "published", staged, published
    if staged:
        return "staged", staged, published
    return "attached", staged, published


def _fs_shown(entry: Entry, oslayer: OSLayer) -> str:
    """The filesystem the image holds; "block" for a raw block volume this driver made,
    "none" for an image made by hand that holds nothing (yet)."""
    fs = fs_type_of(entry, oslayer)
    return fs or ("none" if entry.hand_made else "block")


def object_status(entry: Entry, oslayer: OSLayer, mounts: list[MountEntry]) -> ObjectStatus:
    apparent, alloc = _sizes(entry)
    loop = oslayer.find_loop(entry.image)
    usage = Usage(loop, device_mounts(mounts, loop) if loop is not None else [])
    state, staged, published = _state(entry, usage)
    meta = entry.meta
    return ObjectStatus(
        kind=meta.kind, id=entry.id, name=meta.name, apparent_bytes=apparent, allocated_bytes=alloc,
        fs_type=_fs_shown(entry, oslayer), diskformat=meta.diskformat, created=meta.created,
        source=f"{meta.source_kind}/{meta.source_id}" if meta.source_kind else "",
        ephemeral=meta.ephemeral, state=state if meta.kind == "volume" else "-",
        loop_device=loop.device if loop is not None else "",
        direct_io=loop.direct_io if loop is not None else False,
        staged_at=staged, published_at=published)


def collect(store: Store, oslayer: OSLayer, lock: Path | None = None, datastore: str | None = None
            ) -> NodeStatus:
    """What is on this data dir and in use on this host. `lock`: the lock file whose holder
    is the driver to name (default <data-dir>/.driver.lock, node-local mode; in shared mode
    this node's nodes/<node-id>.lock); `datastore`: the datastore's name in shared mode."""
    mounts = oslayer.mounts()
    data_fs = filesystem_of(store.data_dir, mounts)
    return NodeStatus(
        data_dir=str(store.data_dir),
        data_fs_type=data_fs.fstype if data_fs is not None else "unknown",
        volumes=[object_status(e, oslayer, mounts) for e in store.volumes.entries()],
        snapshots=[object_status(e, oslayer, mounts) for e in store.snapshots.entries()],
        totals=store_totals(store),
        driver=DataDirLock(lock or store.data_dir / LOCK_FILE).holder(),
        datastore=datastore)
