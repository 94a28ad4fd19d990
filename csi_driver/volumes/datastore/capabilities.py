"""What the datastore's filesystem can do, probed at start-up on a scratch file in it.

Shared filesystems differ (NFS, CephFS, GlusterFS, and their versions and options): each
capability the driver relies on is tried, and each missing one has a fallback that is logged
once and exported as a metric (thinloop_datastore_capability), never taken silently:

    o_direct       loop devices with direct I/O; without it, buffered I/O (the node's page
                   cache holds written data until the filesystem inside flushes it)
    sparse         thin images; without it an image takes its full size at once
    fallocate      zeroedthick images in one call; without it glibc writes zeros (slow)
    punch_hole     thin reclaim (online discard gives freed blocks back); without it volumes
                   are mounted without discard and freed space stays allocated in the image
    reflink        snapshots and clones as reflinks; without it, sparse copies
    locks          byte-range locks (fcntl OFD locks) conflict between two opens; without
                   them there is no fence, and the driver refuses to start in shared mode
    locks_across   a lock another live node holds is seen here: verified when a node with a
                   fresh heartbeat has its node-id lock visible from this host; contradicted
                   (start-up refused) when such a node keeps beating but its lock is not seen

Nothing here imports the CSI faces or the server.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import imagelock
from .records import DatastoreError, NodeRegistry

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FICLONE = 0x40049409
_PROBE_BYTES = 1 << 20
_SPARSE_BYTES = 64 << 20
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.ENOTTY, errno.EXDEV,
                  errno.EPERM)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int

UNKNOWN = -1
"""locks_across when no other live node was there to check against."""

FALLBACKS = {
    "o_direct": "loop devices use buffered I/O",
    "sparse": "images take their full size when made",
    "fallocate": "zeroedthick images are written with zeros",
    "punch_hole": "volumes are mounted without discard: freed space stays allocated in the image",
    "reflink": "snapshots and clones are sparse copies",
}


@dataclass(frozen=True)
class Capabilities:
    """Each 1 (works), 0 (does not); locks_across may also be UNKNOWN."""

    fs_type: str
    o_direct: int
    sparse: int
    fallocate: int
    punch_hole: int
    reflink: int
    locks: int
    locks_across: int

    def items(self) -> list[tuple[str, int]]:
        return [(k, v) for k, v in asdict(self).items() if k != "fs_type"]


def fs_type_of(path: Path) -> str:
    """The filesystem type of the mount holding path, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if len(parts) < 5 or not right:
                    continue
                point = parts[4].replace("\\040", " ")
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, kind = point, right.split()[0]
    except OSError:
        pass
    return kind


def _try(what: str, probe: Callable[[], bool]) -> int:
    try:
        return 1 if probe() else 0
    except OSError as exc:
        if exc.errno in _NOT_SUPPORTED:
            return 0
        raise DatastoreError(f"probing {what} on the datastore failed: {exc}") from None


