"""The gRPC server: wiring, the one place errors become status codes, one log line per
RPC, socket hygiene, start-up recovery and graceful shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from . import baton
from .config import Settings
from .controller import ControllerService
from .datastore import Datastore, DatastoreError, Heartbeat, NodeRecord, check_marker
from .dscaps import Capabilities
from .errors import status_of
from .fencing import NodeFences
from .hostos import HostOS, sector_size_for
from .identity import IdentityService
from .inflight import InFlight
from .node import NodeService
from .oslayer import OSLayer, file_id
from .proto import csi_pb2_grpc
from .runner import CommandError
from .snapmeta import SnapshotMetadataService
from .snapshots import Snapshots
from .store import Store
from .volumes import Volumes

if TYPE_CHECKING:
    from .workers import WorkerPool

log = logging.getLogger("thinloop.rpc")
startlog = logging.getLogger("thinloop.server")

Observer = Callable[[str, str, float], None]
"""Called after every RPC with (method, status code name, seconds)."""

_ID_FIELDS = {"volume_id": "volume_id", "name": "req_name", "snapshot_id": "snapshot_id",
              "source_volume_id": "source_volume_id"}


def _subject(request: Any) -> dict[str, str]:
    """The fields worth logging; never secrets or whole requests."""
    out = {}
    for f, key in _ID_FIELDS.items():
        value = getattr(request, f, "")
        if isinstance(value, str) and value:
            out[key] = value[:128]
    return out


class RpcInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Maps DriverError to its code, anything else to INTERNAL (traceback logged), and
    writes one structured line per call."""

    def __init__(self, observers: list[Observer], *, baton_held: bool = True) -> None:
        self.observers = observers
        self.baton_held = baton_held
        """False when the handlers run in worker processes, which take their own."""

    def _finish(self, method: str, request: Any, started: float, code: grpc.StatusCode,
                detail: str) -> None:
        elapsed = time.monotonic() - started
        try:
            self._record(method, request, elapsed, code, detail)
        except Exception:
            logging.getLogger(__name__).exception("recording %s failed", method)

    def _record(self, method: str, request: Any, elapsed: float, code: grpc.StatusCode,
                detail: str) -> None:
        extra = {"method": method, "code": code.name, "duration_ms": round(elapsed * 1000, 2),
                 **_subject(request)}
        if code == grpc.StatusCode.OK:
            log.info("%s OK", method, extra=extra)
        else:
            log.warning("%s %s: %s", method, code.name, detail, extra=extra)
        for obs in self.observers:
            obs(method, code.name, elapsed)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.monotonic()
                try:
                    with baton.held() if self.baton_held else contextlib.nullcontext():
                        response = inner(request, context)
                except Exception as exc:
                    code, detail = status_of(exc, method)
                    self._finish(method, request, started, code, detail)
                    context.abort(code, detail)
                self._finish(method, request, started, grpc.StatusCode.OK, "")
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.monotonic()
                try:
                    yield from inner_stream(request, context)
                except Exception as exc:
                    code, detail = status_of(exc, method)
                    self._finish(method, request, started, code, detail)
                    context.abort(code, detail)
                self._finish(method, request, started, grpc.StatusCode.OK, "")

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


