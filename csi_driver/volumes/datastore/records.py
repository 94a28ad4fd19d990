"""The shared datastore's own records, beside its volumes and snapshots (shared mode).

Layout under the data dir, which is the datastore's mount (or a directory in it):

    datastore.json                     the marker: names the datastore
    nodes/<node-id>.json               a node driver's registration, rewritten every heartbeat
    nodes/<node-id>.lock               locked by that node's driver for as long as it runs
                                       (csi_driver.volumes.datalock: one line names the holder)
    controllers.lock                   a shared lock of every controller (csi_driver.volumes.datalock)
    attachments/<volume-id>.json       which node(s) may open the volume's image, and the
                                       generation (fencing token) each was given
    attachments/.lock                  one-byte locks around each read-modify-write
    holders/<volume-id>@<node-id>.json written by a node once it has the image attached

No absolute path is written anywhere, so the datastore may be mounted at different paths on
different hosts; what must be the same filesystem is checked with the marker. Every record is
replaced whole (temporary file, fsync, rename, directory fsync): a crash leaves the old one
or the new one. A read-modify-write of an attachment record holds a byte-range lock through
the shared filesystem, so two controllers (on two hosts) never interleave. A record that a
client's cache shows as a file the server has already replaced reads as ESTALE; reads retry.

The attachment record is the permission (ControllerPublishVolume writes it); the image lock
(csi_driver.volumes.datastore.imagelock) is the fence. Nothing here imports the CSI faces or the server.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from ...errors import Aborted, AlreadyExists, FailedPrecondition, Internal, NotFound, ResourceExhausted
from ...host.linux import parse_mountinfo
from ..datalock import DataDirLock, DataDirLocked, node_lock_path
from ..store import TMP_PREFIX, fsync_path, write_atomic
from . import imagelock

log = logging.getLogger(__name__)

MARKER = "datastore.json"
NODES = "nodes"
ATTACHMENTS = "attachments"
HOLDERS = "holders"
FORMAT = 1
GENERATION_KEY = "thinloop.csi.io/generation"
"""publish_context key of the fencing token: the attachment's generation number."""
ATTACHMENT_KEY = "thinloop.csi.io/attachment"
"""publish_context key naming the attachment record's incarnation (a volume deleted and
made again under the same name starts a new one, so an old token never matches)."""
RECORD_LOCK_SECONDS = 10.0
"""How long a read-modify-write waits for another controller's before ABORTED."""
STALE_BEATS = 3
"""A node record older than this many heartbeats is shown as stale."""
CLAIM_WAIT_SECONDS = 2.0
"""How long a starting node driver waits for its node-id lock (a crashed predecessor's
worker processes end a moment after it)."""
STALE_READ_SECONDS = 3.0
"""How long NodeStageVolume re-reads an attachment record older than its token."""

T = TypeVar("T")


class DatastoreError(Exception):
    """The datastore cannot be used as configured; one line for the operator."""


def _load(path: Path) -> dict[str, Any] | None:
    """A JSON record, None when absent. ESTALE (a cached name of a replaced file) is
    retried: the next lookup finds the new file."""
    for attempt in range(20):
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ESTALE or attempt == 19:
                raise
            time.sleep(0.01 * (attempt + 1))
            continue
        except ValueError as exc:
            raise Internal(f"{path} is not a valid record: {exc}") from None
        if not isinstance(raw, dict):
            raise Internal(f"{path} is not a valid record")
        return raw
    return None


def _build(cls: type[T], raw: dict[str, Any]) -> T:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in raw.items() if k in known})


def _save(path: Path, record: object) -> None:
    write_atomic(path, json.dumps(asdict(record), sort_keys=True, indent=1))  # type: ignore[call-overload]


