"""Driver settings, built once from command-line flags and environment variables."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TOPOLOGY_KEY = "topology.thinloop.csi.io/node"
DATASTORE_TOPOLOGY_KEY = "topology.thinloop.csi.io/datastore"
"""Shared mode: volumes are reachable from every node that mounts the datastore."""
DEFAULT_DRIVER_NAME = "thinloop.csi.io"
SHARED_DRIVER_NAME = "shared.thinloop.csi.io"
"""The default name in shared mode: its CSIDriver says attachRequired: true, so it is a
second driver beside the node-local one."""
DEFAULT_HEARTBEAT_SECONDS = 10.0
DEFAULT_ENDPOINT = "unix:///run/thinloop/csi.sock"
DEFAULT_DATA_DIR = "/var/lib/thinloop"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
MODES = ("all", "controller", "node")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_WORKERS = 2
DEFAULT_WORKER_IDLE_SECONDS = 10.0
MAX_WORKERS = 64


class SettingsError(ValueError):
    """A flag or environment variable holds a value the driver cannot run with."""


@dataclass(frozen=True)
class Settings:
    """Everything the driver is told at start-up. Immutable after parsing."""

    socket_path: Path
    """Filesystem path of the unix socket the gRPC server listens on."""
    node_id: str
    """This node's identity; also the value of the topology key."""
    data_dir: Path
    """Root of the on-disk volume and snapshot store."""
    driver_name: str = DEFAULT_DRIVER_NAME
    """Name reported by GetPluginInfo; the StorageClass provisioner."""
    mode: str = "all"
    """Which services run: all, controller (no file access) or node."""
    log_level: str = "info"
    """Minimum level of log records written to stderr."""
    log_format: str = "text"
    """Log line format: text for people, json for collectors."""
    overcommit_ratio: float = 1.0
    """How far thin promises may exceed free space; 1.0 means not at all."""
    max_volumes_per_node: int = 0
    """Reported in NodeGetInfo; 0 means no limit."""
    kubelet_dir: Path = Path(DEFAULT_KUBELET_DIR)
    """Staging and target paths must lie below this directory."""
    metrics_address: str = ""
    """host:port for the Prometheus endpoint; empty disables it."""
    workers: int = 0
    worker_idle_seconds: float = DEFAULT_WORKER_IDLE_SECONDS
    """Processes the Controller and Node calls run in; 0 runs them in the server's own."""
    datastore: str = ""
    """Shared mode when set: the name of the shared filesystem that holds the data dir
    (the topology value of topology.thinloop.csi.io/datastore). Empty: node-local mode."""
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    """Shared mode: how often a node driver rewrites its record in the datastore."""

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def runs_controller(self) -> bool:
        return self.mode in ("all", "controller")

    @property
    def runs_node(self) -> bool:
        return self.mode in ("all", "node")

    @property
    def shared(self) -> bool:
        """Images on a shared datastore, attached to one node at a time (ControllerPublish)."""
        return bool(self.datastore)

    @property
    def touches_files(self) -> bool:
        """Node-local controller-only mode must never touch volume files: they live on the
        nodes. In shared mode the controller owns the datastore's files."""
        return self.mode != "controller" or self.shared

    @property
    def topology(self) -> dict[str, str]:
        """The accessible topology of this driver's volumes (and of its node)."""
        if self.shared:
            return {DATASTORE_TOPOLOGY_KEY: self.datastore}
        return {TOPOLOGY_KEY: self.node_id}


def socket_path_from_endpoint(endpoint: str) -> Path:
    """Accept unix:///abs/path (or a bare absolute path) and return the path."""
    if endpoint.startswith("unix://"):
        raw = endpoint[len("unix://"):]
    elif "://" in endpoint:
        raise SettingsError(f"--endpoint {endpoint!r}: only unix:// endpoints are supported")
    else:
        raw = endpoint
    if not raw.startswith("/"):
        raise SettingsError(f"--endpoint {endpoint!r}: the socket path must be absolute")
    return Path(raw)


