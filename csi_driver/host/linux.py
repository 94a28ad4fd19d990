"""The real OS layer: loop devices and mounts through system calls (syscalls), and every
run of blkid, mkfs, resize2fs, xfs_growfs, fsfreeze, fstrim and cp through the runner."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import syscalls
from .oslayer import FileId, LoopDevice, MountEntry, file_id, real_path
from .runner import CommandError, Runner

log = logging.getLogger(__name__)

LOOP_MAJOR = 7
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82
BLKROSET = 0x125D
LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64_SIZE = 232
LO_NUMBER_OFFSET = 40  # after five u64 fields of struct loop_info64
LO_FLAGS_OFFSET = 52  # after five u64 and three u32 fields
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_DIRECT_IO = 16
BLKROGET = 0x125E
BLKGETSIZE64 = 0x80081272
REQUIRED_TOOLS = ("losetup", "blkid", "mount", "umount", "mkfs.ext4", "mkfs.ext3",
                  "mkfs.xfs", "resize2fs", "e2fsck", "xfs_growfs", "fsfreeze", "fstrim", "cp")
TOOL_PACKAGES = {"losetup": "util-linux", "blkid": "util-linux", "mount": "mount",
                 "umount": "mount", "fsfreeze": "util-linux", "fstrim": "util-linux",
                 "mkfs.ext4": "e2fsprogs", "mkfs.ext3": "e2fsprogs", "resize2fs": "e2fsprogs",
                 "e2fsck": "e2fsprogs", "mkfs.xfs": "xfsprogs", "xfs_growfs": "xfsprogs",
                 "cp": "coreutils"}
"""The Debian package of each tool the driver runs."""
_ATTACH_RETRIES = 20
_RACE_ERRNOS = (errno.EBUSY, errno.ENXIO, errno.ENODEV)
"""A loop device another process took, or removed, between "find a free one" and "attach"."""


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mount_field(value: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in value:
        return value
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), value)


def _parse_mountinfo_line(line: str) -> MountEntry | None:
    left, sep, right = line.partition(" - ")
    if not sep:
        return None
    fields = left.split()
    tail = right.split()
    if len(fields) < 6 or len(tail) < 2:
        return None
    if "\\" in line:
        return MountEntry(_unescape_mount_field(fields[4]), _unescape_mount_field(fields[3]),
                          fields[2], tail[0], _unescape_mount_field(tail[1]), tuple(fields[5].split(",")))
    return MountEntry(fields[4], fields[3], fields[2], tail[0], tail[1], tuple(fields[5].split(",")))


_PARSED_LINES: dict[str, MountEntry | None] = {}
"""mountinfo lines already parsed. A line names its mount's unique id, so the same text
always means the same entry; the table is read several times per call and mostly
unchanged between reads, so most lines are found here instead of being parsed again."""


def parse_mountinfo(text: str) -> list[MountEntry]:
    lines = text.splitlines()
    parsed = _PARSED_LINES
    if len(parsed) > 2 * len(lines) + 1024:
        parsed.clear()  # mostly lines of mounts long gone
    entries: list[MountEntry] = []
    for line in lines:
        try:
            entry = parsed[line]
        except KeyError:
            entry = parsed[line] = _parse_mountinfo_line(line)
        if entry is not None:
            entries.append(entry)
    return entries


def _status_file_id(info: bytes) -> FileId:
    """The backing file's (major, minor, inode) in a loop_info64."""
    encoded = int.from_bytes(info[0:8], "little")  # the kernel's new_encode_dev format
    major = (encoded & 0xFFF00) >> 8
    minor = (encoded & 0xFF) | ((encoded >> 12) & 0xFFF00)
    return major, minor, int.from_bytes(info[8:16], "little")


