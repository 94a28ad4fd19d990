"""Freezing a filesystem on the node that has it attached, at the controller's request,
through the datastore (shared mode): what lets the controller snapshot, clone or group-snapshot
volumes that pods are using on other nodes.

The controller copies images through its own client of the datastore, but a filesystem can
only be frozen (FIFREEZE: Documentation/filesystems/vfs.rst, freeze_fs) where it is mounted,
and nothing but the datastore connects the controller to the nodes. So the two talk through
files in it, one directory per node (the node reads only its own):

    freeze/<node-id>/<volume-id>@<hex>.request   the controller's: volume, node, the attachment's
                                                 generation and incarnation, request id, how long
                                                 the node may hold the freeze
    freeze/<node-id>/<volume-id>@<hex>.ack       the node's answer: frozen (its staging mount),
                                                 synced (a raw block volume: nothing to freeze,
                                                 the device flushed), or refused (and why)
    freeze/<node-id>/<volume-id>@<hex>.thawed    the node's, written BEFORE it thaws early: the
                                                 hold expired, the controller went away, the
                                                 driver restarted or stopped

Every record is written whole (temporary file, fsync, rename, directory fsync). The request's
temporary file is locked by the controller (an exclusive OFD lock, csi_driver.volumes.datastore.imagelock) before
it is renamed into place, and stays locked until the controller withdraws the request: a
request whose lock is free has no controller any more (it died, or its client lost the
datastore), which a node sees through its own client without comparing clocks.

One freeze, as the controller runs it (FreezeClient.frozen):

1. check that the node's driver runs (its node-id lock is held) and serves freeze requests (its
   record has a poll period); write the request, locked;
2. wait for the ack, at most ACK_GRACE_SECONDS plus two of the node's poll periods (its driver
   stopping meanwhile fails at once); a refusal, or no answer, fails the call (UNAVAILABLE
   naming the node; FAILED_PRECONDITION when the node refuses for good) after withdrawing
   the request;
3. drop this host's cached pages of the image and copy (the caller's block);
4. check, in this order: (a) no `.thawed` record of the request; (b) the request and the ack are
   still in place; (c) the attachment record still gives that node the same generation.
   Any of them failing discards the copy: UNAVAILABLE, retried by the CO;
5. withdraw the request (unlink, then let go of its lock): the node thaws at its next poll,
   then removes its ack, which the controller waits for (as long as for the ack; a node
   that does not say so in time is logged, the copy stands).

Why (a) then (b) proves the copy was taken while frozen: the node writes `.thawed` before it
thaws early, and removes its `.thawed` and `.ack` only after the request is gone (withdrawn by
the controller, or removed by the node because its lock was free). If the controller sees no
`.thawed` at t1 and the request still in place at t2 > t1, the record was not written before t1
(it cannot have been written and removed, since the request was there all along), so the
thaw came after t1, which is after the last byte was copied. And the freeze came before the
copy began: the node acks only after FIFREEZE returned (the freeze flushed the filesystem
through the loop device to the datastore, REQ_OP_FLUSH reaching fsync of the image).

One freeze, as the node serves it (FreezeServer.poll, from a thread of the driver's first
process, every `poll_seconds`: one directory read when idle; every HELD_POLL_SECONDS while it
holds a freeze, so that the writers' pause ends soon after the copy):

- a new request with its lock held: take the volume's in-flight key (so NodeUnstage,
  NodeUnpublish and NodeExpand wait: ABORTED, retried by kubelet), check the attachment record
  (this node, the request's generation and incarnation, read-write) and the loop device, freeze
  the filesystem's staging mount (or flush a raw block device), write the ack;
- held: thaw when the request is gone (withdrawn: no record needed), or early, recording
  `.thawed` first, when its lock is free or the hold expired;
- a request whose lock is free and that it does not hold: removed (its controller is gone);
  its own `.ack` and `.thawed` of requests that are gone: removed.

Nothing here imports the CSI faces or the server.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ... import failpoints
from ...errors import Aborted, FailedPrecondition, Internal, InvalidArgument, Unavailable
from ...host.oslayer import OSLayer
from ...host.runner import CommandError
from ...settings import (
    DEFAULT_FREEZE_HOLD_SECONDS,
    DEFAULT_FREEZE_POLL_SECONDS,
    FREEZE_HELD_POLL_SECONDS,
    MAX_FREEZE_HOLD_SECONDS,
)
from ..inflight import InFlight
from ..store import IMAGE, TMP_PREFIX, Store, fsync_path
from . import imagelock
from .fencing import fence_of
from .records import Datastore, _build, _listdir, _load, _save, ensure_dir

log = logging.getLogger(__name__)

FREEZE_DIR = "freeze"
REQUEST, ACK, THAWED = ".request", ".ack", ".thawed"
FROZEN, SYNCED, REFUSED = "frozen", "synced", "refused"
"""What a node answers (the ack's state)."""

HOLD_EXPIRED, CONTROLLER_GONE, DRIVER_RESTARTED, DRIVER_STOPPED = (
    "hold_expired", "controller_gone", "driver_restarted", "driver_stopped")
AUTO_THAW_REASONS = (HOLD_EXPIRED, CONTROLLER_GONE, DRIVER_RESTARTED, DRIVER_STOPPED)
"""Why a node thawed before the request was withdrawn (the `.thawed` record's reason)."""
_WHY = {HOLD_EXPIRED: "the hold expired before the controller withdrew its request",
        CONTROLLER_GONE: "nothing holds the request's lock any more: its controller is gone",
        DRIVER_RESTARTED: "the node's driver restarted while the filesystem was frozen",
        DRIVER_STOPPED: "the node's driver was stopped while the filesystem was frozen"}

DEFAULT_POLL_SECONDS = DEFAULT_FREEZE_POLL_SECONDS
"""How often a node reads its freeze directory (--freeze-poll-seconds)."""
DEFAULT_HOLD_SECONDS = DEFAULT_FREEZE_HOLD_SECONDS
"""How long a node may keep a filesystem frozen for one request (--freeze-hold-seconds)."""
HELD_POLL_SECONDS = FREEZE_HELD_POLL_SECONDS
"""How often a node reads its freeze directory while it holds a freeze: the writers wait
until it sees the request withdrawn, so the pause ends soon after the copy."""
ACK_GRACE_SECONDS = 10.0
"""How long the controller waits for an ack, on top of two of the node's poll periods."""
_ACK_CHECK_SECONDS = 0.05
_ALIVE_CHECK_SECONDS = 1.0


@dataclass
class FreezeRequest:
    """What the controller asks of one node for one volume."""

    request_id: str
    volume_id: str
    node_id: str
    generation: int
    """The attachment's generation the controller read (the node's fencing token)."""
    incarnation: str
    hold_seconds: float
    """How long the node may keep the filesystem frozen, from when it froze it."""
    requested: float = 0.0
    """Unix time on the controller's host: for people, never compared across hosts."""
    controller: str = ""
    """host and pid of the controller, for people."""


@dataclass
class FreezeAck:
    request_id: str
    volume_id: str
    state: str
    """FROZEN, SYNCED or REFUSED."""
    mount_point: str = ""
    device: str = ""
    reason: str = ""
    """REFUSED: why, one line."""
    lasting: bool = False
    """REFUSED: true when asking again would be refused again (a retry will not help)."""
    at: float = 0.0


@dataclass
class ThawRecord:
    """Written by the node before it thaws early: the copy under way is not consistent."""

    request_id: str
    volume_id: str
    reason: str
    """One of AUTO_THAW_REASONS."""
    held_seconds: float = 0.0
    at: float = 0.0


@dataclass(frozen=True)
class Target:
    """A volume the controller needs frozen, and the node (and attachment) that can."""

    volume_id: str
    node_id: str
    generation: int
    incarnation: str
    image: Path


def node_dir(data_dir: Path, node_id: str) -> Path:
    return data_dir / FREEZE_DIR / node_id


def _request_locked(path: Path) -> bool | None:
    """Whether some open file (the controller's) holds the request's lock; None when the
    request is gone."""
    try:
        return imagelock.path_lock_state(path) != imagelock.FREE
    except FileNotFoundError:
        return None


def _split(names: Sequence[str]) -> tuple[set[str], set[str], set[str]]:
    """Request ids with a request, an ack, a thaw record, from one directory listing."""
    sets: dict[str, set[str]] = {REQUEST: set(), ACK: set(), THAWED: set()}
    for name in names:
        for suffix, ids in sets.items():
            if name.endswith(suffix):
                ids.add(name[:-len(suffix)])
    return sets[REQUEST], sets[ACK], sets[THAWED]


# -- the controller's side ------------------------------------------------------------------------

@dataclass
class _Sent:
    target: Target
    request_id: str
    dir: Path
    fd: int
    wait: float
    """Seconds the controller waits for the node's answer."""
    deadline: float
    ack: FreezeAck | None = None

    def path(self, suffix: str) -> Path:
        return self.dir / f"{self.request_id}{suffix}"

    def withdraw(self) -> None:
        """Remove the request, then let go of its lock: the node thaws at its next poll."""
        try:
            self.path(REQUEST).unlink(missing_ok=True)
        except OSError as exc:  # the lock going tells the node as much
            log.warning("cannot remove freeze request %s: %s", self.path(REQUEST), exc)
        finally:
            os.close(self.fd)


class FreezeClient:
    """The controller's side: ask the nodes that hold volumes to freeze them for a copy."""

    def __init__(self, datastore: Datastore, hold_seconds: float = DEFAULT_HOLD_SECONDS,
                 ack_grace: float = ACK_GRACE_SECONDS) -> None:
        self.datastore = datastore
        self.hold_seconds = hold_seconds
        self.ack_grace = ack_grace
        self.whoami = f"{socket.gethostname()} pid {os.getpid()}"

    def target(self, volume_id: str, image: Path) -> Target | None:
        """The node that has the volume attached read-write, by its attachment record;
        None when no record names exactly one writer (then no node can be asked)."""
        rec = self.datastore.attachments.get(volume_id)
        writers = [(n, a) for n, a in (rec.nodes.items() if rec is not None else []) if not a.readonly]
        if rec is None or len(writers) != 1:
            return None
        node, att = writers[0]
        return Target(volume_id, node, att.generation, rec.incarnation, image)

    @contextmanager
    def frozen(self, targets: Sequence[Target]) -> Iterator[None]:
        """Have every target frozen by its node for the block (requests written in the order
        of the volume ids, all acks awaited), then check that none was thawed early and
        withdraw the requests, however the block ends. UNAVAILABLE (naming the node) when a
        node's driver does not run, refuses for now or does not answer in time, or when a
        node thawed before the block ended (the copy made in it is then not consistent: the
        caller discards it); FAILED_PRECONDITION when the node refuses for good."""
        ordered = sorted(targets, key=lambda t: (t.volume_id, t.node_id))
        polls = [self._check_node(t) for t in ordered]
        sent: list[_Sent] = []
        try:
            for t, poll in zip(ordered, polls, strict=True):
                sent.append(self._send(t, poll))
            self._wait(sent)
            failpoints.hit("freeze.after_ack")
            for s in sent:
                self._drop_cache(s.target.image)
            yield
            self._verify(sent)
        finally:
            for s in reversed(sent):
                s.withdraw()
            self._await_thaws(sent)

    def _check_node(self, t: Target) -> float:
        """The node's freeze poll period (seconds), once its driver is seen to run and serve
        freeze requests; UNAVAILABLE otherwise."""
        nodes = self.datastore.nodes
        what = (f"volume {t.volume_id} is attached read-write to node {t.node_id}, which alone can freeze "
                "its filesystem for a consistent copy")
        if nodes.lock_state(t.node_id) == imagelock.FREE:
            raise Unavailable(f"{what}, but that node's driver is not running (nothing holds "
                              f"{nodes.lock_path(t.node_id).relative_to(self.datastore.root)}); retry once it "
                              "runs, or once the volume is detached")
        rec = nodes.get(t.node_id)
        if rec is None or rec.freeze_poll <= 0:
            raise Unavailable(f"{what}, but that node's driver does not serve freeze requests (its record "
                              "has no freeze poll period: an older version?); upgrade it, or snapshot the "
                              "volume while it is detached")
        return rec.freeze_poll

    def _send(self, t: Target, poll: float) -> _Sent:
        """Write the request through a temporary file locked before it is renamed into place,
        so that the request is never seen without its lock; the lock stays held by the
        returned descriptor. Nothing after the rename can fail: a request in place is always
        in `sent`, and so always withdrawn. UNAVAILABLE when a controller starting up removed
        the temporary file before it was locked (freeze.sweep: it looked abandoned)."""
        rid = f"{t.volume_id}@{uuid.uuid4().hex[:12]}"
        where = node_dir(self.datastore.root, t.node_id)
        request = FreezeRequest(rid, t.volume_id, t.node_id, t.generation, t.incarnation, self.hold_seconds,
                                time.time(), self.whoami)
        data = json.dumps(asdict(request), sort_keys=True, indent=1).encode()
        ensure_dir(where.parent)
        where.mkdir(exist_ok=True)
        tmp = where / f"{TMP_PREFIX}{rid}{REQUEST}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if not imagelock.try_lock(fd, exclusive=True):
                raise Internal(f"{tmp}: a file just made is locked by someone else")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            try:
                os.rename(tmp, where / f"{rid}{REQUEST}")
            except FileNotFoundError:
                raise Unavailable(f"the request to freeze volume {t.volume_id} was removed while it was being "
                                  "written (a controller starting up took it for abandoned); retry") from None
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        try:
            fsync_path(where, os.O_DIRECTORY)
        except OSError as exc:  # the rename stands; the node reads it through the server anyway
            log.warning("freeze %s: cannot fsync %s: %s", rid, where, exc)
        log.info("freeze %s: asked node %s to freeze volume %s (generation %d, hold %g s)", rid, t.node_id,
                 t.volume_id, t.generation, self.hold_seconds)
        wait = self.ack_grace + 2 * poll
        return _Sent(t, rid, where, fd, wait, time.monotonic() + wait)

    def _wait(self, sent: list[_Sent]) -> None:
        """Every ack, or the first reason to give up."""
        pending = list(sent)
        next_alive_check = time.monotonic() + _ALIVE_CHECK_SECONDS
        while pending:
            for s in list(pending):
                raw = _load(s.path(ACK))
                if raw is not None:
                    s.ack = _build(FreezeAck, raw)
                    pending.remove(s)
                    self._answered(s)
                elif time.monotonic() > s.deadline:
                    t = s.target
                    raise Unavailable(
                        f"node {t.node_id} did not answer the request to freeze volume {t.volume_id} within "
                        f"{s.wait:g} s (its driver holds its node "
                        "lock but does not read its freeze requests: stuck, or cut off from the datastore?); "
                        "the request is withdrawn")
            if not pending:
                break
            if time.monotonic() >= next_alive_check:
                next_alive_check = time.monotonic() + _ALIVE_CHECK_SECONDS
                for s in pending:
                    if self.datastore.nodes.lock_state(s.target.node_id) == imagelock.FREE:
                        raise Unavailable(f"node {s.target.node_id}'s driver stopped before it answered the "
                                          f"request to freeze volume {s.target.volume_id}; retry once it runs")
            time.sleep(_ACK_CHECK_SECONDS)

    def _await_thaws(self, sent: list[_Sent]) -> None:
        """After the withdrawal: wait (as long as for an ack) until every node that froze has
        thawed, which it says by removing its ack after the thaw, so that the call returns
        with the filesystems thawed and the nodes' in-flight keys let go, as a node-local
        snapshot does. A node that does not say so in time is logged, not failed: the copy
        does not depend on it (the node thaws at its next poll, or its restart does)."""
        waiting = [s for s in sent if s.ack is not None and s.ack.state in (FROZEN, SYNCED)]
        deadline = time.monotonic() + max((s.wait for s in waiting), default=0.0)
        try:
            while waiting:
                listed = {d: set(_listdir(d)) for d in {s.dir for s in waiting}}
                waiting = [s for s in waiting if f"{s.request_id}{ACK}" in listed[s.dir]
                           and self.datastore.nodes.lock_state(s.target.node_id) != imagelock.FREE]
                if not waiting or time.monotonic() > deadline:
                    break
                time.sleep(_ACK_CHECK_SECONDS)
        except OSError as exc:
            log.warning("cannot see whether the nodes thawed: %s", exc)
            return
        for s in waiting:
            log.warning("freeze %s: node %s has not said within %g s that it thawed volume %s; it does at its "
                        "next poll", s.request_id, s.target.node_id, s.wait, s.target.volume_id)

    @staticmethod
    def _answered(s: _Sent) -> None:
        ack, t = s.ack, s.target
        assert ack is not None
        if ack.state == REFUSED:
            message = f"node {t.node_id} refused to freeze volume {t.volume_id}: {ack.reason}"
            raise FailedPrecondition(message) if ack.lasting else Unavailable(message)
        if ack.state not in (FROZEN, SYNCED):
            raise Internal(f"node {t.node_id} answered {ack.state!r} to freeze request {s.request_id}")
        log.info("freeze %s: node %s %s volume %s%s", s.request_id, t.node_id, ack.state, t.volume_id,
                 f" ({ack.mount_point})" if ack.mount_point else f" ({ack.device}: raw block)")

    @staticmethod
    def _drop_cache(image: Path) -> None:
        """This host's cached pages of the image predate what the node wrote (csi_driver.volumes.datastore.imagelock)."""
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            imagelock.drop_cache(fd)
        finally:
            os.close(fd)

    def _verify(self, sent: list[_Sent]) -> None:
        """After the copy: (a) no thaw record, then (b) every request and ack still in place,
        then (c) the attachments unchanged (the module docstring says why in this order)."""
        dirs = sorted({s.dir for s in sent})
        listed = {d: set(_listdir(d)) for d in dirs}
        for s in sent:
            if f"{s.request_id}{THAWED}" in listed[s.dir]:
                raw = _load(s.path(THAWED))
                why = _WHY.get(str(raw.get("reason")), "") if raw is not None else ""
                raise Unavailable(f"node {s.target.node_id} thawed volume {s.target.volume_id} before the copy "
                                  f"was done ({why or 'it says so'}); the copy is discarded: retry")
        listed = {d: set(_listdir(d)) for d in dirs}
        for s in sent:
            gone = [x for x in (REQUEST, ACK) if f"{s.request_id}{x}" not in listed[s.dir]]
            if gone:
                raise Unavailable(f"the freeze of volume {s.target.volume_id} on node {s.target.node_id} ended "
                                  f"before the copy was done (its {' and '.join(g[1:] for g in gone)} went: this "
                                  "controller's lock on the request was lost?); the copy is discarded: retry")
        for s in sent:
            t = s.target
            rec = self.datastore.attachments.get(t.volume_id)
            att = rec.nodes.get(t.node_id) if rec is not None else None
            if rec is None or att is None or att.generation != t.generation or rec.incarnation != t.incarnation:
                raise Unavailable(f"the attachment of volume {t.volume_id} to node {t.node_id} changed during "
                                  "the copy; the copy is discarded: retry")


# -- the node's side --------------------------------------------------------------------------------

@dataclass
class _Held:
    request: FreezeRequest
    mount_point: str
    """The staging mount frozen; empty for a raw block volume (synced, nothing frozen)."""
    device: str
    since: float
    """time.monotonic() when the freeze began."""
    keys: ExitStack
    """The volume's in-flight key, held until the thaw."""
    thaw_reason: str | None = None
    """Set once a thaw was attempted and failed: the reason it was attempted with ("" when
    the request was withdrawn); every poll tries again until it works."""
    thaw_recorded: bool = False


@dataclass
class FreezeStats:
    served: dict[str, int] = field(default_factory=lambda: dict.fromkeys((FROZEN, SYNCED, REFUSED), 0))
    auto_thaws: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AUTO_THAW_REASONS, 0))


