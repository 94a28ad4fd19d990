"""CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

import logging
import os
import tempfile

import grpc
from google.protobuf import wrappers_pb2

from . import __version__
from .config import Settings
from .oslayer import OSLayer
from .proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)
PluginCap = csi_pb2.PluginCapability


def readiness(settings: Settings, oslayer: OSLayer | None) -> str:
    """Empty when ready, else the reason (also used by thinloopctl doctor and metrics)."""
    if oslayer is None:
        return ""  # controller-only mode touches no files and runs no tools
    missing = oslayer.missing_tools()
    if missing:
        return f"missing tools: {', '.join(missing)}"
    try:
        fd, name = tempfile.mkstemp(prefix=".probe-", dir=settings.data_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"data dir {settings.data_dir} is not writable: {exc.strerror}"
    st = os.statvfs(settings.data_dir)
    if st.f_bavail == 0:
        return f"data dir {settings.data_dir} is full"
    if not os.path.exists("/dev/loop-control"):
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
        if self.os is not None:
            caps.append(PluginCap(service=PluginCap.Service(type=PluginCap.Service.SNAPSHOT_METADATA_SERVICE)))
        caps.append(PluginCap(volume_expansion=PluginCap.VolumeExpansion(
            type=PluginCap.VolumeExpansion.ONLINE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        reason = readiness(self.settings, self.os)
        if reason:
            log.warning("not ready: %s", reason)
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=not reason))
