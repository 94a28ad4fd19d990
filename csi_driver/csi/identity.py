"""CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import wrappers_pb2

from .. import __version__
from ..host.oslayer import OSLayer
from ..proto import csi_pb2, csi_pb2_grpc
from ..settings import Settings
from ..volumes.readiness import NOT_READY_REASON_KEY, disk_full, readiness

log = logging.getLogger(__name__)
PluginCap = csi_pb2.PluginCapability
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