class FreezeServer:
    """The node's side: serve the freeze requests addressed to this node."""

    def __init__(self, node_id: str, datastore: Datastore, store: Store, oslayer: OSLayer, inflight: InFlight,
                 fenced: Mapping[str, str], poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self.node_id = node_id
        self.datastore = datastore
        self.dir = node_dir(datastore.root, node_id)
        self.store = store
        self.os = oslayer
        self.inflight = inflight
        self.fenced = fenced
        """Volumes this node does not serve (csi_driver.volumes.datastore.fencing): refused for good."""
        self.poll_seconds = poll_seconds
        self.held: dict[str, _Held] = {}
        self.stats = FreezeStats()
        self._busy: set[str] = set()
        """Requests whose volume's in-flight key was taken: tried again at the next poll."""
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- start and stop -------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Start-up, before the filesystems this node left frozen are thawed (the server's
        thaw_frozen): for every ack of a previous run of this driver whose request is still
        there, record the thaw first, so that a controller still copying discards its copy."""
        actions = []
        names = _listdir(self.dir)
        requests, acks, thawed = _split(names)
        for rid in sorted(acks):
            raw = _load(self.dir / f"{rid}{ACK}")
            ack = _build(FreezeAck, raw) if raw is not None else None
            if ack is not None and ack.state in (FROZEN, SYNCED) and rid in requests and rid not in thawed:
                self._record_thaw(rid, ack.volume_id, DRIVER_RESTARTED, 0.0)
                self.stats.auto_thaws[DRIVER_RESTARTED] += 1
                actions.append(f"freeze {rid}: recorded that volume {ack.volume_id} is thawed at start-up "
                               f"({ack.mount_point or ack.device}), before thawing it")
            elif rid not in requests:
                (self.dir / f"{rid}{ACK}").unlink(missing_ok=True)
        return actions

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="freeze-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(min(HELD_POLL_SECONDS, self.poll_seconds) if self.held else self.poll_seconds):
            try:
                self.poll()
            except Exception:
                log.exception("freeze: reading %s failed", self.dir)

    def stop(self) -> None:
        """Graceful shutdown: no more polls; whatever is held is thawed (recorded first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.poll_seconds))
        with self._mutex:
            for rid in sorted(self.held):
                self._thaw(rid, DRIVER_STOPPED)

    # -- one poll -----------------------------------------------------------------------

    def poll(self) -> None:
        """Read the freeze directory once and act on what it holds."""
        with self._mutex:
            names = _listdir(self.dir)  # the one read of an idle poll
            if not names and not self.held:
                return
            requests, acks, thawed = _split(names)
            for rid in sorted(self.held):
                path = self.dir / f"{rid}{REQUEST}"
                locked = _request_locked(path) if rid in requests else None
                pending_thaw = self.held[rid].thaw_reason
                if pending_thaw is not None:
                    self._thaw(rid, pending_thaw)
                elif locked is None:
                    self._thaw(rid, "")
                elif not locked:
                    self._thaw(rid, CONTROLLER_GONE)
                elif time.monotonic() - self.held[rid].since > self.held[rid].request.hold_seconds:
                    self._thaw(rid, HOLD_EXPIRED)
            for rid in sorted(requests):  # in the order of the volume ids
                if rid in self.held:
                    continue
                path = self.dir / f"{rid}{REQUEST}"
                locked = _request_locked(path)
                if locked is False:
                    path.unlink(missing_ok=True)  # its controller is gone; nothing of it is held here
                    log.info("freeze %s: removed the request, whose controller is gone", rid)
                    requests.discard(rid)
                elif locked and rid not in acks and rid not in thawed:
                    self._serve_or_refuse(rid, path)
            for rid in (acks | thawed) - requests - set(self.held):
                for suffix in (ACK, THAWED):
                    (self.dir / f"{rid}{suffix}").unlink(missing_ok=True)
                self._busy.discard(rid)

    def _serve_or_refuse(self, rid: str, path: Path) -> None:
        """Serve one request; one that cannot be read or checked is refused (for good when it
        cannot be read), so that it neither stops this poll nor comes back at every poll."""
        try:
            self._serve(rid, path)
        except Exception as exc:  # the next requests are served all the same
            log.exception("freeze %s: cannot serve the request", rid)
            if rid in self.held:
                return  # frozen: the held entry's polls end it
            lasting = isinstance(exc, (Internal, TypeError, ValueError))
            try:
                self._answer(FreezeAck(rid, rid.partition("@")[0], REFUSED, reason=f"the node could not serve "
                                       f"the request: {exc}", lasting=lasting, at=time.time()))
                self.stats.served[REFUSED] += 1
            except OSError as exc2:
                log.error("freeze %s: cannot answer the refusal either: %s", rid, exc2)

    def _serve(self, rid: str, path: Path) -> None:
        raw = _load(path)
        if raw is None:
            return
        req = _build(FreezeRequest, raw)
        keys = ExitStack()
        try:
            keys.enter_context(self.inflight.hold(f"vol:{req.volume_id}"))
        except Aborted:
            if rid not in self._busy:
                log.info("freeze %s: volume %s has an operation in flight on this node; trying again at the "
                         "next poll", rid, req.volume_id)
                self._busy.add(rid)
            return
        self._busy.discard(rid)
        try:
            refusal, lasting = self._check(req)
            if refusal:
                keys.close()
                self._answer(FreezeAck(rid, req.volume_id, REFUSED, reason=refusal, lasting=lasting, at=time.time()))
                self.stats.served[REFUSED] += 1
                log.warning("freeze %s: refused for volume %s: %s", rid, req.volume_id, refusal)
                return
            self._freeze(req, keys)
        except BaseException:
            keys.close()
            raise

    def _check(self, req: FreezeRequest) -> tuple[str, bool]:
        """Why the request cannot be served now ("" when it can), and whether for good."""
        vid = req.volume_id
        if req.node_id != self.node_id:
            return f"the request names node {req.node_id}, not this node {self.node_id}", True
        if not (0 < req.hold_seconds <= MAX_FREEZE_HOLD_SECONDS):
            return (f"hold_seconds {req.hold_seconds!r} is not a number of seconds above 0 and at most "
                    f"{MAX_FREEZE_HOLD_SECONDS:g}"), True
        fence = fence_of(self.fenced, vid, self.store, self.os)
        if fence:
            return f"volume {vid} is not served on this node: {fence}", True
        try:
            entry = self.store.volumes.get(vid)
        except InvalidArgument as exc:
            return str(exc), True
        if entry is None:
            return f"volume {vid} does not exist in datastore {self.datastore.name}", True
        rec = self.datastore.attachments.get(vid)
        mine = rec.nodes.get(self.node_id) if rec is not None else None
        if rec is None or mine is None or mine.generation != req.generation or rec.incarnation != req.incarnation:
            now = f"generation {mine.generation}" if mine is not None else "no attachment"
            return (f"the attachment record now gives this node {now}, not the request's generation "
                    f"{req.generation}: it changed since the controller read it"), False
        if mine.readonly:
            return "this node has the volume attached read-only: nothing to freeze", False
        return "", False

    def _freeze(self, req: FreezeRequest, keys: ExitStack) -> None:
        rid, vid = req.request_id, req.volume_id
        loop = self.os.find_loop(self.store.volumes.root / vid / IMAGE)
        if loop is None:
            keys.close()
            self._answer(FreezeAck(rid, vid, REFUSED, reason=f"volume {vid} is not attached on node {self.node_id} "
                                   "(detached since the controller looked)", at=time.time()))
            self.stats.served[REFUSED] += 1
            log.warning("freeze %s: refused: volume %s is not attached here", rid, vid)
            return
        point = next((m.mount_point for m in self.os.mounts() if m.major_minor == loop.major_minor and m.root == "/"),
                     "")
        try:
            if point:
                self.os.freeze(point)
            else:
                self.os.sync_device(loop.device)
        except (CommandError, OSError) as exc:
            keys.close()
            self._answer(FreezeAck(rid, vid, REFUSED, reason=f"cannot {'freeze ' + point if point else 'flush ' + loop.device}: "
                                   f"{exc}", at=time.time()))
            self.stats.served[REFUSED] += 1
            log.warning("freeze %s: refused for volume %s: %s", rid, vid, exc)
            return
        # The key is the held entry's from here on: whatever fails below, the entry's polls
        # thaw (request withdrawn or unlocked, or the hold expired) and only then let go.
        self.held[rid] = _Held(req, point, loop.device, time.monotonic(), keys.pop_all())
        state = FROZEN if point else SYNCED
        failpoints.hit("freeze.node.after_freeze")
        try:
            self._answer(FreezeAck(rid, vid, state, point, loop.device, at=time.time()))
        except OSError as exc:
            log.error("freeze %s: cannot write the ack: %s; thawing", rid, exc)
            self._thaw(rid, "")
            return
        self.stats.served[state] += 1
        if point:
            log.info("freeze %s: froze %s (volume %s, %s) for %s; holding it at most %g s", rid, point, vid,
                     loop.device, req.controller or "the controller", req.hold_seconds)
        else:
            log.info("freeze %s: flushed %s (volume %s: raw block, nothing to freeze) for %s; holding it at most "
                     "%g s", rid, loop.device, vid, req.controller or "the controller", req.hold_seconds)
        failpoints.hit("freeze.node.after_ack")
        if not (self.dir / f"{rid}{REQUEST}").exists():
            self._thaw(rid, "")  # withdrawn while this node froze: the controller gave up

    def _answer(self, ack: FreezeAck) -> None:
        _save(self.dir / f"{ack.request_id}{ACK}", ack)

    def _record_thaw(self, rid: str, volume_id: str, reason: str, held: float) -> None:
        _save(self.dir / f"{rid}{THAWED}", ThawRecord(rid, volume_id, reason, round(held, 3), time.time()))

    def _thaw(self, rid: str, reason: str) -> None:
        """Thaw what rid holds. Early (a reason given): the thaw record is written first, and
        then the ack is removed; if neither can be written the filesystem stays frozen and
        the next poll tries again (the datastore is then out of reach from here, and so is the
        volume's image: its writers would wait anyway). A thaw that fails keeps the entry,
        its in-flight key and its ack (the controller still sees it held, and the
        frozen-volumes gauge counts it) and is tried again at every poll."""
        h = self.held[rid]
        held = time.monotonic() - h.since
        what = h.mount_point or f"{h.device} (raw block)"
        if reason and not h.thaw_recorded:
            try:
                self._record_thaw(rid, h.request.volume_id, reason, held)
                h.thaw_recorded = True
            except OSError as exc:
                log.error("freeze %s: cannot record the early thaw: %s; removing the ack instead", rid, exc)
                try:
                    (self.dir / f"{rid}{ACK}").unlink(missing_ok=True)
                except OSError as exc2:
                    log.error("freeze %s: cannot remove the ack either (%s): %s stays frozen until the "
                              "datastore answers", rid, exc2, what)
                    return
        try:
            if h.mount_point:
                self.os.thaw(h.mount_point)
        except Exception as exc:  # kept, and tried again: nothing else would ever thaw it
            if h.thaw_reason is None:
                log.error("freeze %s: cannot thaw %s: %s; trying again at every poll (writers to volume %s "
                          "wait until then)", rid, h.mount_point, exc, h.request.volume_id)
            h.thaw_reason = reason
            return
        del self.held[rid]
        h.keys.close()
        if reason:
            self.stats.auto_thaws[reason] += 1
            log.warning("freeze %s: AUTO-THAW of %s (volume %s) after %.2f s: %s; recorded first, so the "
                        "controller discards its copy", rid, what, h.request.volume_id, held, _WHY[reason])
        else:
            with suppress(OSError):
                (self.dir / f"{rid}{ACK}").unlink(missing_ok=True)
            log.info("freeze %s: thawed %s (volume %s) after %.2f s: the controller withdrew its request", rid,
                     what, h.request.volume_id, held)


