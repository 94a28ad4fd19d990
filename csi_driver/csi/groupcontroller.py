"""CSI GroupController service (CSI v1.12.0, "Group Controller Service RPCs"): volume
group snapshots of volumes on this node, cut at one point in time
(csi_driver.volumes.groupsnapshots). Served where the Controller service touches files (mode
all); Identity advertises GROUP_CONTROLLER_SERVICE there."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from ..errors import InvalidArgument, Unimplemented
from ..proto import csi_pb2, csi_pb2_grpc
from ..volumes.groupsnapshots import GroupSnapshot, GroupSnapshots, check_volume_ids, member_id
from ..volumes.inflight import InFlight
from ..volumes.store import check_id
from .controller import snapshot_msg
from .validation import require

GroupCap = csi_pb2.GroupControllerServiceCapability


def group_msg(group: GroupSnapshot) -> csi_pb2.VolumeGroupSnapshot:
    """The group as CSI describes it: every member present, each naming the group; ready
    when all members are there (a member removed by hand leaves the group not ready)."""
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(group.entry.meta.created * 1e9))
    snaps = [snapshot_msg(e, group.entry.id) for _, e in group.members if e is not None]
    return csi_pb2.VolumeGroupSnapshot(group_snapshot_id=group.entry.id, snapshots=snaps,
                                       creation_time=created, ready_to_use=group.ready_to_use)


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, groups: GroupSnapshots | None, inflight: InFlight) -> None:
        self._groups = groups
        self.inflight = inflight

    @property
    def groups(self) -> GroupSnapshots:
        if self._groups is None:
            raise Unimplemented("volume group snapshots are served by the node plugin")
        return self._groups

    def GroupControllerGetCapabilities(self, request: csi_pb2.GroupControllerGetCapabilitiesRequest,
                                       context: grpc.ServicerContext
                                       ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return csi_pb2.GroupControllerGetCapabilitiesResponse(capabilities=[
            GroupCap(rpc=GroupCap.RPC(type=GroupCap.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))])

    def CreateVolumeGroupSnapshot(self, request: csi_pb2.CreateVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        require(request.name, "name")
        group_id = check_id(request.name, "name")
        volume_ids = check_volume_ids(list(request.source_volume_ids))
        if request.parameters:
            raise InvalidArgument(f"unknown volume group snapshot parameter(s) "
                                  f"{', '.join(sorted(request.parameters))}; none are accepted")
        keys = [f"group:{group_id}", *(f"vol:{v}" for v in volume_ids),
                *(f"snapshot:{member_id(group_id, v)}" for v in volume_ids)]
        with self.inflight.hold(*keys):
            group = self.groups.create(group_id, volume_ids, {})
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=group_msg(group))

    def GetVolumeGroupSnapshot(self, request: csi_pb2.GetVolumeGroupSnapshotRequest,
                               context: grpc.ServicerContext) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        require(request.group_snapshot_id, "group_snapshot_id")
        group = self.groups.get(check_id(request.group_snapshot_id, "group_snapshot_id"))
        self.groups.check_snapshot_ids(group.entry, list(request.snapshot_ids))
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=group_msg(group))

    def DeleteVolumeGroupSnapshot(self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext
                                  ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        require(request.group_snapshot_id, "group_snapshot_id")
        try:
            group_id = check_id(request.group_snapshot_id, "group_snapshot_id")
        except InvalidArgument:
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()  # no such id can exist: already gone
        record = self.groups.records.get(group_id)
        members = record.snapshot_ids if record is not None else []
        with self.inflight.hold(f"group:{group_id}", *(f"snapshot:{s}" for s in members)):
            self.groups.delete(group_id, list(request.snapshot_ids))
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()
