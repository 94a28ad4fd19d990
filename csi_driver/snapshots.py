"""Snapshots: a sparse (or reflinked) copy of a volume's image, taken with the volume's
filesystem frozen when it is mounted, so the copy is filesystem-consistent."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import failpoints
from .errors import AlreadyExists, NotFound, ResourceExhausted
from .store import Entry, Meta, Store
from .volumes import Volumes

log = logging.getLogger(__name__)


class Snapshots:
    def __init__(self, store: Store, volumes: Volumes) -> None:
        self.store = store
        self.volumes = volumes
        self.os = volumes.os

    def get(self, snap_id: str) -> Entry:
        entry = self.store.snapshots.get(snap_id)
        if entry is None:
            raise NotFound(f"snapshot {snap_id} does not exist in {self.volumes.where}")
        return entry

    def create(self, snap_id: str, source_id: str) -> Entry:
        existing = self.store.snapshots.get(snap_id)
        if existing is not None:
            if existing.meta.source_id != source_id:
                raise AlreadyExists(
                    f"snapshot {snap_id} already exists for volume {existing.meta.source_id}")
            return existing
        source = self.volumes.get(source_id)
        need = source.allocated_bytes()
        free = self.store.free_bytes()
        if need > free:
            raise ResourceExhausted(f"snapshot of {source_id} needs {need} bytes; {free} free")
        meta = Meta(name=snap_id, kind="snapshot", fs_type=source.meta.fs_type, diskformat="thin",
                    source_kind="volume", source_id=source_id, created=time.time(),
                    node_id=self.volumes.settings.node_id,
                    parameters={k: v for k, v in source.meta.parameters.items() if k == "access_type"})
        started = time.monotonic()
        entry = self.store.snapshots.create(snap_id, meta, lambda image: self._copy(source, image))
        log.info("snapshot %s of %s: %d bytes allocated, %.2fs", snap_id, source_id,
                 entry.allocated_bytes(), time.monotonic() - started)
        return entry

    def _copy(self, source: Entry, image: Path) -> None:
        self.volumes.copy_consistent(source, image)
        failpoints.hit("snapshot.after_copy")

    def delete(self, snap_id: str) -> None:
        if self.store.snapshots.delete(snap_id):
            log.info("deleted snapshot %s", snap_id)
