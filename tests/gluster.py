"""A GlusterFS datastore for tests and benchmarks: a glusterd of our own (its state, sockets
and logs in a temporary directory, listening only on the address of this host's name), one
volume with one brick, and FUSE clients mounted on demand, one per simulated host.

Every process it starts is stopped at the end (glusterd, the brick's glusterfsd, the FUSE
clients), every mount is unmounted, and the two files glusterd leaves outside its working
directory (the brick's log under /var/log/glusterfs/bricks and its socket under
/var/run/gluster) are removed, as is the empty log directory glusterd makes for the volume
under /var/log/glusterfs/gfproxy. gluster's command-line tool still appends to
/var/log/glusterfs/cli.log and cmd_history.log, as it does for any use of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PORT = 24007
"""glusterd's management port: its bricks fetch their volfile from it, on this port only."""

DATASTORE_OPTIONS = {
    "client.strict-locks": "on",
    "performance.strict-o-direct": "on",
    "performance.quick-read": "off",
    "performance.io-cache": "off",
    "performance.open-behind": "off",
    "performance.stat-prefetch": "off",
    "performance.read-ahead": "off",
}
"""The volume options docs/shared-datastore.md asks of a GlusterFS datastore."""


class GlusterError(RuntimeError):
    """The test datastore cannot be set up; the message says why."""


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "LC_ALL": "C"})


def local_host_name() -> tuple[str, str]:
    """A name of this host that resolves to one of its own addresses. glusterd refuses
    "localhost" as a brick host, and its bricks reach it at the brick host's address."""
    tried = []
    for name in dict.fromkeys((socket.gethostname(), socket.getfqdn())):
        if not name or name.startswith("localhost"):
            continue
        try:
            addr = socket.gethostbyname(name)
        except OSError as exc:
            tried.append(f"{name}: {exc}")
            continue
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind((addr, 0))
        except OSError:
            tried.append(f"{name} -> {addr}: not an address of this host")
            continue
        finally:
            probe.close()
        return name, addr
    raise GlusterError("no name of this host resolves to one of its own addresses, and glusterd "
                       f"refuses 'localhost' as a brick host ({'; '.join(tried) or 'no host name'}): "
                       "add '127.0.1.1 <hostname>' to /etc/hosts")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and ("gluster" in cmdline):
            found.append(int(pid))
    return found


@dataclass
class Client:
    mount: Path
    pid: int