def ensure_dir(path: Path) -> None:
    """Make `path`, a directory of the datastore's top level (nodes/, attachments/, holders/,
    freeze/), when missing, and only while the datastore is mounted: its marker must be
    beside it. With the datastore gone from under the data dir (unmounted, its client
    restarted), nothing is written to the host's own disk: FileNotFoundError (an OSError,
    which the heartbeat logs and a call reports)."""
    if path.is_dir():
        return
    marker = path.parent / MARKER
    if not marker.is_file():
        raise FileNotFoundError(errno.ENOENT, f"the datastore is not mounted there ({marker} is missing)",
                                str(path))
    path.mkdir(exist_ok=True)


def valid_node_id(node_id: str) -> bool:
    """Node ids become file names here: what --node-id accepts (csi_driver.serving.flags), and not
    a name the directory listing hides."""
    return 0 < len(node_id) <= 128 and not node_id.startswith(".") and \
        not any(c in node_id for c in "/\0\n")


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if not n.startswith("."))
    except FileNotFoundError:
        return []


def _every(root: Path, get: Callable[[str], T | None]) -> list[T]:
    """Every record <name>.json in root, by get(name)."""
    found = (get(name[:-5]) for name in _listdir(root) if name.endswith(".json"))
    return [rec for rec in found if rec is not None]


# -- the marker ---------------------------------------------------------------------------------

@dataclass
class Marker:
    datastore: str
    format: int = FORMAT
    created: float = 0.0
    created_by: str = ""


def read_marker(data_dir: Path) -> str | None:
    """The name of the datastore whose marker is in data_dir, None when there is none."""
    raw = _load(data_dir / MARKER)
    name = raw.get("datastore") if raw is not None else None
    return name if isinstance(name, str) else None


def is_mount_point(path: Path) -> bool:
    """Whether a filesystem is mounted at path itself (in this mount namespace): another
    device than its parent's, or a mount table entry there (a bind mount of the same
    filesystem keeps the device number)."""
    try:
        if os.path.ismount(path):
            return True
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return any(m.mount_point == real for m in parse_mountinfo(f.read()))
    except OSError:
        return False


def _write_marker(data_dir: Path, name: str, creator: str) -> bool:
    """Make the marker unless one exists (another controller's, made meanwhile): True when
    this call made it. Refuses a directory that already holds volumes or snapshots."""
    leftovers = [n for n in ("volumes", "snapshots") if _listdir(data_dir / n)]
    if leftovers:
        raise DatastoreError(
            f"{data_dir} holds {' and '.join(leftovers)} but no {MARKER}: it is not a datastore "
            f"this driver made; refusing to claim it as datastore {name!r}")
    tmp = data_dir / f"{TMP_PREFIX}{MARKER}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(asdict(Marker(name, FORMAT, time.time(), creator)), indent=1))
    try:
        os.link(tmp, data_dir / MARKER)  # never replaces one another controller made meanwhile
        made = True
    except FileExistsError:
        made = False
    finally:
        tmp.unlink()
    if made:
        fsync_path(data_dir, os.O_DIRECTORY)
    return made


def marker_problem(data_dir: Path, name: str, *, may_create: bool) -> str:
    """Why data_dir cannot be datastore `name` as it stands, "" when it can: the marker
    names it, or (may_create) there is none yet and data_dir is a mount point, where a
    controller makes it. Only reads (preflight asks this before anything starts)."""
    try:
        raw = _load(data_dir / MARKER)
    except (OSError, Internal) as exc:
        return f"cannot read {data_dir / MARKER}: {exc}"
    if raw is None:
        if not may_create:
            return (f"{data_dir} has no {MARKER}: the datastore {name!r} is not mounted there, or no "
                    "controller has made it a datastore yet (the controller makes the marker)")
        if not is_mount_point(data_dir):
            return (f"{data_dir} has no {MARKER} and is not a mount point: if the datastore is not "
                    f"mounted there, mount it; a controller makes the marker only on the datastore's "
                    f"mount itself, never on a directory of the local disk. A datastore in a directory "
                    f"of a mount is made once by hand: thinloopctl datastore init --data-dir {data_dir} "
                    f"--name {name}")
        return ""
    marker = _build(Marker, raw)
    if marker.datastore != name:
        return (f"{data_dir} is datastore {marker.datastore!r} (its {MARKER} says so), not {name!r}: "
                "every driver of one datastore must see the same filesystem")
    if marker.format != FORMAT:
        return f"{data_dir / MARKER} has format {marker.format}; this driver knows format {FORMAT}"
    return ""


