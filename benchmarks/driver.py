"""thinloop started by the benchmark, as a process of its own on the benchmark's temp dirs,
from this checkout's code (python -m csi_driver)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.settings import grpc_target

from .common import ROOT, BenchError


@dataclass
class LocalDriver:
    """thinloop started by the benchmark on its own temp dirs."""

    root: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    data: Path | None = None
    """The data dir, when not root/data (shared mode: a datastore's mount)."""
    node_id: str = "bench-node"

    @property
    def data_dir(self) -> Path:
        return self.data or self.root / "data"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "csi.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 30.0) -> float:
        """Start the driver; return seconds from process start until Probe answers ready."""
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "csi_driver", "--endpoint", self.endpoint,
                "--data-dir", str(self.data_dir), "--kubelet-dir", str(self.kubelet_dir),
                "--node-id", self.node_id, *self.extra_args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.root / "driver.log", "ab") as log:
            t0 = time.monotonic()
            # Own session: a Ctrl-C in the terminal reaches the benchmark, which stops the
            # driver itself after tearing down what it made.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=ROOT,
                                         start_new_session=True)
        deadline = t0 + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"driver did not start: {self.log_tail()}")
            time.sleep(0.002)
        channel = grpc.insecure_channel(grpc_target(self.socket))
        try:
            stub = csi_pb2_grpc.IdentityStub(channel)
            while True:
                try:
                    resp = stub.Probe(csi_pb2.ProbeRequest(), timeout=5, wait_for_ready=True)
                    if resp.ready.value:
                        return time.monotonic() - t0
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"driver never answered Probe ready: {self.log_tail()}")
                time.sleep(0.005)
        finally:
            channel.close()

    def log_tail(self, lines: int = 40) -> str:
        """The driver log's last lines, for an error raised before the run's temp dir goes."""
        try:
            text = (self.root / "driver.log").read_text(errors="replace").strip().splitlines()
        except OSError as exc:
            return f"no driver log ({exc.strerror})"
        return " | ".join(text[-lines:]) or "driver log is empty"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def local_driver(root: Path, extra_args: Sequence[str] = ()) -> Iterator[LocalDriver]:
    d = LocalDriver(root, list(extra_args))
    try:
        d.start()
        yield d
    finally:
        d.stop()
