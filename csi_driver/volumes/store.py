"""The on-disk store. Directories under the data dir are the only record of volumes and
snapshots: no second database. Objects are built under a temporary name and renamed into
place, metadata is replaced atomically, and deletion renames before it removes, so a crash
at any point leaves either the whole object or a leftover that `recover` clears."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import failpoints
from ..errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

IMAGE = "disk.img"
META = "meta.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")  # fullmatch: "$" passes a trailing newline
_ZERO_CHUNK = 4 << 20


def check_id(value: str, what: str) -> str:
    """Ids and names become directory names: allow only a safe alphabet."""
    if not value:
        raise InvalidArgument(f"{what} is required")
    if not ID_RE.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value[:80]!r} is not valid: use 1-128 characters of letters, digits, "
            "'.', '_', '+' and '-', starting with a letter or digit")
    return value


@dataclass
class Meta:
    """Contents of meta.json for a volume or a snapshot."""

    name: str
    kind: str = "volume"
    """volume or snapshot"""
    fs_type: str = ""
    """ext3, ext4, xfs, or empty for a raw block volume"""
    diskformat: str = "thin"
    """thin, zeroedthick or eagerzeroedthick"""
    reclaim: str = "discard"
    """discard or none. A thick volume's is always none (set so here, whatever was
    written: volumes made before that rule had discard by default)."""
    requested_bytes: int = 0
    created: float = 0.0
    """Unix time the object was completed."""
    source_kind: str = ""
    """snapshot or volume when made from one, else empty"""
    source_id: str = ""
    needs_fs_grow: bool = False
    """The image is larger than its filesystem (restore into a bigger size)."""
    ephemeral: bool = False
    parameters: dict[str, str] = field(default_factory=dict)
    """Parameters as given, for idempotency checks and operators."""
    node_id: str = ""
    group_snapshot_id: str = ""
    """For a snapshot cut as a member of a volume group snapshot: that group's id (the
    group's record is in group-snapshots/, csi_driver.volumes.grouprecords)."""

    def __post_init__(self) -> None:
        if self.diskformat != "thin" and self.reclaim == "discard":
            self.reclaim = "none"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Meta:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class Entry:
    """An object found on disk: its id, directory and metadata."""

    id: str
    path: Path
    meta: Meta
    hand_made: bool = False
    """No readable meta.json (an image put in place by hand, for static provisioning):
    the metadata is defaults, and what the image holds must be looked at."""

    @property
    def image(self) -> Path:
        return self.path / IMAGE

    def size_bytes(self) -> int:
        return os.stat(self.image).st_size

    def allocated_bytes(self) -> int:
        return os.stat(self.image).st_blocks * 512