def check_marker(data_dir: Path, name: str, *, may_create: bool, creator: str) -> str:
    """Check that the data dir is datastore `name` (marker_problem). A controller
    (may_create) makes the marker where there is none and the data dir is a mount point
    (the datastore's mount: a directory of the local disk under a missing mount is not
    one); a node never does. Returns what was done ("" or a line for the log); raises
    DatastoreError otherwise."""
    problem = marker_problem(data_dir, name, may_create=may_create)
    if problem:
        raise DatastoreError(problem)
    if read_marker(data_dir) is not None:
        return ""
    made = _write_marker(data_dir, name, creator)
    problem = marker_problem(data_dir, name, may_create=False)  # one made meanwhile must agree
    if problem:
        raise DatastoreError(problem)
    return f"made {data_dir / MARKER}: this data dir (a mount point) is datastore {name!r}" if made else ""


def init_marker(data_dir: Path, name: str, creator: str) -> str:
    """Make data_dir datastore `name` by hand (thinloopctl datastore init), mount point or
    not: the operator says it is the shared filesystem. Idempotent for the same name;
    DatastoreError for another name, or a directory holding volumes without a marker."""
    if not data_dir.is_dir():
        raise DatastoreError(f"{data_dir} is not a directory: mount the datastore there first")
    existing = read_marker(data_dir)
    if existing is None and _write_marker(data_dir, name, creator):
        return f"made {data_dir / MARKER}: {data_dir} is datastore {name!r}"
    problem = marker_problem(data_dir, name, may_create=False)
    if problem:
        raise DatastoreError(problem)
    return f"{data_dir} is datastore {name!r} already"


# -- nodes ----------------------------------------------------------------------------------------

@dataclass
class NodeRecord:
    """What a node driver says about itself, rewritten every heartbeat."""

    node_id: str
    datastore: str = ""
    host: str = ""
    pid: int = 0
    started: float = 0.0
    heartbeat: float = 0.0
    """Unix time of the last beat, by the writer's clock."""
    beats: int = 0
    interval: float = 10.0
    """Seconds between beats."""
    max_volumes_per_node: int = 0
    freeze_poll: float = 0.0
    """Seconds between the driver's reads of its freeze requests (csi_driver.volumes.datastore.freeze); 0: it
    serves none (a driver from before they existed)."""
    state: str = "running"
    """running, or stopped after a graceful shutdown."""

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat

    def fresh(self, now: float | None = None) -> bool:
        """Beating recently (clocks of the hosts assumed in step, as NTP keeps them)."""
        return self.state == "running" and self.age(now) < STALE_BEATS * self.interval


class NodeRegistry:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / NODES

    def record_path(self, node_id: str) -> Path:
        return self.root / f"{node_id}.json"

    def lock_path(self, node_id: str) -> Path:
        return node_lock_path(self.root.parent, node_id)

    def get(self, node_id: str) -> NodeRecord | None:
        raw = _load(self.record_path(node_id))
        return None if raw is None else _build(NodeRecord, raw)

    def all(self) -> list[NodeRecord]:
        return _every(self.root, self.get)

    def write(self, record: NodeRecord) -> None:
        ensure_dir(self.root)
        _save(self.record_path(record.node_id), record)

    def claim(self, node_id: str) -> DataDirLock:
        """Lock nodes/<node-id>.lock for this driver's life: the data-dir lock of
        csi_driver.volumes.datalock on this node's path (held, like node-local mode's, by the
        driver and the worker processes it forks). Two drivers with one node id would both
        think they own that node's attachments: the second one is refused, naming the
        first (DatastoreError)."""
        ensure_dir(self.root)
        lock = DataDirLock(self.lock_path(node_id))
        try:
            # A driver restarted right after a crash may find the old one's forked workers
            # a moment from their end (PR_SET_PDEATHSIG): give them that moment.
            lock.acquire(wait=CLAIM_WAIT_SECONDS)
        except DataDirLocked as exc:
            raise DatastoreError(node_in_use(node_id, exc.holder, self.lock_path(node_id))) from None
        except OSError as exc:
            raise DatastoreError(f"cannot lock {self.lock_path(node_id)}: {exc.strerror}: the datastore "
                                 "must honour byte-range locks (fcntl) for shared mode") from None
        return lock

    def holder(self, node_id: str) -> str | None:
        """Who holds node_id's lock ("pid <n> host <h> since <t>"), None when nobody does."""
        try:
            return DataDirLock(self.lock_path(node_id)).holder()
        except FileNotFoundError:
            return None

    def lock_state(self, node_id: str) -> str:
        return imagelock.FREE if self.holder(node_id) is None else imagelock.EXCLUSIVE


