"""The driver's settings: one immutable Settings, built once at start-up from flags and
environment variables (csi_driver.serving.flags), and the names and defaults every layer
shares (driver names, topology keys, default paths). The endpoint and address rules are
here too, because thinloopctl applies them as the driver does.

A foundation module: every layer may import it; it imports nothing of any layer."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TOPOLOGY_KEY = "topology.thinloop.csi.io/node"
DATASTORE_TOPOLOGY_KEY = "topology.thinloop.csi.io/datastore"
"""Shared mode: volumes are reachable from every node that mounts the datastore."""
DEFAULT_DRIVER_NAME = "thinloop.csi.io"
SHARED_DRIVER_NAME = "shared.thinloop.csi.io"
"""The default name in shared mode: its CSIDriver says attachRequired: true, so it is a
second driver beside the node-local one."""
DEFAULT_HEARTBEAT_SECONDS = 10.0
DEFAULT_FREEZE_POLL_SECONDS = 0.5
"""Shared mode: how often a node reads its freeze requests (csi_driver.volumes.datastore.freeze)."""
FREEZE_HELD_POLL_SECONDS = 0.05
"""... and how often while it holds a freeze: the writers wait until it sees the request go."""
DEFAULT_FREEZE_HOLD_SECONDS = 300.0
"""Shared mode: how long a node may keep a filesystem frozen for one request."""
MAX_FREEZE_HOLD_SECONDS = 86400.0
"""The most --freeze-hold-seconds takes, and the most a node grants a request."""
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
    """Processes the Controller and Node calls run in; 0 runs them in the server's own."""
    worker_idle_seconds: float = DEFAULT_WORKER_IDLE_SECONDS
    """Seconds a worker process waits for a call before it exits."""
    datastore: str = ""
    """Shared mode when set: the name of the shared filesystem that holds the data dir
    (the topology value of topology.thinloop.csi.io/datastore). Empty: node-local mode."""
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    """Shared mode: how often a node driver rewrites its record in the datastore."""
    freeze_poll_seconds: float = DEFAULT_FREEZE_POLL_SECONDS
    """Shared mode, node: how often the driver reads its freeze requests
    (csi_driver.volumes.datastore.freeze)."""
    freeze_hold_seconds: float = DEFAULT_FREEZE_HOLD_SECONDS
    """Shared mode, controller: how long a node may keep a filesystem frozen for one copy."""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    """Where each setting came from: the flag (`--data-dir`) or its variable
    (`THINLOOP_DATA_DIR`), so that an error found later names what the operator set."""

    def source(self, name: str) -> str:
        """The flag or THINLOOP_* variable that set field `name` (the flag when unknown)."""
        return self.sources.get(name, "--" + name.replace("_", "-"))

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


MAX_SOCKET_PATH_BYTES = 107
"""sun_path in struct sockaddr_un holds 108 bytes, the last one the terminating NUL (unix(7))."""


def grpc_target(path: Path | str) -> str:
    """The gRPC address of the unix socket at absolute `path`, to bind or dial: `unix:/path`.

    Not `unix:///path`: gRPC C-core (grpcio 1.85) parses that form as a URI and refuses a
    path of 106 or 107 bytes that the kernel accepts ("Path name should not have more than
    107 characters"), while `unix:/path` holds the whole MAX_SOCKET_PATH_BYTES
    (tests/unit/test_config.py binds and dials one at the limit)."""
    return f"unix:{path}"


def socket_path_from_endpoint(endpoint: str, source: str = "--endpoint") -> Path:
    """Accept unix:///abs/path (or a bare absolute path) and return the path. The same rules
    serve the driver and thinloopctl, so a client refuses what the server would refuse.

    Raises SettingsError naming `source` (the flag, or the THINLOOP_* variable it came from)."""
    if endpoint.startswith("unix://"):
        raw = endpoint[len("unix://"):]
    elif "://" in endpoint:
        raise SettingsError(f"{source} {endpoint!r}: only unix:// endpoints are supported "
                            "(e.g. unix:///run/thinloop/csi.sock)")
    else:
        raw = endpoint
    if not raw.startswith("/"):
        raise SettingsError(f"{source} {endpoint!r}: the socket path must be absolute "
                            "(unix:///path/to/csi.sock)")
    if raw.endswith("/"):
        raise SettingsError(f"{source} {endpoint!r}: names a directory, not a socket file")
    size = len(os.fsencode(raw))
    if size > MAX_SOCKET_PATH_BYTES:
        raise SettingsError(f"{source} {endpoint!r}: the socket path is {size} bytes; a unix socket "
                            f"path holds at most {MAX_SOCKET_PATH_BYTES}: choose a shorter one")
    return Path(raw)


def parse_address(address: str, source: str = "--metrics-address") -> tuple[str, int]:
    """host:port, :port (all interfaces) or [v6]:port; port 0 picks a free one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise SettingsError(f"{source} {address!r}: expected host:port or :port (e.g. :9809)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)

