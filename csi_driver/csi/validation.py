"""Request validation in plain functions: capabilities, capacity ranges, parameters,
paths. Each raises a DriverError subclass naming the field at fault."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping, Set
from pathlib import Path

from ..errors import InvalidArgument, OutOfRange
from ..host.oslayer import FILESYSTEMS
from ..proto import csi_pb2
from ..volumes.params import DISKFORMATS, MAX_SIZE, VolumeParams, check_reclaim

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_SIZE = 1 * GIB
"""Size of a volume whose capacity_range is absent (or gives only a limit above it)."""
MIN_SIZE = {"ext3": 16 * MIB, "ext4": 16 * MIB, "xfs": 300 * MIB, "": 1 * MIB}
"""Smallest image each filesystem can be made on (mkfs.xfs refuses below 300 MiB)."""
DEFAULT_FS = "ext4"
K8S_PREFIX = "csi.storage.k8s.io/"
STORAGECLASS_PARAMETERS = ("fsType", "diskformat", "reclaim")
"""What CreateVolume's parameters may hold besides csi.storage.k8s.io/* keys, of which
csi.storage.k8s.io/fstype is read as fsType (README: StorageClass parameters)."""
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"

AccessMode = csi_pb2.VolumeCapability.AccessMode
SUPPORTED_MODES = {
    AccessMode.SINGLE_NODE_WRITER,
    AccessMode.SINGLE_NODE_READER_ONLY,
    AccessMode.SINGLE_NODE_SINGLE_WRITER,
    AccessMode.SINGLE_NODE_MULTI_WRITER,
}
SHARED_MODES = SUPPORTED_MODES | {AccessMode.MULTI_NODE_READER_ONLY}
"""Shared mode: several nodes may attach one image, all read-only (ControllerPublishVolume)."""
READ_ONLY_MODES = {AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY}
MULTI_NODE_MODES = {AccessMode.MULTI_NODE_READER_ONLY}
_MOUNT_FLAG_RE = re.compile(r"[A-Za-z0-9_.:=/+-]{1,128}")
_FORBIDDEN_FLAGS = {"bind", "rbind", "remount", "move", "make-shared", "make-rshared"}


def require(value: object, what: str) -> None:
    if not value:
        raise InvalidArgument(f"{what} is required")


def check_capability(cap: csi_pb2.VolumeCapability, modes: Set[int] = SUPPORTED_MODES) -> str:
    """Validate one capability against the access modes served (SUPPORTED_MODES; in shared
    mode SHARED_MODES); return its access type, 'mount' or 'block'."""
    access = cap.WhichOneof("access_type")
    if access is None:
        raise InvalidArgument("volume_capability needs an access_type (mount or block)")
    if not cap.HasField("access_mode"):
        raise InvalidArgument("volume_capability.access_mode is required")
    mode = cap.access_mode.mode
    if mode not in modes:
        name = AccessMode.Mode.Name(mode) if mode in AccessMode.Mode.values() else str(mode)
        if AccessMode.MULTI_NODE_READER_ONLY not in modes:
            raise InvalidArgument(
                f"access mode {name} is not supported: thinloop volumes live on one node "
                "(SINGLE_NODE_* modes only)")
        raise InvalidArgument(
            f"access mode {name} is not supported: a volume is written by one node at a time "
            "(SINGLE_NODE_* modes, or MULTI_NODE_READER_ONLY)")
    if access == "mount":
        fs = cap.mount.fs_type
        if fs and fs not in FILESYSTEMS:
            raise InvalidArgument(f"fs_type {fs!r} is not supported; use one of {', '.join(FILESYSTEMS)}")
        check_mount_flags(cap.mount.mount_flags)
    return str(access)


def check_capabilities(caps: Iterable[csi_pb2.VolumeCapability], modes: Set[int] = SUPPORTED_MODES) -> set[str]:
    kinds = {check_capability(c, modes) for c in caps}
    if not kinds:
        raise InvalidArgument("volume_capabilities is required")
    return kinds


def check_mount_flags(flags: Iterable[str]) -> list[str]:
    out = []
    for flag in flags:
        if not _MOUNT_FLAG_RE.fullmatch(flag) or flag in _FORBIDDEN_FLAGS:
            raise InvalidArgument(f"mount flag {flag[:60]!r} is not allowed")
        out.append(flag)
    return out


def is_read_only(cap: csi_pb2.VolumeCapability) -> bool:
    return cap.access_mode.mode in READ_ONLY_MODES


def capability_fs(caps: Iterable[csi_pb2.VolumeCapability]) -> str:
    found = {c.mount.fs_type for c in caps if c.WhichOneof("access_type") == "mount" and c.mount.fs_type}
    if len(found) > 1:
        raise InvalidArgument(f"volume_capabilities ask for different filesystems: {sorted(found)}")
    return found.pop() if found else ""


def resolve_params(parameters: Mapping[str, str], caps: Iterable[csi_pb2.VolumeCapability],
                   modes: Set[int] = SUPPORTED_MODES) -> VolumeParams:
    caps = list(caps)
    kinds = check_capabilities(caps, modes)
    unknown = sorted(k for k in parameters if k not in STORAGECLASS_PARAMETERS and not k.startswith(K8S_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown parameter(s) {', '.join(repr(k) for k in unknown)}; "
            f"accepted: {', '.join(STORAGECLASS_PARAMETERS)} and {K8S_PREFIX}* keys")
    p_fs = {parameters.get("fsType", ""), parameters.get(K8S_PREFIX + "fstype", "")} - {""}
    cap_fs = capability_fs(caps)
    wanted = p_fs | ({cap_fs} - {""})
    if len(wanted) > 1:
        raise InvalidArgument(f"fsType given twice with different values: {sorted(wanted)}")
    fs = wanted.pop() if wanted else ""
    explicit = bool(fs)
    if fs and fs not in FILESYSTEMS:
        raise InvalidArgument(f"fsType {fs!r} is not supported; use one of {', '.join(FILESYSTEMS)}")
    # A raw block volume has no filesystem: a class-wide fsType does not apply to it.
    fs = (fs or DEFAULT_FS) if "mount" in kinds else ""
    diskformat = parameters.get("diskformat", "thin")
    if diskformat not in DISKFORMATS:
        raise InvalidArgument(f"diskformat {diskformat!r} is not supported; use one of {', '.join(DISKFORMATS)}")
    reclaim = check_reclaim(diskformat, parameters.get("reclaim"))
    access = "both" if len(kinds) > 1 else kinds.pop()
    extra = {k: v for k, v in parameters.items() if k.startswith(K8S_PREFIX)}
    return VolumeParams(fs, diskformat, reclaim, access, extra, explicit)


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def size_from_range(rng: csi_pb2.CapacityRange | None, fs_type: str, *, current: int = 0) -> int:
    """Pick a size inside [required, limit]: the required bytes, else the default (or the
    limit when that is smaller), rounded up to a MiB and to the filesystem's minimum."""
    required = rng.required_bytes if rng is not None else 0
    limit = rng.limit_bytes if rng is not None else 0
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise InvalidArgument(f"capacity_range required_bytes {required} exceeds limit_bytes {limit}")
    if required:
        size = required
    elif current:
        size = current
    else:
        size = min(DEFAULT_SIZE, limit) if limit else DEFAULT_SIZE
    size = max(round_up(size, MIB), MIN_SIZE.get(fs_type, MIB))
    if limit and size > limit:
        raise OutOfRange(
            f"capacity_range cannot be met: the smallest usable size for {fs_type or 'block'} "
            f"rounded to a MiB is {size} bytes, above limit_bytes {limit}")
    if size > MAX_SIZE:
        raise OutOfRange(f"{size} bytes is larger than the largest volume ({MAX_SIZE} bytes)")
    return size


