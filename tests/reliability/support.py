"""Shared checks for the reliability tests: who owns each loop device and mount, filesystem
UUIDs, crash-and-restart of the driver process, and a module-scoped driver."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from csi_driver.host.linux import HostOS, parse_mountinfo
from csi_driver.ops.client import CsiClient
from csi_driver.proto import csi_pb2
from tests import kernel
from tests.conftest import Driver

T = TypeVar("T")


def fs_uuid(path: str | Path) -> str:
    """The filesystem UUID blkid finds on an image or device ('' when none)."""
    res = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", str(path)],
                         capture_output=True, text=True, check=False)
    return res.stdout.strip()


def image_of(d: Driver, volume_id: str) -> Path:
    return d.data_dir / "volumes" / volume_id / "disk.img"


def listed_volumes(c: CsiClient) -> list[str]:
    resp = c.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    return sorted(e.volume.volume_id for e in resp.entries)


def listed_snapshots(c: CsiClient) -> list[str]:
    resp = c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())
    return sorted(e.snapshot.snapshot_id for e in resp.entries)


def leftovers(d: Driver) -> list[str]:
    """Dot-prefixed entries (temporary or trash) in the store, and temp files in objects."""
    found = []
    for kind in ("volumes", "snapshots", "group-snapshots"):
        root = d.data_dir / kind
        if not root.is_dir():
            continue
        for name in os.listdir(root):
            if name.startswith("."):
                found.append(f"{kind}/{name}")
            elif (root / name).is_dir():
                found += [f"{kind}/{name}/{n}" for n in os.listdir(root / name) if n.startswith(".")]
    return sorted(found)


def mounts_of(path: str) -> int:
    """How many mounts are stacked exactly at path."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return sum(1 for m in parse_mountinfo(f.read()) if m.mount_point == os.path.realpath(path))


def assert_everything_owned(d: Driver, c: CsiClient) -> None:
    """Every loop device under the test dir backs a listed volume's image (one loop per
    image), and every mount under the kubelet dir is of such a loop device."""
    volumes = listed_volumes(c)
    images = {os.path.realpath(image_of(d, v)): v for v in volumes}
    loops = [lp for lp in HostOS().loop_devices()
             if lp.backing_file.startswith(os.path.realpath(d.data_dir) + "/")]
    stray = [f"{lp.device} -> {lp.backing_file}" for lp in loops if lp.backing_file not in images]
    assert stray == [], f"loop devices that no volume owns: {stray}"
    backing = [lp.backing_file for lp in loops]
    assert len(backing) == len(set(backing)), f"an image is attached twice: {backing}"
    owned_dev = {lp.major_minor for lp in loops}
    owned_nodes = {"/" + Path(lp.device).name for lp in loops}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        entries = parse_mountinfo(f.read())
    kubelet = os.path.realpath(d.kubelet_dir) + "/"
    foreign = [m.mount_point for m in entries if m.mount_point.startswith(kubelet)
               and m.major_minor not in owned_dev and m.root not in owned_nodes]
    assert foreign == [], f"mounts that no volume owns: {foreign}"


def sha256_file(path: str | Path, limit: int = -1) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(limit)).hexdigest()


def start_ready(d: Driver) -> None:
    """Start and wait until the new process serves: a killed driver leaves its socket
    file behind, so the file's existence alone proves nothing."""
    d.start()
    d.client.identity.Probe(csi_pb2.ProbeRequest(), timeout=20)


def crash_then_retry(d: Driver, failpoint: str, action: Callable[[CsiClient], T]) -> T:
    """Restart the driver with `failpoint` armed, make the call that reaches it (the driver
    must die by SIGKILL, the client seeing UNAVAILABLE), restart it clean, check nothing
    half-made is listed and no leftovers remain, and return the retried call's result."""
    d.stop()
    d.env = {"THINLOOP_FAILPOINTS": f"{failpoint}=kill"}
    start_ready(d)
    with pytest.raises(grpc.RpcError) as info:
        action(d.client)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == -signal.SIGKILL, f"failpoint {failpoint} was not reached"
    d.proc = None
    d.kill()  # drops the dead client
    d.env = {}
    start_ready(d)
    assert leftovers(d) == [], "start-up recovery left temporary or trash entries"
    return action(d.client)


def thaw_quietly(path: str | Path) -> None:
    """Thaw a filesystem a failed test may have left frozen (else unmount hangs)."""
    subprocess.run(["fsfreeze", "--unfreeze", str(path)], capture_output=True, check=False)


def is_frozen(path: str | Path) -> bool:
    """Freezing a frozen filesystem fails with EBUSY; an unfrozen one is frozen and thawed
    again at once."""
    res = subprocess.run(["fsfreeze", "--freeze", str(path)], capture_output=True, text=True, check=False)
    if res.returncode == 0:
        thaw_quietly(path)
        return False
    assert "busy" in res.stderr.lower(), res.stderr
    return True


def module_driver(tmp_path_factory: pytest.TempPathFactory, name: str,
                  extra_args: list[str] | None = None) -> Iterator[Driver]:
    """Body of a module-scoped driver fixture: one driver for the module's tests, then
    everything torn down; a leaked loop device or mount fails the module."""
    root = tmp_path_factory.mktemp(name)
    d = Driver(root, extra_args=list(extra_args or []))
    try:
        d.start()
        yield d
    finally:
        d.shutdown()
        leaked = kernel.cleanup(root)
        assert leaked == [], f"module left kernel objects behind: {leaked}"
