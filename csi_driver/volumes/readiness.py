"""Whether this node can serve volumes at all, and whether its data dir is full: the
answer of Probe (csi_driver.csi.identity), of `thinloopctl doctor` and of the thinloop_ready
and thinloop_data_dir_full metrics, read from the host and the data dir each time."""

from __future__ import annotations

import errno
import os
import tempfile

from ..host.oslayer import OSLayer
from ..settings import Settings
from .datastore.records import health as datastore_health

NOT_READY_REASON_KEY = "thinloop-not-ready-reason-bin"
"""Trailing metadata of a not-ready Probe answer: the reason, UTF-8 (`-bin`: any bytes;
gRPC's metadata rules). thinloopctl info shows it; other clients ignore it."""


def disk_full(settings: Settings) -> str:
    """A warning, not a readiness failure: with the livenessprobe sidecar a not-ready driver
    is restarted in a loop, and while it restarts nobody can delete a volume, which is how
    space is freed. A full disk shows in this reason (logged by Probe), in the
    thinloop_data_dir_full metric, in GetCapacity (zero) and in the volume conditions."""
    try:
        st = os.statvfs(settings.data_dir)
    except OSError:
        return ""
    if st.f_bavail == 0:
        return f"data dir {settings.data_dir} is full"
    if st.f_favail == 0 and st.f_files > 0:
        return f"data dir {settings.data_dir} has no free inodes"
    return ""


def readiness(settings: Settings, oslayer: OSLayer | None) -> str:
    """Empty when ready, else the reason: conditions under which the driver cannot work at
    all (also used by thinloopctl doctor and metrics)."""
    if oslayer is None:
        return ""  # controller-only mode touches no files and runs no tools
    missing = oslayer.missing_tools()
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if settings.shared:
        problem = datastore_health(settings.data_dir, settings.datastore)
        if problem:
            return problem
    try:
        fd, name = tempfile.mkstemp(prefix=".probe-", dir=settings.data_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):  # full: reported by disk_full, not here
            return f"data dir {settings.data_dir} is not writable: {exc.strerror}"
    if settings.runs_node and not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing: load the loop module or mount the host's /dev"
    return ""
