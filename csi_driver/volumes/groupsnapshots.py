"""Volume group snapshots: one point in time across several volumes of this node (or of
one datastore, in shared mode).

Every member volume whose filesystem is mounted here is frozen, in the order of the
volume ids (so two calls over overlapping volumes never wait on each other), every
member's image is copied (a reflink where the host filesystem can, a sparse copy
otherwise: the OS layer's copy_image, as for single snapshots) while they all stay frozen,
and then all are thawed. Each copy becomes an ordinary snapshot (restorable, listed) that
names its group; the group's record (csi_driver.volumes.grouprecords) ties them together.

The steps and what a failure or crash at each leaves (failpoint names in brackets):

1. the group's temporary record directory and one temporary directory per member;
2. freeze all [group.after_freeze]; copy each [group.while_frozen, after the first copy];
   thaw all [group.after_thaw]; fsync each copy;
3. the group record written into its temporary directory [group.after_record];
4. each member's metadata written and renamed into place [group.after_member, after each];
5. the record renamed into place [group.before_commit comes just before]: the group exists.

A failure at any step thaws what was frozen and removes every member made so far and the
temporary record. A crash leaves frozen filesystems (thawed at start-up by the server's
recovery), temporary directories (removed), and possibly members already renamed into place
whose group is still pending: hidden from every call, and removed at start-up by `recover`
using the pending record. Deletion renames the record to the trash first
[group.delete.after_rename], then removes the members [group.delete.after_member], then
the record; a crash part way is finished at start-up.

Raw block members cannot be frozen: their copies are only as consistent as their writer
keeps the device (the README says so).

Shared mode (a datastore): the members are any volumes of the datastore, and each is held
as its single snapshot would be (Volumes.frozen): a member attached here is frozen here; one
attached nowhere or read-only is held under a shared image lock for the copies; one another
node has attached read-write is frozen by that node at this driver's request
(csi_driver.volumes.datastore.freeze: all requests written in the order of the volume ids and all answered
before anything is frozen here or copied). A node that cannot freeze, or that thawed before
the copies were done, fails the whole call (UNAVAILABLE, naming it) and every copy is
removed, as for any failure.
"""

from __future__ import annotations

import logging
import time
from _blake2 import blake2b
from dataclasses import dataclass
from pathlib import Path

from .. import failpoints
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .grouprecords import GroupEntry, GroupMeta, GroupRecords, Member
from .snapshots import Snapshots
from .store import IMAGE, Entry, check_id, fsync_path

log = logging.getLogger(__name__)

MAX_ID = 128


def member_id(group_id: str, volume_id: str) -> str:
    """The snapshot id of a group's member for one volume: `<group>-<volume>`, or, when
    that is longer than an id may be, the group id cut short and a hash of both."""
    plain = f"{group_id}-{volume_id}"
    if len(plain) <= MAX_ID:
        return plain
    digest = blake2b(plain.encode(), digest_size=8).hexdigest()
    return f"{group_id[:MAX_ID - len(digest) - 1]}-{digest}"


@dataclass(frozen=True)
class GroupSnapshot:
    """A committed group and its members as found now (None for a member that is gone)."""

    entry: GroupEntry
    members: list[tuple[Member, Entry | None]]

    @property
    def ready_to_use(self) -> bool:
        return all(e is not None for _, e in self.members)


