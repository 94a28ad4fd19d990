"""Shared mode on a plain shared directory with the fake OS layer: the datastore's records
(marker, node registry, attachments, holders), attach fencing with real byte-range locks on
real files, and start-up recovery of the image locks. GlusterFS tests: tests/shared/."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from csi_driver.csi.controller import ControllerService
from csi_driver.csi.identity import IdentityService
from csi_driver.csi.node import NodeService
from csi_driver.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)
from csi_driver.proto import csi_pb2
from csi_driver.serving.driver import Driver
from csi_driver.serving.flags import parse_settings
from csi_driver.settings import DATASTORE_TOPOLOGY_KEY, SHARED_DRIVER_NAME, Settings, SettingsError
from csi_driver.volumes.datastore import capabilities, imagelock
from csi_driver.volumes.datastore.fencing import NodeFences
from csi_driver.volumes.datastore.records import (
    ATTACHMENT_KEY,
    GENERATION_KEY,
    Attachments,
    Datastore,
    DatastoreError,
    Heartbeat,
    Holder,
    NodeRecord,
    NodeRegistry,
    check_marker,
    init_marker,
)
from tests.fakeos import FakeOS
from tests.helpers import MIB, cap_for

CTX: Any = None
Mode = csi_pb2.VolumeCapability.AccessMode
Cap = csi_pb2.ControllerServiceCapability.RPC.Type


class SharedRig:
    """One driver (controller and/or node) over a shared data dir."""

    def __init__(self, tmp: Path, data: Path, node_id: str, mode: str = "all", max_volumes: int = 0) -> None:
        self.kubelet = tmp / f"kubelet-{node_id}"
        self.kubelet.mkdir(exist_ok=True)
        (tmp / f"run-{node_id}").mkdir(exist_ok=True)
        self.settings = Settings(socket_path=tmp / f"run-{node_id}" / "csi.sock", node_id=node_id, data_dir=data,
                                 kubelet_dir=self.kubelet, mode=mode, datastore="ds1",
                                 driver_name=SHARED_DRIVER_NAME, max_volumes_per_node=max_volumes,
                                 freeze_poll_seconds=0.02)
        self.os = FakeOS()
        self.driver = Driver.build(self.settings, oslayer=self.os)
        self.driver.recover()
        if self.driver.freezer is not None:
            self.driver.freezer.start()  # as serve() does: the node answers freeze requests
        assert self.driver.volumes is not None
        self.ctrl = ControllerService(self.settings, self.driver.volumes, self.driver.snapshots, self.driver.inflight)
        self.node = NodeService(self.settings, self.driver.volumes, self.driver.inflight, self.driver.fenced)
        self.ident = IdentityService(self.settings, self.os)

    def close(self) -> None:
        self.driver.close()

    def create(self, name: str, size: int = 64 * MIB, fs: str = "ext4") -> csi_pb2.Volume:
        return self.ctrl.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[cap_for(fs)],
            capacity_range=csi_pb2.CapacityRange(required_bytes=size)), CTX).volume

    def publish(self, vid: str, node: str, *, readonly: bool = False, mode: int = Mode.SINGLE_NODE_WRITER,
                fs: str = "ext4") -> dict[str, str]:
        cap = cap_for(fs)
        cap.access_mode.mode = mode  # type: ignore[assignment]
        resp = self.ctrl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node, volume_capability=cap, readonly=readonly), CTX)
        return dict(resp.publish_context)

    def unpublish(self, vid: str, node: str) -> None:
        self.ctrl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node), CTX)

    def staging(self, vid: str) -> str:
        return str(self.kubelet / "st" / vid)

    def stage(self, vid: str, token: dict[str, str], mode: int = Mode.SINGLE_NODE_WRITER, fs: str = "ext4") -> None:
        cap = cap_for(fs)
        cap.access_mode.mode = mode  # type: ignore[assignment]
        self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=self.staging(vid), volume_capability=cap,
            publish_context=token), CTX)

    def unstage(self, vid: str) -> None:
        self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=self.staging(vid)), CTX)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "datastore"


def datastore_at(data: Path) -> Path:
    """A plain directory made datastore ds1 by hand (it is no mount point, where a
    controller would make the marker itself): thinloopctl datastore init."""
    data.mkdir(exist_ok=True)
    init_marker(data, "ds1", "test")
    return data


@pytest.fixture
def rigs(tmp_path: Path, data: Path) -> Iterator[dict[str, SharedRig]]:
    with three_rigs(tmp_path, data) as made:
        yield made


@contextmanager
def three_rigs(tmp_path: Path, data: Path) -> Iterator[dict[str, SharedRig]]:
    """A controller ("ctl", mode controller) and two nodes a and b over one data dir."""
    made: dict[str, SharedRig] = {}
    datastore_at(data)
    try:
        made["ctl"] = SharedRig(tmp_path, data, "ctl", mode="controller")
        made["a"] = SharedRig(tmp_path, data, "a", mode="node")
        made["b"] = SharedRig(tmp_path, data, "b", mode="node")
        yield made
    finally:
        for r in made.values():
            r.close()


def image_lock(data: Path, vid: str) -> str:
    return imagelock.path_lock_state(data / "volumes" / vid / "disk.img")


# -- settings -------------------------------------------------------------------------------------

def test_datastore_flag_selects_shared_mode_and_its_driver_name() -> None:
    s = parse_settings(["--node-id", "n", "--datastore", "gluster-1"], {})
    assert s.shared and s.driver_name == SHARED_DRIVER_NAME
    assert s.topology == {DATASTORE_TOPOLOGY_KEY: "gluster-1"}
    assert s.touches_files and parse_settings(["--node-id", "n", "--datastore", "x", "--mode", "controller"],
                                              {}).touches_files
    local = parse_settings(["--node-id", "n"], {})
    assert not local.shared and local.driver_name == "thinloop.csi.io"
    assert parse_settings(["--node-id", "n", "--datastore", "d", "--driver-name", "x.io"], {}).driver_name == "x.io"
    assert parse_settings(["--node-id", "n"], {"THINLOOP_DATASTORE": "d"}).datastore == "d"


@pytest.mark.parametrize("argv", [["--datastore=-bad"], ["--datastore", "a/b"], ["--datastore", "x" * 64],
                                  ["--heartbeat-seconds", "0"], ["--heartbeat-seconds", "soon"]])
def test_bad_datastore_settings_are_one_line_errors(argv: list[str]) -> None:
    with pytest.raises(SettingsError, match=argv[0].split("=")[0]):
        parse_settings(["--node-id", "n", *argv], {})


# -- marker and registration ---------------------------------------------------------------------

def test_marker_made_by_hand_checked_by_everyone(data: Path) -> None:
    data.mkdir()
    with pytest.raises(DatastoreError, match="not mounted there"):
        check_marker(data, "ds1", may_create=False, creator="n")
    # Not a mount point: a controller never makes the marker there (the datastore may simply
    # not be mounted, leaving the local disk's directory).
    with pytest.raises(DatastoreError, match="not a mount point"):
        check_marker(data, "ds1", may_create=True, creator="ctl")
    assert list(data.iterdir()) == []
    assert "made" in init_marker(data, "ds1", "op")
    assert "already" in init_marker(data, "ds1", "op")
    assert check_marker(data, "ds1", may_create=True, creator="ctl") == ""
    assert check_marker(data, "ds1", may_create=False, creator="n") == ""
    with pytest.raises(DatastoreError, match="is datastore 'ds1'"):
        check_marker(data, "ds2", may_create=True, creator="ctl")
    with pytest.raises(DatastoreError, match="is datastore 'ds1'"):
        init_marker(data, "ds2", "op")


@pytest.mark.root
def test_controller_makes_the_marker_on_a_mount_point_only(tmp_path: Path) -> None:
    """The datastore's mount (here a tmpfs) gets the marker from the controller; the same
    directory with nothing mounted on it (a mount missing at start) does not."""
    point = tmp_path / "mnt"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "thinloop-test", str(point)], check=True)
    try:
        assert "made" in check_marker(point, "ds1", may_create=True, creator="ctl")
        assert (point / "datastore.json").exists()
    finally:
        subprocess.run(["umount", str(point)], check=True)
    with pytest.raises(DatastoreError, match="not a mount point"):
        check_marker(point, "ds1", may_create=True, creator="ctl")
    assert list(point.iterdir()) == []


def test_a_controller_whose_datastore_is_not_mounted_exits_with_one_line(tmp_path: Path) -> None:
    """The safety gap of a missing mount: a controller started on the empty mount-point
    directory of the local disk would make a new datastore there. It refuses, naming the
    fix, and leaves the directory as it was."""
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{tmp_path}/s.sock",
                          "--data-dir", str(tmp_path / "empty"), "--mode", "controller", "--datastore", "ds1",
                          "--node-id", "c1", "--log-level", "error"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "--datastore ds1" in run.stderr and "not a mount point" in run.stderr
    assert "thinloopctl datastore init" in run.stderr
    assert list((tmp_path / "empty").iterdir()) == []
    assert not (tmp_path / "s.sock").exists()


def test_a_shared_data_dir_that_does_not_exist_is_never_made(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{tmp_path}/s.sock",
                          "--data-dir", str(tmp_path / "mnt" / "ds1"), "--mode", "node", "--datastore", "ds1",
                          "--node-id", "n1", "--kubelet-dir", str(tmp_path), "--log-level", "error"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "--data-dir" in run.stderr and "does not exist" in run.stderr and "mount the datastore" in run.stderr
    assert not (tmp_path / "mnt").exists()


def test_datastore_init_command(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from csi_driver.ops import ctl
    data.mkdir()
    assert ctl.main(["datastore", "init", "--data-dir", str(data), "--name", "ds1"]) == 0
    assert "made" in capsys.readouterr().out
    assert ctl.main(["datastore", "init", "--data-dir", str(data), "--name", "ds1", "-o", "json"]) == ctl.EXIT_UNCHANGED
    assert '"made": false' in capsys.readouterr().out
    assert ctl.main(["datastore", "init", "--data-dir", str(data), "--name", "other"]) == ctl.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is datastore 'ds1'" in err


def test_controller_refuses_to_claim_a_data_dir_with_volumes_and_no_marker(tmp_path: Path) -> None:
    (tmp_path / "volumes" / "v1").mkdir(parents=True)
    with pytest.raises(DatastoreError, match="holds volumes"):
        init_marker(tmp_path, "ds1", "op")
    assert not (tmp_path / "datastore.json").exists()


def test_node_driver_refuses_to_start_without_the_marker(tmp_path: Path, data: Path) -> None:
    data.mkdir()
    with pytest.raises(DatastoreError, match="controller makes the marker"):
        SharedRig(tmp_path, data, "a", mode="node")


def test_two_drivers_with_one_node_id_the_second_is_refused(tmp_path: Path, data: Path) -> None:
    datastore_at(data)
    first = SharedRig(tmp_path, data, "a")
    try:
        (tmp_path / "second").mkdir()
        with pytest.raises(DatastoreError, match="another driver with node id 'a'"):
            SharedRig(tmp_path / "second", data, "a")
    finally:
        first.close()
    again = SharedRig(tmp_path, data, "a")  # let go at a graceful stop
    again.close()
    assert NodeRegistry(data).get("a").state == "stopped"  # type: ignore[union-attr]


def test_heartbeat_rewrites_the_record_and_the_lock_is_visible(data: Path) -> None:
    datastore_at(data)
    reg = NodeRegistry(data)
    hb = Heartbeat(reg, NodeRecord("n1", "ds1", interval=0.05))
    hb.register()
    try:
        first = reg.get("n1")
        assert first is not None and first.fresh() and first.pid == os.getpid()
        assert reg.lock_state("n1") == imagelock.EXCLUSIVE
        hb.start()
        for _ in range(200):
            now = reg.get("n1")
            if now is not None and now.beats >= 2:
                break
            threading.Event().wait(0.02)
        assert now is not None and now.beats >= 2
    finally:
        hb.stop()
    assert reg.lock_state("n1") == imagelock.FREE


# -- attach fencing -----------------------------------------------------------------------------------

def test_shared_capabilities_and_topology(rigs: dict[str, SharedRig]) -> None:
    caps = {c.rpc.type for c in rigs["ctl"].ctrl.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), CTX).capabilities}
    assert {Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.PUBLISH_READONLY, Cap.LIST_VOLUMES_PUBLISHED_NODES,
            Cap.GET_VOLUME, Cap.EXPAND_VOLUME, Cap.CREATE_DELETE_SNAPSHOT} <= caps
    vol = rigs["ctl"].create("v1")
    assert dict(vol.accessible_topology[0].segments) == {DATASTORE_TOPOLOGY_KEY: "ds1"}
    info = rigs["a"].node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), CTX)
    assert info.node_id == "a" and dict(info.accessible_topology.segments) == {DATASTORE_TOPOLOGY_KEY: "ds1"}
    other = csi_pb2.GetCapacityRequest(accessible_topology=csi_pb2.Topology(segments={DATASTORE_TOPOLOGY_KEY: "x"}))
    assert rigs["ctl"].ctrl.GetCapacity(other, CTX).available_capacity == 0
    assert rigs["ctl"].ctrl.GetCapacity(csi_pb2.GetCapacityRequest(), CTX).available_capacity > 0


def test_node_without_the_datastore_reports_no_topology_and_not_ready(rigs: dict[str, SharedRig], data: Path) -> None:
    assert rigs["a"].ident.Probe(csi_pb2.ProbeRequest(), CTX).ready.value
    (data / "datastore.json").rename(data / "moved.json")
    info = rigs["a"].node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), CTX)
    assert info.node_id == "a" and not info.accessible_topology.segments
    assert not rigs["a"].ident.Probe(csi_pb2.ProbeRequest(), CTX).ready.value


def test_publish_rules(rigs: dict[str, SharedRig]) -> None:
    ctl = rigs["ctl"]
    ctl.create("v1")
    with pytest.raises(NotFound, match="not registered"):
        ctl.publish("v1", "nobody")
    with pytest.raises(NotFound, match="does not exist"):
        ctl.publish("ghost", "a")
    token = ctl.publish("v1", "a")
    assert token[GENERATION_KEY] == "1" and token[ATTACHMENT_KEY]
    assert ctl.publish("v1", "a") == token  # idempotent
    with pytest.raises(AlreadyExists):
        ctl.publish("v1", "a", readonly=True)
    with pytest.raises(FailedPrecondition, match="attached to a"):
        ctl.publish("v1", "b")
    listed = ctl.ctrl.ListVolumes(csi_pb2.ListVolumesRequest(), CTX).entries[0]
    assert list(listed.status.published_node_ids) == ["a"]
    got = ctl.ctrl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="v1"), CTX)
    assert list(got.status.published_node_ids) == ["a"]
    ctl.unpublish("v1", "a")
    ctl.unpublish("v1", "a")  # idempotent
    ctl.unpublish("ghost", "a")
    moved = ctl.publish("v1", "b")
    assert int(moved[GENERATION_KEY]) > int(token[GENERATION_KEY])
    with pytest.raises(InvalidArgument):
        ctl.ctrl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(volume_id="v1", node_id="a"), CTX)


def test_many_readers_never_beside_a_writer(rigs: dict[str, SharedRig]) -> None:
    ctl = rigs["ctl"]
    ctl.create("v1")
    ra = ctl.publish("v1", "a", mode=Mode.MULTI_NODE_READER_ONLY)
    rb = ctl.publish("v1", "b", mode=Mode.MULTI_NODE_READER_ONLY)
    assert ra != rb
    NodeRegistry(ctl.settings.data_dir).write(NodeRecord("c", "ds1"))
    with pytest.raises(FailedPrecondition, match="one node at a time"):
        ctl.publish("v1", "c")
    # read-only stages take shared locks: both nodes hold the image at once
    rigs["a"].stage("v1", ra, mode=Mode.MULTI_NODE_READER_ONLY)
    rigs["b"].stage("v1", rb, mode=Mode.MULTI_NODE_READER_ONLY)
    assert image_lock(rigs["a"].settings.data_dir, "v1") == imagelock.SHARED
    assert all(rigs[n].os.readonly for n in "ab")  # read-only loop devices
    rigs["a"].unstage("v1")
    rigs["b"].unstage("v1")
    ctl.unpublish("v1", "a")
    ctl.unpublish("v1", "b")
    assert ctl.publish("v1", "a")
    with pytest.raises(FailedPrecondition, match="never beside a writer"):
        ctl.publish("v1", "b", mode=Mode.MULTI_NODE_READER_ONLY)


def test_multi_node_writers_are_refused(rigs: dict[str, SharedRig]) -> None:
    rigs["ctl"].create("v1")
    with pytest.raises(InvalidArgument, match="MULTI_NODE_MULTI_WRITER"):
        rigs["ctl"].publish("v1", "a", mode=Mode.MULTI_NODE_MULTI_WRITER)


def test_attach_limit_per_node(tmp_path: Path, data: Path) -> None:
    datastore_at(data)
    ctl = SharedRig(tmp_path, data, "ctl", mode="controller")
    node = SharedRig(tmp_path, data, "a", mode="node", max_volumes=2)
    try:
        for v in ("v1", "v2", "v3"):
            ctl.create(v)
        ctl.publish("v1", "a")
        ctl.publish("v2", "a")
        ctl.publish("v2", "a")
        with pytest.raises(ResourceExhausted, match="limit"):
            ctl.publish("v3", "a")
        ctl.unpublish("v1", "a")
        ctl.publish("v3", "a")
    finally:
        node.close()
        ctl.close()


def test_stage_needs_the_attachment_and_its_current_token(rigs: dict[str, SharedRig]) -> None:
    ctl, a, b = rigs["ctl"], rigs["a"], rigs["b"]
    ctl.create("v1")
    with pytest.raises(FailedPrecondition, match="not published to node a"):
        a.stage("v1", {})
    old = ctl.publish("v1", "a")
    with pytest.raises(FailedPrecondition, match="carries no"):
        a.stage("v1", {})
    ctl.unpublish("v1", "a")
    new = ctl.publish("v1", "a")
    with pytest.raises(FailedPrecondition, match="stale fencing token"):
        a.stage("v1", old)
    with pytest.raises(FailedPrecondition, match="not published to node b"):
        b.stage("v1", new)
    assert a.os.loops == {} and b.os.loops == {}
    a.stage("v1", new)
    a.stage("v1", new)  # idempotent
    assert image_lock(a.settings.data_dir, "v1") == imagelock.EXCLUSIVE


def test_the_image_lock_fences_a_second_node_even_with_a_permission(rigs: dict[str, SharedRig]) -> None:
    ctl, a, b = rigs["ctl"], rigs["a"], rigs["b"]
    ctl.create("v1")
    a.stage("v1", ctl.publish("v1", "a"))
    # The node-failure path: the attachment is released while a still has the image.
    ctl.unpublish("v1", "a")
    token = ctl.publish("v1", "b")
    with pytest.raises(FailedPrecondition, match="node a"):
        b.stage("v1", token)
    assert b.os.loops == {}
    with pytest.raises(FailedPrecondition, match="published to node"):
        ctl.ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v1"), CTX)
    a.unstage("v1")
    assert image_lock(a.settings.data_dir, "v1") == imagelock.FREE
    b.stage("v1", token)
    b.unstage("v1")
    ctl.unpublish("v1", "b")
    ctl.ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v1"), CTX)
    assert not (a.settings.data_dir / "attachments" / "v1.json").exists()
    assert list((a.settings.data_dir / "holders").iterdir()) == []


def test_delete_refused_while_another_client_holds_the_image(rigs: dict[str, SharedRig], data: Path) -> None:
    rigs["ctl"].create("v1")
    fd = imagelock.open_locked(data / "volumes" / "v1" / "disk.img", readonly=False, direct=False)
    try:
        with pytest.raises(FailedPrecondition, match="in use"):
            rigs["ctl"].ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="v1"), CTX)
        with pytest.raises(FailedPrecondition, match="no node can be asked"):
            rigs["ctl"].ctrl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s1", source_volume_id="v1"), CTX)
    finally:
        os.close(fd)
    rigs["ctl"].ctrl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s1", source_volume_id="v1"), CTX)


def test_group_snapshot_freezes_each_member_where_it_is_attached(tmp_path: Path, rigs: dict[str, SharedRig],
                                                                 data: Path) -> None:
    """Shared mode, a driver that is controller and node ("c"): a member staged on this node
    is frozen here for the copies; one attached nowhere is copied under a shared image lock;
    one that node a has attached read-write is frozen by node a, at c's request through the
    datastore, for all the copies, and thawed after. A member whose node does not answer
    (its driver is gone) refuses the call with UNAVAILABLE naming it and that node, leaving
    no snapshot, group, request or lock behind."""
    from csi_driver.csi.groupcontroller import GroupControllerService
    from csi_driver.errors import Unavailable
    c = SharedRig(tmp_path, data, "c", mode="all")
    try:
        assert c.driver.groups is not None
        group = GroupControllerService(c.driver.groups, c.driver.inflight)
        for v in ("here", "idle", "busy"):
            c.create(v)
        c.stage("here", c.publish("here", "c"))
        rigs["a"].stage("busy", c.publish("busy", "a"))
        seen: dict[str, object] = {}
        copy = c.os.copy_image

        def watched(source: Path, dest: Path, *, sparse: bool = True, shared: bool = True) -> None:
            seen[source.parent.name] = (set(c.os.frozen), set(rigs["a"].os.frozen),
                                        image_lock(data, source.parent.name))
            copy(source, dest, sparse=sparse, shared=shared)

        c.os.copy_image = watched  # type: ignore[method-assign]

        def cut(name: str, *vids: str) -> csi_pb2.VolumeGroupSnapshot:
            return group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
                name=name, source_volume_ids=list(vids)), CTX).group_snapshot

        made = cut("g1", "here", "idle", "busy")
        assert made.ready_to_use and len(made.snapshots) == 3
        here, busy = {c.staging("here")}, {rigs["a"].staging("busy")}
        # every copy is made with both filesystems frozen: c's own, and a's at c's request
        assert seen["busy"] == (here, busy, imagelock.EXCLUSIVE)  # under a's own lock (its loop device)
        assert seen["here"] == (here, busy, imagelock.EXCLUSIVE)
        assert seen["idle"] == (here, busy, imagelock.SHARED)  # held under a shared lock for the copy
        assert c.os.frozen == set() and image_lock(data, "idle") == imagelock.FREE
        assert not rigs["a"].os.frozen and freeze_files(data) == []  # a thawed before the call returned
        # node a's driver goes away: nobody can freeze "busy", so nothing is copied
        seen.clear()
        rigs["a"].close()
        with pytest.raises(Unavailable) as refused:
            cut("g2", "here", "idle", "busy")
        assert "volume busy is attached read-write to node a" in str(refused.value)
        assert "driver is not running" in str(refused.value)
        assert seen == {} and c.os.frozen == set()
        assert sorted(p.name for p in (data / "snapshots").iterdir()) == [m.snapshot_id for m in made.snapshots]
        assert image_lock(data, "idle") == imagelock.FREE
        assert freeze_files(data) == []
        rigs["a"].unstage("busy")  # (kubelet on a, with the driver back)
        assert cut("g3", "busy").ready_to_use  # detached: copied under a shared lock
        with pytest.raises(NotFound, match="datastore ds1"):
            cut("g4", "here", "ghost")
    finally:
        c.close()


def freeze_files(data: Path) -> list[str]:
    """The freeze requests and answers in the datastore (csi_driver.volumes.datastore.freeze)."""
    return sorted(str(p.relative_to(data)) for p in (data / "freeze").rglob("*") if p.is_file())


def wait_until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Poll a condition another thread makes true; fail (not flake) only after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_controller_expand_grows_the_image(rigs: dict[str, SharedRig], data: Path) -> None:
    """The image lives on the datastore, so the controller grows it. Published nowhere: the
    filesystem grows at the next stage and no node call is needed; published to a node:
    that node grows the filesystem (NodeExpandVolume)."""
    ctl = rigs["ctl"]
    ctl.create("v1")

    def expand(size: int) -> csi_pb2.ControllerExpandVolumeResponse:
        return ctl.ctrl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id="v1", capacity_range=csi_pb2.CapacityRange(required_bytes=size)), CTX)

    resp = expand(128 * MIB)
    assert not resp.node_expansion_required and resp.capacity_bytes == 128 * MIB
    assert (data / "volumes" / "v1" / "disk.img").stat().st_size == 128 * MIB
    assert ctl.driver.volumes.get("v1").meta.needs_fs_grow  # type: ignore[union-attr]
    token = ctl.publish("v1", "a")
    resp = expand(192 * MIB)
    assert resp.node_expansion_required and resp.capacity_bytes == 192 * MIB
    assert (data / "volumes" / "v1" / "disk.img").stat().st_size == 192 * MIB
    rigs["a"].stage("v1", token)  # the growth owed is made at stage
    assert not ctl.driver.volumes.get("v1").meta.needs_fs_grow  # type: ignore[union-attr]


def test_inline_ephemeral_volumes_are_refused(rigs: dict[str, SharedRig]) -> None:
    a = rigs["a"]
    with pytest.raises(InvalidArgument, match="shared mode"):
        a.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id="e1", target_path=str(a.kubelet / "pods" / "e1"), volume_capability=cap_for("ext4"),
            volume_context={"csi.storage.k8s.io/ephemeral": "true"}), CTX)


def test_node_local_driver_does_not_attach(tmp_path: Path) -> None:
    settings = Settings(socket_path=tmp_path / "s", node_id="n", data_dir=tmp_path / "d")
    d = Driver.build(settings, oslayer=FakeOS())
    ctrl = ControllerService(settings, d.volumes, d.snapshots, d.inflight)
    with pytest.raises(Unimplemented):
        ctrl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id="v", node_id="n", volume_capability=cap_for("ext4")), CTX)


def test_racing_controllers_exactly_one_wins(data: Path) -> None:
    """Two controllers (separate record stores, separate opens of the lock file) publish
    one volume to two nodes at once, many times: exactly one wins each round."""
    datastore_at(data)
    reg = NodeRegistry(data)
    for n in ("a", "b"):
        reg.write(NodeRecord(n, "ds1"))
    stores = [Attachments(data, NodeRegistry(data)) for _ in range(2)]
    for i in range(60):
        vid = f"v{i}"
        results: dict[str, str] = {}
        barrier = threading.Barrier(2)

        def go(store: Attachments, node: str, vid: str = vid, results: dict[str, str] = results,
               barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                store.publish(vid, node, readonly=False, multi_node=False)
                results[node] = "won"
            except FailedPrecondition:
                results[node] = "refused"

        threads = [threading.Thread(target=go, args=(s, n)) for s, n in zip(stores, "ab", strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == ["refused", "won"], results
        rec = stores[0].get(vid)
        assert rec is not None and list(rec.nodes) == [k for k, v in results.items() if v == "won"]


# -- recovery ---------------------------------------------------------------------------------------

def test_recovery_keeps_a_held_lock_and_fences_a_volume_someone_else_holds(rigs: dict[str, SharedRig]) -> None:
    ctl, a = rigs["ctl"], rigs["a"]
    for v in ("held", "lost", "stolen", "revoked"):
        ctl.create(v)
        a.stage(v, ctl.publish(v, "a"))
    data = a.settings.data_dir
    # "lost": the device's lock is gone (the fake keeps a copy of the open file: drop it)
    lost_index = next(i for i, f in a.os.loops.items() if "/lost/" in f)
    os.close(a.os.kept.pop(lost_index))
    # "stolen": another node's holder record names it too
    from csi_driver.volumes.datastore.records import Holder
    a.driver.datastore.holders.put(Holder("stolen", "b", False, 9, 0.0, "/dev/loop9"))  # type: ignore[union-attr]
    # "revoked": unpublished from a while a was down
    ctl.unpublish("revoked", "a")
    # a holder record of a that no device backs any more (a reboot)
    a.driver.datastore.holders.put(Holder("gone", "a", False, 1, 0.0, "/dev/loop7"))  # type: ignore[union-attr]
    fences = NodeFences("a", a.driver.datastore, a.driver.store, a.os)  # type: ignore[arg-type]
    actions = fences.recover()
    try:
        text = "\n".join(actions)
        assert "held: its image lock is held" in text
        assert "lost: took its lost image lock again" in text
        assert set(fences.fenced) == {"stolen", "revoked"}
        assert "holder record of gone" in text
        assert image_lock(data, "lost") == imagelock.EXCLUSIVE  # held again, by this process
        node = NodeService(a.settings, a.driver.volumes, a.driver.inflight, fences.fenced)  # type: ignore[arg-type]
        with pytest.raises(FailedPrecondition, match="not served"):
            node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id="stolen", staging_target_path=a.staging("stolen"),
                target_path=str(a.kubelet / "pods" / "x"), volume_capability=cap_for("ext4")), CTX)
        # the re-taken lock goes with the device
        a.unstage("lost")
        fences.release_retaken()
        assert image_lock(data, "lost") == imagelock.FREE and fences.retaken == {}
    finally:
        for fd in fences.retaken.values():
            imagelock.release(fd)


def test_kept_locks_are_closed_in_forked_children(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = imagelock.open_locked(path, readonly=False, direct=False)
    imagelock.keep(fd)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's copy must be gone, or it would keep the lock after the release
        try:
            os.fstat(fd)
            os.write(w, b"open")
        except OSError:
            os.write(w, b"closed")
        os._exit(0)
    os.close(w)
    assert os.read(r, 10) == b"closed"
    os.close(r)
    os.waitpid(pid, 0)
    imagelock.release(fd)
    assert imagelock.path_lock_state(path) == imagelock.FREE


def test_a_second_controller_leaves_the_first_ones_work_alone(tmp_path: Path, data: Path) -> None:
    """Issue 14's two-drivers-on-one-data-dir fault, between controllers of one datastore
    (a standby replica starting beside the active one): a controller clears unfinished
    work only while no other controller runs, so it never removes a volume another one is
    still making; a controller that starts alone clears what a crash left."""
    datastore_at(data)
    first = SharedRig(tmp_path, data, "c1", mode="controller")
    making = data / "volumes" / ".tmp-v1.0123abcd"  # the first one's create, half-way
    making.mkdir()
    (making / "disk.img").write_bytes(b"")
    second = SharedRig(tmp_path, data, "c2", mode="controller")
    try:
        assert making.exists()
        first.close()  # the first one crashed; the second still runs: not alone
        third = SharedRig(tmp_path, data, "c3", mode="controller")
        third.close()
        assert making.exists()
    finally:
        second.close()
    alone = SharedRig(tmp_path, data, "c4", mode="controller")
    try:
        assert not making.exists()
        assert alone.driver.controllers_lock is not None
        # Back to shared once recovered: another controller starts beside it at once.
        beside = SharedRig(tmp_path, data, "c5", mode="controller")
        beside.close()
    finally:
        alone.close()


# -- capability probes ---------------------------------------------------------------------------------

def test_probe_finds_what_a_local_filesystem_does(tmp_path: Path) -> None:
    caps = capabilities.probe(tmp_path)
    assert caps.locks == 1 and caps.sparse == 1 and caps.locks_across == capabilities.UNKNOWN
    assert caps.fs_type != "unknown"
    assert [p.name for p in tmp_path.iterdir()] == []  # the scratch file is gone


def test_locks_across_clients_judged_on_live_peers(tmp_path: Path) -> None:
    datastore_at(tmp_path)
    reg = NodeRegistry(tmp_path)
    live = Heartbeat(reg, NodeRecord("peer", "ds1", interval=5))
    live.register()
    try:
        assert capabilities.locks_across(reg, "me") == 1
    finally:
        live.stop()
    assert capabilities.locks_across(reg, "me") == capabilities.UNKNOWN  # stopped: nobody to judge by

    # A peer that keeps beating while its lock is never seen: locks do not cross clients.
    ghost = NodeRecord("ghost", "ds1", interval=0.05, heartbeat=0)
    import time as _time
    ghost.heartbeat = _time.time()
    reg.write(ghost)

    def beat_on(_seconds: float) -> None:
        ghost.beats += 1
        ghost.heartbeat = _time.time()
        reg.write(ghost)

    assert capabilities.locks_across(reg, "me", wait=beat_on) == 0
    with pytest.raises(DatastoreError, match="not visible from this host"):
        capabilities.probe(tmp_path, reg, "me", wait=beat_on)
    # A peer that stops beating had just died: nothing is concluded.
    ghost.heartbeat = _time.time()
    reg.write(ghost)
    assert capabilities.locks_across(reg, "me", wait=lambda _s: None) == capabilities.UNKNOWN


def test_no_discard_when_the_datastore_cannot_punch_holes(rigs: dict[str, SharedRig]) -> None:
    from dataclasses import replace
    a = rigs["a"]
    assert a.driver.caps is not None and a.driver.volumes is not None
    a.driver.volumes.caps = replace(a.driver.caps, punch_hole=0)
    assert "discard" not in a.node._mount_options([], "ext4", "discard", False)
    a.driver.volumes.caps = replace(a.driver.caps, punch_hole=1)
    assert "discard" in a.node._mount_options([], "ext4", "discard", False)


def test_lock_of_a_byte_does_not_block_another(tmp_path: Path) -> None:
    with imagelock.keys_locked(tmp_path / "l", ["x"], 1.0):
        with imagelock.keys_locked(tmp_path / "l", ["y"], 1.0):
            pass
        with pytest.raises(imagelock.LockHeld), imagelock.keys_locked(tmp_path / "l", ["x"], 0.05):
            pass
    fd = os.open(tmp_path / "l", os.O_RDWR)
    try:
        assert imagelock.try_lock(fd, exclusive=True, start=imagelock.byte_of("x"), length=1)
    finally:
        os.close(fd)
    assert fcntl.F_OFD_SETLK  # the kernel interface the locks use


def test_a_node_without_its_datastore_exits_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{tmp_path}/s.sock",
                          "--data-dir", str(tmp_path / "empty"), "--mode", "node", "--datastore", "ds1",
                          "--node-id", "n1", "--kubelet-dir", str(tmp_path), "--log-level", "error"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "no datastore.json" in run.stderr
    assert list((tmp_path / "empty").iterdir()) == []  # a node never makes the marker


def test_node_orphans_refuses_a_shared_datastore(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every image of a datastore would look like an orphan from one node: never judge them."""
    from csi_driver.ops import ctl
    datastore_at(data)
    (data / "volumes" / "v1").mkdir(parents=True)
    (data / "volumes" / "v1" / "disk.img").write_bytes(b"")
    assert ctl.main(["node", "orphans", "--delete", "--yes", "--data-dir", str(data)]) == 2
    assert "shared datastore" in capsys.readouterr().err
    assert (data / "volumes" / "v1" / "disk.img").exists()


