"""CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

import errno
import logging
import os
import tempfile

import grpc
from google.protobuf import wrappers_pb2

from .. import __version__
from ..config import Settings
from ..host.oslayer import OSLayer
from ..proto import csi_pb2, csi_pb2_grpc
from ..volumes.datastore.records import health as datastore_health

log = logging.getLogger(__name__)
PluginCap = csi_pb2.PluginCapability
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


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, settings: Settings, oslayer: OSLayer | None) -> None:
        self.settings = settings
        self.os = oslayer

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
                      ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.settings.driver_name, vendor_version=__version__)

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = []
        if self.settings.runs_controller:
            caps.append(PluginCap(service=PluginCap.Service(type=PluginCap.Service.CONTROLLER_SERVICE)))
        caps.append(PluginCap(service=PluginCap.Service(
            type=PluginCap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)))
        if self.settings.runs_controller and self.os is not None:
            # Volume group snapshots need the volumes' files: served in mode all.
            caps.append(PluginCap(service=PluginCap.Service(type=PluginCap.Service.GROUP_CONTROLLER_SERVICE)))
        if self.os is not None:
            caps.append(PluginCap(service=PluginCap.Service(type=PluginCap.Service.SNAPSHOT_METADATA_SERVICE)))
        caps.append(PluginCap(volume_expansion=PluginCap.VolumeExpansion(
            type=PluginCap.VolumeExpansion.ONLINE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        reason = readiness(self.settings, self.os)
        if reason:
            log.warning("not ready: %s", reason)
            if context is not None:  # Probe's message has no room for a reason: say it beside it
                context.set_trailing_metadata(((NOT_READY_REASON_KEY, reason.encode()),))
        elif self.os is not None and (full := disk_full(self.settings)):
            log.warning("ready, but %s: free space before creating or growing volumes", full)
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=not reason))
