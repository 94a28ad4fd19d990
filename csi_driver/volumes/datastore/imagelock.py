"""Byte-range locks through a shared filesystem: the fence of shared mode.

An open-file-description lock (F_OFD_SETLK, fcntl(2)) belongs to the open file it was taken
through, not to a process: it conflicts with every other open of the file, in this process,
in another one, or through another client of a network filesystem that passes locks to its
server (NFSv4, CephFS, GlusterFS: what docs/shared-datastore.md calls "locks across the
mount"), and it ends when the last descriptor of that open file is closed, or when the
filesystem's server drops the client (lease expiry, session eviction, disconnect).

The image lock is taken through the very open file that LOOP_CONFIGURE hands to the loop
device (csi_driver.host.syscalls.loop_configure_fd): the kernel keeps that open file as long as the
device is attached, so the lock lasts exactly as long as the loop device, whatever happens to
the process that took it (a handler worker that exits when idle, a driver killed with -9).

Locks the driver holds in its own process for its whole life (the node-id lock, an image lock
re-taken at start-up) are registered here: a process forked from the driver (the worker
spawner) inherits their descriptors, and an inherited descriptor would keep the open file,
and so the lock, alive after the driver let it go; they are closed in every forked child.
That registry is per process by nature (os.register_at_fork), hence module state.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from _blake2 import blake2b  # hashlib would also start OpenSSL (see csi_driver.volumes.inflight)
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

FREE, SHARED, EXCLUSIVE = "free", "shared", "exclusive"
"""What lock_state finds on a range."""

_REFUSED = (errno.EAGAIN, errno.EACCES)


def _flock(kind: int, start: int, length: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0)


def try_lock(fd: int, *, exclusive: bool, start: int = 0, length: int = 0) -> bool:
    """Take an OFD lock on [start, start+length) (length 0: to the end of any size) through
    fd. True when taken, False when another open file holds a conflicting one. Any other
    failure (ENOLCK: the filesystem keeps no locks) raises OSError."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(kind, start, length))
    except OSError as exc:
        if exc.errno in _REFUSED:
            return False
        raise
    return True


def unlock(fd: int, *, start: int = 0, length: int = 0) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, start, length))


def lock_state(fd: int, *, start: int = 0, length: int = 0) -> str:
    """FREE, SHARED or EXCLUSIVE: the strongest lock another open file holds on the range
    (F_OFD_GETLK; takes nothing, so it is safe to ask at any time)."""
    raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, length))
    kind = struct.unpack("hhqqi4x", raw)[0]
    if kind == fcntl.F_UNLCK:
        return FREE
    return SHARED if kind == fcntl.F_RDLCK else EXCLUSIVE


def path_lock_state(path: Path) -> str:
    """lock_state of a whole file, through a fresh read-only open of it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return lock_state(fd)
    finally:
        os.close(fd)


class LockHeld(Exception):
    """Another open file (on this host or another) holds a conflicting lock."""


def open_locked(path: Path, *, readonly: bool, direct: bool, wait: float = 0.0) -> int:
    """Open path (O_DIRECT when `direct`) and lock all of it through that open file:
    shared for a read-only open, exclusive otherwise. Retries for up to `wait` seconds,
    since a lock another client has just let go of can take a moment to reach the server.
    Returns the descriptor; raises LockHeld when the lock stays taken."""
    flags = os.O_CLOEXEC | (os.O_RDONLY if readonly else os.O_RDWR) | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    deadline = time.monotonic() + wait
    try:
        while not try_lock(fd, exclusive=not readonly):
            if time.monotonic() >= deadline:
                raise LockHeld(str(path))
            time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise
    return fd


def drop_cache(fd: int) -> None:
    """Drop this host's cached (clean) pages of the file: a network filesystem's client may
    keep pages that another client has since overwritten (posix_fadvise DONTNEED)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def byte_of(key: str) -> int:
    """A byte offset for a key (63-bit hash), so that keys lock one file independently."""
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


@contextmanager
def keys_locked(path: Path, keys: list[str], timeout: float) -> Iterator[None]:
    """Hold an exclusive one-byte lock per key on the file at path (made if missing) for
    the block; wait up to `timeout` seconds for them (in sorted order, so that two holders
    of overlapping key sets never wait on each other forever). Raises LockHeld on timeout."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        for key in sorted(set(keys)):
            while not try_lock(fd, exclusive=True, start=byte_of(key), length=1):
                if time.monotonic() >= deadline:
                    raise LockHeld(f"{path} [{key}]")
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # drops every lock taken through it


# -- descriptors the driver process keeps for its lifetime ---------------------------------

_kept: set[int] = set()
_kept_lock = threading.Lock()


def keep(fd: int) -> None:
    """Keep fd (and the locks taken through it) in this process only: it is closed in any
    child forked from now on, so that the lock ends when this process lets it go."""
    with _kept_lock:
        _kept.add(fd)


def release(fd: int) -> None:
    """Close a kept descriptor, ending its locks (unless another process has a copy)."""
    with _kept_lock:
        _kept.discard(fd)
    os.close(fd)


def _close_inherited() -> None:
    for fd in list(_kept):
        with suppress(OSError):
            os.close(fd)
    _kept.clear()


os.register_at_fork(after_in_child=_close_inherited)