def test_node_status_and_trim_on_a_datastore(rigs: dict[str, SharedRig], data: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The node commands read a datastore too: status lists its volumes and names this
    node's driver (the holder of nodes/<node-id>.lock, not .driver.lock); trim with no
    volume staged on this host trims nothing, and a name the datastore lacks is exit 4."""
    import json

    from csi_driver.ops import ctl
    rigs["ctl"].create("v1")
    assert ctl.main(["-o", "json", "node", "status", "--data-dir", str(data), "--node-id", "a"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["datastore"] == "ds1" and [v["id"] for v in doc["volumes"]] == ["v1"]
    assert doc["driver"].startswith(f"pid {os.getpid()} ")  # node a's driver is this process
    assert ctl.main(["-o", "json", "node", "status", "--data-dir", str(data), "--node-id", "nobody"]) == 0
    assert json.loads(capsys.readouterr().out)["driver"] is None
    endpoint = f"unix://{rigs['a'].settings.socket_path}"
    assert ctl.main(["-o", "json", "node", "trim", "--data-dir", str(data), "--endpoint", endpoint]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["id"] == "v1" and row["result"] == "skipped: not staged on this node"
    assert ctl.main(["node", "trim", "ghost", "--data-dir", str(data), "--endpoint", endpoint]) == ctl.EXIT_NOT_FOUND


def test_names_may_hold_a_plus() -> None:
    """csi-sanity's attach-limit spec names a volume 'sanity-max-attach-limit-vol+1-<tag>'."""
    from csi_driver.volumes.store import check_id
    assert check_id("sanity-max-attach-limit-vol+1-DBABD3B0", "name")
    for bad in ("+lead", "a/+", "a+\n"):
        with pytest.raises(InvalidArgument):
            check_id(bad, "name")


def test_stage_rereads_a_record_older_than_its_token(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose client still shows an older attachment record (seen on GlusterFS with
    its default caching) reads again rather than calling a current token stale."""
    from csi_driver.volumes.datastore import records
    datastore_at(data)
    NodeRegistry(data).write(NodeRecord("a", "ds1"))
    att = Attachments(data, NodeRegistry(data))
    att.publish("v1", "a", readonly=False, multi_node=False)
    old = att.path("v1").read_text()
    att.unpublish("v1", "a")
    current = att.publish("v1", "a", readonly=False, multi_node=False)
    new = att.path("v1").read_text()
    token = current.token("a")

    def show(text: str) -> None:
        """Replace the record whole, as every writer of records does (a reader never sees
        it half-written)."""
        tmp = att.path("v1").with_suffix(".test-tmp")
        tmp.write_text(text)
        os.replace(tmp, att.path("v1"))

    show(old)  # what a stale cache would show
    threading.Timer(0.3, lambda: show(new)).start()
    assert att.check_stage("v1", "a", token).generation == current.nodes["a"].generation
    show(old)
    monkeypatch.setattr(records, "STALE_READ_SECONDS", 0.3)
    with pytest.raises(FailedPrecondition, match="serves stale files"):
        att.check_stage("v1", "a", token)
    show(new)
    with pytest.raises(FailedPrecondition, match="stale fencing token"):
        att.check_stage("v1", "a", {**token, GENERATION_KEY: "1"})  # a genuinely old token


def test_a_stage_that_fails_after_its_mount_leaves_nothing_and_the_image_free(
        rigs: dict[str, SharedRig], data: Path) -> None:
    """An xfs volume grown while unpublished grows at stage, after the mount: that failing
    fails the stage (a final error to kubelet, which then never unstages), so the stage
    itself takes away its mount, detaches and lets go of the image's lock; node b, given
    the volume, stages it."""
    from csi_driver.host.runner import CommandError
    ctl, a, b = rigs["ctl"], rigs["a"], rigs["b"]
    ctl.create("v1", fs="xfs")
    a.stage("v1", ctl.publish("v1", "a", fs="xfs"), fs="xfs")  # made its filesystem
    a.unstage("v1")
    ctl.unpublish("v1", "a")
    ctl.ctrl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id="v1", capacity_range=csi_pb2.CapacityRange(required_bytes=512 * MIB)), CTX)
    assert ctl.driver.volumes is not None and ctl.driver.volumes.get("v1").meta.needs_fs_grow

    def broken_grow(fs: str, device: str, mount_point: str) -> None:
        raise CommandError(["xfs_growfs", mount_point], 1, "injected")

    a.os.grow_fs = broken_grow  # type: ignore[method-assign]
    with pytest.raises(CommandError):
        a.stage("v1", ctl.publish("v1", "a", fs="xfs"), fs="xfs")
    assert a.os.mounts() == [] and a.os.loops == {}
    assert image_lock(data, "v1") == imagelock.FREE
    assert a.driver.datastore is not None and a.driver.datastore.holders.of_volume("v1") == []
    ctl.unpublish("v1", "a")
    b.stage("v1", ctl.publish("v1", "b", fs="xfs"), fs="xfs")  # b grows it
    assert image_lock(data, "v1") == imagelock.EXCLUSIVE
    b.unstage("v1")


def test_a_fence_is_lifted_once_the_node_has_let_go_of_the_device(rigs: dict[str, SharedRig]) -> None:
    """Unpublished from a while a's driver was down, the volume is fenced at a's start; a
    unstages it (the device goes), and a proper publish to a is then served again."""
    ctl, a = rigs["ctl"], rigs["a"]
    ctl.create("v1")
    a.stage("v1", ctl.publish("v1", "a"))
    ctl.unpublish("v1", "a")
    assert a.driver.datastore is not None and a.driver.store is not None
    fences = NodeFences("a", a.driver.datastore, a.driver.store, a.os)
    fences.recover()
    assert set(fences.fenced) == {"v1"}
    node = NodeService(a.settings, a.driver.volumes, a.driver.inflight, fences.fenced)  # type: ignore[arg-type]
    a.node = node
    token = ctl.publish("v1", "b")
    with pytest.raises(FailedPrecondition, match="not served on this node"):
        a.stage("v1", token)
    a.unstage("v1")  # letting go works while fenced
    ctl.unpublish("v1", "b")
    a.stage("v1", ctl.publish("v1", "a"))  # served again
    a.unstage("v1")
    fences.release_retaken()


def test_a_device_attached_here_without_a_holder_record_gets_one(rigs: dict[str, SharedRig], data: Path) -> None:
    """A stage that finds the image already attached here (an earlier call that failed after
    its attach) records this node as a holder, as a fresh attach does."""
    ctl, a = rigs["ctl"], rigs["a"]
    ctl.create("v1")
    token = ctl.publish("v1", "a")
    a.stage("v1", token)
    ds = a.driver.datastore
    assert ds is not None and [h.node_id for h in ds.holders.of_volume("v1")] == ["a"]
    ds.holders.remove("v1", "a")
    a.stage("v1", token)  # idempotent: already staged
    a.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="v1", staging_target_path=str(a.kubelet / "st" / "second"), volume_capability=cap_for("ext4"),
        publish_context=token), CTX)  # a second staging path reuses the device
    assert [h.node_id for h in ds.holders.of_volume("v1")] == ["a"]
    a.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id="v1", staging_target_path=str(a.kubelet / "st" / "second")), CTX)
    a.unstage("v1")
    assert ds.holders.of_volume("v1") == []


def test_a_single_node_publish_is_refused_beside_other_readers_even_to_one_of_them(
        rigs: dict[str, SharedRig]) -> None:
    """Published read-only to a and b (MULTI_NODE_READER_ONLY), a SINGLE_NODE publish to a
    is FAILED_PRECONDITION: a is already there, but so is b."""
    ctl = rigs["ctl"]
    ctl.create("v1")
    ctl.publish("v1", "a", readonly=True, mode=Mode.MULTI_NODE_READER_ONLY)
    ctl.publish("v1", "b", readonly=True, mode=Mode.MULTI_NODE_READER_ONLY)
    with pytest.raises(FailedPrecondition, match="one node at a time"):
        ctl.publish("v1", "a", readonly=True, mode=Mode.SINGLE_NODE_READER_ONLY)
    assert ctl.publish("v1", "a", readonly=True, mode=Mode.MULTI_NODE_READER_ONLY)  # still idempotent


def test_temporary_files_of_records_left_by_a_crash_are_removed_by_their_writers(
        tmp_path: Path, data: Path) -> None:
    """A crash between the write and the rename of a record leaves `.tmp-<record>.<hex>`. A
    node's start removes those of its own records (node record, holder records) and no one
    else's; a controller that starts alone removes those of attachment records."""
    datastore_at(data)
    leftovers = {"nodes": [".tmp-a.json.0123abcd", ".tmp-b.json.0123abcd"],
                 "holders": [".tmp-v1@a.json.0123abcd", ".tmp-v1@b.json.0123abcd"],
                 "attachments": [".tmp-v1.json.0123abcd"]}
    for where, names in leftovers.items():
        (data / where).mkdir(exist_ok=True)
        for n in names:
            (data / where / n).write_text("{")

    def left(where: str) -> list[str]:
        return sorted(n for n in os.listdir(data / where) if n.startswith(".tmp-"))

    a = SharedRig(tmp_path, data, "a", mode="node")
    try:
        assert left("nodes") == [".tmp-b.json.0123abcd"]
        assert left("holders") == [".tmp-v1@b.json.0123abcd"]
        assert left("attachments") == [".tmp-v1.json.0123abcd"]  # not a node's to remove
        ctl = SharedRig(tmp_path, data, "ctl", mode="controller")
        ctl.close()
        assert left("attachments") == []
        assert left("nodes") == [".tmp-b.json.0123abcd"]
    finally:
        a.close()


def test_nothing_is_written_to_the_host_s_disk_while_the_datastore_is_not_mounted(data: Path) -> None:
    """The heartbeat (and every record writer) makes the datastore's directories only
    beside its marker: with the datastore unmounted from under the data dir (a bare mount
    point left, or no data dir at all), a beat fails and creates nothing."""
    datastore_at(data)
    beat = Heartbeat(NodeRegistry(data), NodeRecord("a", "ds1", interval=5))
    beat.register()
    try:
        os.rename(data, data.with_name("away"))  # "unmounted": a bare mount point is left
        data.mkdir()
        with pytest.raises(FileNotFoundError, match="datastore is not mounted"):
            beat.beat()
        with pytest.raises(FileNotFoundError):
            Datastore.open("ds1", data).holders.put(Holder("v1", "a"))
        assert list(data.iterdir()) == []
        data.rmdir()  # a data dir below the mount point: gone with it
        with pytest.raises(FileNotFoundError):
            beat.beat()
        assert not data.exists()
        os.rename(data.with_name("away"), data)  # mounted again
        beat.beat()
    finally:
        beat.stop()


def test_publish_checks_the_attachment_as_stage_does(rigs: dict[str, SharedRig]) -> None:
    """Staged on a, then unpublished from a and published to b (a's node call not made, as
    after a node's loss): a NodePublishVolume on a with its old token is refused, like a
    stage would be, so no new mount of the volume appears on a."""
    ctl, a = rigs["ctl"], rigs["a"]
    ctl.create("v1")
    token = ctl.publish("v1", "a")
    a.stage("v1", token)

    def publish(target: str, context: dict[str, str]) -> None:
        a.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id="v1", staging_target_path=a.staging("v1"), target_path=str(a.kubelet / "pods" / target),
            volume_capability=cap_for("ext4"), publish_context=context), CTX)

    publish("p1", token)
    with pytest.raises(FailedPrecondition, match="stale fencing token"):
        publish("p2", {**token, GENERATION_KEY: "0"})
    ctl.unpublish("v1", "a")
    ctl.publish("v1", "b")
    before = a.os.mounts()
    with pytest.raises(FailedPrecondition, match="not published to node a"):
        publish("p3", token)
    assert a.os.mounts() == before
