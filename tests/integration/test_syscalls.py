"""The system calls that replace losetup, mount and umount, against the real kernel."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from csi_driver.host import syscalls
from csi_driver.host.linux import HostOS
from csi_driver.host.runner import CommandResult, Runner

pytestmark = pytest.mark.root


class RecordingRunner(Runner):
    def __init__(self) -> None:
        super().__init__()
        self.argvs: list[list[str]] = []

    def run(self, argv: Sequence[str], *, timeout: float | None = None, check: bool = True) -> CommandResult:
        self.argvs.append(list(argv))
        return super().run(argv, timeout=timeout, check=check)


@pytest.fixture
def host() -> HostOS:
    return HostOS(RecordingRunner())


@pytest.fixture
def image(workdir: Path) -> Iterator[Path]:
    img = workdir / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(img)], check=True)
    yield img


def options_at(path: Path) -> set[str]:
    """Per-mount and filesystem options, as findmnt shows them."""
    out = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return set(out.strip().split(","))


def test_attach_detach_by_ioctl(host: HostOS, image: Path) -> None:
    dev = host.attach_loop(image, readonly=False)
    try:
        assert dev.direct_io and not dev.readonly and dev.size_bytes == 64 << 20
        assert dev.backs(str(image), (os.major(image.stat().st_dev), os.minor(image.stat().st_dev),
                                      image.stat().st_ino))
        assert host.attach_loop(image, readonly=False) == dev  # idempotent
        with pytest.raises(syscalls.SyscallError) as exc:  # a bound device refuses a second file
            syscalls.loop_configure(dev.device, str(image), readonly=False, direct_io=False, block_size=0)
        assert exc.value.errno == errno.EBUSY
        assert host.runner.argvs == []  # type: ignore[attr-defined]
    finally:
        host.detach_loop(dev.device)
    assert host.find_loop(image) is None
    host.detach_loop(dev.device)  # detaching twice is not an error


def test_device_node_read_agrees_with_sysfs(host: HostOS, image: Path) -> None:
    """The loop state read through one open of /dev/loopN is what sysfs shows, also
    after the device is made read-only with BLKROSET; without a usable node the sysfs
    read is used."""
    dev = host.attach_loop(image, readonly=False)
    name = Path(dev.device).name
    try:
        for readonly in (False, True):
            host.set_device_readonly(dev.device, readonly)
            by_node = host._read_loop_node(name, dev.backing_file)
            by_sysfs = host._read_loop_sysfs(name, dev.backing_file)
            assert by_node is not None and by_node == by_sysfs and by_node.readonly == readonly
        host.set_device_readonly(dev.device, False)
        assert HostOS(dev_dir=Path("/nonexistent"))._read_loop_node(name, dev.backing_file) is None
        other = HostOS(dev_dir=Path("/nonexistent"))._read_loop(name)
        assert other is not None and other.major_minor == dev.major_minor and other.backing_id is None
    finally:
        host.detach_loop(dev.device)


def test_read_only_attach(host: HostOS, image: Path, workdir: Path) -> None:
    dev = host.attach_loop(image, readonly=True)
    mnt = workdir / "mnt"
    mnt.mkdir()
    try:
        assert dev.readonly and host.attached_read_only(dev.device)
        with pytest.raises(syscalls.SyscallError):  # a read-only device is not mounted writable
            host.mount(dev.device, str(mnt), "ext4", [])
        host.mount(dev.device, str(mnt), "ext4", ["ro"])
        assert "ro" in options_at(mnt)
        host.unmount(str(mnt))
    finally:
        host.detach_loop(dev.device)


def test_mount_flags_and_read_only_bind(host: HostOS, image: Path, workdir: Path) -> None:
    dev = host.attach_loop(image, readonly=False)
    staging, target = workdir / "staging", workdir / "target"
    staging.mkdir()
    target.mkdir()
    try:
        host.mount(dev.device, str(staging), "ext4", ["nosuid", "noatime", "discard"])
        assert {"rw", "nosuid", "noatime", "discard"} <= options_at(staging)
        host.bind_mount(str(staging), str(target), readonly=True)
        assert {"ro", "nosuid", "noatime"} <= options_at(target)  # flags kept by the remount
        with pytest.raises(OSError) as exc:
            (target / "f").write_text("x")
        assert exc.value.errno == errno.EROFS
        (staging / "f").write_text("x")  # the staging mount stays writable
        host.unmount(str(target))
        with pytest.raises(syscalls.SyscallError) as err:
            host.unmount(str(target))
        assert err.value.errno == errno.EINVAL  # not a mount point any more
        host.unmount(str(staging))
        assert host.runner.argvs == []  # type: ignore[attr-defined]
    finally:
        host.detach_loop(dev.device)


def test_options_for_mount8_go_to_mount8(host: HostOS, image: Path, workdir: Path) -> None:
    dev = host.attach_loop(image, readonly=False)
    mnt = workdir / "mnt"
    mnt.mkdir()
    try:
        host.mount(dev.device, str(mnt), "ext4", ["nofail", "noatime"])
        assert "noatime" in options_at(mnt)
        assert host.runner.argvs == [  # type: ignore[attr-defined]
            ["mount", "-t", "ext4", "-o", "nofail,noatime", dev.device, str(mnt)]]
        host.unmount(str(mnt))
    finally:
        host.detach_loop(dev.device)


def test_losetup_when_the_kernel_refuses_loop_configure(host: HostOS, image: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(device: str, image: str, **_: object) -> None:
        raise syscalls.SyscallError("ioctl(LOOP_CONFIGURE)", [device, image], errno.ENOTTY)

    monkeypatch.setattr(syscalls, "loop_configure", refuse)
    dev = host.attach_loop(image, readonly=False)
    try:
        assert dev.direct_io and dev.backing_file == str(image)
        argv = host.runner.argvs[-1]  # type: ignore[attr-defined]
        assert argv[:2] == ["losetup", "--direct-io=on"] and argv[-1] == str(image)
    finally:
        host.detach_loop(dev.device)
