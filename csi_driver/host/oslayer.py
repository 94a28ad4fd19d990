"""The narrow interface between the CSI services and the host: loop devices, filesystems
and mounts. `HostOS` (csi_driver.host.linux) is the real one; tests use a stateful fake."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

FILESYSTEMS = ("ext3", "ext4", "xfs")


class MountEntry(NamedTuple):
    """One line of /proc/self/mountinfo (a tuple: a node has hundreds, read often)."""

    mount_point: str
    root: str
    major_minor: str
    fstype: str
    source: str
    options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


FileId = tuple[int, int, int]
"""(major, minor, inode) of a file: what it is, whatever path reaches it."""


def real_path(path: str | Path) -> str:
    """os.path.realpath, in three system calls (open with O_PATH, readlink of the
    descriptor, close) when the path exists, instead of an lstat per component.
    Only for paths the driver never unmounts (images, sysfs): a command spawned by
    another thread at that instant inherits the descriptor until it execs, and a mount
    holding it cannot be unmounted meanwhile (umount2 fails with EBUSY)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = ""
    finally:
        os.close(fd)
    if not real.startswith("/") or real.endswith(" (deleted)"):
        return os.path.realpath(path)  # no /proc, or a path outside this root
    return real


def file_id(path: str | Path) -> FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


@dataclass(frozen=True)
class LoopDevice:
    device: str
    """/dev/loopN"""
    backing_file: str
    """As sysfs shows it: relative to the mount namespace the file was opened in, so after
    the driver's container restarts it may not be the path this process sees."""
    major_minor: str
    direct_io: bool
    readonly: bool
    size_bytes: int
    backing_id: FileId | None = None
    """The backing file's identity from LOOP_GET_STATUS64; None when it cannot be read."""

    def backs(self, image: str, image_id: FileId | None) -> bool:
        """Whether this device is attached to the image (by identity where known)."""
        if image_id is not None and self.backing_id is not None:
            return image_id == self.backing_id
        return self.backing_file == image


class OSLayer(Protocol):
    def loop_devices(self) -> list[LoopDevice]:
        """Every attached loop device, read from sysfs (no subprocess)."""
        ...

    def find_loop(self, image: Path) -> LoopDevice | None: ...

    def loop_of_mount(self, mount: MountEntry) -> LoopDevice | None:
        """The loop device a mount shows: its filesystem's device, or a bind of the node."""
        ...

    def attach_loop(self, image: Path, *, readonly: bool, discard: bool = True) -> LoopDevice:
        """Attach (or find attached) a loop device; discard=False as disable_discard."""
        ...

    def disable_discard(self, device: str) -> None:
        """Make the device refuse discards and write-zeroes, which the loop driver would
        turn into holes punched in the image (thick volumes); until it is detached."""
        ...

    def attach_loop_fd(self, fd: int, image: Path, *, readonly: bool, direct_io: bool,
                       discard: bool = True) -> LoopDevice:
        """Attach the open file fd itself (the device keeps it, and its locks); discard as
        attach_loop."""
        ...

    def detach_loop(self, device: str) -> None: ...

    def refresh_loop(self, device: str) -> None:
        """Re-read the backing file's size (losetup -c on the device)."""
        ...

    def set_device_readonly(self, device: str, readonly: bool) -> None: ...

    def attached_read_only(self, device: str) -> bool:
        """Whether the loop device itself was set up read-only (losetup --read-only)."""
        ...

    def probe_fs(self, path: str) -> str | None:
        """Filesystem type found by blkid -p on a device or image file, None if none."""
        ...

    def superblock_fs(self, path: str) -> str | None:
        """ext3/ext4/xfs read from the superblock magic alone (no subprocess), else None."""
        ...

    def mkfs(self, path: str, fstype: str, *, discard: bool, prezeroed: bool = False) -> None: ...

    def mount(self, source: str, target: str, fstype: str, options: Sequence[str]) -> None: ...

    def bind_mount(self, source: str, target: str, *, readonly: bool) -> None: ...

    def unmount(self, target: str) -> None: ...

    def remount(self, target: str, options: Sequence[str]) -> None: ...

    def mounts(self) -> list[MountEntry]: ...

    def grow_fs(self, fstype: str, device: str, mount_point: str) -> None: ...

    def freeze(self, mount_point: str) -> None: ...

    def thaw(self, mount_point: str) -> None: ...

    def sync_device(self, device: str) -> None:
        """Write a block device's dirty pages and flush it (fsync(2) of the device node):
        what a raw block volume gets instead of a freeze."""
        ...

    def copy_image(self, source: Path, dest: Path, *, sparse: bool = True, shared: bool = True) -> None:
        """Copy an image; sparse keeps holes, shared reflinks where the host filesystem
        can (thick copies want neither)."""
        ...

    def fs_error_count(self, device: str) -> int: ...

    def trim(self, mount_point: str) -> int:
        """fstrim the mounted filesystem; bytes trimmed as reported."""
        ...

    def missing_tools(self) -> list[str]: ...
