"""Who holds what on a shared datastore, read straight from its records and locks (for
`thinloopctl datastore ...`), and the operator's release of a fenced node's attachment.
Reading takes no lock (F_OFD_GETLK only asks); nothing here imports the CSI faces."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..volumes.datastore import imagelock
from ..volumes.datastore.records import MARKER, Datastore, DatastoreError, read_marker
from ..volumes.store import IMAGE


@dataclass
class VolumeHolding:
    """One volume: the permission (attachment record), the fence (image lock), and what
    the nodes say they have (holder records)."""

    volume: str
    attached_to: list[str] = field(default_factory=list)
    """node (read-write|read-only, generation N) per attachment."""
    lock: str = imagelock.FREE
    """free, shared or exclusive, as seen through this host's client."""
    holders: list[str] = field(default_factory=list)
    """node (device, since) per holder record."""
    note: str = ""
    """What does not add up, if anything."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeStatus:
    node: str
    host: str
    pid: int
    state: str
    heartbeat_age_seconds: float
    alive: bool
    """Beating recently and holding its node-id lock."""
    lock: str
    attached: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_datastore(data_dir: Path) -> Datastore:
    """The datastore whose marker is in data_dir (no name needed: the marker has it)."""
    name = read_marker(data_dir)
    if name is None:
        raise DatastoreError(f"{data_dir} is not a thinloop datastore (no {MARKER}); pass --data-dir")
    return Datastore.open(name, data_dir)


def _since(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "?"


def holdings(ds: Datastore) -> list[VolumeHolding]:
    volumes_root = ds.root / "volumes"
    ids = sorted(p.name for p in volumes_root.iterdir() if not p.name.startswith(".")) \
        if volumes_root.is_dir() else []
    records = {r.volume_id: r for r in ds.attachments.all()}
    held: dict[str, list[str]] = {}
    held_nodes: dict[str, set[str]] = {}
    for h in ds.holders.all():
        held.setdefault(h.volume_id, []).append(
            f"{h.node_id} ({h.device or '?'}, {'read-only' if h.readonly else 'read-write'}, since {_since(h.since)})")
        held_nodes.setdefault(h.volume_id, set()).add(h.node_id)
    out = []
    for vid in ids:
        rec = records.get(vid)
        row = VolumeHolding(vid)
        if rec is not None:
            row.attached_to = [f"{n} ({'read-only' if a.readonly else 'read-write'}, generation {a.generation})"
                               for n, a in sorted(rec.nodes.items())]
        try:
            row.lock = imagelock.path_lock_state(volumes_root / vid / IMAGE)
        except FileNotFoundError:
            row.lock = "no image"
        row.holders = held.get(vid, [])
        attached = set(rec.nodes) if rec is not None else set()
        holding = held_nodes.get(vid, set())
        if row.lock == imagelock.FREE and holding:
            row.note = "holder records but no lock: stale records (that node rebooted?) or a lost lock"
        elif row.lock != imagelock.FREE and not holding:
            row.note = "locked by a client no holder record names"
        elif holding - attached:
            row.note = f"held by {', '.join(sorted(holding - attached))} without an attachment (released while held)"
        out.append(row)
    return out


def nodes(ds: Datastore) -> list[NodeStatus]:
    attached: dict[str, int] = {}
    for rec in ds.attachments.all():
        for n in rec.nodes:
            attached[n] = attached.get(n, 0) + 1
    now = time.time()
    out = []
    for r in ds.nodes.all():
        lock = ds.nodes.lock_state(r.node_id)
        out.append(NodeStatus(r.node_id, r.host, r.pid, r.state, round(r.age(now), 1),
                              r.fresh(now) and lock != imagelock.FREE, lock, attached.get(r.node_id, 0)))
    return out


class ReleaseRefused(Exception):
    """The release would not be safe; the message says why."""


def release(ds: Datastore, volume_id: str, node_id: str) -> list[str]:
    """Remove node_id's attachment of volume_id and its holder record, for an operator who
    has fenced that node (powered off, or cut from the datastore). Refused while the node's
    driver still holds its node-id lock or a client still holds the image lock: that node
    (or someone) is still connected to the datastore, so it is not fenced."""
    if ds.nodes.lock_state(node_id) != imagelock.FREE:
        raise ReleaseRefused(f"node {node_id}'s driver still holds its lock on the datastore "
                             f"({ds.nodes.lock_path(node_id)}): it is running and connected, not fenced")
    image = ds.root / "volumes" / volume_id / IMAGE
    state = imagelock.path_lock_state(image) if image.exists() else imagelock.FREE
    if state != imagelock.FREE:
        who = ds.holders.describe(volume_id) or "a client no holder record names"
        raise ReleaseRefused(f"the image of {volume_id} is still locked ({state}) through the datastore by "
                             f"{who}: a client that holds it is still connected, so it is not fenced")
    done = []
    if ds.attachments.unpublish(volume_id, node_id):
        done.append(f"removed the attachment of {volume_id} to {node_id}")
    if any(h.node_id == node_id for h in ds.holders.of_volume(volume_id)):
        ds.holders.remove(volume_id, node_id)
        done.append(f"removed {node_id}'s holder record of {volume_id}")
    return done or [f"{volume_id} was not attached to {node_id}: nothing to release"]
