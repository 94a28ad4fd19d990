"""Parsing /proc/self/mountinfo, with its cache of lines already parsed."""

from __future__ import annotations

from csi_driver.host import linux
from csi_driver.host.linux import parse_mountinfo
from csi_driver.host.oslayer import MountEntry

TABLE = (
    "22 27 0:21 / /proc rw,relatime shared:12 - proc proc rw\n"
    "97 27 7:3 / /var/lib/kubelet/plugins/x/globalmount rw,noatime - ext4 /dev/loop3 rw,discard\n"
    "98 27 7:3 / /var/lib/kubelet/pods/p/volumes/with\\040space rw - ext4 /dev/loop3 rw\n"
    "99 27 0:5 /loop4 /var/lib/kubelet/pods/q/dev ro,nosuid - devtmpfs udev rw\n"
    "not a mountinfo line\n"
)


def test_fields_and_escapes() -> None:
    entries = parse_mountinfo(TABLE)
    assert [e.mount_point for e in entries] == [
        "/proc", "/var/lib/kubelet/plugins/x/globalmount", "/var/lib/kubelet/pods/p/volumes/with space",
        "/var/lib/kubelet/pods/q/dev"]
    assert entries[1] == MountEntry("/var/lib/kubelet/plugins/x/globalmount", "/", "7:3", "ext4",
                                    "/dev/loop3", ("rw", "noatime"))
    assert entries[3].root == "/loop4" and entries[3].readonly


def test_a_second_read_gives_the_same_entries_from_the_cache() -> None:
    linux._PARSED_LINES.clear()
    first = parse_mountinfo(TABLE)
    assert len(linux._PARSED_LINES) == 5  # the line that is not an entry is remembered too
    changed = TABLE.replace("97 27 7:3", "101 27 7:3")
    second = parse_mountinfo(changed)
    assert second == first  # same mounts; only the (unused) mount id changed
    assert parse_mountinfo(TABLE) == first


def test_the_cache_stays_bounded() -> None:
    linux._PARSED_LINES.clear()
    for i in range(3000):
        parse_mountinfo(f"{i} 27 7:1 / /mnt/m{i} rw - ext4 /dev/loop1 rw\n")
    assert len(linux._PARSED_LINES) <= 2 * 1 + 1024 + 1
    assert parse_mountinfo("5 27 7:1 / /mnt/x rw - ext4 /dev/loop1 rw\n")[0].mount_point == "/mnt/x"