# -- cleanup and listing --------------------------------------------------------------------------------

def sweep(datastore: Datastore) -> list[str]:
    """A controller's start-up: remove requests whose lock is free (their controller is gone,
    whatever node they name), and, in the directory of a node whose driver is not running,
    its acks and thaw records of requests that are gone (a running node removes its own)."""
    actions = []
    root = datastore.root / FREEZE_DIR
    for node in _listdir(root):
        where = root / node
        running = datastore.nodes.lock_state(node) != imagelock.FREE
        names = sorted(os.listdir(where)) if where.is_dir() else []
        for name in names:
            if name.startswith(TMP_PREFIX) and name.endswith(REQUEST) and _request_locked(where / name) is False:
                (where / name).unlink(missing_ok=True)  # a controller died making it
        requests, acks, thawed = _split([n for n in names if not n.startswith(".")])
        for rid in sorted(requests):
            if _request_locked(where / f"{rid}{REQUEST}") is False:
                (where / f"{rid}{REQUEST}").unlink(missing_ok=True)
                requests.discard(rid)
                actions.append(f"removed freeze request {rid} to node {node}: its controller is gone")
        if not running:
            for rid in sorted((acks | thawed) - requests):
                for suffix in (ACK, THAWED):
                    (where / f"{rid}{suffix}").unlink(missing_ok=True)
                actions.append(f"removed node {node}'s answer to freeze request {rid}, which is gone "
                               "(that node's driver is not running)")
    return actions


