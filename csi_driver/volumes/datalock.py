"""One driver per data dir: an exclusive lock that a driver holds for as long as it lives.

Two drivers on one data dir destroy each other's work: the second one's start-up recovery
removes the first one's half-made volumes, and both attach and delete the same images. So
the driver takes this lock before recovery touches anything, and a second driver refuses
to start, naming the holder.

The lock is an open-file-description write lock (fcntl(2) F_OFD_SETLK) on the first byte
of a lock file. It belongs to the open file description, not to a process: the handler
worker spawner and the workers it forks (csi_driver.serving.workers) inherit the descriptor and so
hold the lock with the front, and the kernel drops it when the last of them exits, a
SIGKILL included, so a crash never leaves it stuck. The descriptor is close-on-exec: no
program the driver runs (mkfs, cp, ...) keeps it beyond its exec, so nothing outlives the
driver holding it.

F_OFD_GETLK reports no pid for such a lock (l_pid is -1, fcntl(2)), and a pid means
nothing in another pid namespace anyway, so the holder writes who it is into the file:
one line ``pid <n> host <hostname> since <UTC time>``. A reader that finds the lock held
shows that line.

The lock takes the lock file's path, not the data dir: one mechanism, several paths. The
driver's node-local mode locks ``<data-dir>/.driver.lock``. In shared mode many drivers use
one data dir (the datastore): a node driver locks ``<data-dir>/nodes/<node-id>.lock``
(node_lock_path), one driver per node id, and every controller holds a *shared* lock on
``<data-dir>/controllers.lock`` (CONTROLLERS_LOCK), which it may turn exclusive only while
no other controller lives: start-up recovery, which removes unfinished work, runs only
then (csi_driver.serving.server). Through a shared filesystem these are byte-range locks that the
filesystem passes to its server, seen by every client (docs/shared-datastore.md)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import time
from pathlib import Path

LOCK_FILE = ".driver.lock"
"""In the data dir; holds one line naming the driver that holds the lock. Recovery, the
orphan scan and listings skip it (dot-prefixed, outside volumes/ and snapshots/)."""
NODES_DIR = "nodes"
CONTROLLERS_LOCK = "controllers.lock"


def node_lock_path(data_dir: Path, node_id: str) -> Path:
    """Shared mode: the lock a node driver holds for its node id (beside its record,
    csi_driver.volumes.datastore.records.NodeRegistry)."""
    return data_dir / NODES_DIR / f"{node_id}.lock"


def _flock(kind: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 1, 0)


class DataDirLocked(Exception):
    """Another process holds the lock; the message is one line naming it."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"another thinloop driver ({holder}) holds the lock {path}")


def _describe(text: str) -> str:
    """The holder's line, or what can be said when it has not been written yet."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:200] if line.startswith("pid ") else "pid unknown: it has not written its name yet"


class DataDirLock:
    """An exclusive lock on `path` (shared with `shared=True`: any number of shared
    holders, no exclusive one), taken with `acquire` and dropped with `release` (or when
    every process sharing the descriptor has exited)."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, trying for up to `wait` seconds, or raise DataDirLocked; other
        failures (no such directory, no permission) raise OSError."""
        if self.held:
            return
        deadline = time.monotonic() + wait
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        kind = fcntl.F_RDLCK if self.shared else fcntl.F_WRLCK
        while True:
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(kind))
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    if exc.errno in (errno.EAGAIN, errno.EACCES):
                        raise DataDirLocked(self.path, self.holder() or "pid unknown") from None
                    raise
            time.sleep(0.05)
        if self.shared:
            self._fd = fd  # many holders: none writes its name
            return
        try:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            line = f"pid {os.getpid()} host {socket.gethostname()} since {since}\n".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def exclusive_while_alone(self) -> bool:
        """A held shared lock made exclusive, if no other process holds it (never waits):
        True when it now is. Converting an OFD lock is atomic (fcntl(2)): the lock is
        never let go in between."""
        assert self.held and self.shared
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def back_to_shared(self) -> None:
        """After exclusive_while_alone: shared again, letting other holders in."""
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK))

    def release(self) -> None:
        """Drop the lock (this process's descriptor; forked children holding the same
        description keep it until they exit)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def holder(self) -> str | None:
        """Who holds the lock now ("pid <n> host <h> since <t>"), None when nobody does.
        Only reads: usable while a driver runs (thinloopctl node status). An exclusive
        lock's holder only: a shared lock conflicts with no read lock, so it reads as free."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            # A write lock cannot be tested through a read-only descriptor; a read lock
            # conflicts with the holder's write lock just the same.
            probe = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_RDLCK))
            if struct.unpack("hhqqi4x", probe)[0] == fcntl.F_UNLCK:
                return None
            return _describe(os.pread(fd, 512, 0).decode("utf-8", "replace"))
        finally:
            os.close(fd)