def node_in_use(node_id: str, holder: str, path: Path) -> str:
    """One line: another driver holds node_id's lock (preflight and the server say it)."""
    return (f"another driver with node id {node_id!r} is running on this datastore ({holder}): it holds "
            f"{path}; stop it, or give this one another node id")


class Heartbeat:
    """A node driver's registration: the node-id lock, and its record rewritten every
    `interval` seconds by a thread of the driver's own process."""

    def __init__(self, registry: NodeRegistry, record: NodeRecord) -> None:
        self.registry = registry
        self.record = record
        self._lock: DataDirLock | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_beat: list[Callable[[], None]] = []
        """Also run after every beat (in the heartbeat thread)."""

    def register(self) -> None:
        """Claim the node id and write the first record (no thread yet: call before the
        driver forks its worker spawner)."""
        self._lock = self.registry.claim(self.record.node_id)
        now = time.time()
        self.record.started, self.record.heartbeat, self.record.state = now, now, "running"
        self.record.host, self.record.pid = socket.gethostname(), os.getpid()
        self.registry.write(self.record)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.record.heartbeat = time.time()
        self.record.beats += 1
        self.registry.write(self.record)

    def _run(self) -> None:
        while not self._stop.wait(self.record.interval):
            try:
                self.beat()
            except OSError as exc:
                log.warning("heartbeat: cannot write %s: %s", self.registry.record_path(self.record.node_id),
                            exc)
            for hook in self.on_beat:
                try:
                    hook()
                except Exception:
                    log.exception("heartbeat hook failed")

    def stop(self) -> None:
        """Graceful shutdown: the record says stopped, the node-id lock is let go."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lock is not None:
            self.record.state = "stopped"
            try:
                self.registry.write(self.record)
            except OSError as exc:
                log.warning("cannot mark %s stopped: %s", self.record.node_id, exc)
            self._lock.release()
            self._lock = None


# -- attachments ------------------------------------------------------------------------------------

@dataclass
class NodeAttachment:
    readonly: bool = False
    generation: int = 0
    since: float = 0.0


@dataclass
class AttachmentRecord:
    volume_id: str
    incarnation: str = ""
    generation: int = 0
    """Raised by every change; a node's token is the generation its attachment was made at."""
    nodes: dict[str, NodeAttachment] = field(default_factory=dict)

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> AttachmentRecord:
        rec = _build(cls, raw)
        rec.nodes = {n: _build(NodeAttachment, a) for n, a in dict(rec.nodes).items()}  # type: ignore[arg-type]
        return rec

    def token(self, node_id: str) -> dict[str, str]:
        """The publish_context handed to node_id."""
        return {GENERATION_KEY: str(self.nodes[node_id].generation), ATTACHMENT_KEY: self.incarnation}

    def describe(self) -> str:
        return ", ".join(f"{n} ({'read-only' if a.readonly else 'read-write'}, generation {a.generation})"
                         for n, a in sorted(self.nodes.items())) or "no node"


