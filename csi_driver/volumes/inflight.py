"""A set of keys with an operation in flight: a second request for the same key is
refused with ABORTED (the CO retries it), never queued behind the first.

With handler worker processes (csi_driver.serving.workers) the set must hold across processes, so
a key is also an open-file-description lock on one byte of a lock file in the data dir,
the byte chosen by a 63-bit hash of the key. Such locks conflict between any two opens of
the file, in one process or two, and the kernel drops them when the holder's descriptor
is closed, a killed process included: a crash never leaves a key held.

A descriptor is also shared, for a moment, by every child forked while it is open: a
thread that spawns mkfs or cp forks a child that holds a copy of every descriptor of the
process until it closes them before exec (close_fds; they are close-on-exec too). A key
released by its own call in that moment stays locked by the child's copy, so a second
process that finds a key locked by another process retries for GRACE_SECONDS before it
answers ABORTED: the CO's next call of a lifecycle (NodePublishVolume right after
NodeStageVolume) is not refused for a lock its own finished call left in a fork."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from _blake2 import blake2b  # hashlib would also start OpenSSL: 0.5 MiB more in every process
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import Aborted

GRACE_SECONDS = 0.25
"""How long a key locked by another process is retried: far longer than a fork's window
before exec, far shorter than a CO's retry back-off."""

LOCK_FILE = ".inflight.lock"
"""In the data dir; holds no data, only locks. Recovery and the orphan scan skip it."""


def _byte_of(key: str) -> int:
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def _flock(kind: int, start: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


class InFlight:
    def __init__(self, lock_dir: Path | None = None, name: str = LOCK_FILE) -> None:
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._path = str(lock_dir / name) if lock_dir is not None else None
        if self._path is not None:  # made once at start-up: a refused call changes nothing on disk
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold every key for the duration of the block, or raise Aborted at once."""
        wanted = {k for k in keys if k}
        with self._lock:
            busy = wanted & self._keys
            if busy:
                raise Aborted(f"an operation on {', '.join(sorted(busy))} is already in progress")
            self._keys |= wanted
        fd = -1
        try:
            if self._path is not None and wanted:
                fd = self._lock_across(wanted)
            yield
        finally:
            if fd >= 0:
                os.close(fd)  # drops every lock taken through it
            with self._lock:
                self._keys -= wanted

    def _lock_across(self, keys: set[str]) -> int:
        assert self._path is not None
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + GRACE_SECONDS
        delay = 0.001
        try:
            for key in sorted(keys):
                while True:
                    try:
                        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, _byte_of(key)))
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() >= deadline:
                            raise Aborted(f"an operation on {key} is already in progress") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
        except BaseException:
            os.close(fd)  # drops the keys taken so far
            raise
        return fd

    def busy(self) -> int:
        """Keys held by this process."""
        with self._lock:
            return len(self._keys)


def driver_keys(data_dir: Path, socket_path: Path, *, shared: bool) -> InFlight:
    """The in-flight keys of the driver serving socket_path over data_dir, as that driver
    and the operator's node commands (thinloopctl node trim, orphans) share them: in the
    data dir in node-local mode (one driver per data dir); beside the socket in shared mode,
    where many drivers share the datastore and a controller's key of a volume must not
    refuse a node's call on it (the attachment record's lock orders those)."""
    if shared:
        return InFlight(socket_path.parent, f".{socket_path.name}.inflight")
    return InFlight(data_dir)
