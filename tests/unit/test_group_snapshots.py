"""Volume group snapshots against the stateful fake OS layer: the CSI GroupController
service's rules (CSI v1.12.0), freezing, failure at every step, start-up recovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi_driver import failpoints
from csi_driver.csi.groupcontroller import GroupControllerService
from csi_driver.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)
from csi_driver.proto import csi_pb2
from csi_driver.serving.driver import Driver
from csi_driver.volumes.groupsnapshots import MAX_ID, member_id
from tests.helpers import MIB, cap_for, tree
from tests.unit.test_services import CTX, Rig

PluginService = csi_pb2.PluginCapability.Service


class GroupRig(Rig):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        assert self.driver.groups is not None
        self.group = GroupControllerService(self.driver.groups, self.driver.inflight)
        self.data = self.settings.data_dir

    def cut(self, name: str, *volumes: str, **params: str) -> csi_pb2.VolumeGroupSnapshot:
        return self.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name=name, source_volume_ids=list(volumes), parameters=params), CTX).group_snapshot

    def get(self, group: str, *snaps: str) -> csi_pb2.VolumeGroupSnapshot:
        return self.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group, snapshot_ids=list(snaps)), CTX).group_snapshot

    def delete(self, group: str, *snaps: str) -> None:
        self.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group, snapshot_ids=list(snaps)), CTX)

    def listed(self) -> dict[str, str]:
        """snapshot id -> group id, as ListSnapshots shows them."""
        resp = self.ctrl.ListSnapshots(csi_pb2.ListSnapshotsRequest(), CTX)
        return {e.snapshot.snapshot_id: e.snapshot.group_snapshot_id for e in resp.entries}

    def three(self) -> list[str]:
        """Three volumes, two of them staged (mounted) and one raw block volume."""
        self.create("vol-b", fs="ext3")
        self.create("vol-a")
        self.create("vol-c", fs="block", size=32 * MIB)
        self.stage("vol-a")
        self.stage("vol-b", "ext3")
        return ["vol-b", "vol-c", "vol-a"]


@pytest.fixture
def g(tmp_path: Path) -> GroupRig:
    return GroupRig(tmp_path)


@pytest.fixture
def failpoint(monkeypatch: pytest.MonkeyPatch) -> object:
    def arm(name: str) -> None:
        monkeypatch.setattr(failpoints, "_ACTIVE", {name: "error"})
    return arm


def test_capabilities(g: GroupRig) -> None:
    caps = g.group.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest(), CTX)
    assert [c.rpc.type for c in caps.capabilities] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    plugin = g.ident.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), CTX)
    assert PluginService.GROUP_CONTROLLER_SERVICE in [c.service.type for c in plugin.capabilities]


def test_controller_mode_neither_advertises_nor_serves_groups(tmp_path: Path) -> None:
    from dataclasses import replace

    from csi_driver.csi.identity import IdentityService
    settings = replace(Rig(tmp_path).settings, mode="controller")
    d = Driver.build(settings)
    assert d.groups is None and "GroupController" not in d.services()
    plugin = IdentityService(settings, None).GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), CTX)
    assert PluginService.GROUP_CONTROLLER_SERVICE not in [c.service.type for c in plugin.capabilities]
    with pytest.raises(Unimplemented):
        GroupControllerService(None, d.inflight).GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="x"), CTX)


def test_cut_freezes_every_mounted_member_in_volume_order_and_copies_all_while_frozen(g: GroupRig) -> None:
    volumes = g.three()
    frozen_order: list[str] = []
    real_freeze, real_copy = g.os.freeze, g.os.copy_image
    seen: list[tuple[str, frozenset[str]]] = []

    def freeze(point: str) -> None:
        frozen_order.append(point)
        real_freeze(point)

    def copy(source: Path, dest: Path) -> None:
        seen.append((Path(source).parent.name, frozenset(g.os.frozen)))
        real_copy(source, dest)

    g.os.freeze, g.os.copy_image = freeze, copy  # type: ignore[method-assign]
    group = g.cut("grp", *volumes)
    staged = {v: str(g.kubelet / "st" / v) for v in ("vol-a", "vol-b")}
    assert frozen_order == [staged["vol-a"], staged["vol-b"]], "frozen in the order of the volume ids"
    assert [v for v, _ in seen] == ["vol-a", "vol-b", "vol-c"]
    assert all(f == frozenset(staged.values()) for _, f in seen), "every copy is made with all frozen"
    assert g.os.frozen == set(), "all thawed"
    assert group.group_snapshot_id == "grp" and group.ready_to_use
    assert group.creation_time.seconds > 0
    members = {s.source_volume_id: s for s in group.snapshots}
    assert sorted(members) == ["vol-a", "vol-b", "vol-c"]
    for vid, snap in members.items():
        assert snap.snapshot_id == member_id("grp", vid) == f"grp-{vid}"
        assert snap.group_snapshot_id == "grp" and snap.ready_to_use
        assert snap.creation_time == group.creation_time, "one point in time"
        assert (g.data / "snapshots" / snap.snapshot_id / "disk.img").read_bytes() == \
            (g.data / "volumes" / vid / "disk.img").read_bytes()


def test_members_are_ordinary_snapshots_deleted_only_with_their_group(g: GroupRig) -> None:
    g.create("v1")
    g.create("v2")
    g.cut("grp", "v1", "v2")
    assert g.listed() == {"grp-v1": "grp", "grp-v2": "grp"}
    by_source = g.ctrl.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id="v2"), CTX).entries
    assert [(e.snapshot.snapshot_id, e.snapshot.group_snapshot_id) for e in by_source] == [("grp-v2", "grp")]
    got = g.ctrl.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id="grp-v1"), CTX).snapshot
    assert got.group_snapshot_id == "grp"
    with pytest.raises(InvalidArgument, match="is part of volume group snapshot grp"):
        g.ctrl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="grp-v1"), CTX)
    with pytest.raises(AlreadyExists, match="member of volume group snapshot grp"):
        g.ctrl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="grp-v1", source_volume_id="v1"), CTX)
    req = csi_pb2.CreateVolumeRequest(name="restored", volume_capabilities=[cap_for("ext4")],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MIB))
    req.volume_content_source.snapshot.snapshot_id = "grp-v2"
    vol = g.ctrl.CreateVolume(req, CTX).volume
    assert vol.content_source.snapshot.snapshot_id == "grp-v2"
    assert (g.data / "volumes" / "restored" / "disk.img").read_bytes() == \
        (g.data / "volumes" / "v2" / "disk.img").read_bytes()
    g.delete("grp")
    assert g.listed() == {}
    assert os.listdir(g.data / "group-snapshots") == []


def test_idempotent_by_name_and_already_exists_when_different(g: GroupRig) -> None:
    g.create("v1")
    g.create("v2")
    g.create("v3")
    first = g.cut("grp", "v2", "v1")
    again = g.cut("grp", "v1", "v2")
    assert again == first, "the same name and volumes (in any order) return the same group"
    before = tree(str(g.data))
    with pytest.raises(AlreadyExists, match="holds volumes v1, v2"):
        g.cut("grp", "v1", "v3")
    with pytest.raises(AlreadyExists):
        g.cut("grp", "v1")
    assert tree(str(g.data)) == before


def test_bad_requests_are_invalid_argument_and_change_nothing(g: GroupRig) -> None:
    g.create("v1")
    before = tree(str(g.data))
    for name, volumes, params in (("", ["v1"], {}), ("grp", [], {}), ("bad/name", ["v1"], {}),
                                  ("grp", ["v1", "v1"], {}), ("grp", ["../v1"], {}),
                                  ("grp", ["v1"], {"speed": "fast"})):
        with pytest.raises(InvalidArgument):
            g.cut(name, *volumes, **params)
    with pytest.raises(InvalidArgument):
        g.get("")
    with pytest.raises(InvalidArgument):
        g.delete("")
    g.delete("no/such")  # an id that cannot exist is already gone
    assert tree(str(g.data)) == before


def test_volumes_must_all_be_on_this_node(g: GroupRig) -> None:
    g.create("here")
    before = tree(str(g.data))
    with pytest.raises(FailedPrecondition) as info:
        g.cut("grp", "here", "elsewhere-1", "elsewhere-2")
    assert "elsewhere-1, elsewhere-2 are not on node n1" in info.value.message
    assert "while here are" in info.value.message
    with pytest.raises(NotFound, match="elsewhere-1"):
        g.cut("grp", "elsewhere-1")
    assert tree(str(g.data)) == before


def test_get_and_delete_follow_the_spec(g: GroupRig) -> None:
    g.create("v1")
    g.create("v2")
    made = g.cut("grp", "v1", "v2")
    assert g.get("grp") == made
    assert g.get("grp", "grp-v2", "grp-v1") == made
    with pytest.raises(InvalidArgument, match="do not match"):
        g.get("grp", "grp-v1")
    with pytest.raises(NotFound):
        g.get("other")
    with pytest.raises(InvalidArgument, match="do not match"):
        g.delete("grp", "grp-v1", "something-else")
    assert g.listed() == {"grp-v1": "grp", "grp-v2": "grp"}, "a refused delete removes nothing"
    g.delete("grp", "grp-v1", "grp-v2")
    g.delete("grp")  # idempotent
    with pytest.raises(NotFound):
        g.get("grp")
    assert g.listed() == {}


def test_a_member_removed_by_hand_makes_the_group_not_ready(g: GroupRig) -> None:
    import shutil
    g.create("v1")
    g.create("v2")
    g.cut("grp", "v1", "v2")
    shutil.rmtree(g.data / "snapshots" / "grp-v1")
    got = g.get("grp")
    assert not got.ready_to_use
    assert [s.snapshot_id for s in got.snapshots] == ["grp-v2"]


def test_a_member_whose_group_record_is_gone_stands_alone(g: GroupRig) -> None:
    """Never hidden for good, never lost: it is listed and deletable on its own."""
    import shutil
    g.create("v1")
    g.cut("grp", "v1")
    shutil.rmtree(g.data / "group-snapshots" / "grp")
    assert g.listed() == {"grp-v1": ""}
    g.ctrl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="grp-v1"), CTX)
    assert g.listed() == {}


def test_busy_volume_or_group_is_aborted(g: GroupRig) -> None:
    g.create("v1")
    g.create("v2")
    with g.driver.inflight.hold("vol:v2"), pytest.raises(Aborted):
        g.cut("grp", "v1", "v2")
    g.cut("grp", "v1", "v2")
    with g.driver.inflight.hold("snapshot:grp-v1"), pytest.raises(Aborted):
        g.delete("grp")
    with g.driver.inflight.hold("group:grp"), pytest.raises(Aborted):
        g.cut("grp", "v1", "v2")


def test_no_room_is_resource_exhausted(g: GroupRig, monkeypatch: pytest.MonkeyPatch) -> None:
    g.create("v1")
    (g.data / "volumes" / "v1" / "disk.img").write_bytes(b"x" * MIB)  # some allocation to copy
    monkeypatch.setattr(type(g.driver.store), "free_bytes", lambda self: 4096)
    before = tree(str(g.data))
    with pytest.raises(ResourceExhausted):
        g.cut("grp", "v1")
    assert tree(str(g.data)) == before


def test_long_names_make_valid_distinct_member_ids() -> None:
    group = "g" * MAX_ID
    ids = {member_id(group, v) for v in ("a" * 100, "b" * 100)}
    assert len(ids) == 2
    assert all(len(i) <= MAX_ID for i in ids)


STEPS = ["group.after_freeze", "group.while_frozen", "group.after_thaw", "group.after_record",
         "group.after_member", "group.before_commit", "snapshot.create.before_rename"]


@pytest.mark.parametrize("step", STEPS)
def test_failure_at_any_step_thaws_everything_and_leaves_nothing(g: GroupRig, failpoint: object,
                                                                 step: str) -> None:
    volumes = g.three()
    before = tree(str(g.data))
    failpoint(step)  # type: ignore[operator]
    with pytest.raises(Internal, match=f"failpoint {step}"):
        g.cut("grp", *volumes)
    assert g.os.frozen == set(), "everything frozen was thawed"
    assert tree(str(g.data)) == before, "no partial copy, record or member is left"
    assert g.listed() == {}
    failpoints._ACTIVE.clear()
    assert g.cut("grp", *volumes).ready_to_use


def test_a_failed_freeze_thaws_those_already_frozen(g: GroupRig) -> None:
    volumes = g.three()
    real = g.os.freeze

    def freeze(point: str) -> None:
        if point.endswith("vol-b"):
            raise Internal("cannot freeze")
        real(point)

    g.os.freeze = freeze  # type: ignore[method-assign]
    with pytest.raises(Internal):
        g.cut("grp", *volumes)
    assert g.os.frozen == set()
    assert g.listed() == {}


def test_pending_members_are_hidden_and_recovery_removes_them(g: GroupRig, tmp_path: Path) -> None:
    """What a crash after the first member's rename leaves: the record pending, a member in
    place. Nothing shows it; start-up recovery removes both."""
    g.create("v1")
    g.create("v2")
    g.cut("grp", "v1", "v2")
    records = g.data / "group-snapshots"
    os.rename(records / "grp", records / ".tmp-grp.0123abcd")  # as if the commit had not happened
    assert g.listed() == {}
    with pytest.raises(NotFound):
        g.ctrl.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id="grp-v1"), CTX)
    with pytest.raises(NotFound):
        g.get("grp")
    with pytest.raises(Aborted):
        g.ctrl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="grp-v1"), CTX)
    actions = Driver.build(g.settings, oslayer=g.os).recover()
    assert "removed unfinished volume group snapshot grp (2 member(s) removed)" in actions
    assert os.listdir(records) == [] and os.listdir(g.data / "snapshots") == []


def test_recovery_finishes_an_interrupted_delete(g: GroupRig) -> None:
    g.create("v1")
    g.create("v2")
    g.cut("grp", "v1", "v2")
    records = g.data / "group-snapshots"
    os.rename(records / "grp", records / ".trash-grp.0123abcd")
    assert g.listed() == {}
    g.delete("grp")  # already gone as far as CSI is concerned
    actions = Driver.build(g.settings, oslayer=g.os).recover()
    assert "finished deleting volume group snapshot grp (2 member(s) removed)" in actions
    assert os.listdir(records) == [] and os.listdir(g.data / "snapshots") == []


def test_recovery_of_a_record_never_written(g: GroupRig) -> None:
    (g.data / "group-snapshots" / ".tmp-grp.0123abcd").mkdir()
    actions = Driver.build(g.settings, oslayer=g.os).recover()
    assert "removed unfinished volume group snapshot grp (0 member(s) removed)" in actions
    assert os.listdir(g.data / "group-snapshots") == []
