"""mount(8)'s split of -o options, and the error syscalls raise."""

from __future__ import annotations

import errno

import pytest

from csi_driver.host import syscalls as lx
from csi_driver.host.runner import CommandError


@pytest.mark.parametrize(("options", "flags", "data"), [
    ([], 0, ""),
    (["discard"], 0, "discard"),
    (["ro", "noatime", "discard"], lx.MS_RDONLY | lx.MS_NOATIME, "discard"),
    (["ro", "rw"], 0, ""),  # the last word wins, as in mount(8)
    (["nosuid", "nodev", "noexec", "suid"], lx.MS_NODEV | lx.MS_NOEXEC, ""),
    (["nouuid", "logbsize=256k"], 0, "nouuid,logbsize=256k"),
    (["data=ordered", "errors=remount-ro", "lazytime"], lx.MS_LAZYTIME, "data=ordered,errors=remount-ro"),
    (["relatime", "strictatime", "nostrictatime"], lx.MS_RELATIME, ""),
])
def test_split_options(options: list[str], flags: int, data: str) -> None:
    assert lx.split_options(options) == (flags, data)


@pytest.mark.parametrize("option", ["nofail", "defaults", "noauto", "_netdev", "x-systemd.automount",
                                    "comment=keep", "loop", "offset=4096"])
def test_options_only_mount8_knows_are_left_to_it(option: str) -> None:
    assert lx.split_options(["noatime", option]) is None


def test_syscall_error_reads_like_a_command_error() -> None:
    exc = lx.SyscallError("ioctl(LOOP_CONFIGURE)", ["/dev/loop7", "/data/disk.img"], errno.EBUSY)
    assert isinstance(exc, CommandError)
    assert exc.errno == errno.EBUSY and exc.returncode == errno.EBUSY
    assert "busy" in exc.stderr.lower()  # what the attach retry looks for
    assert str(exc) == "ioctl(LOOP_CONFIGURE) /dev/loop7 /data/disk.img: Device or resource busy (EBUSY)"
