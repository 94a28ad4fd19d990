"""Shared mode on a real GlusterFS datastore: one glusterd and volume for the session
(tests/gluster.py), and per test fresh FUSE clients as the hosts' views of it (one for the
controller, one per node) with drivers started on them as separate processes."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_driver.host.linux import HostOS
from csi_driver.volumes.datastore.records import init_marker, read_marker
from tests import kernel
from tests.conftest import HAVE_KERNEL, Driver
from tests.gluster import GlusterBed, GlusterError
from tests.operator.conftest import run_ctl

__all__ = ["run_ctl"]  # thinloopctl in-process, for the datastore commands

DATASTORE = "gluster-test"
_names = itertools.count()


@dataclass
class SharedDriver(Driver):
    """A driver process on a host's mount of the datastore."""

    node: str = "a"
    data: Path = Path("/nonexistent")
    mode: str = "node"

    @property
    def data_dir(self) -> Path:
        return self.data

    def start(self) -> SharedDriver:
        # A driver killed with -9 leaves its socket: wait for the new one, not that one.
        self.socket.unlink(missing_ok=True)
        super().start()
        return self

    def args(self) -> list[str]:
        return [sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{self.socket}",
                "--data-dir", str(self.data), "--kubelet-dir", str(self.kubelet_dir),
                "--node-id", self.node, "--mode", self.mode, "--datastore", DATASTORE,
                "--heartbeat-seconds", "1", "--log-level", "debug", *self.extra_args]


@dataclass
class Cluster:
    """Hosts (each a FUSE client of the datastore) and the drivers running on them."""

    bed: GlusterBed
    root: Path
    subdir: str
    mounts: dict[str, Path] = field(default_factory=dict)
    drivers: dict[str, SharedDriver] = field(default_factory=dict)

    def host(self, name: str) -> Path:
        """The datastore as host `name` sees it (its own FUSE client), made on first use."""
        if name not in self.mounts:
            self.mounts[name] = self.bed.mount(f"{self.subdir}-{name}-{next(_names)}")
        return self.mounts[name]

    def data(self, host: str) -> Path:
        return self.host(host) / self.subdir

    def init(self, host: str) -> None:
        """Make the test's directory of the volume a datastore, as an operator does once with
        `thinloopctl datastore init` (it is no mount point, where a controller would make
        the marker itself)."""
        data = self.data(host)
        data.mkdir(exist_ok=True)
        if read_marker(data) is None:
            init_marker(data, DATASTORE, "tests")

    def start(self, host: str, mode: str = "node", *extra: str, env: dict[str, str] | None = None) -> SharedDriver:
        """Start (or restart) the driver of `host`; its node id is the host's name."""
        old = self.drivers.get(host)
        if old is not None:
            old.shutdown()
        if mode in ("controller", "all"):
            self.init(host)
        d = SharedDriver(self.root / host, list(extra), env=dict(env or {}), node=host, data=self.data(host),
                         mode=mode)
        d.start()
        self.drivers[host] = d
        return d

    def lose_host(self, host: str) -> None:
        """Node loss as the datastore sees it: the host's client dies (SIGKILL)."""
        self.bed.kill_client(self.mounts[host])

    def reboot(self, host: str) -> list[str]:
        """What a reboot of a lost host takes away: its driver, its mounts, the loop devices
        on its (dead) client. Returns what was there."""
        if host in self.drivers:
            self.drivers[host].kill()
        gone = kernel.cleanup(self.root / host)
        hostos = HostOS()
        for loop in hostos.loop_devices():
            if loop.backing_file.startswith(str(self.mounts[host]) + "/"):
                hostos.detach_loop(loop.device)
                gone.append(f"loop {loop.device}")
        return gone

    def teardown(self) -> list[str]:
        for d in self.drivers.values():
            d.shutdown()
        leaked = kernel.cleanup(self.root)
        host = HostOS()
        for loop in host.loop_devices():
            if any(loop.backing_file.startswith(str(m) + "/") for m in self.mounts.values()):
                leaked.append(f"loop {loop.device} ({loop.backing_file})")
                host.detach_loop(loop.device)
        live = [m for m in self.mounts.values() if _usable(m)]
        if live:
            shutil.rmtree(live[0] / self.subdir, ignore_errors=True)
        for m in self.mounts.values():
            self.bed.unmount(m)
        return leaked


def _usable(path: Path) -> bool:
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def gluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlusterBed]:
    if not HAVE_KERNEL:
        pytest.skip("needs root, loop devices and FUSE (a GlusterFS datastore of its own)")
    bed = GlusterBed(tmp_path_factory.mktemp("gluster"))
    try:
        bed.start()
    except GlusterError as exc:
        bed.stop()
        pytest.fail(f"cannot start the GlusterFS test datastore: {exc}")
    yield bed
    forced = bed.stop()
    if forced:
        print(f"GlusterFS test datastore: had to force {forced}", file=sys.stderr)


@pytest.fixture
def cluster(gluster: GlusterBed, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(gluster, tmp_path, f"t{next(_names)}-{request.node.name[:40]}".replace("[", "-").replace("]", ""))
    try:
        yield c
    finally:
        leaked = c.teardown()
    if leaked:
        pytest.fail(f"test left kernel objects behind: {leaked}")
