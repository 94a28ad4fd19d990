"""Volume group snapshot records on disk.

A group is one directory, `<data-dir>/group-snapshots/<group-id>/meta.json`, naming its
member snapshots. The members are ordinary snapshots under `snapshots/` (restorable,
listed), each carrying the group's id in its own meta.json. The record's rename into
place is the moment the group exists; its rename out (to a trash name) the moment it no
longer does. So at any instant a group id is in one of three states, read from the
directory alone:

- committed: `group-snapshots/<id>/` is there;
- pending: a `.tmp-<id>.<8 hex>` (being created) or `.trash-<id>.<8 hex>` (being deleted)
  directory is there; its members are not shown to anyone, and start-up recovery removes
  them (csi_driver.volumes.groupsnapshots);
- absent: neither. A snapshot that names an absent group lost its record by some other
  hand; it is kept and served as a standalone snapshot rather than hidden for good.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .store import META, TMP_PREFIX, TRASH_PREFIX, Meta, _fsync_dir, _remove_tree, check_id, write_atomic

log = logging.getLogger(__name__)

GROUPS_DIR = "group-snapshots"
"""Under the data dir."""


@dataclass(frozen=True)
class Member:
    snapshot_id: str
    source_volume_id: str


@dataclass
class GroupMeta:
    """Contents of a group's meta.json."""

    name: str
    members: list[Member] = field(default_factory=list)
    """In the order the volumes were frozen (sorted by volume id)."""
    parameters: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    """Unix time of the cut: every member's filesystem was frozen at this moment."""
    node_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> GroupMeta:
        raw = json.loads(text)
        members = [Member(str(m["snapshot_id"]), str(m["source_volume_id"])) for m in raw.get("members", [])]
        return cls(name=str(raw["name"]), members=members, parameters=dict(raw.get("parameters", {})),
                   created=float(raw.get("created", 0.0)), node_id=str(raw.get("node_id", "")))


@dataclass(frozen=True)
class GroupEntry:
    """A committed group found on disk."""

    id: str
    path: Path
    meta: GroupMeta

    @property
    def snapshot_ids(self) -> list[str]:
        return [m.snapshot_id for m in self.meta.members]

    @property
    def source_ids(self) -> list[str]:
        return [m.source_volume_id for m in self.meta.members]


@dataclass(frozen=True)
class Membership:
    """Which group ids were committed, and which pending, at one moment."""

    committed: frozenset[str]
    pending: frozenset[str]

    def group_of(self, meta: Meta) -> str | None:
        """The group a snapshot is shown as part of: the group's id when it is committed,
        "" when the snapshot stands alone (cut alone, or its group's record is gone), None
        while its group is being created or deleted (the snapshot is not shown)."""
        group = meta.group_snapshot_id
        if not group or (group not in self.committed and group not in self.pending):
            return ""
        return group if group in self.committed else None


@dataclass(frozen=True)
class Unfinished:
    """A group whose creation or deletion a crash interrupted."""

    group_id: str
    path: Path
    deleting: bool
    """True for a record renamed to the trash (being deleted), False for one being made."""
    meta: GroupMeta | None
    """None when the crash came before the record was written (no member was made yet)."""


def _pending_id(name: str) -> str:
    """The group id in a `.tmp-<id>.<hex>` or `.trash-<id>.<hex>` name."""
    for prefix in (TMP_PREFIX, TRASH_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):].rpartition(".")[0]
    return ""


class GroupRecords:
    """The group-snapshots/ directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, group_id: str) -> Path:
        return self.root / check_id(group_id, "group_snapshot_id")

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.root)
        except FileNotFoundError:
            return []

    def ids(self) -> list[str]:
        """Sorted ids of committed groups."""
        return sorted(n for n in self._names() if not n.startswith(".") and (self.root / n).is_dir())

    def get(self, group_id: str) -> GroupEntry | None:
        path = self.path(group_id)
        meta = self._read(path)
        return GroupEntry(group_id, path, meta) if meta is not None else None

    def _read(self, path: Path) -> GroupMeta | None:
        try:
            return GroupMeta.from_json((path / META).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, TypeError, KeyError) as exc:
            # Its members are then served as standalone snapshots: kept, never hidden.
            log.error("group snapshot record %s is unreadable (%s); its members stand alone", path, exc)
            return None

    def membership(self) -> Membership:
        committed, pending = set(), set()
        for name in self._names():
            if name.startswith("."):
                if group := _pending_id(name):
                    pending.add(group)
            else:
                committed.add(name)
        return Membership(frozenset(committed), frozenset(pending))

    # -- creation: begin, write, commit (or discard) ------------------------------------

    def begin(self, group_id: str) -> Path:
        """A temporary directory for the group's record; while it exists the group is
        pending and its members are hidden."""
        self.path(group_id)
        tmp = self.root / f"{TMP_PREFIX}{group_id}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        _fsync_dir(self.root)  # recovery must find it if a member outlives a crash
        return tmp

    def write(self, tmp: Path, meta: GroupMeta) -> None:
        """Write the record (durably) into the temporary directory, before any member is
        renamed into place: recovery reads it to find them."""
        write_atomic(tmp / META, meta.to_json())

    def commit(self, tmp: Path, group_id: str) -> GroupEntry:
        final = self.path(group_id)
        meta = self._read(tmp)
        if meta is None:
            raise FileNotFoundError(f"{tmp / META} was not written")
        os.rename(tmp, final)
        _fsync_dir(self.root)
        return GroupEntry(group_id, final, meta)

    def discard(self, tmp: Path) -> None:
        _remove_tree(tmp, ignore_errors=True)

    # -- deletion: to the trash, then gone ----------------------------------------------

    def start_delete(self, group_id: str) -> Path | None:
        """Rename the record out of place (the group no longer exists; its members are
        hidden until removed). None when it was not there."""
        trash = self.root / f"{TRASH_PREFIX}{group_id}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path(group_id), trash)
        except FileNotFoundError:
            return None
        _fsync_dir(self.root)
        return trash

    def finish_delete(self, trash: Path) -> None:
        _remove_tree(trash, ignore_errors=True)
        _fsync_dir(self.root)

    def unfinished(self) -> list[Unfinished]:
        """Records of creations and deletions a crash interrupted (only meaningful at
        start-up, when no call is running)."""
        out = []
        for name in sorted(self._names()):
            group = _pending_id(name)
            if not group:
                continue
            path = self.root / name
            out.append(Unfinished(group, path, name.startswith(TRASH_PREFIX), self._read(path)))
        return out