@dataclass
class PendingFreeze:
    """One freeze request in the datastore, for thinloopctl."""

    node: str
    volume: str
    request_id: str
    state: str
    """waiting (no answer yet), frozen, synced, refused: <why>, thawed early: <reason>."""
    controller: str
    """host and pid, and whether it still holds the request's lock."""
    hold_seconds: float
    requested: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pending(datastore: Datastore) -> list[PendingFreeze]:
    """Every freeze request of the datastore with what its node answered."""
    out = []
    root = datastore.root / FREEZE_DIR
    for node in _listdir(root):
        where = root / node
        requests, acks, thawed = _split(_listdir(where))
        for rid in sorted(requests):
            raw = _load(where / f"{rid}{REQUEST}")
            if raw is None:
                continue
            req = _build(FreezeRequest, raw)
            state = "waiting"
            if rid in thawed:
                rec = _load(where / f"{rid}{THAWED}")
                state = f"thawed early: {rec.get('reason') if rec is not None else '?'}"
            elif rid in acks:
                ack_raw = _load(where / f"{rid}{ACK}")
                if ack_raw is not None:
                    ack = _build(FreezeAck, ack_raw)
                    state = f"refused: {ack.reason}" if ack.state == REFUSED else ack.state
            locked = _request_locked(where / f"{rid}{REQUEST}")
            if locked is None:
                continue  # withdrawn since the listing
            note = "" if locked else "no controller holds it: removed at that node's next poll, or a controller's start"
            out.append(PendingFreeze(node, req.volume_id, rid, state,
                                     f"{req.controller or '?'} ({'holds it' if locked else 'gone'})",
                                     req.hold_seconds,
                                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(req.requested)), note))
    return out
