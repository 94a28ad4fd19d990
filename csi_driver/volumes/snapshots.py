"""Snapshots: a sparse (or reflinked) copy of a volume's image, taken with the volume's
filesystem frozen when it is mounted, so the copy is filesystem-consistent."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .. import failpoints
from ..errors import Aborted, AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from .grouprecords import GROUPS_DIR, GroupRecords, Membership
from .lifecycle import Volumes, fs_type_of
from .store import Entry, Meta, Store

log = logging.getLogger(__name__)


class Snapshots:
    def __init__(self, store: Store, volumes: Volumes) -> None:
        self.store = store
        self.volumes = volumes
        self.os = volumes.os
        self.groups = GroupRecords(store.data_dir / GROUPS_DIR)

    def get(self, snap_id: str) -> Entry:
        """A snapshot that is shown: not a member of a group still being created or
        deleted (csi_driver.volumes.grouprecords)."""
        entry = self.store.snapshots.get(snap_id)
        if entry is None or self.group_of(entry) is None:
            raise NotFound(f"snapshot {snap_id} does not exist in {self.volumes.where}")
        return entry

    def group_of(self, entry: Entry, membership: Membership | None = None) -> str | None:
        """The volume group snapshot the snapshot is part of ("" for none; None while its
        group is being created or deleted). Read the entries before the membership: a
        member is renamed into place only while its group is pending or committed."""
        if not entry.meta.group_snapshot_id:
            return ""
        return (membership or self.groups.membership()).group_of(entry.meta)

    def create(self, snap_id: str, source_id: str) -> Entry:
        existing = self.store.snapshots.get(snap_id)
        if existing is not None:
            if existing.meta.group_snapshot_id and self.group_of(existing) != "":
                raise AlreadyExists(f"snapshot {snap_id} is a member of volume group snapshot "
                                    f"{existing.meta.group_snapshot_id}; choose another name")
            if existing.meta.source_id != source_id:
                raise AlreadyExists(
                    f"snapshot {snap_id} already exists for volume {existing.meta.source_id}")
            return existing
        source = self.volumes.get(source_id)
        need = source.allocated_bytes()
        free = self.store.free_bytes()
        if need > free:
            raise ResourceExhausted(f"snapshot of {source_id} needs {need} bytes; {free} free")
        meta = self.meta_for(snap_id, source, time.time())
        started = time.monotonic()
        entry = self.store.snapshots.create(snap_id, meta, lambda image: self._copy(source, image))
        log.info("snapshot %s of %s: %d bytes allocated, %.2fs", snap_id, source_id,
                 entry.allocated_bytes(), time.monotonic() - started)
        return entry

    def meta_for(self, snap_id: str, source: Entry, created: float, group_snapshot_id: str = "") -> Meta:
        """The metadata of a snapshot of `source` cut at `created` (Unix time): what a
        snapshot carries from its volume is the filesystem and access type of its bytes,
        and a filesystem growth still owed (the image is larger than its filesystem: a
        restore must grow it too). It is a sparse copy whatever the source's diskformat:
        a restore or clone follows its own."""
        return Meta(name=snap_id, kind="snapshot", fs_type=fs_type_of(source, self.os), diskformat="thin",
                    requested_bytes=source.size_bytes(), needs_fs_grow=source.meta.needs_fs_grow,
                    source_kind="volume", source_id=source.id, created=created,
                    node_id=self.volumes.settings.node_id,
                    parameters={k: v for k, v in source.meta.parameters.items() if k == "access_type"},
                    group_snapshot_id=group_snapshot_id)

    def _copy(self, source: Entry, image: Path) -> None:
        self.volumes.copy_consistent(source, image)
        failpoints.hit("snapshot.after_copy")

    def delete(self, snap_id: str) -> None:
        """Delete a standalone snapshot. A member of a volume group snapshot is deleted
        only with its group: INVALID_ARGUMENT (CSI spec, DeleteSnapshot errors)."""
        entry = self.store.snapshots.get(snap_id)
        if entry is not None and entry.meta.group_snapshot_id:
            group = self.group_of(entry)
            if group:
                raise InvalidArgument(
                    f"snapshot {snap_id} is part of volume group snapshot {group}: it is deleted with "
                    "its group (DeleteVolumeGroupSnapshot), not alone")
            if group is None:
                raise Aborted(f"volume group snapshot {entry.meta.group_snapshot_id} of snapshot {snap_id} "
                              "is being created or deleted")
        if self.store.snapshots.delete(snap_id):
            log.info("deleted snapshot %s", snap_id)
