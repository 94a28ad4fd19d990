"""The gRPC server: the socket (made 0600, a stale one replaced), the data dir's lock, the
services wired to the server behind the interceptor, start-up recovery before the first
call, and a graceful stop on SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from concurrent import futures
from typing import Any

import grpc

from ..csi.identity import IdentityService
from ..csi.snapmeta import SnapshotMetadataService
from ..proto import csi_pb2_grpc
from ..settings import Settings, grpc_target
from ..volumes.datalock import LOCK_FILE, DataDirLock, DataDirLocked
from ..volumes.datastore.records import DatastoreError
from .driver import Driver
from .interceptor import RpcInterceptor
from .preflight import StartupError, data_dir_in_use, inspect_endpoint

startlog = logging.getLogger("thinloop.server")


def add_services(driver: Driver, server: grpc.Server) -> None:
    """Identity and SnapshotMetadata served here; Controller, GroupController and Node
    here or, with worker processes, through a proxy to them."""
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(driver.settings, driver.oslayer), server)
    adders = {"Controller": csi_pb2_grpc.add_ControllerServicer_to_server,
              "GroupController": csi_pb2_grpc.add_GroupControllerServicer_to_server,
              "Node": csi_pb2_grpc.add_NodeServicer_to_server}
    for name, servicer in driver.services().items():
        if driver.pool is not None:
            from .workers import Proxy
            servicer = Proxy(driver.pool, name)
        adders[name](servicer, server)
    if driver.snapshots is not None:
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataService(driver.snapshots), server)


def make_server(driver: Driver, max_workers: int = 16) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                         interceptors=[RpcInterceptor(driver.observers)])
    add_services(driver, server)
    return server


def prepare_socket(path: str) -> None:
    """Make the socket's directory; refuse what preflight.inspect_endpoint refuses (checked
    again here: the socket may have changed since start-up began); remove a stale socket."""
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    if inspect_endpoint(path):
        os.unlink(path)  # nobody listens: stale
        startlog.info("removed stale socket %s", path)


LOCK_GRACE_SECONDS = 2.0


def lock_data_dir(settings: Settings, *, create: bool = True) -> DataDirLock | None:
    """Take the data dir's driver lock (csi_driver.volumes.datalock) before anything reads or
    changes the data dir; None in controller-only mode, which touches no files, and, with
    create=False, when the data dir does not exist yet (no driver can hold it then).
    A second driver on the same data dir gets StartupError naming the holder.

    None in shared mode too: many drivers share the datastore, and each holds the lock of
    its part instead (Driver.recover: the node-id lock, the controllers' shared lock)."""
    if not settings.touches_files or settings.shared or not (create or settings.data_dir.is_dir()):
        return None
    lock = DataDirLock(settings.data_dir / LOCK_FILE)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A driver restarted right after a crash may find the old one's forked workers
        # a moment from their end (PR_SET_PDEATHSIG): give them that moment.
        lock.acquire(wait=LOCK_GRACE_SECONDS)
    except DataDirLocked as exc:
        raise StartupError(data_dir_in_use(settings, exc.holder)) from None
    except OSError as exc:
        raise StartupError(f"cannot lock data dir {settings.data_dir}: {exc.strerror or exc}") from None
    return lock


def serve(settings: Settings, driver: Driver | None = None,
          ready: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code. The data dir lock is held
    from before recovery until the handler workers have exited."""
    path = str(settings.socket_path)
    # A driver already on this data dir is named even when it also serves this endpoint;
    # an unsafe endpoint is refused before a data dir that does not exist is made.
    lock = lock_data_dir(settings, create=False)
    try:
        prepare_socket(path)
        lock = lock or lock_data_dir(settings)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    built: Driver | None = driver
    try:
        try:
            built = driver = driver or Driver.build(settings)
            recovered = driver.recover()
        except DatastoreError as exc:
            raise StartupError(str(exc)) from None
        if settings.workers and driver.volumes is not None and driver.pool is None:
            driver.start_workers(settings.workers)  # before any thread starts: it forks
        if driver.heartbeat is not None:
            driver.heartbeat.start()
        if driver.freezer is not None:
            driver.freezer.start()
        try:
            return _serve(settings, driver, recovered, ready)
        finally:
            if driver.pool is not None:
                driver.pool.close()
    finally:
        if built is not None:
            built.close()
        if lock is not None:
            lock.release()


def _serve(settings: Settings, driver: Driver, recovered: list[str],
           ready: threading.Event | None) -> int:
    path = str(settings.socket_path)
    metrics_server = None
    if settings.metrics_address:
        from .metrics import start as start_metrics
        try:
            metrics_server = start_metrics(driver, settings.metrics_address, recovered)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot serve metrics on {settings.metrics_address}: {exc}") from None
    server = make_server(driver)
    old_umask = os.umask(0o077)
    try:
        if server.add_insecure_port(grpc_target(path)) == 0:
            raise StartupError(f"cannot listen on {path}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        startlog.info("received %s: finishing in-flight calls", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    startlog.info("serving %s on %s (mode %s, node %s, data dir %s%s)", settings.driver_name, path,
                  settings.mode, settings.node_id, settings.data_dir,
                  f", datastore {settings.datastore}" if settings.shared else "")
    if ready is not None:
        ready.set()
    stop.wait()
    server.stop(grace=30).wait()
    if metrics_server is not None:
        metrics_server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    startlog.info("stopped")
    return 0