class HostOS:
    """OSLayer over the real kernel."""

    def __init__(self, runner: Runner | None = None, *, dev_dir: Path = Path("/dev"),
                 sys_block: Path = Path("/sys/block"), sector_size: int = 512) -> None:
        self.runner = runner or Runner()
        self.dev_dir = dev_dir
        self.sys_block = sys_block
        self.sector_size = sector_size
        """Logical sector size for new loop devices, matched to the disk under the data dir."""
        self._attach_lock = threading.Lock()
        self._loop_hint: dict[str, str] = {}

    # -- loop devices -----------------------------------------------------------------

    def _read_loop(self, name: str) -> LoopDevice | None:
        backing = _sysread(f"{self.sys_block}/{name}/loop/backing_file")
        if not backing:
            return None  # not attached
        return self._read_loop_node(name, backing) or self._read_loop_sysfs(name, backing)

    def _read_loop_node(self, name: str, backing: str) -> LoopDevice | None:
        """Everything but the backing path from one open of the device node: its number,
        LOOP_GET_STATUS64 (identity, direct I/O), BLKROGET and BLKGETSIZE64. None when
        this container has no usable node for it (or the node is another device)."""
        try:
            fd = os.open(f"{self.dev_dir}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            info = bytes(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64_SIZE)))
            readonly = int.from_bytes(fcntl.ioctl(fd, BLKROGET, bytes(4)), "little")
            size = int.from_bytes(fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)), "little")
        except OSError:
            return None
        finally:
            os.close(fd)
        number = int.from_bytes(info[LO_NUMBER_OFFSET:LO_NUMBER_OFFSET + 4], "little")
        if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != LOOP_MAJOR or f"loop{number}" != name:
            return None
        flags = int.from_bytes(info[LO_FLAGS_OFFSET:LO_FLAGS_OFFSET + 4], "little")
        return LoopDevice(
            device=f"{self.dev_dir}/{name}",
            backing_file=backing,
            major_minor=f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}",
            direct_io=bool(flags & LO_FLAGS_DIRECT_IO),
            readonly=bool(readonly),
            size_bytes=size,
            backing_id=_status_file_id(info),
        )

    def _read_loop_sysfs(self, name: str, backing: str) -> LoopDevice:
        base = f"{self.sys_block}/{name}"
        return LoopDevice(
            device=f"{self.dev_dir}/{name}",
            backing_file=backing,
            major_minor=_sysread(f"{base}/dev"),
            direct_io=_sysread(f"{base}/loop/dio") == "1",
            readonly=_sysread(f"{base}/ro") == "1",
            size_bytes=int(_sysread(f"{base}/size") or 0) * 512,
            backing_id=self._backing_id(name),
        )

    def _backing_id(self, name: str) -> FileId | None:
        """(major, minor, inode) of the backing file, from LOOP_GET_STATUS64."""
        try:
            return _status_file_id(self._loop_status(f"{self.dev_dir}/{name}"))
        except OSError:
            return None

    @staticmethod
    def _loop_status(device: str) -> bytes:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return bytes(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64_SIZE)))
        finally:
            os.close(fd)

    def loop_devices(self) -> list[LoopDevice]:
        found = []
        try:
            names = [n for n in os.listdir(self.sys_block) if n.startswith("loop")]
        except OSError:
            return []
        for name in names:
            dev = self._read_loop(name)
            if dev is not None:
                found.append(dev)
        return found

    @staticmethod
    def _sized_loops() -> list[str]:
        """Loop devices with a size, from one read of /proc/partitions (which leaves out
        empty disks: a free loop device is one). A thinloop image is never empty."""
        rows = (line.split() for line in _sysread("/proc/partitions").splitlines())
        return [row[3] for row in rows
                if len(row) == 4 and row[3].startswith("loop") and row[3][4:].isdigit()]

    def find_loop(self, image: Path) -> LoopDevice | None:
        """The device attached to this image. First by path, reading one sysfs file per
        sized loop device (the last device seen for the image first); then, since sysfs
        paths are relative to the mount namespace that attached them (a restarted driver
        container sees another), by the backing file's identity."""
        wanted = real_path(image)
        hint = self._loop_hint.get(wanted)
        names = self._sized_loops()
        if hint in names:
            names.remove(hint)
            names.insert(0, hint)
        wanted_id = file_id(wanted)
        others = []
        sys_block = self.sys_block
        for name in names:
            backing = _sysread(f"{sys_block}/{name}/loop/backing_file")
            if not backing:
                continue  # not attached
            if backing != wanted:
                others.append(name)
                continue
            dev = self._read_loop(name)
            if dev is not None and dev.backs(wanted, wanted_id):
                self._loop_hint[wanted] = name
                return dev
        if wanted_id is not None:
            for name in others:
                if self._backing_id(name) == wanted_id:
                    dev = self._read_loop(name)
                    if dev is not None and dev.backing_id == wanted_id:
                        self._loop_hint[wanted] = name
                        return dev
        self._loop_hint.pop(wanted, None)
        return None

    def loop_of_mount(self, mount: MountEntry) -> LoopDevice | None:
        if mount.root.startswith("/loop") and mount.fstype in ("devtmpfs", "tmpfs"):
            return self._read_loop(mount.root[1:])  # a bind of the device node
        # The filesystem's device, through sysfs (a partition's minor is not the index).
        try:
            node = Path(real_path(f"/sys/dev/block/{mount.major_minor}"))
        except OSError:
            return None
        if not (node / "loop").is_dir():
            node = node.parent
        return self._read_loop(node.name) if node.name.startswith("loop") else None

    def _ensure_node(self, index: int) -> str:
        """Create /dev/loopN when this container's /dev lacks the node the kernel made."""
        node = self.dev_dir / f"loop{index}"
        try:
            st = os.stat(node)
            if stat.S_ISBLK(st.st_mode):
                return str(node)
            raise CommandError(["mknod", str(node)], 1, f"{node} exists but is not a block device")
        except FileNotFoundError:
            os.mknod(node, 0o660 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, index))
            log.info("created missing device node %s", node)
            return str(node)

    def _free_loop_index(self) -> int:
        fd = os.open(self.dev_dir / "loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            return int(fcntl.ioctl(fd, LOOP_CTL_GET_FREE))
        finally:
            os.close(fd)

    def attach_loop(self, image: Path, *, readonly: bool, discard: bool = True) -> LoopDevice:
        """Attach with direct I/O; fall back to buffered I/O when the kernel refuses it.
        With discard=False the device refuses discards and write-zeroes (disable_discard),
        so nothing above it can punch holes in the image. Attaches are serialised in this
        process; a device a racing process took (EBUSY) or removed (ENXIO) is retried."""
        image_path = real_path(image)
        with self._attach_lock:
            existing = self.find_loop(Path(image_path))
            if existing is not None:
                return existing
            direct_io = True
            last: CommandError | None = None
            for _ in range(_ATTACH_RETRIES):
                device = self._ensure_node(self._free_loop_index())
                try:
                    self._bind_loop(device, image_path, readonly=readonly, direct_io=direct_io)
                except CommandError as exc:
                    last = exc
                    attached = self.find_loop(Path(image_path))
                    if attached is not None:
                        # losetup attached the file but could not switch on direct I/O.
                        log.warning("direct I/O refused for %s; using buffered I/O", image_path)
                        return attached
                    if getattr(exc, "errno", None) in _RACE_ERRNOS or "busy" in exc.stderr.lower():
                        continue  # another process took (or removed) this device first
                    if direct_io and "direct" in exc.stderr.lower():
                        direct_io = False
                        continue
                    raise
                dev = self._read_loop(Path(device).name)
                if dev is None or dev.backing_file != image_path:
                    continue  # lost a race between attach and read; try again
                if not self._settle_discard(dev, discard):
                    continue
                if direct_io and not dev.direct_io:
                    log.warning("direct I/O not enabled on %s for %s", device, image_path)
                return dev
            raise last or CommandError(["losetup", image_path], errno.EBUSY, "no free loop device")

    def _settle_discard(self, dev: LoopDevice, discard: bool) -> bool:
        """After an attach: a thick image's device (discard=False) made to refuse discards;
        a device that cannot discard (a thick volume left it so and its removal failed)
        given back when discards are wanted, False then: attach another."""
        if discard and self.discard_disabled(dev.device):
            log.info("%s cannot discard (left so by a thick volume); using another device", dev.device)
            self.detach_loop(dev.device)
            return False
        if not discard:
            self.disable_discard(dev.device)
        return True

    def _queue_limit(self, device: str, name: str) -> int:
        try:
            return int(_sysread(f"{self.sys_block}/{Path(device).name}/queue/{name}") or 0)
        except ValueError:
            return 0

    def discard_disabled(self, device: str) -> bool:
        """Whether the device's discards were switched off (disable_discard) while its
        backing file could take them."""
        return (self._queue_limit(device, "discard_max_bytes") == 0
                and self._queue_limit(device, "discard_max_hw_bytes") > 0)

    def disable_discard(self, device: str) -> None:
        """Make the loop device refuse discard and write-zeroes requests (EOPNOTSUPP), by
        setting its queue's discard_max_bytes to 0 (Documentation/ABI/stable/sysfs-block).
        The loop driver turns both into fallocate(PUNCH_HOLE) on the backing file
        (drivers/block/loop.c, lo_fallocate), which is how a filesystem's online discard,
        fstrim, ext4's lazy inode-table init and online resize, blkdiscard and an
        application's mkfs would take a thick image's allocation away; refused, the block
        layer writes zeros instead, which keeps it. One way: the kernel then also sets the
        discard granularity to 0 and accepts no other value, so the device stays so until
        it is removed (detach_loop removes it)."""
        path = f"{self.sys_block}/{Path(device).name}/queue/discard_max_bytes"
        if self._queue_limit(device, "discard_max_bytes") == 0:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("cannot switch discard off on %s (%s): a discard or fstrim from above "
                        "can give back part of this thick image; is /sys read-only?", device,
                        exc.strerror)

    def _remove_device(self, name: str) -> None:
        """LOOP_CTL_REMOVE an unbound loop device (a new one is made on demand). Fails
        with EBUSY while anything still has it open; tried for a moment, then left."""
        index = int(name.removeprefix("loop"))
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fd = os.open(self.dev_dir / "loop-control", os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, LOOP_CTL_REMOVE, index)
                finally:
                    os.close(fd)
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.info("left /dev/%s in place (cannot remove it: %s); it cannot discard "
                             "until removed", name, exc.strerror)
                    return
            time.sleep(0.02)

    def attach_loop_fd(self, fd: int, image: Path, *, readonly: bool, direct_io: bool,
                       discard: bool = True) -> LoopDevice:
        """Attach a loop device to the open file `fd` (of `image`) itself, so that locks
        taken through that open file last as long as the device (csi_driver.volumes.datastore.imagelock).
        Never falls back to losetup, which would open the file again, without the lock.
        Direct I/O refused by the kernel (EINVAL) is retried buffered, on the same open
        file with O_DIRECT cleared. As attach_loop: a device a racing process took (EBUSY)
        or removed (ENXIO) is retried with another; discard=False makes the device refuse
        discards (disable_discard), and a device left so is passed over for discard=True."""
        image_path = real_path(image)
        st = os.fstat(fd)
        wanted: FileId = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        block_size = self.sector_size if self.sector_size > 512 else 0
        with self._attach_lock:
            last: syscalls.SyscallError | None = None
            for _ in range(_ATTACH_RETRIES):
                device = self._ensure_node(self._free_loop_index())
                try:
                    syscalls.loop_configure_fd(device, fd, image_path, readonly=readonly,
                                               direct_io=direct_io, block_size=block_size)
                except syscalls.SyscallError as exc:
                    last = exc
                    if exc.errno in _RACE_ERRNOS:
                        continue  # another process took (or removed) this device first
                    if direct_io and exc.errno == errno.EINVAL:
                        log.warning("direct I/O refused for %s; using buffered I/O", image_path)
                        direct_io = False
                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                        continue
                    raise
                dev = self._read_loop(Path(device).name)
                if dev is None or not dev.backs(image_path, wanted):
                    continue  # lost a race between attach and read; try again
                if self._settle_discard(dev, discard):
                    return dev
            raise last or CommandError(["LOOP_CONFIGURE", image_path], errno.EBUSY, "no free loop device")

    def _bind_loop(self, device: str, image: str, *, readonly: bool, direct_io: bool) -> None:
        """LOOP_CONFIGURE; losetup when the kernel refuses it for any reason but a race
        (older kernels, O_DIRECT refused by the backing filesystem): util-linux knows
        every fallback. A race (the device taken, or removed, by another process) raises."""
        try:
            syscalls.loop_configure(device, image, readonly=readonly, direct_io=direct_io,
                                    block_size=self.sector_size if self.sector_size > 512 else 0)
            return
        except syscalls.SyscallError as exc:
            if exc.errno in _RACE_ERRNOS:
                raise  # taken, or removed, by another process: attach_loop takes another
            log.info("%s; attaching with losetup instead", exc)
        argv = ["losetup"]
        if direct_io:
            argv.append("--direct-io=on")
        if self.sector_size > 512:
            argv += ["--sector-size", str(self.sector_size)]
        if readonly:
            argv.append("--read-only")
        self.runner.run([*argv, device, image], timeout=60)

    def detach_loop(self, device: str) -> None:
        """Detach; a device whose discards were switched off is then removed, so that no
        later user (a thin volume, another program) inherits a device that cannot discard."""
        name = Path(device).name
        before = self._read_loop(name)
        crippled = before is not None and self.discard_disabled(device)
        try:
            syscalls.loop_clear(device)
        except syscalls.SyscallError as exc:
            if exc.errno != errno.ENXIO:
                raise
            # already detached, or being detached by the kernel: wait for it below
        if before is not None:
            released = self._wait_released(name, before.backing_file)
            if crippled and released:
                self._remove_device(name)

    def _wait_released(self, name: str, backing_file: str, timeout: float = 5.0) -> bool:
        """While anything else holds the device open, the kernel only marks it for
        auto-clear and lets go of the file at the last close: wait for that, so a
        DeleteVolume right after unstage does not find the volume still attached.
        False when it still holds the file after `timeout`."""
        deadline = time.monotonic() + timeout
        while (dev := self._read_loop(name)) is not None and dev.backing_file == backing_file:
            if time.monotonic() > deadline:
                log.warning("/dev/%s still holds %s %.0fs after detach; the kernel frees it "
                            "when its last opener closes it", name, backing_file, timeout)
                return False
            time.sleep(0.02)
        return True

    def refresh_loop(self, device: str) -> None:
        syscalls.loop_set_capacity(device)

    def attached_read_only(self, device: str) -> bool:
        info = self._loop_status(device)
        flags = int.from_bytes(info[LO_FLAGS_OFFSET:LO_FLAGS_OFFSET + 4], "little")
        return bool(flags & LO_FLAGS_READ_ONLY)

    def set_device_readonly(self, device: str, readonly: bool) -> None:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, BLKROSET, (1 if readonly else 0).to_bytes(4, "little"))
        finally:
            os.close(fd)

    # -- filesystems ------------------------------------------------------------------

    def probe_fs(self, path: str) -> str | None:
        res = self.runner.run(["blkid", "-p", "-s", "TYPE", "-o", "value", path],
                              timeout=60, check=False)
        if res.returncode == 2:
            return None  # nothing recognised
        if res.returncode != 0:
            raise CommandError(res.argv, res.returncode, res.stderr)
        return res.stdout.strip() or None

    def superblock_fs(self, path: str) -> str | None:
        try:
            with open(path, "rb") as f:
                head = f.read(2048)
        except OSError:
            return None
        return fs_from_superblock(head)

    def mkfs(self, path: str, fstype: str, *, discard: bool, prezeroed: bool = False) -> None:
        """Make a filesystem. discard=False: mkfs discards nothing (a discard punches holes
        in a preallocated image). prezeroed: the storage reads as zeros already (a new
        image), so ext3/ext4 neither zero nor leave for the kernel to zero later (its lazy
        inode-table init, which discards through a loop device) their inode tables and
        journal: mke2fs -E assume_storage_prezeroed=1 (e2fsprogs 1.47). An older mke2fs
        refuses the option; then the tables are zeroed at first mount, by writes where the
        device refuses discards."""
        extended: list[str] = []
        if fstype in ("ext3", "ext4"):
            argv = [f"mkfs.{fstype}", "-q", "-F", "-b", "4096"]
            if not discard:
                extended.append("nodiscard")
            if prezeroed:
                extended.append("assume_storage_prezeroed=1")
        elif fstype == "xfs":
            argv = ["mkfs.xfs", "-q", "-f", "-s", "size=4096"]
            if not discard:
                argv.append("-K")
        else:
            raise ValueError(f"unsupported filesystem {fstype}")
        if not extended:
            self.runner.run([*argv, path])
            return
        res = self.runner.run([*argv, "-E", ",".join(extended), path], check=False)
        if res.returncode != 0 and prezeroed and "assume_storage_prezeroed" in res.stderr + res.stdout:
            log.info("%s does not know assume_storage_prezeroed; making %s without it", argv[0], path)
            extended.remove("assume_storage_prezeroed=1")
            argv += ["-E", ",".join(extended)] if extended else []
            self.runner.run([*argv, path])
        elif res.returncode != 0:
            raise CommandError(res.argv, res.returncode, res.stderr or res.stdout)

    def grow_fs(self, fstype: str, device: str, mount_point: str) -> None:
        """Grow to the device size: online when mount_point is given, else offline
        (ext only: xfs can grow only while mounted)."""
        if fstype in ("ext3", "ext4"):
            if not mount_point:
                res = self.runner.run(["e2fsck", "-f", "-p", device], check=False)
                if res.returncode >= 4:  # 1 and 2 mean errors were fixed
                    raise CommandError(res.argv, res.returncode, res.stderr or res.stdout)
            self.runner.run(["resize2fs", device])
        elif fstype == "xfs":
            self.runner.run(["xfs_growfs", mount_point])
        else:
            raise ValueError(f"cannot grow filesystem {fstype}")

    def freeze(self, mount_point: str) -> None:
        self.runner.run(["fsfreeze", "--freeze", mount_point], timeout=60)

    def thaw(self, mount_point: str) -> None:
        self.runner.run(["fsfreeze", "--unfreeze", mount_point], timeout=60)

    def sync_device(self, device: str) -> None:
        # fsync of a block device node writes its page cache and sends a cache flush down;
        # the loop driver turns that into fsync of the image (drivers/block/loop.c, lo_req_flush).
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def trim(self, mount_point: str) -> int:
        res = self.runner.run(["fstrim", "-v", mount_point])
        m = re.search(r"\((\d+) bytes\) trimmed", res.stdout)
        return int(m.group(1)) if m else 0

    def fs_error_count(self, device: str) -> int:
        try:
            return int((Path("/sys/fs/ext4") / Path(device).name / "errors_count").read_text())
        except (OSError, ValueError):
            return 0

    def copy_image(self, source: Path, dest: Path, *, sparse: bool = True, shared: bool = True) -> None:
        """cp the image. sparse: zeros become holes (else every byte is written: an
        eagerzeroedthick copy); shared: a reflink where the host filesystem can (else
        blocks of its own, which a thick copy needs: a shared block is not reserved)."""
        argv = ["cp", f"--sparse={'always' if sparse else 'never'}",
                f"--reflink={'auto' if shared else 'never'}", str(source), str(dest)]
        # Time follows the data (not the apparent size); allow a day for very large images.
        self.runner.run(argv, timeout=86400)

    # -- mounts -----------------------------------------------------------------------

    def mounts(self) -> list[MountEntry]:
        return parse_mountinfo(_sysread("/proc/self/mountinfo"))

    def mount(self, source: str, target: str, fstype: str, options: Sequence[str]) -> None:
        split = syscalls.split_options(options)
        if split is not None:
            syscalls.mount(source, target, fstype, *split)
            return
        argv = ["mount", "-t", fstype]  # options only mount(8) understands
        if options:
            argv += ["-o", ",".join(options)]
        self.runner.run([*argv, source, target], timeout=120)

    def bind_mount(self, source: str, target: str, *, readonly: bool) -> None:
        syscalls.bind_mount(source, target, readonly=readonly)

    def unmount(self, target: str) -> None:
        syscalls.umount(target)

    def remount(self, target: str, options: Sequence[str]) -> None:
        self.runner.run(["mount", "-o", ",".join(["remount", *options]), target], timeout=60)

    def missing_tools(self) -> list[str]:
        return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