def _o_direct(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    try:
        buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
        buf.write(b"\xa5" * 4096)
        os.pwrite(fd, buf, 0)
        return True
    finally:
        os.close(fd)


def _sparse(path: Path) -> bool:
    with open(path, "r+b") as f:
        f.truncate(_SPARSE_BYTES)
        return os.fstat(f.fileno()).st_blocks * 512 < _SPARSE_BYTES // 2


def _fallocate_ok(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if _fallocate(fd, 0, _SPARSE_BYTES - _PROBE_BYTES, _PROBE_BYTES) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
        return True
    finally:
        os.close(fd)


def _punch_hole(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, os.urandom(4096) * (_PROBE_BYTES // 4096), 0)
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, _PROBE_BYTES) != 0:
            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")
        os.fsync(fd)
        return os.fstat(fd).st_blocks < before
    finally:
        os.close(fd)


def _reflink(path: Path) -> bool:
    clone = path.with_name(path.name + ".clone")
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(clone, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return True
        finally:
            os.close(dst)
            clone.unlink(missing_ok=True)
    finally:
        os.close(src)


def _locks(path: Path) -> bool:
    """One open's exclusive lock refuses another open's (and a shared one allows one)."""
    a = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    b = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if not imagelock.try_lock(a, exclusive=True):
            return False
        return not imagelock.try_lock(b, exclusive=False)
    finally:
        os.close(a)
        os.close(b)


def locks_across(registry: NodeRegistry, me: str, wait: Callable[[float], None] = time.sleep) -> int:
    """Whether a lock taken through another client is visible here, judged on the other
    node drivers: a node whose record is fresh holds its node-id lock. Seen held: 1. None
    fresh: UNKNOWN. A node whose lock looks free is watched for one more beat: if it beats
    on with its lock still unseen, locks do not cross clients (0); if it stops, it had died."""
    peers = [r for r in registry.all() if r.node_id != me and r.fresh()]
    if not peers:
        return UNKNOWN
    doubtful = []
    for peer in peers:
        if registry.lock_state(peer.node_id) != imagelock.FREE:
            return 1
        doubtful.append(peer)
    wait(max(p.interval for p in doubtful) * 1.5)
    for peer in doubtful:
        now = registry.get(peer.node_id)
        if now is not None and now.beats > peer.beats and now.state == "running":
            if registry.lock_state(peer.node_id) == imagelock.FREE:
                log.error("node %s beats on (%d -> %d) but its lock on %s is not visible from here",
                          peer.node_id, peer.beats, now.beats, registry.lock_path(peer.node_id))
                return 0
            return 1
    return UNKNOWN


def probe(data_dir: Path, registry: NodeRegistry | None = None, node_id: str = "",
          wait: Callable[[float], None] = time.sleep) -> Capabilities:
    """Try every capability on a scratch file in the data dir, then remove it. Raises
    DatastoreError when the datastore cannot fence (no byte-range locks, or locks that do
    not cross clients)."""
    scratch = data_dir / f".probe-{node_id or 'driver'}-{uuid.uuid4().hex[:8]}"
    fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    try:
        found = {
            "o_direct": _try("O_DIRECT", lambda: _o_direct(scratch)),
            "sparse": _try("sparse files", lambda: _sparse(scratch)),
            "fallocate": _try("fallocate", lambda: _fallocate_ok(scratch)),
            "punch_hole": _try("hole punching", lambda: _punch_hole(scratch)),
            "reflink": _try("reflink", lambda: _reflink(scratch)),
        }
        try:
            locks = 1 if _locks(scratch) else 0
        except OSError as exc:
            raise DatastoreError(f"the datastore refuses byte-range locks ({exc.strerror}): shared mode "
                                 "cannot fence attachments without them") from None
    finally:
        scratch.unlink(missing_ok=True)
    if not locks:
        raise DatastoreError("byte-range locks on the datastore do not conflict between two opens of "
                             "one file: shared mode cannot fence attachments")
    across = locks_across(registry, node_id, wait) if registry is not None else UNKNOWN
    if across == 0:
        raise DatastoreError("a lock another node's driver holds on the datastore is not visible from "
                             "this host: the filesystem does not pass byte-range locks between clients "
                             "(for NFS: v4.1+ without 'nolock'; see docs/shared-datastore.md)")
    return Capabilities(fs_type=fs_type_of(data_dir), locks=locks, locks_across=across, **found)


def report(caps: Capabilities, datastore: str) -> None:
    """One line per capability the datastore lacks, saying what the driver does instead."""
    log.info("datastore %s (%s): %s", datastore, caps.fs_type,
             ", ".join(f"{k}={'unknown' if v == UNKNOWN else v}" for k, v in caps.items()))
    for name, fallback in FALLBACKS.items():
        if not getattr(caps, name):
            log.warning("datastore %s (%s) lacks %s: %s", datastore, caps.fs_type, name, fallback)
    if caps.locks_across == UNKNOWN:
        log.warning("datastore %s: no other node driver is running, so locks across clients could not "
                    "be checked now (the filesystem type is %s)", datastore, caps.fs_type)
