"""Find and tear down the kernel objects (mounts, loop devices) under one directory tree.
Used where a whole tree is thrown away at once: test fixtures, the benchmark and the
soak, after a run; never by the CSI services, which act on one volume at a time."""

from __future__ import annotations

import os
from pathlib import Path

from .linux import HostOS
from .runner import CommandError


def mounts_under(root: Path, host: HostOS | None = None) -> list[str]:
    real = os.path.realpath(root)
    return [m.mount_point for m in (host or HostOS()).mounts()
            if m.mount_point == real or m.mount_point.startswith(real + "/")]


def loops_under(root: Path, host: HostOS | None = None) -> list[str]:
    real = os.path.realpath(root) + "/"
    return [d.device for d in (host or HostOS()).loop_devices() if d.backing_file.startswith(real)]


def sweep(root: Path) -> list[str]:
    """Unmount everything under root (deepest first, lazily when busy) and detach every loop
    device backed by a file under root. Returns what was found; empty after a clean run."""
    host = HostOS()
    found: list[str] = []
    for _ in range(10):
        points = sorted(set(mounts_under(root, host)), key=len, reverse=True)
        if not points:
            break
        for point in points:
            found.append(f"mount {point}")
            try:
                host.unmount(point)
            except CommandError:
                host.runner.run(["umount", "--lazy", point], check=False)
    for dev in loops_under(root, host):
        found.append(f"loop {dev}")
        try:
            host.detach_loop(dev)  # also removes a device a thick volume left unable to discard
        except CommandError:
            host.runner.run(["losetup", "--detach", dev], check=False)
    return found
