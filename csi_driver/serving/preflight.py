"""Start-up checks of the environment the settings name, run before the driver starts
anything: no socket is made, no process forked and nothing in the data dir touched until
they pass. Each failure is one line naming the flag (or the THINLOOP_* variable that set
it) or the path, and the fix.

Only reads: the socket, the data dir and its parents are looked at with stat(2) and
access(2); the metrics address is bound once and released at once."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path

from ..host.linux import REQUIRED_TOOLS, TOOL_PACKAGES
from ..settings import Settings, parse_address
from ..volumes.datalock import LOCK_FILE, DataDirLock, node_lock_path
from ..volumes.datastore.records import marker_problem, node_in_use

LOOP_CONTROL = "/dev/loop-control"


class StartupError(RuntimeError):
    """The driver cannot start; the message is one line for the operator."""


def check(settings: Settings) -> None:
    """Every check, cheapest and most basic first; raise StartupError at the first failure.
    A data dir another driver holds is named first: a second copy started with the same
    flags is told who holds the data dir (its socket is that driver's too). In shared mode
    the datastore comes first the same way (its marker, and the node id's lock)."""
    if settings.shared:
        _check_datastore(settings)
    elif settings.touches_files:
        _check_data_dir_free(settings)
    inspect_endpoint(str(settings.socket_path), settings.source("endpoint"))
    _check_socket_dir(settings)
    if settings.metrics_address:
        _check_metrics_address(settings)
    if settings.touches_files:
        if not settings.shared:
            _check_data_dir(settings)
        _check_tools()
    if settings.touches_files and settings.runs_node:
        _check_loop_control()


def _check_datastore(settings: Settings) -> None:
    """Shared mode: the data dir is the datastore's mount (a directory that exists, is
    never made, and takes writes), its marker names --datastore (or, for a controller, it
    is a mount point where the marker is still to be made: csi_driver.volumes.datastore.records), and no
    other driver holds this node id's lock there."""
    source, path = settings.source("data_dir"), settings.data_dir
    named = f"{settings.source('datastore')} {settings.datastore}"
    if not path.is_dir():
        what = "is not a directory" if os.path.lexists(path) else "does not exist"
        raise StartupError(f"{source} {path}: {what}; with {named} it is the datastore's mount, which the "
                           "driver never creates: mount the datastore there")
    problem = marker_problem(path, settings.datastore, may_create=settings.runs_controller)
    if problem:
        raise StartupError(f"{named}: {problem}")
    if settings.runs_node:
        lock = node_lock_path(path, settings.node_id)
        try:
            holder = DataDirLock(lock).holder()
        except OSError:
            holder = None  # unreadable: the writability check below says why
        if holder is not None:
            raise StartupError(f"{settings.source('node_id')} {settings.node_id}: "
                               f"{node_in_use(settings.node_id, holder, lock)}")
    problem = _writable_dir_problem(path)
    if problem:
        raise StartupError(f"{source} {path}: {problem}; the datastore's mount must take writes")


def _check_data_dir_free(settings: Settings) -> None:
    """Only reads the lock (csi_driver.volumes.datalock); taking it is the server's first act."""
    try:
        holder = DataDirLock(settings.data_dir / LOCK_FILE).holder()
    except OSError:
        return  # unreadable: _check_data_dir says why
    if holder is not None:
        raise StartupError(data_dir_in_use(settings, holder))


def data_dir_in_use(settings: Settings, holder: str) -> str:
    return (f"data dir {settings.data_dir} is in use by another thinloop driver ({holder}); "
            "stop that one first, or give this one its own --data-dir")


def inspect_endpoint(path: str, source: str = "--endpoint") -> bool:
    """Refuse symlinks, non-sockets, sockets owned by someone else and sockets another
    process still serves. True when a stale socket of ours is there (safe to replace)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False  # a parent is not a directory: _check_socket_dir says which
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"{source} unix://{path}: is a symlink; refusing to use it: remove it or "
                           "choose another path")
    if not stat.S_ISSOCK(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a file"
        raise StartupError(f"{source} unix://{path}: exists and is not a socket ({what}); refusing to "
                           "replace it: remove it or choose another path")
    if st.st_uid != os.geteuid():
        raise StartupError(f"{source} unix://{path}: belongs to uid {st.st_uid}, not to this process "
                           f"(uid {os.geteuid()}): is another driver using it? Choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return True  # nobody listens: stale
    finally:
        probe.close()
    raise StartupError(f"{source} unix://{path}: another process is serving it; stop that process or "
                       "choose another path")


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _writable_dir_problem(path: Path) -> str:
    """Why a process cannot create entries in directory `path`, or empty."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"{path} is on a read-only filesystem"
    except OSError as exc:
        return f"{path} cannot be examined: {exc.strerror}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by uid {os.geteuid()}"
    return ""


def _check_socket_dir(settings: Settings) -> None:
    source = settings.source("endpoint")
    parent = settings.socket_path.parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise StartupError(f"{source} {settings.endpoint}: {existing} is not a directory, so the "
                           "socket cannot be made under it: choose another path")
    problem = _writable_dir_problem(existing)
    if problem:
        made = "cannot be created" if existing != parent else "cannot hold the socket"
        raise StartupError(f"{source} {settings.endpoint}: {parent} {made}: {problem}; choose a "
                           "writable directory")


def _check_metrics_address(settings: Settings) -> None:
    source = settings.source("metrics_address")
    address = settings.metrics_address
    host, port = parse_address(address, source)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{source} {address!r}: cannot resolve {host!r} ({exc.strerror}): "
                           "use an IP address, or :PORT for all interfaces") from None
    family, kind, proto, _, sockaddr = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server does
        probe.bind(sockaddr)
    except OSError as exc:
        raise StartupError(f"{source} {address!r}: cannot listen there ({exc.strerror}): choose "
                           "another port, or stop what holds it") from None
    finally:
        probe.close()


def _check_data_dir(settings: Settings) -> None:
    source = settings.source("data_dir")
    path = settings.data_dir
    existing = _nearest_existing(path)
    if existing == path or os.path.exists(path):
        if not path.is_dir():
            what = "a regular file" if path.is_file() else "not a directory"
            raise StartupError(f"{source} {path}: is {what}; point {source} at a directory "
                               "(it is created when missing)")
        problem = _writable_dir_problem(path)
        if problem:
            raise StartupError(f"{source} {path}: {problem}; the driver writes images there: make "
                               f"it writable or point {source} elsewhere")
        return
    if not existing.is_dir():
        raise StartupError(f"{source} {path}: cannot be created, {existing} is not a directory; "
                           f"point {source} elsewhere")
    problem = _writable_dir_problem(existing)
    if problem:
        raise StartupError(f"{source} {path}: cannot be created, {problem}; create it by hand or "
                           f"point {source} elsewhere")


def _check_tools() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        packages = " ".join(sorted({TOOL_PACKAGES.get(t, t) for t in missing}))
        raise StartupError(f"tools missing from PATH: {', '.join(missing)}; install {packages} "
                           f"(Debian: apt-get install {packages}) or fix PATH")


def _check_loop_control() -> None:
    try:
        st = os.stat(LOOP_CONTROL)
    except FileNotFoundError:
        raise StartupError(f"{LOOP_CONTROL} is missing: load the loop module (modprobe loop) and, "
                           "in a container, mount the host's /dev") from None
    if not stat.S_ISCHR(st.st_mode):
        raise StartupError(f"{LOOP_CONTROL} is not a character device: mount the host's /dev there")
