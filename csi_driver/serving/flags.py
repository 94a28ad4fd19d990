"""The driver's command line: one flag per setting, each with its THINLOOP_* variable,
parsed once into csi_driver.settings.Settings. Misuse and bad values are one line naming
the flag (or the variable that set it), never a traceback."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..cliparse import HelpFormatter, OneLineParser, UsageError
from ..settings import (
    DATASTORE_TOPOLOGY_KEY,
    DEFAULT_DATA_DIR,
    DEFAULT_DRIVER_NAME,
    DEFAULT_ENDPOINT,
    DEFAULT_FREEZE_HOLD_SECONDS,
    DEFAULT_FREEZE_POLL_SECONDS,
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_KUBELET_DIR,
    DEFAULT_WORKER_IDLE_SECONDS,
    DEFAULT_WORKERS,
    FREEZE_HELD_POLL_SECONDS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_FREEZE_HOLD_SECONDS,
    MAX_WORKERS,
    MODES,
    SHARED_DRIVER_NAME,
    TOPOLOGY_KEY,
    Settings,
    SettingsError,
    parse_address,
    socket_path_from_endpoint,
)


@dataclass(frozen=True)
class Flag:
    """One driver setting: a flag, its THINLOOP_* variable, default and meaning."""

    name: str
    default: str
    help: str
    metavar: str = ""
    shown: str = ""
    """The default as --help words it, when it is not the literal `default`."""

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return "THINLOOP_" + self.dest.upper()


FLAGS = (
    Flag("--endpoint", DEFAULT_ENDPOINT, "unix socket to serve CSI on (created 0600; a stale socket "
         "of this driver is replaced; a symlink, a foreign file or a live socket is refused)", "URI"),
    Flag("--node-id", "", "this node's identity, also the value of the topology key "
         f"{TOPOLOGY_KEY} (node-local mode); in shared mode the name other drivers of the "
         "datastore know this node by", "ID", shown="host name"),
    Flag("--data-dir", DEFAULT_DATA_DIR, "absolute path of the directory holding the volume and "
         "snapshot images (created 0700 when missing; with --datastore, the datastore's mount, never "
         "created)", "DIR"),
    Flag("--driver-name", "", "CSI driver name: the StorageClass provisioner and the CSIDriver "
         "object's name", "NAME", shown=f"{DEFAULT_DRIVER_NAME}; {SHARED_DRIVER_NAME} with --datastore"),
    Flag("--mode", "all", "services to run: all; controller (for the controller Deployment: no file "
         "access, or with --datastore the datastore's files but no loop device); node",
         "|".join(MODES)),
    Flag("--kubelet-dir", DEFAULT_KUBELET_DIR, "kubelet's root directory: staging and target paths "
         "must lie under it", "DIR"),
    Flag("--overcommit-ratio", "1.0", "how far unused thin promises may exceed free space when "
         "reporting capacity; 1.0 = never", "RATIO"),
    Flag("--max-volumes-per-node", "0", "volume limit reported in NodeGetInfo; 0 = no limit", "N"),
    Flag("--log-level", "info", "lowest level of log lines written to stderr", "|".join(LOG_LEVELS)),
    Flag("--log-format", "text", "text for people, json (one object per line) for collectors",
         "|".join(LOG_FORMATS)),
    Flag("--metrics-address", "", "host:port or :port serving Prometheus metrics; empty = off",
         "ADDR"),
    Flag("--workers", str(DEFAULT_WORKERS), "most processes running Controller and Node calls at "
         f"once, started when calls wait (0 = in the server process: one CPU; at most {MAX_WORKERS})",
         "N"),
    Flag("--worker-idle-seconds", str(DEFAULT_WORKER_IDLE_SECONDS).removesuffix(".0"),
         "a worker with no call for this long exits, giving its memory back", "SECONDS"),
    Flag("--datastore", "", "shared mode: the name of the shared filesystem mounted at --data-dir on "
         "every node and the controller (volumes move between nodes; attach is fenced; the topology "
         f"value of {DATASTORE_TOPOLOGY_KEY}); empty = node-local mode", "NAME"),
    Flag("--heartbeat-seconds", str(DEFAULT_HEARTBEAT_SECONDS).removesuffix(".0"),
         "shared mode: how often a node driver rewrites its record in the datastore (a node silent for "
         "three of these is shown as not alive)", "SECONDS"),
    Flag("--freeze-poll-seconds", str(DEFAULT_FREEZE_POLL_SECONDS),
         "shared mode, node: how often the driver reads the datastore for requests to freeze a volume "
         f"it has attached (one directory read; every {FREEZE_HELD_POLL_SECONDS:g} s while it holds a freeze); a "
         "snapshot of a volume in use waits up to this long for the freeze", "SECONDS"),
    Flag("--freeze-hold-seconds", str(DEFAULT_FREEZE_HOLD_SECONDS).removesuffix(".0"),
         "shared mode, controller: how long a node may keep a volume's filesystem frozen for one "
         "snapshot, clone or group snapshot; a copy that takes longer is discarded and the call fails "
         "(UNAVAILABLE, retried)", "SECONDS"),
)


def _build_parser(environ: Mapping[str, str]) -> OneLineParser:
    p = OneLineParser(
        prog="thinloop-csi", formatter_class=HelpFormatter,
        description="thinloop CSI driver: thin (sparse) loopback-file volumes for Kubernetes.\n\n"
        "Every flag can also be set with the environment variable named after it (THINLOOP_, "
        "then the flag in upper case with dashes as underscores); a flag given on the command "
        "line wins. Bad settings and a node that cannot run the driver (missing tools, no "
        "/dev/loop-control, a data dir that cannot be written) stop it at start with one line "
        "naming the flag or path and the fix, before anything is created.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for flag in FLAGS:
        default = f"default: {flag.shown or flag.default or 'empty'}"
        now = f"; set to {environ[flag.env]!r} here" if flag.env in environ else ""
        p.add_argument(flag.name, default=None, metavar=flag.metavar or None,
                       help=f"{flag.help} [{default}; env {flag.env}{now}]".replace("%", "%%"))
    return p


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Parse flags over environment defaults; raise SettingsError with one clear line naming
    the flag, or the THINLOOP_* variable when the value came from the environment."""
    environ = os.environ if environ is None else environ
    try:
        ns = _build_parser(environ).parse_args(list(argv))
    except UsageError as exc:
        raise SettingsError(str(exc).removeprefix("thinloop-csi: ")) from None
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for flag in FLAGS:
        given = getattr(ns, flag.dest)
        if given is not None:
            values[flag.dest], sources[flag.dest] = given, flag.name
        elif flag.env in environ:
            values[flag.dest], sources[flag.dest] = environ[flag.env], flag.env
        else:
            values[flag.dest], sources[flag.dest] = flag.default, flag.name

    def bad(dest: str, why: str) -> SettingsError:
        return SettingsError(f"{sources[dest]} {values[dest]!r}: {why}")

    def choice(dest: str, allowed: Sequence[str]) -> str:
        value = values[dest].lower()
        if value not in allowed:
            raise bad(dest, f"expected one of {', '.join(allowed)}")
        return value

    def number(dest: str, kind: type[int] | type[float], ok: Callable[[float], bool], words: str) -> Any:
        try:
            value = kind(values[dest])
        except ValueError:
            raise bad(dest, "not an integer" if kind is int else "not a number") from None
        if not ok(value):  # NaN fails every comparison, so it fails here too
            raise bad(dest, f"must be {words}")
        return value

    def absolute(dest: str) -> Path:
        path = Path(values[dest])
        if not path.is_absolute():
            raise bad(dest, "must be an absolute path")
        return path

    mode = choice("mode", MODES)
    level = choice("log_level", LOG_LEVELS)
    fmt = choice("log_format", LOG_FORMATS)
    ratio = number("overcommit_ratio", float, lambda v: 1.0 <= v < math.inf, "a finite number >= 1.0")
    max_vols = number("max_volumes_per_node", int, lambda v: 0 <= v < 2**31, ">= 0")
    workers = number("workers", int, lambda v: 0 <= v <= MAX_WORKERS, f"between 0 and {MAX_WORKERS}")
    idle = number("worker_idle_seconds", float, lambda v: 0 < v <= 86400, "above 0 and at most 86400")
    data_dir = absolute("data_dir")
    kubelet_dir = absolute("kubelet_dir")
    datastore = values["datastore"]
    if datastore and not _valid_label_value(datastore):
        raise bad("datastore", "must be 1-63 letters, digits, '-', '_' or '.', starting and ending with "
                  "a letter or digit (it is a topology label value)")
    heartbeat = number("heartbeat_seconds", float, lambda v: 0.1 <= v <= 3600, "between 0.1 and 3600")
    freeze_poll = number("freeze_poll_seconds", float, lambda v: 0.01 <= v <= 60, "between 0.01 and 60")
    freeze_hold = number("freeze_hold_seconds", float, lambda v: 1 <= v <= MAX_FREEZE_HOLD_SECONDS,
                         f"between 1 and {MAX_FREEZE_HOLD_SECONDS:g}")
    driver_name = values["driver_name"] or (SHARED_DRIVER_NAME if datastore else DEFAULT_DRIVER_NAME)
    if not _valid_driver_name(driver_name):
        raise bad("driver_name", "must be a DNS-style name of at most 63 characters "
                  "(letters, digits, '-' and '.', starting and ending with a letter or digit)")
    node_id = values["node_id"] or socket.gethostname()
    if not node_id or len(node_id) > 128 or any(c in node_id for c in "/\0\n"):
        raise SettingsError(f"{sources['node_id']} {node_id!r}: must be 1-128 characters without '/'")
    if datastore and node_id.startswith("."):
        raise SettingsError(f"{sources['node_id']} {node_id!r}: with --datastore it names files in the "
                            "datastore (nodes/<id>.json), so it must not start with '.'")
    if values["metrics_address"]:
        parse_address(values["metrics_address"], sources["metrics_address"])
    return Settings(
        socket_path=socket_path_from_endpoint(values["endpoint"], sources["endpoint"]),
        node_id=node_id,
        data_dir=data_dir,
        driver_name=driver_name,
        mode=mode,
        log_level=level,
        log_format=fmt,
        overcommit_ratio=ratio,
        max_volumes_per_node=max_vols,
        kubelet_dir=kubelet_dir,
        metrics_address=values["metrics_address"],
        workers=workers,
        worker_idle_seconds=idle,
        datastore=datastore,
        heartbeat_seconds=heartbeat,
        freeze_poll_seconds=freeze_poll,
        freeze_hold_seconds=freeze_hold,
        sources=sources,
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