def fits_range(size: int, rng: csi_pb2.CapacityRange | None) -> bool:
    if rng is None:
        return True
    if rng.required_bytes and size < rng.required_bytes:
        return False
    return not (rng.limit_bytes and size > rng.limit_bytes)


@functools.lru_cache(maxsize=8)
def _real_root(root: str) -> str:
    """The kubelet dir, resolved once: it does not move under a running driver (were it
    to, paths would be refused, never let out)."""
    return os.path.realpath(root)


def confine(path: str, root: Path, what: str) -> str:
    """An absolute path whose real location (symlinks resolved) lies under root.
    Returns the resolved path, which is what the driver then mounts on or removes."""
    require(path, what)
    if "\0" in path or "\n" in path:
        raise InvalidArgument(f"{what} contains a control character")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path[:200]!r} must be an absolute path")
    if len(path) > 4096:
        raise InvalidArgument(f"{what} is too long")
    real = os.path.realpath(path)
    real_root = _real_root(str(root))
    if real == real_root:
        raise InvalidArgument(f"{what} {path[:200]!r} is the kubelet directory {root} itself; it must "
                              "be a path below it")
    if os.path.commonpath([real, real_root]) != real_root:
        raise InvalidArgument(f"{what} {path[:200]!r} is outside the kubelet directory {root}")
    return real
