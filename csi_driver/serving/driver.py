"""What one driver process is made of, built once from its settings: the in-flight keys, the
OS layer, the store, the volume mechanics, snapshots and group snapshots, and in shared
mode the datastore, its probed capabilities, this node's heartbeat and fences; and the
start-up recovery that runs before anything is served."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..csi.controller import ControllerService
from ..csi.groupcontroller import GroupControllerService
from ..csi.node import NodeService
from ..host.linux import HostOS, sector_size_for
from ..host.oslayer import OSLayer
from ..settings import Settings
from ..volumes.datalock import CONTROLLERS_LOCK, DataDirLock, DataDirLocked
from ..volumes.datastore import freeze
from ..volumes.datastore.capabilities import Capabilities
from ..volumes.datastore.fencing import NodeFences
from ..volumes.datastore.records import Datastore, DatastoreError, Heartbeat, NodeRecord, check_marker
from ..volumes.groupsnapshots import GroupSnapshots
from ..volumes.inflight import InFlight, driver_keys
from ..volumes.lifecycle import Volumes
from ..volumes.recovery import thaw_frozen
from ..volumes.snapshots import Snapshots
from ..volumes.store import Store
from .interceptor import Observer

if TYPE_CHECKING:
    from .workers import WorkerPool

startlog = logging.getLogger("thinloop.server")

CONTROLLER_LOCK_WAIT_SECONDS = 60.0


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
    (csi_driver.volumes.datalock.CONTROLLERS_LOCK)."""
    freezer: freeze.FreezeServer | None = None
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
            from ..volumes.datastore import capabilities
            if not settings.data_dir.is_dir():  # never made: it is the datastore's mount
                raise DatastoreError(f"{settings.source('data_dir')} {settings.data_dir}: no such directory; "
                                     f"mount datastore {settings.datastore!r} there")
            done = check_marker(settings.data_dir, settings.datastore, may_create=settings.runs_controller,
                                creator=settings.node_id)
            if done:
                startlog.info("%s", done)
            datastore = Datastore.open(settings.datastore, settings.data_dir)
            caps = capabilities.probe(settings.data_dir, datastore.nodes if settings.runs_node else None,
                                settings.node_id)
            capabilities.report(caps, settings.datastore)
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
            actions += thaw_frozen(self.store, self.oslayer) if self.oslayer is not None else []
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
        swept = freeze.sweep(self.datastore)  # requests nobody holds: safe with others running
        if not lock.exclusive_while_alone():
            return [*swept, "unfinished work on the datastore left to a controller that starts alone: "
                    "another controller is running"]
        try:
            return swept + self.datastore.sweep_attachment_temp_files() + self.recover_unfinished()
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
        swept = self.datastore.sweep_node_temp_files(self.settings.node_id)  # its lock is held now
        return [f"registered node {self.settings.node_id} in datastore {self.settings.datastore}", *swept]

    def recover_freezes(self) -> list[str]:
        """The freeze server of this node (csi_driver.volumes.datastore.freeze), and the
        early thaws its previous run leaves to record."""
        assert self.datastore is not None and self.oslayer is not None and self.store is not None
        self.freezer = freeze.FreezeServer(self.settings.node_id, self.datastore, self.store, self.oslayer,
                                           self.inflight, self.fenced, self.settings.freeze_poll_seconds)
        return self.freezer.recover()

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
        (csi_driver.serving.workers)."""
        from .workers import WorkerPool
        pool = WorkerPool(count, self.settings.worker_idle_seconds)
        pool.start(self.services())
        self.pool = pool

    def busy(self) -> int:
        """Calls or keys in flight, for the metrics."""
        return self.pool.busy() if self.pool is not None else self.inflight.busy()
