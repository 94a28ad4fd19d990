"""Service logic against the stateful fake OS layer: fast, no root, no kernel objects."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from csi_driver.csi.controller import ControllerService
from csi_driver.csi.identity import IdentityService
from csi_driver.csi.node import NodeService
from csi_driver.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from csi_driver.proto import csi_pb2
from csi_driver.serving.driver import Driver
from csi_driver.settings import TOPOLOGY_KEY, Settings
from csi_driver.volumes.store import Store
from tests.fakeos import FakeOS
from tests.helpers import GIB, MIB, cap_for

CTX: Any = None  # the services never use the gRPC context


class Rig:
    def __init__(self, tmp: Path, ratio: float = 1.0) -> None:
        self.kubelet = tmp / "kubelet"
        self.kubelet.mkdir()
        self.settings = Settings(socket_path=tmp / "csi.sock", node_id="n1", data_dir=tmp / "data",
                                 kubelet_dir=self.kubelet, overcommit_ratio=ratio)
        self.os = FakeOS()
        self.driver = Driver.build(self.settings, oslayer=self.os)
        assert self.driver.volumes is not None
        self.ctrl = ControllerService(self.settings, self.driver.volumes, self.driver.snapshots,
                                      self.driver.inflight)
        self.node = NodeService(self.settings, self.driver.volumes, self.driver.inflight)
        self.ident = IdentityService(self.settings, self.os)

    def create(self, name: str, size: int = 64 * MIB, fs: str = "ext4", **params: str) -> csi_pb2.Volume:
        return self.ctrl.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[cap_for(fs)], parameters=params,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size)), CTX).volume

    def stage(self, vid: str, fs: str = "ext4") -> str:
        staging = str(self.kubelet / "st" / vid)
        self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=cap_for(fs)), CTX)
        return staging


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_create_is_idempotent_and_formats_once(rig: Rig) -> None:
    a = rig.create("v1")
    b = rig.create("v1")
    assert a == b
    assert [c[0] for c in rig.os.calls] == ["mkfs"]
    assert a.capacity_bytes == 64 * MIB
    assert dict(a.accessible_topology[0].segments) == {TOPOLOGY_KEY: "n1"}
    assert not list((rig.settings.data_dir / "volumes").glob(".tmp-*"))


@pytest.mark.parametrize(("change", "kwargs"), [
    ("size", {"size": 128 * MIB}),
    ("fs", {"fs": "xfs", "size": 320 * MIB}),
    ("diskformat", {"diskformat": "zeroedthick"}),
])
def test_same_name_incompatible_request_is_already_exists(rig: Rig, change: str, kwargs: dict[str, Any]) -> None:
    rig.create("v1")
    with pytest.raises(AlreadyExists):
        rig.create("v1", **kwargs)


def test_capacity_maths(rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The host's real free space moves with every other process on the machine: measure it
    # never, fake it once. GetCapacity is then exact arithmetic on the fake figure.
    free = 100 * GIB
    monkeypatch.setattr(Store, "free_bytes", lambda self: free)
    rig.create("thin", 4 * GIB)  # sparse: almost nothing allocated, 4 GiB promised
    image = rig.settings.data_dir / "volumes" / "thin" / "disk.img"
    promised = os.stat(image).st_size - os.stat(image).st_blocks * 512  # our own file: stable
    assert 4 * GIB - MIB < promised <= 4 * GIB
    avail = rig.ctrl.GetCapacity(csi_pb2.GetCapacityRequest(), CTX).available_capacity
    assert avail == free - promised
    (tmp_path / "r").mkdir()
    relaxed = Rig(tmp_path / "r", ratio=4.0)
    relaxed.create("thin", 4 * GIB)
    avail4 = relaxed.ctrl.GetCapacity(csi_pb2.GetCapacityRequest(), CTX).available_capacity
    assert avail4 == int(free - promised / 4)  # promises count a quarter with ratio 4
    other = csi_pb2.GetCapacityRequest(accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: "n2"}))
    assert rig.ctrl.GetCapacity(other, CTX).available_capacity == 0
    mine = csi_pb2.GetCapacityRequest(accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: "n1"}))
    assert rig.ctrl.GetCapacity(mine, CTX).available_capacity == avail


def test_create_beyond_room_is_resource_exhausted_and_leaves_nothing(rig: Rig) -> None:
    with pytest.raises(ResourceExhausted):
        rig.create("huge", 1 << 45)
    assert os.listdir(rig.settings.data_dir / "volumes") == []


def test_create_for_another_node_is_refused(rig: Rig) -> None:
    req = csi_pb2.CreateVolumeRequest(name="v", volume_capabilities=[cap_for("ext4")])
    req.accessibility_requirements.requisite.add().segments[TOPOLOGY_KEY] = "n2"
    with pytest.raises(ResourceExhausted, match="n1"):
        rig.ctrl.CreateVolume(req, CTX)


def test_delete_refused_while_staged_then_ok(rig: Rig) -> None:
    rig.create("v1")
    staging = rig.stage("v1")
    rig.stage("v1")  # idempotent: no second attach or mount
    assert [c[0] for c in rig.os.calls].count("attach") == 1
    assert [c[0] for c in rig.os.calls].count("mount") == 1
    with pytest.raises(FailedPrecondition, match="in use"):
        rig.ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v1"), CTX)
    rig.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id="v1", staging_target_path=staging), CTX)
    rig.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id="v1", staging_target_path=staging), CTX)
    assert rig.os.loops == {} and rig.os.mount_table == []
    rig.ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v1"), CTX)
    rig.ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v1"), CTX)
    assert not (rig.settings.data_dir / "volumes" / "v1").exists()


def test_stage_never_reformats(rig: Rig) -> None:
    rig.create("v1")
    rig.stage("v1")
    assert [c[0] for c in rig.os.calls].count("mkfs") == 1  # only at create
    with pytest.raises(FailedPrecondition):
        rig.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id="v1", staging_target_path=str(rig.kubelet / "other"), volume_capability=cap_for("xfs")), CTX)


def test_publish_needs_stage_and_is_idempotent(rig: Rig) -> None:
    rig.create("v1")
    target = str(rig.kubelet / "pods" / "p" / "mount")
    pub = csi_pb2.NodePublishVolumeRequest(volume_id="v1", staging_target_path=str(rig.kubelet / "st" / "v1"),
                                           target_path=target, volume_capability=cap_for("ext4"))
    with pytest.raises(FailedPrecondition, match="not staged"):
        rig.node.NodePublishVolume(pub, CTX)
    rig.stage("v1")
    rig.node.NodePublishVolume(pub, CTX)
    rig.node.NodePublishVolume(pub, CTX)
    assert [c[0] for c in rig.os.calls].count("bind") == 1
    assert os.path.isdir(target)
    unpub = csi_pb2.NodeUnpublishVolumeRequest(volume_id="v1", target_path=target)
    rig.node.NodeUnpublishVolume(unpub, CTX)
    rig.node.NodeUnpublishVolume(unpub, CTX)
    assert not os.path.exists(target)


def test_paths_outside_the_kubelet_dir_are_refused(rig: Rig, tmp_path: Path) -> None:
    rig.create("v1")
    with pytest.raises(InvalidArgument, match="outside"):
        rig.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id="v1", staging_target_path=str(tmp_path / "elsewhere"), volume_capability=cap_for("ext4")), CTX)
    assert rig.os.calls == [c for c in rig.os.calls if c[0] == "mkfs"]


def test_unknown_volume_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFound):
        rig.stage("ghost")
    with pytest.raises(NotFound):
        rig.ctrl.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id="ghost", volume_capabilities=[cap_for("ext4")]), CTX)


def test_validate_volume_capabilities(rig: Rig) -> None:
    rig.create("v1")
    ok = rig.ctrl.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="v1", volume_capabilities=[cap_for("ext4")]), CTX)
    assert ok.HasField("confirmed")
    multi = cap_for("ext4")
    multi.access_mode.mode = csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
    no = rig.ctrl.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="v1", volume_capabilities=[multi]), CTX)
    assert not no.HasField("confirmed") and "SINGLE_NODE" in no.message
    wrong_fs = rig.ctrl.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="v1", volume_capabilities=[cap_for("xfs")]), CTX)
    assert not wrong_fs.HasField("confirmed")


def test_probe_reports_missing_tools(rig: Rig) -> None:
    assert rig.ident.Probe(csi_pb2.ProbeRequest(), CTX).ready.value
    rig.os.missing = ["mkfs.xfs"]
    assert not rig.ident.Probe(csi_pb2.ProbeRequest(), CTX).ready.value


def test_controller_mode_touches_no_files(tmp_path: Path) -> None:
    settings = Settings(socket_path=tmp_path / "s", node_id="c", data_dir=tmp_path / "data", mode="controller")
    d = Driver.build(settings)
    assert d.volumes is None and not (tmp_path / "data").exists()
    ctrl = ControllerService(settings, None, None, d.inflight)
    resp = ctrl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id="pvc-1", capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GIB)), CTX)
    assert resp.node_expansion_required and resp.capacity_bytes == 2 * GIB
    caps = ctrl.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest(), CTX)
    assert {c.rpc.type for c in caps.capabilities} == {
        csi_pb2.ControllerServiceCapability.RPC.EXPAND_VOLUME,
        csi_pb2.ControllerServiceCapability.RPC.SINGLE_NODE_MULTI_WRITER}


def test_a_clone_holds_its_source_and_freezes_it(rig: Rig) -> None:
    from csi_driver.errors import Aborted
    rig.create("src")
    staging = rig.stage("src")
    req = csi_pb2.CreateVolumeRequest(name="copy", volume_capabilities=[cap_for("ext4")],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MIB))
    req.volume_content_source.volume.volume_id = "src"
    with rig.driver.inflight.hold("vol:src"), pytest.raises(Aborted):
        rig.ctrl.CreateVolume(req, CTX)  # the source is busy: same key as every volume call
    frozen: list[str] = []
    real_copy = rig.os.copy_image
    rig.os.copy_image = lambda s, d, **kw: (frozen.extend(rig.os.frozen), real_copy(s, d, **kw))[1]  # type: ignore[method-assign]
    rig.ctrl.CreateVolume(req, CTX)
    assert frozen == [staging], "the source filesystem is frozen while it is copied"
    assert rig.os.frozen == set()


def _copy_request(name: str, fs: str, snapshot: str, size: int = 320 * MIB) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap_for(fs)],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=size))
    req.volume_content_source.snapshot.snapshot_id = snapshot
    return req


def test_a_restore_keeps_its_sources_filesystem_and_never_formats_block_data(rig: Rig) -> None:
    rig.create("x", 320 * MIB, "xfs")
    rig.create("raw", 32 * MIB, "block")
    for vid in ("x", "raw"):
        rig.ctrl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=f"s-{vid}", source_volume_id=vid), CTX)
    restored = rig.ctrl.CreateVolume(_copy_request("r", "", "s-x"), CTX).volume  # no fsType given
    assert restored.volume_context["fsType"] == "xfs"
    assert rig.ctrl.CreateVolume(_copy_request("r", "", "s-x"), CTX).volume == restored  # idempotent
    with pytest.raises(InvalidArgument, match="cannot be ext4"):
        rig.ctrl.CreateVolume(_copy_request("r2", "ext4", "s-x"), CTX)
    with pytest.raises(InvalidArgument, match="raw block"):
        rig.ctrl.CreateVolume(_copy_request("r3", "", "s-raw"), CTX)
    as_block = rig.ctrl.CreateVolume(_copy_request("r4", "block", "s-raw", 32 * MIB), CTX).volume
    assert "fsType" not in as_block.volume_context


def test_a_vanished_filesystem_is_never_reformatted(rig: Rig) -> None:
    rig.create("v1")
    image = rig.settings.data_dir / "volumes" / "v1" / "disk.img"
    with open(image, "r+b") as f:
        f.write(bytes(64))  # the superblock is gone (damage), the data behind it is not
    with pytest.raises(FailedPrecondition, match="refusing to format"):
        rig.stage("v1")
    assert [c[0] for c in rig.os.calls].count("mkfs") == 1  # only the one at create
    assert rig.os.loops == {}, "the loop device attached for the failed stage is released"


def test_names_volume_matches_only_that_volume() -> None:
    from csi_driver.volumes.lifecycle import names_volume
    assert names_volume("/var/lib/thinloop/volumes/v1/disk.img", "v1")
    assert names_volume("/volumes/v1/disk.img (deleted)", "v1")  # seen from a namespace that is gone
    assert names_volume("/d/volumes/.trash-v1.0a1b2c3d/disk.img (deleted)", "v1")
    assert not names_volume("/d/volumes/v1.deadbeef/disk.img", "v1")  # another volume with a dotted id
    assert not names_volume("/d/volumes/v10/disk.img", "v1")
    assert not names_volume("/d/snapshots/v1/disk.img", "v1")


def test_controller_expand_grows_an_unstaged_image_and_leaves_a_staged_one_to_the_node(rig: Rig) -> None:
    rig.create("idle", 64 * MIB)
    resp = rig.ctrl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id="idle", capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MIB)), CTX)
    assert resp.capacity_bytes == 128 * MIB and not resp.node_expansion_required
    entry = rig.driver.store.volumes.get("idle")  # type: ignore[union-attr]
    assert entry is not None and entry.size_bytes() == 128 * MIB
    assert entry.meta.needs_fs_grow, "the filesystem grows at the next stage"

    rig.create("busy", 64 * MIB)
    rig.stage("busy")
    resp = rig.ctrl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id="busy", capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MIB)), CTX)
    assert resp.node_expansion_required and resp.capacity_bytes == 128 * MIB
    busy = rig.driver.store.volumes.get("busy")  # type: ignore[union-attr]
    assert busy is not None and busy.size_bytes() == 64 * MIB, "a staged image is the node's to grow"


def test_staging_with_another_filesystem_is_refused_in_plain_words(rig: Rig) -> None:
    rig.create("v1", fs="ext4")
    with pytest.raises(FailedPrecondition) as err:
        rig.stage("v1", fs="xfs")
    assert "holds an existing filesystem of type ext4, not the xfs requested" in err.value.message