class Attachments:
    def __init__(self, data_dir: Path, nodes: NodeRegistry, lock_timeout: float = RECORD_LOCK_SECONDS) -> None:
        self.root = data_dir / ATTACHMENTS
        self.nodes = nodes
        self.lock_timeout = lock_timeout

    def path(self, volume_id: str) -> Path:
        return self.root / f"{volume_id}.json"

    def get(self, volume_id: str) -> AttachmentRecord | None:
        raw = _load(self.path(volume_id))
        return None if raw is None else AttachmentRecord.from_raw(raw)

    def all(self) -> list[AttachmentRecord]:
        return _every(self.root, self.get)

    def published_nodes(self, volume_id: str) -> list[str]:
        rec = self.get(volume_id)
        return sorted(rec.nodes) if rec is not None else []

    @contextmanager
    def hold(self, volume_id: str, *extra_keys: str) -> Iterator[None]:
        """The volume's record lock (and extra keys'), across every host of the datastore,
        for a read-modify-write; ABORTED after lock_timeout seconds of waiting."""
        ensure_dir(self.root)
        try:
            with imagelock.keys_locked(self.root / ".lock", [f"vol:{volume_id}", *extra_keys],
                                       self.lock_timeout):
                yield
        except imagelock.LockHeld:
            raise Aborted(f"the attachment record of volume {volume_id} is being changed by another "
                          f"controller (waited {self.lock_timeout:g} s)") from None

    def _update(self, volume_id: str, change: Callable[[AttachmentRecord], bool],
                extra_keys: tuple[str, ...] = ()) -> AttachmentRecord:
        """Read, change and write back one record under its lock. `change` returns whether
        it changed anything (nothing is written otherwise)."""
        with self.hold(volume_id, *extra_keys):
            rec = self.get(volume_id) or AttachmentRecord(volume_id, uuid.uuid4().hex[:12])
            if change(rec):
                rec.generation += 1
                _save(self.path(volume_id), rec)
            return rec

    def publish(self, volume_id: str, node_id: str, *, readonly: bool, multi_node: bool,
                exists: Callable[[], bool] = lambda: True) -> AttachmentRecord:
        """Record that node_id may open the image (ControllerPublishVolume). Idempotent for
        the same node and mode; FAILED_PRECONDITION when a SINGLE_NODE_* volume is attached
        elsewhere, or when a writer and other nodes would meet; NOT_FOUND for a node that
        never registered, or a volume that `exists` (asked under the record's lock, which
        DeleteVolume also holds) says is gone; RESOURCE_EXHAUSTED past the node's
        max_volumes_per_node."""
        node = self.nodes.get(node_id) if valid_node_id(node_id) else None
        if node is None:
            raise NotFound(f"node {node_id[:128]!r} is not registered in this datastore (no {NODES}/<node>.json): "
                           "its driver has not started with this datastore mounted")

        def change(rec: AttachmentRecord) -> bool:
            if not exists():
                raise NotFound(f"volume {volume_id} does not exist")
            current = rec.nodes.get(node_id)
            if current is not None and current.readonly != readonly:
                raise AlreadyExists(
                    f"volume {volume_id} is already published to node {node_id} "
                    f"{'read-only' if current.readonly else 'read-write'}")
            others = {n: a for n, a in rec.nodes.items() if n != node_id}
            if others and not multi_node:
                raise FailedPrecondition(
                    f"volume {volume_id} is attached to {rec.describe()}; a single-node volume is "
                    "published to one node at a time (unpublish it there first)")
            if current is not None:
                return False  # the same node, the same mode: already published
            if others and (not readonly or any(not a.readonly for a in others.values())):
                raise FailedPrecondition(
                    f"volume {volume_id} is attached to {rec.describe()}; several nodes may only "
                    "attach it read-only, never beside a writer")
            if node.max_volumes_per_node > 0:
                count = sum(1 for r in self.all() if node_id in r.nodes and r.volume_id != volume_id)
                if count >= node.max_volumes_per_node:
                    raise ResourceExhausted(
                        f"node {node_id} already has {count} volumes attached, its limit "
                        f"(--max-volumes-per-node {node.max_volumes_per_node})")
            rec.nodes[node_id] = NodeAttachment(readonly, rec.generation + 1, time.time())
            return True

        rec = self._update(volume_id, change, (f"node:{node_id}",))
        log.info("volume %s published to node %s (%s, generation %d)", volume_id, node_id,
                 "read-only" if readonly else "read-write", rec.nodes[node_id].generation)
        return rec

    def unpublish(self, volume_id: str, node_id: str) -> bool:
        """Remove node_id's attachment (ControllerUnpublishVolume, or an operator's release);
        idempotent. Returns whether there was one."""
        removed: list[NodeAttachment] = []

        def change(rec: AttachmentRecord) -> bool:
            gone = rec.nodes.pop(node_id, None)
            if gone is not None:
                removed.append(gone)
            return gone is not None

        if not self.path(volume_id).exists():
            return False
        self._update(volume_id, change)
        if removed:
            log.info("volume %s unpublished from node %s", volume_id, node_id)
        return bool(removed)

    def remove(self, volume_id: str) -> None:
        """Forget a deleted volume's record (call holding hold(volume_id))."""
        self.path(volume_id).unlink(missing_ok=True)

    def check_stage(self, volume_id: str, node_id: str, publish_context: dict[str, str]) -> NodeAttachment:
        """The attachment that lets node_id stage the volume now: the record must name it,
        and the token in publish_context must be the one it was given (a token of an
        earlier attachment is stale: the volume has been unpublished since).

        Generations only grow, so a token newer than the record this node reads means the
        node's client still shows an older record (a network filesystem's cache): the read
        is repeated for up to STALE_READ_SECONDS before the token is judged."""
        given = publish_context.get(GENERATION_KEY, "")
        wanted = int(given) if given.isdigit() and len(given) < 19 else 0
        rec = self.get(volume_id)
        deadline = time.monotonic() + STALE_READ_SECONDS
        while wanted and (rec.generation if rec is not None else 0) < wanted and time.monotonic() < deadline:
            time.sleep(0.1)
            rec = self.get(volume_id)
        seen = rec.generation if rec is not None else 0
        if wanted > seen:
            raise FailedPrecondition(
                f"this node still reads generation {seen} of the attachment record of {volume_id}, older than "
                f"the token's {wanted}, after {STALE_READ_SECONDS:g} s: its datastore client serves stale "
                "files (for GlusterFS see the volume options in docs/shared-datastore.md")
        mine = rec.nodes.get(node_id) if rec is not None else None
        if rec is None or mine is None:
            where = f"; it is attached to {rec.describe()}" if rec is not None and rec.nodes else ""
            raise FailedPrecondition(
                f"volume {volume_id} is not published to node {node_id}{where}: "
                "ControllerPublishVolume to this node comes first")
        if not given:
            raise FailedPrecondition(
                f"the node call for {volume_id} carries no {GENERATION_KEY} in publish_context: "
                "pass what ControllerPublishVolume returned")
        if given != str(mine.generation) or publish_context.get(ATTACHMENT_KEY, "") != rec.incarnation:
            raise FailedPrecondition(
                f"stale fencing token for {volume_id}: publish_context says generation {given[:20]}, "
                f"the attachment record gives node {node_id} generation {mine.generation}")
        return mine