def _build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    def env(name: str, default: str) -> str:
        return environ.get(f"THINLOOP_{name}", default)

    p = argparse.ArgumentParser(
        prog="thinloop-csi",
        description="thinloop CSI driver: thin loopback-file volumes. "
        "Every flag can also be set with the THINLOOP_<FLAG> environment variable "
        "(upper case, dashes as underscores).",
    )
    p.add_argument("--endpoint", default=env("ENDPOINT", DEFAULT_ENDPOINT),
                   help="unix:///path/to/csi.sock")
    p.add_argument("--node-id", default=env("NODE_ID", ""),
                   help="node identity (default: the host name)")
    p.add_argument("--data-dir", default=env("DATA_DIR", DEFAULT_DATA_DIR))
    p.add_argument("--driver-name", default=env("DRIVER_NAME", ""),
                   help=f"default {DEFAULT_DRIVER_NAME}, or {SHARED_DRIVER_NAME} with --datastore")
    p.add_argument("--mode", default=env("MODE", "all"), help="all | controller | node")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "info"))
    p.add_argument("--log-format", default=env("LOG_FORMAT", "text"), help="text | json")
    p.add_argument("--overcommit-ratio", default=env("OVERCOMMIT_RATIO", "1.0"))
    p.add_argument("--max-volumes-per-node", default=env("MAX_VOLUMES_PER_NODE", "0"))
    p.add_argument("--kubelet-dir", default=env("KUBELET_DIR", DEFAULT_KUBELET_DIR))
    p.add_argument("--metrics-address", default=env("METRICS_ADDRESS", ""),
                   help="host:port serving Prometheus metrics (off when empty)")
    p.add_argument("--workers", default=env("WORKERS", str(DEFAULT_WORKERS)),
                   help="processes that run the Controller and Node calls, so that they use "
                   "more than one CPU (0: run them in the server process); at most this "
                   "many, started when calls wait")
    p.add_argument("--worker-idle-seconds",
                   default=env("WORKER_IDLE_SECONDS", str(DEFAULT_WORKER_IDLE_SECONDS)),
                   help="a worker process with no call for this long exits (its memory goes back)")
    p.add_argument("--datastore", default=env("DATASTORE", ""),
                   help="shared mode: the name of the shared filesystem mounted at --data-dir on "
                   "every node and the controller (volumes move between nodes; attach is fenced)")
    p.add_argument("--heartbeat-seconds",
                   default=env("HEARTBEAT_SECONDS", str(DEFAULT_HEARTBEAT_SECONDS)),
                   help="shared mode: how often a node driver rewrites its record in the datastore")
    return p


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Parse flags over environment defaults; raise SettingsError with one clear line."""
    environ = os.environ if environ is None else environ
    ns = _build_parser(environ).parse_args(list(argv))
    mode = ns.mode.lower()
    if mode not in MODES:
        raise SettingsError(f"--mode {ns.mode!r}: expected one of {', '.join(MODES)}")
    level = ns.log_level.lower()
    if level not in LOG_LEVELS:
        raise SettingsError(f"--log-level {ns.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    fmt = ns.log_format.lower()
    if fmt not in LOG_FORMATS:
        raise SettingsError(f"--log-format {ns.log_format!r}: expected text or json")
    try:
        ratio = float(ns.overcommit_ratio)
    except ValueError:
        raise SettingsError(f"--overcommit-ratio {ns.overcommit_ratio!r}: not a number") from None
    if not ratio >= 1.0 or ratio == float("inf"):
        raise SettingsError(f"--overcommit-ratio {ns.overcommit_ratio!r}: must be a finite number >= 1.0")
    try:
        max_vols = int(ns.max_volumes_per_node)
    except ValueError:
        raise SettingsError(f"--max-volumes-per-node {ns.max_volumes_per_node!r}: not an integer") from None
    if max_vols < 0:
        raise SettingsError("--max-volumes-per-node must be >= 0")
    try:
        workers = int(ns.workers)
    except ValueError:
        raise SettingsError(f"--workers {ns.workers!r}: not an integer") from None
    if not 0 <= workers <= MAX_WORKERS:
        raise SettingsError(f"--workers {workers}: must be between 0 and {MAX_WORKERS}")
    try:
        idle = float(ns.worker_idle_seconds)
    except ValueError:
        raise SettingsError(f"--worker-idle-seconds {ns.worker_idle_seconds!r}: not a number") from None
    if not 0 < idle <= 86400:
        raise SettingsError(f"--worker-idle-seconds {ns.worker_idle_seconds!r}: must be above 0 and "
                            "at most 86400")
    data_dir = Path(ns.data_dir)
    if not data_dir.is_absolute():
        raise SettingsError(f"--data-dir {ns.data_dir!r}: must be an absolute path")
    kubelet_dir = Path(ns.kubelet_dir)
    if not kubelet_dir.is_absolute():
        raise SettingsError(f"--kubelet-dir {ns.kubelet_dir!r}: must be an absolute path")
    datastore = ns.datastore
    if datastore and not _valid_label_value(datastore):
        raise SettingsError(f"--datastore {datastore!r}: must be 1-63 letters, digits, '-', '_' or '.', "
                            "starting and ending with a letter or digit (it is a topology label value)")
    try:
        heartbeat = float(ns.heartbeat_seconds)
    except ValueError:
        raise SettingsError(f"--heartbeat-seconds {ns.heartbeat_seconds!r}: not a number") from None
    if not 0.1 <= heartbeat <= 3600:
        raise SettingsError(f"--heartbeat-seconds {ns.heartbeat_seconds!r}: must be between 0.1 and 3600")
    driver_name = ns.driver_name or (SHARED_DRIVER_NAME if datastore else DEFAULT_DRIVER_NAME)
    if not _valid_driver_name(driver_name):
        raise SettingsError(f"--driver-name {driver_name!r}: must be a DNS-style name of at most 63 characters")
    node_id = ns.node_id or socket.gethostname()
    if not node_id or len(node_id) > 128 or any(c in node_id for c in "/\0\n"):
        raise SettingsError(f"--node-id {node_id!r}: must be 1-128 characters without '/'")
    return Settings(
        socket_path=socket_path_from_endpoint(ns.endpoint),
        node_id=node_id,
        data_dir=data_dir,
        driver_name=driver_name,
        mode=mode,
        log_level=level,
        log_format=fmt,
        overcommit_ratio=ratio,
        max_volumes_per_node=max_vols,
        kubelet_dir=kubelet_dir,
        metrics_address=ns.metrics_address,
        workers=workers,
        worker_idle_seconds=idle,
        datastore=datastore,
        heartbeat_seconds=heartbeat,
    )


def _valid_driver_name(name: str) -> bool:
    if not name or len(name) > 63 or not name[0].isalnum() or not name[-1].isalnum():
        return False
    return all((c.isalnum() and c.isascii()) or c in "-." for c in name)


def _valid_label_value(value: str) -> bool:
    """A Kubernetes label value (the datastore name is one, as a topology value)."""
    if not value or len(value) > 63 or not value[0].isalnum() or not value[-1].isalnum():
        return False
    return all((c.isalnum() and c.isascii()) or c in "-_." for c in value)