class GroupSnapshots:
    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots
        self.volumes = snapshots.volumes
        self.records: GroupRecords = snapshots.groups
        self.node_id = self.volumes.settings.node_id

    # -- reading --------------------------------------------------------------------------

    def get(self, group_id: str) -> GroupSnapshot:
        entry = self.records.get(group_id)
        if entry is None:
            raise NotFound(f"volume group snapshot {group_id} does not exist in {self.volumes.where}")
        return self._with_members(entry)

    def _with_members(self, entry: GroupEntry) -> GroupSnapshot:
        members: list[tuple[Member, Entry | None]] = []
        for m in entry.meta.members:
            snap = self.snapshots.store.snapshots.get(m.snapshot_id)
            if snap is None or snap.meta.group_snapshot_id != entry.id:
                log.error("volume group snapshot %s: member snapshot %s is missing", entry.id, m.snapshot_id)
                snap = None
            members.append((m, snap))
        return GroupSnapshot(entry, members)

    @staticmethod
    def check_snapshot_ids(group: GroupEntry, snapshot_ids: list[str]) -> None:
        """A caller that names the members must name exactly them: INVALID_ARGUMENT
        otherwise (CSI spec, Get/DeleteVolumeGroupSnapshot errors: snapshot list
        mismatch). An empty list names nothing and is not checked."""
        if snapshot_ids and sorted(set(snapshot_ids)) != sorted(group.snapshot_ids):
            raise InvalidArgument(
                f"snapshot_ids {sorted(set(snapshot_ids))} do not match the members of volume group "
                f"snapshot {group.id}: {sorted(group.snapshot_ids)}")

    # -- creating -------------------------------------------------------------------------

    def create(self, group_id: str, volume_ids: list[str], parameters: dict[str, str]) -> GroupSnapshot:
        """Cut the group, or return it when it already exists for the same volumes and
        parameters. `volume_ids` must be distinct and already checked. Errors:
        ALREADY_EXISTS (same name, other volumes or parameters; or a member's snapshot id
        is taken), NOT_FOUND (no volume is on this node), FAILED_PRECONDITION (some are,
        some are not: all must be on this node), RESOURCE_EXHAUSTED (no room)."""
        existing = self.records.get(group_id)
        if existing is not None:
            self._check_same(existing, volume_ids, parameters)
            return self._with_members(existing)
        sources = self._sources(volume_ids)
        members = [Member(member_id(group_id, s.id), s.id) for s in sources]
        taken = [m.snapshot_id for m in members if self.snapshots.store.snapshots.get(m.snapshot_id) is not None]
        if taken:
            raise AlreadyExists(f"snapshot id(s) {', '.join(taken)} of volume group snapshot {group_id} are "
                                "already taken by other snapshots; choose another name")
        need = sum(s.allocated_bytes() for s in sources)
        free = self.snapshots.store.free_bytes()
        if need > free:
            raise ResourceExhausted(f"volume group snapshot {group_id} needs {need} bytes; {free} free")
        started = time.monotonic()
        entry = self._cut(group_id, sources, members, parameters)
        log.info("volume group snapshot %s of %s: %.2fs", group_id, ", ".join(entry.source_ids),
                 time.monotonic() - started)
        return self._with_members(entry)

    @staticmethod
    def _check_same(existing: GroupEntry, volume_ids: list[str], parameters: dict[str, str]) -> None:
        problems = []
        if sorted(existing.source_ids) != sorted(volume_ids):
            problems.append(f"it holds volumes {', '.join(sorted(existing.source_ids))}")
        if existing.meta.parameters != parameters:
            problems.append("it was made with other parameters")
        if problems:
            raise AlreadyExists(f"volume group snapshot {existing.id} already exists and differs: "
                                f"{'; '.join(problems)}")

    def _sources(self, volume_ids: list[str]) -> list[Entry]:
        """The member volumes, sorted by id; all must be on this node (in shared mode: in
        this datastore)."""
        found = {v: self.volumes.store.volumes.get(v) for v in volume_ids}
        elsewhere = sorted(v for v, e in found.items() if e is None)
        where = self.volumes.where
        if elsewhere and len(elsewhere) == len(volume_ids):
            raise NotFound(f"volume(s) {', '.join(elsewhere)} do not exist in {where}")
        if elsewhere and self.volumes.datastore is not None:
            raise NotFound(f"volume(s) {', '.join(elsewhere)} do not exist in {where}: a volume group "
                           "snapshot is cut from volumes of one datastore")
        if elsewhere:
            here = sorted(v for v, e in found.items() if e is not None)
            raise FailedPrecondition(
                f"volume(s) {', '.join(elsewhere)} are not on node {self.node_id} (on another node, or "
                f"gone), while {', '.join(here)} are: a volume group snapshot is cut on one node, so all "
                "its volumes must be on that node")
        return [e for _, e in sorted(found.items()) if e is not None]

    def _cut(self, group_id: str, sources: list[Entry], members: list[Member],
             parameters: dict[str, str]) -> GroupEntry:
        snaps = self.snapshots.store.snapshots
        record = self.records.begin(group_id)
        tmps: dict[str, Path] = {}
        try:
            for m in members:
                tmps[m.snapshot_id] = snaps.begin(m.snapshot_id)
            with self.volumes.frozen(sources) as points:
                cut, frozen_at = time.time(), time.monotonic()
                failpoints.hit("group.after_freeze")
                for source, m in zip(sources, members, strict=True):
                    self.volumes.os.copy_image(source.image, tmps[m.snapshot_id] / IMAGE)
                    failpoints.hit("group.while_frozen")
            # Writers to every frozen member waited this long: the copies of all members.
            log.info("volume group snapshot %s: %s frozen for %.2fs", group_id,
                     ", ".join(points) or "nothing", time.monotonic() - frozen_at)
            failpoints.hit("group.after_thaw")
            for m in members:
                fsync_path(tmps[m.snapshot_id] / IMAGE)
            meta = GroupMeta(name=group_id, members=members, parameters=dict(parameters), created=cut,
                             node_id=self.node_id)
            self.records.write(record, meta)
            failpoints.hit("group.after_record")
            for source, m in zip(sources, members, strict=True):
                snaps.commit(tmps[m.snapshot_id], m.snapshot_id,
                             self.snapshots.meta_for(m.snapshot_id, source, cut, group_id))
                failpoints.hit("group.after_member")
            failpoints.hit("group.before_commit")
            return self.records.commit(record, group_id)
        except BaseException:
            self._remove_members(group_id, members)  # those already renamed into place
            for tmp in tmps.values():
                snaps.discard(tmp)
            self.records.discard(record)
            raise

    # -- deleting -------------------------------------------------------------------------

    def delete(self, group_id: str, snapshot_ids: list[str]) -> bool:
        """Delete the group and its members; False when it was not there. The record goes
        first (the group no longer exists), then the members, then the record itself."""
        entry = self.records.get(group_id)
        if entry is None:
            return False
        self.check_snapshot_ids(entry, snapshot_ids)
        trash = self.records.start_delete(group_id)
        if trash is None:
            return False
        failpoints.hit("group.delete.after_rename")
        for m in entry.meta.members:
            if self._remove_member(group_id, m):
                failpoints.hit("group.delete.after_member")
        self.records.finish_delete(trash)
        log.info("deleted volume group snapshot %s and its %d member(s)", group_id, len(entry.meta.members))
        return True

    def _remove_member(self, group_id: str, member: Member) -> bool:
        """Remove the member if it is in place and names this group."""
        snaps = self.snapshots.store.snapshots
        found = snaps.get(member.snapshot_id)
        return found is not None and found.meta.group_snapshot_id == group_id and snaps.delete(member.snapshot_id)

    def _remove_members(self, group_id: str, members: list[Member]) -> int:
        """Remove the members that are in place; say how many."""
        return sum(self._remove_member(group_id, m) for m in members)

    # -- start-up -------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish what a crash interrupted: a group being created is removed with the
        members already renamed into place; one being deleted loses its remaining members.
        Runs before any call is served. Says what was done."""
        actions = []
        for u in self.records.unfinished():
            removed = self._remove_members(u.group_id, u.meta.members) if u.meta is not None else 0
            self.records.finish_delete(u.path)
            what = "finished deleting" if u.deleting else "removed unfinished"
            actions.append(f"{what} volume group snapshot {u.group_id} ({removed} member(s) removed)")
        return actions


def check_volume_ids(volume_ids: list[str]) -> list[str]:
    """The request's source volume ids, checked: at least one, each a valid id, none twice.
    INVALID_ARGUMENT otherwise."""
    if not volume_ids:
        raise InvalidArgument("source_volume_ids is required")
    for v in volume_ids:
        check_id(v, "source_volume_id")
    twice = sorted({v for v in volume_ids if volume_ids.count(v) > 1})
    if twice:
        raise InvalidArgument(f"source_volume_ids names {', '.join(twice)} more than once")
    return list(volume_ids)