@dataclass
class GlusterBed:
    base: Path
    volume: str = "thinloop"
    host: str = ""
    address: str = ""
    glusterd: subprocess.Popen[bytes] | None = None
    clients: list[Client] = field(default_factory=list)
    _extra_files: list[Path] = field(default_factory=list)
    _extra_dirs: list[Path] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.base / "glusterd.socket"

    def gluster(self, *args: str) -> str:
        res = _run(["gluster", f"--glusterd-sock={self.sock}", "--mode=script", *args])
        if res.returncode != 0:
            raise GlusterError(f"gluster {' '.join(args)}: {(res.stderr or res.stdout).strip()}")
        return res.stdout

    def start(self) -> GlusterBed:
        for tool in ("glusterd", "gluster", "glusterfs"):
            if shutil.which(tool) is None:
                raise GlusterError(f"{tool} is not installed (Debian: glusterfs-server, glusterfs-client; "
                                   "scripts/install-deps.sh installs them)")
        self.host, self.address = local_host_name()
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex((self.address, PORT)) == 0:
                raise GlusterError(f"something already listens on {self.address}:{PORT} (another glusterd?); "
                                   "the test datastore needs that port")
        for d in ("wd", "run", "logs", "brick", "mnt"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        volfile = self.base / "glusterd.vol"
        volfile.write_text(f"""volume management
    type mgmt/glusterd
    option working-directory {self.base / 'wd'}
    option run-directory {self.base / 'run'}
    option glusterd-sockfile {self.sock}
    option transport-type socket
    option transport.socket.bind-address {self.address}
    option transport.socket.listen-port {PORT}
    option ping-timeout 0
    option event-threads 1
end-volume
""")
        log = self.base / "logs" / "glusterd.log"
        self.glusterd = subprocess.Popen(["glusterd", "-N", "-f", str(volfile), "-l", str(log)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.glusterd.poll() is not None:
                raise GlusterError(f"glusterd exited with {self.glusterd.returncode}: "
                                   f"{self._tail(log)}")
            if self.sock.exists() and _run(["gluster", f"--glusterd-sock={self.sock}", "--mode=script",
                                            "volume", "list"]).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise GlusterError(f"glusterd did not answer within 30 s: {self._tail(log)}")
            time.sleep(0.2)
        brick = self.base / "brick" / "b0"
        gfproxy_log = Path("/var/log/glusterfs/gfproxy") / self.volume  # glusterd makes it per volume
        if not gfproxy_log.exists():
            self._extra_dirs.append(gfproxy_log)
        self.gluster("volume", "create", self.volume, f"{self.host}:{brick}", "force")
        for key, value in DATASTORE_OPTIONS.items():
            self.gluster("volume", "set", self.volume, key, value)
        try:
            self.gluster("volume", "start", self.volume)
        except GlusterError as exc:
            raise GlusterError(f"{exc}: {self._tail(log)}") from None
        self._note_brick_files(brick)
        return self

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in lines if " E " in line]
        return " | ".join((errors or lines)[-3:])

    def _note_brick_files(self, brick: Path) -> None:
        """The brick's log and socket are outside our directory: remember them to remove."""
        for pid in _processes_mentioning(str(brick)):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv]
            for flag in ("-S", "-l"):
                if flag in args:
                    path = Path(args[args.index(flag) + 1])
                    if not path.is_relative_to(self.base):
                        self._extra_files.append(path)

    def mount(self, name: str) -> Path:
        """A new FUSE client of the volume (a host's view of the datastore)."""
        point = self.base / "mnt" / name
        point.mkdir(parents=True, exist_ok=False)
        pidfile = self.base / "run" / f"client-{name}.pid"
        res = _run(["glusterfs", f"--volfile-server={self.host}", f"--volfile-id={self.volume}",
                    f"--log-file={self.base / 'logs' / f'client-{name}.log'}", f"--pid-file={pidfile}",
                    str(point)])
        if res.returncode != 0:
            raise GlusterError(f"mounting {self.volume} at {point}: {(res.stderr or res.stdout).strip()}")
        deadline = time.monotonic() + 20
        while not (os.path.ismount(point) and pidfile.exists() and pidfile.read_text().strip()):
            if time.monotonic() > deadline:
                raise GlusterError(f"{point} was not mounted within 20 s")
            time.sleep(0.05)
        os.statvfs(point)
        self.clients.append(Client(point, int(pidfile.read_text())))
        return point

    def client(self, mount: Path) -> Client:
        return next(c for c in self.clients if c.mount == mount)

    def kill_client(self, mount: Path) -> None:
        """SIGKILL a client process: its host loses the datastore at once (node loss). The
        brick drops the client's locks when its connection goes."""
        os.kill(self.client(mount).pid, signal.SIGKILL)

    def unmount(self, mount: Path) -> None:
        client = self.client(mount)
        if str(mount) in _mounts() and _run(["umount", str(mount)]).returncode != 0:
            _run(["umount", "-l", str(mount)])  # a dead client's mount (ENOTCONN), or busy
        deadline = time.monotonic() + 10
        while _alive(client.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(client.pid):
            os.kill(client.pid, signal.SIGKILL)
        self.clients.remove(client)

    def stop(self) -> list[str]:
        """Stop everything; return what had to be forced (empty after a clean run)."""
        forced = []
        for client in list(self.clients):
            self.unmount(client.mount)
        if self.glusterd is not None and self.glusterd.poll() is None:
            with contextlib.suppress(GlusterError, subprocess.TimeoutExpired):
                self.gluster("volume", "stop", self.volume, "force")
            self.glusterd.terminate()
            try:
                self.glusterd.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.glusterd.kill()
                self.glusterd.wait()
                forced.append("glusterd")
        for pid in _processes_mentioning(str(self.base)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            forced.append(f"pid {pid}")
        for m in sorted((p for p in _mounts() if p.startswith(str(self.base))), reverse=True):
            _run(["umount", "-l", m])
            forced.append(f"mount {m}")
        for path in self._extra_files:
            path.unlink(missing_ok=True)
        for d in self._extra_dirs:
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty
        return forced


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _mounts() -> list[str]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 1:
            out.append(parts[1].replace("\\040", " "))
    return out