def fsync_path(path: Path, flags: int = 0) -> None:
    """fsync a file by its path (a copied image, so that it survives a crash); with
    os.O_DIRECTORY, a directory's entries."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fsync_path(path, os.O_DIRECTORY)


def write_atomic(path: Path, data: str) -> None:
    """Replace `path` with `data` durably: a temporary file, fsynced, renamed over `path`,
    and the directory fsynced."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data.encode("utf-8"))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.unlink(tmp)  # a full disk leaves no half-written file behind
        raise
    finally:
        os.close(fd)
    failpoints.hit("meta.before_replace")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def room_for(what: str) -> Iterator[None]:
    """Turn the host filesystem running out of room into RESOURCE_EXHAUSTED."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"no room on the node {what}: {exc.strerror}") from None
        raise


def extend(fd: int, start: int, end: int, diskformat: str) -> None:
    """Make bytes [start, end) of the image what its diskformat promises: a hole (thin),
    preallocated (zeroedthick), or preallocated and zero-written (eagerzeroedthick)."""
    if diskformat == "thin":
        os.ftruncate(fd, end)
        return
    _preallocate(fd, start, end, diskformat == "eagerzeroedthick")


def _preallocate(fd: int, start: int, end: int, zero: bool) -> None:
    os.posix_fallocate(fd, start, end - start)
    if zero:
        zeros = bytes(_ZERO_CHUNK)
        os.lseek(fd, start, os.SEEK_SET)
        left = end - start
        while left > 0:
            left -= os.write(fd, zeros[: min(left, _ZERO_CHUNK)])


def create_image(path: Path, size: int, diskformat: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with room_for(f"for a {size}-byte image"):
            extend(fd, 0, size, diskformat)
            os.fsync(fd)
    finally:
        os.close(fd)


def grow_image(path: Path, size: int, diskformat: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        old = os.fstat(fd).st_size
        if size > old:
            with room_for("to grow the image"):
                extend(fd, old, size, diskformat)
                os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree_gone_is_fine(path: Path) -> None:
    """rmtree, where an entry someone else removed meanwhile (another process finishing
    the same deletion, e.g. `thinloopctl node orphans` beside start-up recovery) is what
    was wanted; any other failure is raised."""
    def handler(func: Callable[..., object], name: str, exc: object) -> None:
        err = exc[1] if isinstance(exc, tuple) else exc  # onerror gets exc_info, onexc the exception
        if isinstance(err, BaseException) and not isinstance(err, FileNotFoundError):
            raise err

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=handler)
    else:
        shutil.rmtree(path, onerror=handler)


def _remove_tree(path: Path, ignore_errors: bool = False) -> None:
    """Remove a directory tree, or only the link when `path` is a symlink: nothing
    outside the data dir may be removed through a link planted in it."""
    if path.is_symlink():
        path.unlink()
        return
    if ignore_errors:
        shutil.rmtree(path, ignore_errors=True)
    else:
        _rmtree_gone_is_fine(path)


class Collection:
    """A directory of objects, one subdirectory each (volumes/ or snapshots/)."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root = root
        self.kind = kind
        root.mkdir(parents=True, exist_ok=True)

    def path(self, obj_id: str) -> Path:
        return self.root / check_id(obj_id, f"{self.kind} id")

    def ids(self) -> list[str]:
        """Sorted ids of complete objects: dot-prefixed leftovers are not listed."""
        try:
            with os.scandir(self.root) as it:
                return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
        except FileNotFoundError:
            return []

    def get(self, obj_id: str) -> Entry | None:
        path = self.path(obj_id)
        if not (path / IMAGE).is_file():
            return None
        try:
            meta = Meta.from_json((path / META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            # Made by hand (static provisioning): everything but the image is a default.
            return Entry(obj_id, path, Meta(name=obj_id, kind=self.kind, diskformat="thin"), hand_made=True)
        except (ValueError, TypeError) as exc:
            log.error("%s %s: unreadable %s (%s); treating as hand-made", self.kind, obj_id, META, exc)
            return Entry(obj_id, path, Meta(name=obj_id, kind=self.kind), hand_made=True)
        return Entry(obj_id, path, meta)

    def entries(self) -> Iterator[Entry]:
        for obj_id in self.ids():
            entry = self.get(obj_id)
            if entry is not None:
                yield entry

    def create(self, obj_id: str, meta: Meta, build: Callable[[Path], None]) -> Entry:
        """Build the object in a temporary directory, then rename it into place."""
        tmp = self.begin(obj_id)
        try:
            build(tmp / IMAGE)
            failpoints.hit(f"{self.kind}.create.after_build")
            return self.commit(tmp, obj_id, meta)
        except BaseException:
            self.discard(tmp)
            raise

    def begin(self, obj_id: str) -> Path:
        """A new temporary directory for the object (not listed; removed by `recover`)."""
        self.path(obj_id)  # the id is checked before anything is made
        tmp = self.root / f"{TMP_PREFIX}{obj_id}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        return tmp

    def commit(self, tmp: Path, obj_id: str, meta: Meta) -> Entry:
        """Write the metadata into a directory made by `begin`, whose image is complete
        and durable, and rename it into place: from here on it is listed."""
        final = self.path(obj_id)
        write_atomic(tmp / META, meta.to_json())  # also makes tmp's entries durable
        failpoints.hit(f"{self.kind}.create.before_rename")
        os.rename(tmp, final)
        _fsync_dir(self.root)
        return Entry(obj_id, final, meta)

    def discard(self, tmp: Path) -> None:
        """Remove a directory made by `begin` that will not be committed."""
        shutil.rmtree(tmp, ignore_errors=True)

    def save_meta(self, entry: Entry, meta: Meta) -> Entry:
        write_atomic(entry.path / META, meta.to_json())
        return Entry(entry.id, entry.path, meta)

    def delete(self, obj_id: str) -> bool:
        """Rename out of the listing first, then remove. False when it was not there."""
        path = self.path(obj_id)
        trash = self.root / f"{TRASH_PREFIX}{obj_id}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        _fsync_dir(self.root)
        failpoints.hit(f"{self.kind}.delete.after_rename")
        _remove_tree(trash)
        return True

    def recover(self) -> list[str]:
        """Remove leftovers of operations a crash interrupted; say what was done."""
        actions = []
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        for name in names:
            p = self.root / name
            if name.startswith(TMP_PREFIX):
                _remove_tree(p, ignore_errors=True)
                actions.append(f"removed unfinished {self.kind} {name}")
            elif name.startswith(TRASH_PREFIX):
                _remove_tree(p, ignore_errors=True)
                actions.append(f"finished deleting {self.kind} {name}")
            elif p.is_dir() and not p.is_symlink():  # never reach through a link
                for leftover in p.glob(f"{TMP_PREFIX}*"):
                    leftover.unlink(missing_ok=True)
                    actions.append(f"removed half-written file {leftover}")
        return actions


class Store:
    """Volumes and snapshots under one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.volumes = Collection(data_dir / "volumes", "volume")
        self.snapshots = Collection(data_dir / "snapshots", "snapshot")

    def recover(self) -> list[str]:
        return self.volumes.recover() + self.snapshots.recover()

    def free_bytes(self) -> int:
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize

    def unused_promises(self) -> int:
        """Bytes that thin images may still grow into: apparent minus allocated."""
        total = 0
        for obj_id in self.volumes.ids():
            try:
                st = os.stat(self.volumes.root / obj_id / IMAGE)
            except FileNotFoundError:
                continue
            total += max(0, st.st_size - st.st_blocks * 512)
        return total

    def stats(self) -> dict[str, Any]:
        return {"free_bytes": self.free_bytes(), "unused_promises": self.unused_promises()}