@dataclass
class Driver:
    """Everything one driver process is made of, built once from settings."""

    settings: Settings
    inflight: InFlight
    oslayer: OSLayer | None
    store: Store | None
    volumes: Volumes | None
    snapshots: Snapshots | None
    observers: list[Observer] = field(default_factory=list)
    pool: WorkerPool | None = None
    """Handler worker processes, when the Controller and Node calls run in them."""
    datastore: Datastore | None = None
    """Shared mode: the datastore's records."""
    caps: Capabilities | None = None
    """Shared mode: what the datastore's filesystem can do (probed at start-up)."""
    heartbeat: Heartbeat | None = None
    """Shared mode, node: this node's registration in the datastore."""
    fenced: dict[str, str] = field(default_factory=dict)
    """Shared mode, node: volumes recovery found attached here but held or owned elsewhere
    too (a split brain in the making), with the reason; the node refuses to serve them."""
    fences: NodeFences | None = None
    """Shared mode, node: what start-up recovery found about the image locks."""

    @classmethod
    def build(cls, settings: Settings, oslayer: OSLayer | None = None) -> Driver:
        """Everything the settings call for. Shared mode checks the datastore's marker and
        probes its filesystem here: DatastoreError when it cannot be used."""
        if not settings.touches_files:
            return cls(settings, InFlight(), None, None, None, None)
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        datastore = caps = None
        if settings.shared:
            from . import dscaps
            done = check_marker(settings.data_dir, settings.datastore, may_create=settings.runs_controller,
                                creator=settings.node_id)
            if done:
                startlog.info("%s", done)
            datastore = Datastore.open(settings.datastore, settings.data_dir)
            caps = dscaps.probe(settings.data_dir, datastore.nodes if settings.runs_node else None,
                                settings.node_id)
            dscaps.report(caps, settings.datastore)
            # Many drivers share this data dir: keys in flight are this driver's own.
            inflight = InFlight(settings.socket_path.parent, f".{settings.socket_path.name}.inflight")
        else:
            inflight = InFlight(settings.data_dir)  # holds across worker processes too
        os_layer = oslayer or HostOS(sector_size=sector_size_for(settings.data_dir))
        store = Store(settings.data_dir)
        volumes = Volumes(settings, store, os_layer, datastore, caps)
        return cls(settings, inflight, os_layer, store, volumes, Snapshots(store, volumes),
                   datastore=datastore, caps=caps)

    def recover(self) -> list[str]:
        """Finish or remove what interrupted operations left behind; log each action.
        Shared mode: leftovers of the controller's operations are the controller's to clear
        (a node must not remove what a controller is building); a node registers itself
        and checks the lock of every image it has attached before it serves anything."""
        if self.store is None:
            return []
        shared = self.settings.shared
        actions = []
        if not shared or self.settings.runs_controller:
            actions += self.store.recover()
        if not shared or self.settings.runs_node:
            actions += self.thaw_frozen()
        if shared and self.settings.runs_node:
            actions += self.register_node() + self.recover_fences()
        for action in actions:
            startlog.info("recovery: %s", action)
        return actions

    def register_node(self) -> list[str]:
        """Claim this node id in the datastore (refused while another driver holds it) and
        write the node's record; the heartbeat thread starts once serving."""
        assert self.datastore is not None
        record = NodeRecord(self.settings.node_id, self.settings.datastore,
                            interval=self.settings.heartbeat_seconds,
                            max_volumes_per_node=self.settings.max_volumes_per_node)
        self.heartbeat = Heartbeat(self.datastore.nodes, record)
        self.heartbeat.register()
        return [f"registered node {self.settings.node_id} in datastore {self.settings.datastore}"]

    def recover_fences(self) -> list[str]:
        """The image lock of every loop device here backed by the datastore (fencing.py)."""
        assert self.datastore is not None and self.oslayer is not None and self.store is not None
        assert self.heartbeat is not None
        fences = NodeFences(self.settings.node_id, self.datastore, self.store, self.oslayer)
        actions = fences.recover()
        self.fenced.update(fences.fenced)
        self.heartbeat.on_beat.append(fences.release_retaken)
        self.fences = fences
        return actions

    def thaw_frozen(self) -> list[str]:
        """A crash between a snapshot's freeze and thaw leaves the volume's filesystem
        frozen, hanging every writer: thaw the filesystems of this driver's loop devices.
        fsfreeze fails with EINVAL on one that is not frozen, which is the usual case."""
        if self.oslayer is None or self.store is None:
            return []
        actions = []
        root = os.path.realpath(self.store.volumes.root) + os.sep
        ours = {file_id(e.image) for e in self.store.volumes.entries()} - {None}
        mounts = self.oslayer.mounts()
        for loop in self.oslayer.loop_devices():
            if loop.backing_id not in ours and not loop.backing_file.startswith(root):
                continue
            own = [m.mount_point for m in mounts if m.major_minor == loop.major_minor and m.root == "/"]
            if not own:
                continue
            try:
                self.oslayer.thaw(own[0])  # one superblock: thawing one of its mounts is enough
            except CommandError as exc:
                if "Invalid argument" not in exc.stderr:
                    startlog.warning("recovery: cannot thaw %s: %s", own[0], exc)
                continue
            actions.append(f"thawed {own[0]} ({loop.device}), left frozen by an interrupted snapshot")
        return actions

    def services(self) -> dict[str, object]:
        """The Controller and Node servicers this process (or its workers) run."""
        out: dict[str, object] = {}
        if self.settings.runs_controller:
            out["Controller"] = ControllerService(self.settings, self.volumes, self.snapshots, self.inflight)
        if self.settings.runs_node and self.volumes is not None:
            out["Node"] = NodeService(self.settings, self.volumes, self.inflight, self.fenced)
        return out

    def start_workers(self, count: int) -> None:
        """Run the Controller and Node calls in up to `count` forked processes
        (csi_driver.workers)."""
        from .workers import WorkerPool
        pool = WorkerPool(count, self.settings.worker_idle_seconds)
        pool.start(self.services())
        self.pool = pool

    def busy(self) -> int:
        """Calls or keys in flight, for the metrics."""
        return self.pool.busy() if self.pool is not None else self.inflight.busy()

    def add_services(self, server: grpc.Server) -> None:
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(self.settings, self.oslayer), server)
        adders = {"Controller": csi_pb2_grpc.add_ControllerServicer_to_server,
                  "Node": csi_pb2_grpc.add_NodeServicer_to_server}
        for name, servicer in self.services().items():
            if self.pool is not None:
                from .workers import Proxy
                servicer = Proxy(self.pool, name)
            adders[name](servicer, server)
        if self.snapshots is not None:
            csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataService(self.snapshots), server)

    def make_server(self, max_workers: int = 16) -> grpc.Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                        thread_name_prefix="rpc"),
                             interceptors=[RpcInterceptor(self.observers, baton_held=self.pool is None)])
        self.add_services(server)
        return server