# -- holders -------------------------------------------------------------------------------------------

@dataclass
class Holder:
    """A node has the image attached (and its loop device holds the image lock)."""

    volume_id: str
    node_id: str
    readonly: bool = False
    generation: int = 0
    since: float = 0.0
    device: str = ""


class Holders:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / HOLDERS

    def path(self, volume_id: str, node_id: str) -> Path:
        return self.root / f"{volume_id}@{node_id}.json"

    def put(self, holder: Holder) -> None:
        ensure_dir(self.root)
        _save(self.path(holder.volume_id, holder.node_id), holder)

    def remove(self, volume_id: str, node_id: str) -> None:
        self.path(volume_id, node_id).unlink(missing_ok=True)

    def all(self) -> list[Holder]:
        out = []
        for name in _listdir(self.root):
            if name.endswith(".json") and "@" in name:
                raw = _load(self.root / name)
                if raw is not None:
                    out.append(_build(Holder, raw))
        return out

    def of_volume(self, volume_id: str) -> list[Holder]:
        prefix = f"{volume_id}@"
        out = []
        for name in _listdir(self.root):
            if name.startswith(prefix) and name.endswith(".json"):
                raw = _load(self.root / name)
                if raw is not None:
                    out.append(_build(Holder, raw))
        return out

    def describe(self, volume_id: str, but: str = "") -> str:
        """Who holds the volume, as far as the records tell ("" when none do)."""
        held = [h for h in self.of_volume(volume_id) if h.node_id != but]
        return ", ".join(
            f"node {h.node_id} ({'read-only' if h.readonly else 'read-write'}, attached "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(h.since))})" for h in held)


