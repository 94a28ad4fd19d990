"""Shared fixtures. Integration tests run the real driver as a subprocess against a temp
data dir and a temp "kubelet" dir, and always clean up loop devices and mounts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_driver.ops.client import CsiClient, wait_for_socket
from tests import kernel

HAVE_KERNEL = (os.geteuid() == 0 and os.path.exists("/dev/loop-control")
               and shutil.which("losetup") is not None and shutil.which("mkfs.ext4") is not None)
NODE_ID = "test-node"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs root, /dev/loop-control, losetup and mkfs (real kernel objects)")
    for item in items:
        if "root" in item.keywords and not HAVE_KERNEL:
            item.add_marker(skip)


@dataclass
class Driver:
    """A driver process on a temp data dir; restartable; killable."""

    root: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the driver process (e.g. THINLOOP_FAILPOINTS)."""
    proc: subprocess.Popen[bytes] | None = None
    _client: CsiClient | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "csi.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "driver.log"

    def args(self) -> list[str]:
        return [sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{self.socket}",
                "--data-dir", str(self.data_dir), "--kubelet-dir", str(self.kubelet_dir),
                "--node-id", NODE_ID, "--log-level", "debug", *self.extra_args]

    def start(self) -> Driver:
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log, env={**os.environ, **self.env})
        log.close()
        try:
            wait_for_socket(str(self.socket))
        except TimeoutError as exc:  # nothing left running; the driver's own words in the failure
            self.kill()
            tail = "\n".join(self.log().splitlines()[-20:])
            raise TimeoutError(f"{exc}; the driver's log ends:\n{tail}") from None
        return self

    @property
    def client(self) -> CsiClient:
        if self._client is None:
            self._client = CsiClient.connect(f"unix://{self.socket}")
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def stop(self) -> int:
        self._drop_client()
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.proc = None
        return rc

    def kill(self) -> None:
        self._drop_client()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None

    def shutdown(self) -> None:
        """Stop gracefully; kill if that fails. For fixture teardown."""
        try:
            self.stop()
        finally:
            self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def path(self, rel: str) -> str:
        return str(self.kubelet_dir / rel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A temp dir whose loop devices and mounts are torn down whatever the test did."""
    yield tmp_path
    leaked = kernel.cleanup(tmp_path)
    if leaked and HAVE_KERNEL:
        pytest.fail(f"test left kernel objects behind: {leaked}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path (/tmp/tl-XXXXXXXX), for unix sockets made under it: a
    socket path holds at most 107 bytes, and pytest's own tmp_path grows with its run
    counter (pytest-9 to pytest-10 is one byte more) and the test's name."""
    path = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def driver(workdir: Path) -> Iterator[Driver]:
    d = Driver(workdir).start()
    try:
        yield d
    finally:
        d.shutdown()