class StartupError(RuntimeError):
    """The driver cannot start; the message is one line for the operator."""


def prepare_socket(path: str) -> None:
    """Refuse symlinks, non-sockets and sockets owned by someone else; remove a stale
    socket of ours; refuse to take over one that another process still serves."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o750, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"endpoint {path} is a symlink; refusing to use it")
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"endpoint {path} exists and is not a socket; refusing to replace it")
    if st.st_uid != os.geteuid():
        raise StartupError(f"endpoint {path} belongs to uid {st.st_uid}, not to this process")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        startlog.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise StartupError(f"another process is serving {path}")


def serve(settings: Settings, driver: Driver | None = None,
          ready: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    path = str(settings.socket_path)
    prepare_socket(path)
    try:
        driver = driver or Driver.build(settings)
        recovered = driver.recover()
    except DatastoreError as exc:
        raise StartupError(str(exc)) from None
    if settings.workers and driver.volumes is not None and driver.pool is None:
        driver.start_workers(settings.workers)  # before any thread starts: it forks
    if driver.heartbeat is not None:
        driver.heartbeat.start()
    try:
        return _serve(settings, driver, recovered, ready)
    finally:
        if driver.heartbeat is not None:
            driver.heartbeat.stop()
        if driver.pool is not None:
            driver.pool.close()


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
    server = driver.make_server()
    old_umask = os.umask(0o077)
    try:
        if server.add_insecure_port(f"unix://{path}") == 0:
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