EXT_MAGIC_AT = 1024 + 0x38
EXT_COMPAT_HAS_JOURNAL = 0x4
EXT_INCOMPAT_EXTENTS = 0x40


def _sysread(path: str) -> str:
    """A small kernel-made text file (sysfs, procfs), stripped; "" when it is absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape").strip()


def fs_from_superblock(head: bytes) -> str | None:
    """Recognise the filesystems this driver makes from their first 2 KiB."""
    if head[:4] == b"XFSB":
        return "xfs"
    if len(head) >= 1128 and head[EXT_MAGIC_AT:EXT_MAGIC_AT + 2] == b"\x53\xef":
        compat = int.from_bytes(head[1024 + 0x5C:1024 + 0x60], "little")
        incompat = int.from_bytes(head[1024 + 0x60:1024 + 0x64], "little")
        if incompat & EXT_INCOMPAT_EXTENTS:
            return "ext4"
        if compat & EXT_COMPAT_HAS_JOURNAL:
            return "ext3"
    return None


def sector_size_for(path: Path) -> int:
    """Logical sector size of the block device holding `path`, 512 when unknown."""
    try:
        dev = os.stat(path).st_dev
        sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        for candidate in (sysdir / "queue", sysdir.resolve().parent / "queue"):
            f = candidate / "logical_block_size"
            if f.exists():
                return max(512, int(f.read_text()))
    except (OSError, ValueError):
        pass
    return 512
