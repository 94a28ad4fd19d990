"""The gRPC server: wiring, the one place errors become status codes, one log line per
RPC, socket hygiene, start-up recovery and graceful shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from . import baton, dsfreeze
from .config import Settings
from .controller import ControllerService
from .datalock import CONTROLLERS_LOCK, LOCK_FILE, DataDirLock, DataDirLocked
from .datastore import Datastore, DatastoreError, Heartbeat, NodeRecord, check_marker
from .dscaps import Capabilities
from .dsfreeze import FreezeServer
from .errors import status_of
from .fencing import NodeFences
from .groupcontroller import GroupControllerService
from .groupsnapshots import GroupSnapshots
from .hostos import HostOS, sector_size_for
from .identity import IdentityService
from .inflight import InFlight, driver_keys
from .node import NodeService
from .oslayer import OSLayer, file_id
from .preflight import StartupError, data_dir_in_use, inspect_endpoint
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
              "source_volume_id": "source_volume_id", "group_snapshot_id": "group_snapshot_id"}


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
    groups: GroupSnapshots | None = None
    """Volume group snapshots (None in controller-only mode)."""
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
    controllers_lock: DataDirLock | None = None
    """Shared mode, controller: the shared lock every controller of the datastore holds
    (csi_driver.datalock.CONTROLLERS_LOCK)."""
    freezer: FreezeServer | None = None
    """Shared mode, node: serves the controller's requests to freeze volumes attached here
    (a thread of this process, started with the heartbeat)."""

    @classmethod
    def build(cls, settings: Settings, oslayer: OSLayer | None = None) -> Driver:
        """Everything the settings call for. Shared mode checks the datastore's marker and
        probes its filesystem here: DatastoreError when it cannot be used."""
        if not settings.touches_files:
            return cls(settings, InFlight(), None, None, None, None)
        datastore = caps = None
        if settings.shared:
            from . import dscaps
            if not settings.data_dir.is_dir():  # never made: it is the datastore's mount
                raise DatastoreError(f"{settings.source('data_dir')} {settings.data_dir}: no such directory; "
                                     f"mount datastore {settings.datastore!r} there")
            done = check_marker(settings.data_dir, settings.datastore, may_create=settings.runs_controller,
                                creator=settings.node_id)
            if done:
                startlog.info("%s", done)
            datastore = Datastore.open(settings.datastore, settings.data_dir)
            caps = dscaps.probe(settings.data_dir, datastore.nodes if settings.runs_node else None,
                                settings.node_id)
            dscaps.report(caps, settings.datastore)
        else:
            settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Holds across worker processes too; in shared mode, this driver's keys only.
        inflight = driver_keys(settings.data_dir, settings.socket_path, shared=settings.shared)
        os_layer = oslayer or HostOS(sector_size=sector_size_for(settings.data_dir))
        store = Store(settings.data_dir)
        volumes = Volumes(settings, store, os_layer, datastore, caps)
        snapshots = Snapshots(store, volumes)
        return cls(settings, inflight, os_layer, store, volumes, snapshots, groups=GroupSnapshots(snapshots),
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
        if shared and self.settings.runs_node:
            actions += self.register_node()
        if not shared:
            actions += self.recover_unfinished()
        elif self.settings.runs_controller:
            actions += self.recover_as_controller()
        if shared and self.settings.runs_node:
            actions += self.recover_freezes()  # records early thaws before thaw_frozen thaws
        if not shared or self.settings.runs_node:
            actions += self.thaw_frozen()
        if shared and self.settings.runs_node:
            actions += self.recover_fences()
        for action in actions:
            startlog.info("recovery: %s", action)
        return actions

    def recover_unfinished(self) -> list[str]:
        """Unfinished volumes, snapshots and group snapshots, removed or finished (only by
        the one driver that works on this data dir: its lock says so)."""
        assert self.store is not None
        groups = self.groups.recover() if self.groups is not None else []
        return self.store.recover() + groups

    def recover_as_controller(self) -> list[str]:
        """Shared mode: take the controllers' shared lock on the datastore and, while no
        other controller holds it, clear unfinished work (recover_unfinished): an
        unfinished volume of a live controller is that controller's own work in progress,
        never a leftover. With another controller alive, leftovers of a crash wait for a
        controller that starts alone (they are hidden from every call meanwhile)."""
        lock = DataDirLock(self.settings.data_dir / CONTROLLERS_LOCK, shared=True)
        try:
            # Another controller that is clearing leftovers holds it exclusively meanwhile.
            lock.acquire(wait=CONTROLLER_LOCK_WAIT_SECONDS)
        except DataDirLocked:
            raise DatastoreError(
                f"another controller of datastore {self.settings.datastore} has held "
                f"{lock.path} exclusively for {CONTROLLER_LOCK_WAIT_SECONDS:g} s (start-up "
                "recovery of a large datastore?); start this one again later") from None
        except OSError as exc:
            raise DatastoreError(f"cannot lock {lock.path}: {exc.strerror or exc}") from None
        self.controllers_lock = lock
        assert self.datastore is not None
        swept = dsfreeze.sweep(self.datastore)  # requests nobody holds: safe with others running
        if not lock.exclusive_while_alone():
            return [*swept, "unfinished work on the datastore left to a controller that starts alone: "
                    "another controller is running"]
        try:
            return swept + self.recover_unfinished()
        finally:
            lock.back_to_shared()

    def close(self) -> None:
        """Let go of what the driver holds on the datastore (shared mode): the node record
        says stopped and the node-id lock goes; the controllers' lock goes."""
        if self.freezer is not None:
            self.freezer.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.controllers_lock is not None:
            self.controllers_lock.release()

    def register_node(self) -> list[str]:
        """Claim this node id in the datastore (refused while another driver holds it) and
        write the node's record; the heartbeat thread starts once serving."""
        assert self.datastore is not None
        record = NodeRecord(self.settings.node_id, self.settings.datastore,
                            interval=self.settings.heartbeat_seconds,
                            max_volumes_per_node=self.settings.max_volumes_per_node,
                            freeze_poll=self.settings.freeze_poll_seconds)
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

    def recover_freezes(self) -> list[str]:
        """The freeze server of this node (csi_driver.dsfreeze), and the early thaws its
        previous run leaves to record."""
        assert self.datastore is not None and self.oslayer is not None and self.store is not None
        self.freezer = dsfreeze.FreezeServer(self.settings.node_id, self.datastore, self.store, self.oslayer,
                                             self.inflight, self.fenced, self.settings.freeze_poll_seconds)
        return self.freezer.recover()

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
        """The Controller, GroupController and Node servicers this process (or its workers)
        run."""
        out: dict[str, object] = {}
        if self.settings.runs_controller:
            out["Controller"] = ControllerService(self.settings, self.volumes, self.snapshots, self.inflight)
            if self.groups is not None:
                out["GroupController"] = GroupControllerService(self.groups, self.inflight)
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
                  "GroupController": csi_pb2_grpc.add_GroupControllerServicer_to_server,
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


def prepare_socket(path: str) -> None:
    """Make the socket's directory; refuse what preflight.inspect_endpoint refuses (checked
    again here: the socket may have changed since start-up began); remove a stale socket."""
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    if inspect_endpoint(path):
        os.unlink(path)  # nobody listens: stale
        startlog.info("removed stale socket %s", path)


LOCK_GRACE_SECONDS = 2.0
CONTROLLER_LOCK_WAIT_SECONDS = 60.0


def lock_data_dir(settings: Settings, *, create: bool = True) -> DataDirLock | None:
    """Take the data dir's driver lock (csi_driver.datalock) before anything reads or
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