@dataclass
class Datastore:
    """The records of one datastore, by name, over the data dir."""

    name: str
    root: Path
    nodes: NodeRegistry
    attachments: Attachments
    holders: Holders

    @classmethod
    def open(cls, name: str, root: Path) -> Datastore:
        nodes = NodeRegistry(root)
        return cls(name, root, nodes, Attachments(root, nodes), Holders(root))

    def sweep_node_temp_files(self, node_id: str) -> list[str]:
        """A node's start-up, its node-id lock held: remove the temporary files of its own
        records (its node record, its holder records) that a crash left between write and
        rename. Nothing else writes them, and this driver writes none before it serves."""
        found = _temp_files(self.nodes.root, lambda name: name == f"{node_id}.json")
        found += _temp_files(self.holders.root, lambda name: name.endswith(f"@{node_id}.json"))
        return _remove_temp(found)

    def sweep_attachment_temp_files(self) -> list[str]:
        """A controller that starts alone: remove the temporary files of attachment records
        a crash left between write and rename, each under its record's lock (which every
        writer of the record holds while it writes: an operator's `datastore release` too)."""
        done = []
        for path, name in _temp_files(self.attachments.root, lambda name: name.endswith(".json")):
            with self.attachments.hold(name[:-len(".json")]):
                done += _remove_temp([(path, name)])
        return done

    def forget_volume(self, volume_id: str) -> None:
        """After DeleteVolume: its attachment record and any holder records."""
        self.attachments.remove(volume_id)
        for h in self.holders.of_volume(volume_id):
            self.holders.remove(volume_id, h.node_id)


def _temp_files(root: Path, wanted: Callable[[str], bool]) -> list[tuple[Path, str]]:
    """Temporary files of write_atomic in root (`.tmp-<record name>.<hex>`) whose record
    name `wanted` accepts, with that name."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    out = []
    for n in sorted(names):
        record, dot, suffix = n.removeprefix(TMP_PREFIX).rpartition(".")
        if n.startswith(TMP_PREFIX) and dot and len(suffix) == 8 and wanted(record):
            out.append((root / n, record))
    return out


def _remove_temp(found: list[tuple[Path, str]]) -> list[str]:
    done = []
    for path, record in found:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        done.append(f"removed {path.parent.name}/{path.name}, a write of {record} that a crash left unfinished")
    return done


def health(data_dir: Path, name: str) -> str:
    """Empty when the datastore is mounted here, is `name`, and takes writes; else the reason
    (NodeGetInfo then reports no datastore topology, Probe reports not ready)."""
    try:
        raw = _load(data_dir / MARKER)
    except (OSError, Internal) as exc:
        return f"datastore {name}: cannot read {data_dir / MARKER}: {exc}"
    if raw is None:
        return f"datastore {name} is not mounted at {data_dir} (no {MARKER})"
    if raw.get("datastore") != name:
        return f"{data_dir} is datastore {raw.get('datastore')!r}, not {name!r}"
    probe = data_dir / f".probe-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return f"datastore {name} at {data_dir} does not take writes: {exc.strerror}"
    return ""
