"""Helpers that look at and clean up real kernel objects (loop devices, mounts) that a test
made under its temporary directory, so nothing is left behind even when a test fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from csi_driver.hostos import HostOS, parse_mountinfo


def mounts_under(root: Path) -> list[str]:
    real = os.path.realpath(root)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        entries = parse_mountinfo(f.read())
    return [m.mount_point for m in entries if m.mount_point == real or m.mount_point.startswith(real + "/")]


def loops_under(root: Path) -> list[str]:
    real = os.path.realpath(root)
    return [d.device for d in HostOS().loop_devices()
            if d.backing_file.startswith(real + "/") or d.backing_file.startswith(str(root) + "/")]


def cleanup(root: Path) -> list[str]:
    """Unmount (deepest first) and detach everything of root; return what was found."""
    found = []
    for _ in range(10):
        points = sorted(set(mounts_under(root)), key=len, reverse=True)
        if not points:
            break
        for p in points:
            found.append(f"mount {p}")
            subprocess.run(["umount", "-l", p], check=False, capture_output=True)
    for dev in loops_under(root):
        found.append(f"loop {dev}")
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
    return found
