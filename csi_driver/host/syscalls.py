"""The kernel calls behind losetup, mount and umount, made directly.

Spawning util-linux costs 1 to 2 ms per command (fork, exec, dynamic linking, libmount reading
the mount table); the system call underneath costs 0.01 to 0.8 ms. A lifecycle spawns six of
them, so the driver makes these calls itself. What util-linux adds on top is reproduced
where it matters (read-only binds are remounted read-only, keeping the mount's other flags)
and left to the command where it does not fit: options that only mean something to
mount(8) (``nofail``, ``x-…``) make ``split_options`` answer None and the caller runs mount.
Failures raise ``SyscallError``, a ``CommandError`` carrying errno, so callers handle
both paths alike.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import struct
from collections.abc import Sequence

from .runner import CommandError

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_SILENT = 32768
MS_RELATIME = 1 << 21
MS_I_VERSION = 1 << 23
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

# option -> (flag, True to set it / False to clear it), as mount(8) reads them
_FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "mand": (MS_MANDLOCK, True), "nomand": (MS_MANDLOCK, False),
    "dirsync": (MS_DIRSYNC, True),
    "nosymfollow": (MS_NOSYMFOLLOW, True),
    "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "nostrictatime": (MS_STRICTATIME, False),
    "lazytime": (MS_LAZYTIME, True), "nolazytime": (MS_LAZYTIME, False),
    "iversion": (MS_I_VERSION, True), "noiversion": (MS_I_VERSION, False),
    "silent": (MS_SILENT, True), "loud": (MS_SILENT, False),
}
# Options only mount(8) understands; the kernel would reject them.
_USERSPACE_OPTIONS = {"auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
                      "_netdev", "loop", "defaults"}
_USERSPACE_PREFIXES = ("x-", "X-", "comment=", "loop=", "offset=", "sizelimit=", "encryption=",
                       "helper=", "uhelper=")

# statvfs f_flag bits that a bind remount must carry over (ST_* -> MS_*)
_KEEP_ON_REMOUNT = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                    (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                    (os.ST_RELATIME, MS_RELATIME))

# <linux/loop.h>
LOOP_CLR_FD = 0x4C01
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
LOOP_INFO64_SIZE = 232
_LO_FLAGS_AT = 52  # offset of lo_flags in struct loop_info64
_LO_FILE_NAME_AT = 56
_LOOP_CONFIG_RESERVED = 64  # __u64 __reserved[8] after the info


class SyscallError(CommandError):
    """A system call the driver made in place of a command failed."""

    def __init__(self, call: str, subject: Sequence[str], err: int) -> None:
        name = errno.errorcode.get(err, str(err))
        super().__init__([call, *subject], err, f"{os.strerror(err)} ({name})")
        self.errno = err
        self.args = (f"{call} {' '.join(subject)}: {os.strerror(err)} ({name})",)


_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_mount.restype = ctypes.c_int
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int


def _enc(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def split_options(options: Sequence[str]) -> tuple[int, str] | None:
    """mount(8)'s split of -o options into flags and the filesystem's data string; None
    when an option means something only to mount(8) itself."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            bit, on = _FLAG_OPTIONS[opt]
            flags = flags | bit if on else flags & ~bit
        elif opt in _USERSPACE_OPTIONS or opt.startswith(_USERSPACE_PREFIXES):
            return None
        elif opt:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    rc = _mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data) if data else None)
    err = ctypes.get_errno()
    if rc != 0:
        what = [f"{source or 'none'}", "on", target]
        if fstype:
            what += ["type", fstype]
        if data:
            what += ["data", data]
        raise SyscallError("mount(2)", what, err)


def bind_mount(source: str, target: str, *, readonly: bool) -> None:
    """A bind mount, made read-only by a second call as mount(8) does; undone if that fails."""
    mount(source, target, None, MS_BIND)
    if not readonly:
        return
    keep = os.statvfs(target).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st_bit, ms_bit in _KEEP_ON_REMOUNT:
        if keep & st_bit:
            flags |= ms_bit
    try:
        mount(None, target, None, flags)
    except SyscallError:
        umount(target)
        raise


def umount(target: str, flags: int = 0) -> None:
    rc = _umount2(_enc(target), flags)
    err = ctypes.get_errno()
    if rc != 0:
        raise SyscallError("umount2(2)", [target], err)


def _loop_ioctl(device: str, request: int, arg: int | bytes, call: str, subject: Sequence[str],
                mode: int = os.O_RDONLY) -> None:
    try:
        fd = os.open(device, mode | os.O_CLOEXEC)
    except OSError as exc:
        raise SyscallError("open(2)", [device], exc.errno or errno.EIO) from None
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise SyscallError(call, [device, *subject], exc.errno or errno.EIO) from None
    finally:
        os.close(fd)


def loop_configure(device: str, image: str, *, readonly: bool, direct_io: bool, block_size: int) -> None:
    """Bind `image` to the free loop device `device` in one LOOP_CONFIGURE (kernel 5.8+).
    Raises SyscallError: EBUSY when another process took the device first, EINVAL when
    the kernel refuses direct I/O for this file (or knows no LOOP_CONFIGURE: ENOTTY)."""
    flags = os.O_CLOEXEC | (os.O_RDONLY if readonly else os.O_RDWR)
    try:
        backing = os.open(image, flags | (os.O_DIRECT if direct_io else 0))
    except OSError as exc:
        raise SyscallError("open(2)", [image], exc.errno or errno.EIO) from None
    try:
        loop_configure_fd(device, backing, image, readonly=readonly, direct_io=direct_io,
                          block_size=block_size)
    finally:
        os.close(backing)


def loop_configure_fd(device: str, backing: int, name: str, *, readonly: bool, direct_io: bool,
                      block_size: int) -> None:
    """LOOP_CONFIGURE with an open file: the device keeps that very open file (and so any
    open-file-description lock taken through it) until it is detached. `name` is what
    sysfs shows as the backing file's name; errors as loop_configure."""
    info = bytearray(LOOP_INFO64_SIZE)
    lo_flags = (LO_FLAGS_READ_ONLY if readonly else 0) | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    struct.pack_into("<I", info, _LO_FLAGS_AT, lo_flags)
    encoded = os.fsencode(name)[:LO_NAME_SIZE - 1]
    info[_LO_FILE_NAME_AT:_LO_FILE_NAME_AT + len(encoded)] = encoded
    config = struct.pack("<II", backing, block_size) + bytes(info) + bytes(_LOOP_CONFIG_RESERVED)
    _loop_ioctl(device, LOOP_CONFIGURE, config, "ioctl(LOOP_CONFIGURE)", [name], os.O_RDWR)


def loop_clear(device: str) -> None:
    """LOOP_CLR_FD: the kernel lets go of the file when the last opener closes the device."""
    _loop_ioctl(device, LOOP_CLR_FD, 0, "ioctl(LOOP_CLR_FD)", [])


def loop_set_capacity(device: str) -> None:
    _loop_ioctl(device, LOOP_SET_CAPACITY, 0, "ioctl(LOOP_SET_CAPACITY)", [])


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that forked it ends."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise SyscallError("prctl", ["PR_SET_PDEATHSIG"], ctypes.get_errno())


def malloc_trim() -> None:
    """Give the C heap's free pages back to the kernel (glibc; a no-op elsewhere)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
