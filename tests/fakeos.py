"""A stateful fake of the OS layer: loop devices, filesystems and mounts in memory, so
service logic can be tested quickly and without root."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from csi_driver.host.oslayer import LoopDevice, MountEntry, file_id

MARKER = b"FAKEFS:"


class FakeOS:
    def __init__(self) -> None:
        self.loops: dict[int, str] = {}
        self.readonly: set[int] = set()
        self.mount_table: list[MountEntry] = []
        self.calls: list[tuple[str, ...]] = []
        self.frozen: set[str] = set()
        self.missing: list[str] = []
        self.kept: dict[int, int] = {}
        """Loop index -> a copy of the open file attach_loop_fd was given, as the kernel keeps it."""
        self.no_discard: set[int] = set()

    def _dev(self, index: int) -> LoopDevice:
        image = self.loops[index]
        return LoopDevice(f"/dev/loop{index}", image, f"7:{index}", True, index in self.readonly,
                          os.stat(image).st_size if os.path.exists(image) else 0, file_id(image))

    def _image_of(self, device: str) -> str:
        return self.loops[int(device.removeprefix("/dev/loop"))]

    def loop_devices(self) -> list[LoopDevice]:
        return [self._dev(i) for i in sorted(self.loops)]

    def find_loop(self, image: Path) -> LoopDevice | None:
        real = os.path.realpath(image)
        return next((self._dev(i) for i, f in self.loops.items() if f == real), None)

    def loop_of_mount(self, mount: MountEntry) -> LoopDevice | None:
        for dev in self.loop_devices():
            if mount.major_minor == dev.major_minor or mount.root == "/" + Path(dev.device).name:
                return dev
        return None

    def attach_loop(self, image: Path, *, readonly: bool, discard: bool = True) -> LoopDevice:
        self.calls.append(("attach", str(image)))
        index = next(i for i in range(1024) if i not in self.loops)
        self.loops[index] = os.path.realpath(image)
        if readonly:
            self.readonly.add(index)
        if not discard:
            self.no_discard.add(index)
        return self._dev(index)

    def attach_loop_fd(self, fd: int, image: Path, *, readonly: bool, direct_io: bool,
                       discard: bool = True) -> LoopDevice:
        dev = self.attach_loop(image, readonly=readonly, discard=discard)
        self.kept[int(dev.device.removeprefix("/dev/loop"))] = os.dup(fd)
        return dev

    def disable_discard(self, device: str) -> None:
        self.no_discard.add(int(device.removeprefix("/dev/loop")))

    def detach_loop(self, device: str) -> None:
        self.calls.append(("detach", device))
        index = int(device.removeprefix("/dev/loop"))
        self.loops.pop(index, None)
        self.no_discard.discard(index)
        if index in self.kept:
            os.close(self.kept.pop(index))

    def refresh_loop(self, device: str) -> None:
        self.calls.append(("refresh", device))

    def attached_read_only(self, device: str) -> bool:
        return int(device.removeprefix("/dev/loop")) in self.readonly

    def set_device_readonly(self, device: str, readonly: bool) -> None:
        index = int(device.removeprefix("/dev/loop"))
        (self.readonly.add if readonly else self.readonly.discard)(index)

    # The "filesystem" is a marker written into the image itself, so it follows renames
    # and copies exactly as a real superblock would.
    def probe_fs(self, path: str) -> str | None:
        image = self._image_of(path) if path.startswith("/dev/loop") else path
        with open(image, "rb") as f:
            head = f.read(32)
        return head[len(MARKER):].split(b"\0")[0].decode() if head.startswith(MARKER) else None

    def superblock_fs(self, path: str) -> str | None:
        return self.probe_fs(path)

    def mkfs(self, path: str, fstype: str, *, discard: bool, prezeroed: bool = False) -> None:
        self.calls.append(("mkfs", path, fstype))
        if self.probe_fs(path) is not None:
            raise AssertionError(f"mkfs over an existing filesystem on {path}")
        image = self._image_of(path) if path.startswith("/dev/loop") else path
        with open(image, "r+b") as f:
            f.write(MARKER + fstype.encode() + b"\0")

    def mount(self, source: str, target: str, fstype: str, options: Sequence[str]) -> None:
        self.calls.append(("mount", source, target))
        index = int(source.removeprefix("/dev/loop"))
        self.mount_table.append(MountEntry(target, "/", f"7:{index}", fstype, source, tuple(options) or ("rw",)))

    def bind_mount(self, source: str, target: str, *, readonly: bool) -> None:
        self.calls.append(("bind", source, target))
        opts = ("ro",) if readonly else ("rw",)
        if source.startswith("/dev/loop"):
            self.mount_table.append(MountEntry(target, "/" + Path(source).name, "0:5", "devtmpfs", "udev", opts))
            return
        src = next(m for m in reversed(self.mount_table) if m.mount_point == source)
        self.mount_table.append(MountEntry(target, src.root, src.major_minor, src.fstype, src.source, opts))

    def unmount(self, target: str) -> None:
        self.calls.append(("umount", target))
        for i in range(len(self.mount_table) - 1, -1, -1):
            if self.mount_table[i].mount_point == target:
                del self.mount_table[i]
                return
        raise AssertionError(f"{target} not mounted")

    def remount(self, target: str, options: Sequence[str]) -> None:
        self.calls.append(("remount", target, *options))

    def mounts(self) -> list[MountEntry]:
        return list(self.mount_table)

    def grow_fs(self, fstype: str, device: str, mount_point: str) -> None:
        self.calls.append(("grow", fstype, device, mount_point))

    def freeze(self, mount_point: str) -> None:
        self.frozen.add(mount_point)

    def thaw(self, mount_point: str) -> None:
        self.frozen.discard(mount_point)

    def sync_device(self, device: str) -> None:
        self.calls.append(("sync", device))

    def copy_image(self, source: Path, dest: Path, *, sparse: bool = True, shared: bool = True) -> None:
        shutil.copyfile(source, dest)

    def fs_error_count(self, device: str) -> int:
        return 0

    def trim(self, mount_point: str) -> int:
        return 0

    def missing_tools(self) -> list[str]:
        return list(self.missing)
