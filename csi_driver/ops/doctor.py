"""`thinloopctl doctor`: is this node able to run thinloop? Each check says ok, warn or
fail, what it found, and how to fix it. Checks only look, except the direct-I/O check,
which attaches (and always detaches) a small temporary image in the data dir."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..host import caps
from ..host.linux import REQUIRED_TOOLS, TOOL_PACKAGES, HostOS, sector_size_for
from ..host.runner import CommandError, Runner
from ..settings import Settings
from ..volumes.readiness import readiness
from ..volumes.status import filesystem_of

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_FRACTION = 0.10
VERSION_ARGV = {"util-linux": ["losetup", "--version"], "e2fsprogs": ["mkfs.ext4", "-V"],
                "xfsprogs": ["mkfs.xfs", "-V"], "coreutils": ["cp", "--version"]}
DATA_FS_NOTES = {
    "tmpfs": (FAIL, "volumes live in memory and vanish at reboot; use a disk-backed directory"),
    "overlay": (FAIL, "the data dir is in the container's writable layer and dies with the "
                "container; mount a hostPath there"),
    "nfs": (WARN, "loop devices over NFS are slow and fragile; use a local disk"),
    "nfs4": (WARN, "loop devices over NFS are slow and fragile; use a local disk"),
}


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loop_control() -> Check:
    path = "/dev/loop-control"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Check("loop-control", FAIL, f"{path} is missing",
                     "load the loop module (modprobe loop) and give the container the host's /dev")
    if not stat.S_ISCHR(st.st_mode):
        return Check("loop-control", FAIL, f"{path} is not a character device",
                     "mount the host's /dev into the container")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("loop-control", FAIL, f"{path} is not writable by this process",
                     "run the node container privileged (as in deploy/kubernetes/base/node.yaml)")
    return Check("loop-control", OK, f"{path} present")


def _tools(runner: Runner) -> list[Check]:
    checks = []
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
        checks.append(Check("tools", FAIL, f"not found in PATH: {', '.join(missing)}",
                            f"install {' '.join(pkgs)} (or fix PATH)"))
    else:
        checks.append(Check("tools", OK, f"all {len(REQUIRED_TOOLS)} found"))
    for pkg, argv in VERSION_ARGV.items():
        if shutil.which(argv[0]) is None:
            continue
        res = runner.run(argv, timeout=10, check=False)
        text = (res.stdout + res.stderr).strip().splitlines()
        line = text[0] if text else "(no version output)"
        version = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", line)
        status, fix = OK, ""
        if pkg == "util-linux" and version and (int(version[1]), int(version[2])) < (2, 28):
            status, fix = WARN, "util-linux 2.28 or newer is needed for losetup --direct-io"
        checks.append(Check(f"version {pkg}", status, line, fix))
    return checks


def _direct_io(data_dir: Path) -> list[Check]:
    """Attach a small sparse image in the data dir with direct I/O, as a volume would be."""
    hostos = HostOS(sector_size=sector_size_for(data_dir))
    attached = hostos.loop_devices()
    ours = [d for d in attached if d.backing_file.startswith(os.path.realpath(data_dir) + "/")]
    checks = [Check("loop devices", OK,
                    f"{len(attached)} attached on this host, {len(ours)} of them thinloop images")]
    try:
        fd, name = tempfile.mkstemp(prefix=".doctor-", suffix=".img", dir=data_dir)
    except OSError as exc:
        return [*checks, Check("direct I/O", FAIL, f"cannot create a test image: {exc.strerror}",
                               "make the data dir writable")]
    try:
        os.ftruncate(fd, 16 << 20)
        os.close(fd)
        try:
            dev = hostos.attach_loop(Path(name), readonly=False)
        except (CommandError, OSError) as exc:
            busy = "no free loop" in str(exc).lower() or "busy" in str(exc).lower()
            fix = ("free loop devices: detach unused ones (thinloopctl node orphans) or load the "
                   "loop module with a larger max_loop") if busy else \
                "check that losetup works here: run the container privileged with the host's /dev"
            return [*checks, Check("direct I/O", FAIL, f"cannot attach a loop device: {exc}", fix)]
        try:
            if dev.direct_io:
                checks.append(Check("direct I/O", OK,
                                    f"{dev.device} attached with direct I/O "
                                    f"(sector size {hostos.sector_size})"))
            else:
                checks.append(Check(
                    "direct I/O", WARN, f"{dev.device} attached, but the kernel refused direct I/O: "
                    "volumes work with buffered I/O (page cache used twice)",
                    "use a data dir filesystem that supports O_DIRECT (ext4, xfs) on a kernel >= 4.10"))
        finally:
            hostos.detach_loop(dev.device)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    return checks


def _propagation(mount_point: str) -> str:
    """The propagation tags (shared:N, master:N, ...) of the top mount at mount_point.
    HostOS.mounts() drops these optional mountinfo fields, so they are read here."""
    tags = ""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left = line.partition(" - ")[0].split()
            if len(left) >= 6 and left[4] == mount_point:
                tags = " ".join(left[6:])  # the last one listed is the top mount
    return tags


def _kubelet_dir(kubelet_dir: Path, hostos: HostOS) -> Check:
    if not kubelet_dir.is_dir():
        return Check("mount propagation", WARN, f"{kubelet_dir} does not exist (not a kubelet node?)",
                     "pass --kubelet-dir with the kubelet root directory of this node")
    mount = filesystem_of(kubelet_dir, hostos.mounts())
    if mount is None:
        return Check("mount propagation", WARN, f"no mount found holding {kubelet_dir}",
                     "check /proc/self/mountinfo; is /proc the host's?")
    tags = _propagation(mount.mount_point)
    if "shared:" in tags:
        return Check("mount propagation", OK, f"{kubelet_dir} is on {mount.mount_point}, shared ({tags})")
    return Check(
        "mount propagation", FAIL,
        f"{kubelet_dir} is on {mount.mount_point}, which is not shared ({tags or 'private'}): "
        "mounts the driver makes never reach kubelet and pods",
        f"on the host: mount --make-rshared {mount.mount_point} (systemd does this for /); in the "
        "pod: mountPropagation: Bidirectional on the kubelet dir volume")


def _data_dir(data_dir: Path, hostos: HostOS) -> list[Check]:
    if not data_dir.is_dir():
        return [Check("data dir", FAIL, f"{data_dir} does not exist",
                      "create it, or pass --data-dir (the driver makes it on start)")]
    mount = filesystem_of(data_dir, hostos.mounts())
    fstype = mount.fstype if mount is not None else "unknown"
    status, note = DATA_FS_NOTES.get(fstype, (OK, ""))
    checks = [Check("data dir filesystem", status,
                    f"{data_dir} is on {fstype}" + (f" at {mount.mount_point}" if mount else "")
                    + (f": {note}" if note else ""),
                    "point --data-dir at a local ext4 or xfs filesystem" if status != OK else "")]
    st = os.statvfs(data_dir)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    detail = f"{free >> 20} MiB free of {total >> 20} MiB"
    if free == 0:
        checks.append(Check("data dir free space", FAIL, detail + ": full; thin volumes cannot write",
                            "free space or grow the filesystem; `thinloopctl node trim` reclaims "
                            "space deleted inside volumes"))
    elif total and free / total < MIN_FREE_FRACTION:
        checks.append(Check("data dir free space", WARN, detail + " (under 10%)",
                            "free space, run `thinloopctl node trim`, or stop placing volumes here"))
    else:
        checks.append(Check("data dir free space", OK, detail))
    return checks


def _cap_sys_resource() -> Check:
    why = caps.why_lacking(caps.CAP_SYS_RESOURCE)
    if not why:
        return Check("CAP_SYS_RESOURCE", OK, "present")
    detail, _, fix = why.partition(": ")
    return Check("CAP_SYS_RESOURCE", WARN,
                 f"{detail}: ext3/ext4 volumes cannot grow while mounted (the kernel's online resize "
                 "needs it); the driver grows them at the next stage instead",
                 f"{fix}; xfs growth is not affected")


def _filesystems() -> Check:
    try:
        known = Path("/proc/filesystems").read_text().split()
    except OSError:
        return Check("kernel filesystems", WARN, "/proc/filesystems is unreadable",
                     "mount /proc in the container")
    missing = [fs for fs in ("ext4", "xfs") if fs not in known]
    if missing:
        return Check("kernel filesystems", WARN,
                     f"not loaded yet: {', '.join(missing)} (mount loads a module on demand)",
                     f"modprobe {' '.join(missing)} on the host if mounts fail")
    return Check("kernel filesystems", OK, "ext4 and xfs available")


def _readiness(data_dir: Path) -> Check:
    settings = Settings(socket_path=Path("/nonexistent"), node_id="doctor", data_dir=data_dir)
    reason = readiness(settings, HostOS())
    if reason:
        return Check("probe readiness", FAIL, f"Probe would answer not ready: {reason}",
                     "fix the checks above; the driver logs the same reason")
    return Check("probe readiness", OK, "Probe would answer ready")


def run(data_dir: Path, kubelet_dir: Path, runner: Runner | None = None,
        driver_probe: Callable[[], Check] | None = None) -> list[Check]:
    """Every check, in the order an operator would fix them."""
    runner = runner or Runner()
    hostos = HostOS(runner)
    checks = [_loop_control(), *_tools(runner), _filesystems(), _cap_sys_resource(),
              *_data_dir(data_dir, hostos)]
    if data_dir.is_dir() and os.path.exists("/dev/loop-control"):
        checks += _direct_io(data_dir)
    checks.append(_kubelet_dir(kubelet_dir, hostos))
    if data_dir.is_dir():
        checks.append(_readiness(data_dir))
    if driver_probe is not None:
        checks.append(driver_probe())
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)
