"""Hostile input, property-based: every request message is fed malformed names and ids
(`/`, `..`, NUL, newlines, very long, unicode), negative, zero, huge and contradictory
capacities, unknown parameters and capabilities, and relative, non-existent, symlinked and
foreign paths. Each call gets the status code the CSI spec asks for (never UNKNOWN or
INTERNAL), nothing on disk or in the mount table changes, and the server keeps serving.

One driver serves the whole module. It holds a staged and published filesystem volume, a
staged and published block volume and a snapshot, so that hostile requests naming real
objects are exercised too. Every request is built so that it cannot legitimately succeed
in changing anything: the strategies put at least one definite fault in each mutating
request."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_driver.ops.client import CsiClient, capability
from csi_driver.proto import csi_pb2
from csi_driver.volumes.params import _QUANTITY_RE as QUANTITY_RE
from csi_driver.volumes.store import ID_RE
from tests import kernel
from tests.conftest import Driver
from tests.helpers import MIB, Published, create, up, write_data
from tests.reliability.support import module_driver

pytestmark = pytest.mark.root

C = grpc.StatusCode
NEVER = {C.UNKNOWN, C.INTERNAL, C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.UNIMPLEMENTED}
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
AccessMode = csi_pb2.VolumeCapability.AccessMode
INT64 = (-(1 << 63), (1 << 63) - 1)
REAL_IDS = ("bi-fs", "bi-blk", "bi-snap")


@dataclass
class World:
    d: Driver
    fs: Published
    blk: Published
    outside: Path

    @property
    def c(self) -> CsiClient:
        return self.d.client


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for d in module_driver(tmp_path_factory, "badinput"):
        c = d.client
        k = str(d.kubelet_dir)
        fs = up(c, create(c, "bi-fs", 64 * MIB).volume_id, k, "ext4")
        blk = up(c, create(c, "bi-blk", 16 * MIB, "block").volume_id, k, "block")
        write_data(fs, MIB)
        c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="bi-snap", source_volume_id="bi-fs"))
        outside = d.root / "outside"
        (outside / "dir").mkdir(parents=True)
        (outside / "file").write_text("x")
        os.symlink(outside, d.kubelet_dir / "link-out")
        os.symlink(outside / "dir", d.kubelet_dir / "link-dir")
        os.symlink(outside / "nothing", d.kubelet_dir / "dangling")
        try:
            yield World(d, fs, blk, outside)
        finally:
            for p in (fs, blk):
                c = d.client
                c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=p.volume_id, target_path=p.target))
                c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=p.volume_id, staging_target_path=p.staging))


# -- what "nothing changed" means ---------------------------------------------------------

def snapshot_state(w: World) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Every entry under the data, kubelet and outside dirs (link targets; size, mtime
    and inode of files; only the size of images, whose mtimes move by themselves while
    their filesystems are mounted), and the loop devices and mounts under the test root."""
    entries = []
    for top in (w.d.data_dir, w.d.kubelet_dir, w.outside):
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    what = "link:" + os.readlink(path)
                elif os.path.isdir(path):
                    what = "dir"
                elif name == "disk.img":
                    what = f"image:{os.path.getsize(path)}"
                else:
                    st_ = os.lstat(path)
                    what = f"file:{st_.st_size}:{st_.st_mtime_ns}:{st_.st_ino}"
                entries.append((path, what))
    return sorted(entries), sorted(kernel.loops_under(w.d.root)), sorted(kernel.mounts_under(w.d.root))


def check(w: World, call: Callable[[], Any], allowed: set[grpc.StatusCode]) -> grpc.StatusCode:
    """Make the call; its code must be allowed and never one of NEVER; nothing may change
    on disk or in the kernel; the server must still answer."""
    before = snapshot_state(w)
    try:
        call()
        code = C.OK
        detail = ""
    except grpc.RpcError as exc:
        code = exc.code()
        detail = exc.details() or ""
    assert code not in NEVER, f"{code.name}: {detail}"
    assert code in allowed, f"{code.name}: {detail}"
    assert snapshot_state(w) == before, f"the call changed state ({code.name}: {detail})"
    assert w.c.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
    return code


# -- strategies ---------------------------------------------------------------------------

BAD_IDS = ["/", "..", ".", "../bi-fs", "bi-fs/..", "a/b", "/etc/passwd", "a\0b", "bi-fs\0",
           "a\nb", "-lead", ".hidden", ".tmp-bi-fs", ".trash-x", "x" * 129, "y" * 5000, "ünï",
           "日本語", "a b", "\t", "%2e%2e", "bi-fs/", " bi-fs", "bi-fs\n", "\u202e", "😀"]
bad_ids = st.one_of(st.sampled_from(BAD_IDS),
                    st.text(max_size=300).filter(lambda s: not ID_RE.match(s)))
ghost_ids = st.from_regex(r"\Aghost-[a-z0-9]{1,20}\Z")
any_ids = st.one_of(bad_ids, ghost_ids, st.sampled_from(REAL_IDS), st.just(""))
int64 = st.one_of(st.sampled_from([-1, 0, 1, INT64[0], INT64[1], 1 << 20, 64 << 40, (64 << 40) + 1]),
                  st.integers(*INT64))
capacities = st.one_of(st.none(), st.builds(csi_pb2.CapacityRange, required_bytes=int64, limit_bytes=int64))
text = st.text(max_size=80)
GOOD_FS = ["", "ext3", "ext4", "xfs"]
mode_values = st.one_of(st.sampled_from(list(AccessMode.Mode.values())), st.integers(-5, 40))


@st.composite
def any_caps(draw: st.DrawFn) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability()
    kind = draw(st.sampled_from(["mount", "block", "none"]))
    if kind == "mount":
        cap.mount.fs_type = draw(st.one_of(st.sampled_from(GOOD_FS), text))
        cap.mount.mount_flags.extend(draw(st.lists(st.one_of(st.sampled_from(
            ["ro", "noatime", "bind", "remount", "a,b", "x;rm -rf /", "\0", ""]), text), max_size=3)))
    elif kind == "block":
        cap.block.SetInParent()
    if draw(st.booleans()) or kind == "none":
        cap.access_mode.mode = draw(mode_values)  # type: ignore[assignment]
    return cap


@st.composite
def bad_caps(draw: st.DrawFn) -> csi_pb2.VolumeCapability:
    """A capability the driver must refuse."""
    fault = draw(st.sampled_from(["no-type", "no-mode", "mode", "fs", "flag"]))
    cap = capability(fs_type=draw(st.sampled_from(GOOD_FS)))
    if fault == "no-type":
        cap = csi_pb2.VolumeCapability(access_mode=cap.access_mode)
    elif fault == "no-mode":
        cap.ClearField("access_mode")
    elif fault == "mode":
        cap.access_mode.mode = draw(st.sampled_from([  # type: ignore[assignment]
            AccessMode.UNKNOWN, AccessMode.MULTI_NODE_READER_ONLY, AccessMode.MULTI_NODE_SINGLE_WRITER,
            AccessMode.MULTI_NODE_MULTI_WRITER, 99]))
    elif fault == "fs":
        cap.mount.fs_type = draw(st.one_of(st.sampled_from(["btrfs", "ntfs", "EXT4", "ext4 ", "../ext4"]),
                                           text.filter(lambda s: s not in GOOD_FS)))
    else:
        cap.mount.mount_flags.append(draw(st.sampled_from(["bind", "remount", "a b", "x;y", "o\0", ""])))
    return cap


any_params = st.dictionaries(
    st.one_of(st.sampled_from(["fsType", "diskformat", "reclaim", "csi.storage.k8s.io/pvc/name"]), text),
    st.one_of(st.sampled_from(["ext4", "xfs", "thin", "zeroedthick", "discard", "none"]), text),
    max_size=4)


@st.composite
def bad_params(draw: st.DrawFn) -> dict[str, str]:
    """Parameters the driver must refuse: an unknown key, or a known one with a bad value."""
    params = draw(any_params)
    if draw(st.booleans()):
        key = draw(st.one_of(st.sampled_from(["size", "FSTYPE", "mkfsOptions", "secret", ""]), text)
                   .filter(lambda k: k not in ("fsType", "diskformat", "reclaim")
                           and not k.startswith("csi.storage.k8s.io/")))
        params[key] = draw(text)
    else:
        key = draw(st.sampled_from(["fsType", "diskformat", "reclaim"]))
        params[key] = draw(st.sampled_from(["btrfs", "thick", "sometimes", "", "EXT4", "ext4\0"]))
        if params[key] == "" and key == "fsType":
            params[key] = "zfs"
        elif params[key] == "":
            params[key] = "bogus"
    return params


@st.composite
def bad_capacity(draw: st.DrawFn) -> csi_pb2.CapacityRange:
    """A range no volume can satisfy here: negative, contradictory, above the largest
    volume, above the free space, or a limit below the smallest volume."""
    fault = draw(st.sampled_from(["negative", "contradictory", "too-big", "no-room", "tiny-limit"]))
    if fault == "negative":
        return csi_pb2.CapacityRange(required_bytes=draw(st.integers(INT64[0], -1)),
                                     limit_bytes=draw(int64))
    if fault == "contradictory":
        limit = draw(st.integers(1, (1 << 62)))
        return csi_pb2.CapacityRange(required_bytes=draw(st.integers(limit + 1, INT64[1])), limit_bytes=limit)
    if fault == "too-big":
        return csi_pb2.CapacityRange(required_bytes=draw(st.integers((64 << 40) + 1, INT64[1])))
    if fault == "no-room":
        return csi_pb2.CapacityRange(required_bytes=draw(st.integers(16 << 40, 64 << 40)))
    return csi_pb2.CapacityRange(limit_bytes=draw(st.integers(1, (1 << 20) - 1)))


def bad_paths(w: World) -> st.SearchStrategy[str]:
    """Paths a node call must refuse: relative, outside the kubelet dir (directly, by `..`,
    or through a symlink), with control characters, too long, or the kubelet dir itself."""
    k = str(w.d.kubelet_dir)
    out = str(w.outside)
    fixed = ["", "relative/path", ".", "..", "pods/x/mount", "/", "/etc", "/tmp", "/proc/self",
             "/dev/null", out, out + "/dir", out + "/new/target", k, k + "/", k + "/.",
             k + "/../outside/dir", k + "/pods/../../outside", k + "/link-out", k + "/link-out/dir",
             k + "/link-out/new/x", k + "/link-dir", k + "/dangling", k + "/dangling/sub",
             k + "/a\0b", k + "/a\nb", k + "/" + "a" * 5000, "/" + "\u00fc" * 50, w.fs.staging + "\0"]
    return st.one_of(st.sampled_from(fixed),
                     st.builds(lambda s: out + "/" + s, text),
                     st.builds(lambda s: k + "/link-out/" + s, text),
                     text.filter(lambda s: not s.startswith("/")))


def fresh_paths(w: World) -> st.SearchStrategy[str]:
    """Well-formed paths inside the kubelet dir where nothing exists."""
    k = str(w.d.kubelet_dir)
    return st.builds(lambda s: f"{k}/fresh/{s}/mount", st.from_regex(r"\A[a-z0-9]{1,12}\Z"))


# -- the properties, one per message ------------------------------------------------------

@st.composite
def create_requests(draw: st.DrawFn) -> csi_pb2.CreateVolumeRequest:
    fault = draw(st.sampled_from(["name", "caps", "no-caps", "params", "capacity", "source", "topology"]))
    req = csi_pb2.CreateVolumeRequest(
        name=draw(bad_ids) if fault == "name" else draw(st.one_of(ghost_ids, st.sampled_from(REAL_IDS))),
        volume_capabilities=draw(st.lists(any_caps(), max_size=2)) if fault == "name" else [capability()],
        parameters=draw(bad_params()) if fault == "params" else draw(any_params) if fault == "name" else {},
    )
    if fault == "caps":
        req.volume_capabilities.insert(draw(st.integers(0, 1)), draw(bad_caps()))
    elif fault == "no-caps":
        del req.volume_capabilities[:]
    rng = draw(bad_capacity()) if fault == "capacity" else draw(capacities)
    if rng is not None:
        req.capacity_range.CopyFrom(rng)
    if fault == "source":
        kind = draw(st.sampled_from(["snapshot", "volume", "empty"]))
        if kind == "snapshot":
            req.volume_content_source.snapshot.snapshot_id = draw(st.one_of(bad_ids, ghost_ids))
        elif kind == "volume":
            req.volume_content_source.volume.volume_id = draw(st.one_of(bad_ids, ghost_ids))
        else:
            req.volume_content_source.SetInParent()
    if fault == "topology":
        req.accessibility_requirements.requisite.add().segments["topology.thinloop.csi.io/node"] = \
            draw(st.sampled_from(["other-node", "", "test-node\0"]))
    return req


def test_create_volume(world: World) -> None:
    @SETTINGS
    @given(create_requests())
    def prop(req: csi_pb2.CreateVolumeRequest) -> None:
        code = check(world, lambda: world.c.controller.CreateVolume(req, timeout=30),
                     {C.INVALID_ARGUMENT, C.OUT_OF_RANGE, C.NOT_FOUND, C.ALREADY_EXISTS,
                      C.RESOURCE_EXHAUSTED})
        if req.name in BAD_IDS or not req.name:
            assert code == C.INVALID_ARGUMENT
    prop()


def test_delete_volume(world: World) -> None:
    @SETTINGS
    @given(st.one_of(bad_ids, ghost_ids, st.just("")))
    def prop(vid: str) -> None:
        code = check(world, lambda: world.c.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=30), {C.OK, C.INVALID_ARGUMENT})
        assert code == (C.INVALID_ARGUMENT if not vid else C.OK), "unknown ids are already deleted"
    prop()


def test_validate_volume_capabilities(world: World) -> None:
    @SETTINGS
    @given(any_ids, st.lists(any_caps(), max_size=3), any_params,
           st.dictionaries(text, text, max_size=3))
    def prop(vid: str, caps: list[csi_pb2.VolumeCapability], params: dict[str, str],
             ctx: dict[str, str]) -> None:
        req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vid, volume_capabilities=caps,
                                                        parameters=params, volume_context=ctx)
        code = check(world, lambda: world.c.controller.ValidateVolumeCapabilities(req, timeout=30),
                     {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
        if vid.startswith("ghost-") and caps:
            assert code == C.NOT_FOUND
    prop()


def test_list_volumes(world: World) -> None:
    tokens = st.one_of(text, st.binary(max_size=40).map(bytes.hex),
                       st.sampled_from(["00", "2e2e2f", "zz", "-1", "6269"]))

    @SETTINGS
    @given(st.integers(-(1 << 31), (1 << 31) - 1), tokens)
    def prop(max_entries: int, token: str) -> None:
        code = check(world, lambda: world.c.controller.ListVolumes(csi_pb2.ListVolumesRequest(
            max_entries=max_entries, starting_token=token), timeout=30),
            {C.OK, C.ABORTED, C.INVALID_ARGUMENT})
        if max_entries < 0:
            assert code == C.INVALID_ARGUMENT
    prop()


def test_get_capacity(world: World) -> None:
    @SETTINGS
    @given(st.lists(any_caps(), max_size=2), any_params,
           st.dictionaries(st.sampled_from(["topology.thinloop.csi.io/node", "zone", ""]), text, max_size=2))
    def prop(caps: list[csi_pb2.VolumeCapability], params: dict[str, str], topo: dict[str, str]) -> None:
        req = csi_pb2.GetCapacityRequest(volume_capabilities=caps, parameters=params)
        if topo:
            req.accessible_topology.segments.update(topo)
        check(world, lambda: world.c.controller.GetCapacity(req, timeout=30), {C.OK, C.INVALID_ARGUMENT})
    prop()


def test_controller_expand_volume(world: World) -> None:
    @SETTINGS
    @given(any_ids, capacities, st.one_of(st.none(), any_caps()))
    def prop(vid: str, rng: csi_pb2.CapacityRange | None, cap: csi_pb2.VolumeCapability | None) -> None:
        req = csi_pb2.ControllerExpandVolumeRequest(volume_id=vid)
        if rng is not None:
            req.capacity_range.CopyFrom(rng)
        if cap is not None:
            req.volume_capability.CopyFrom(cap)
        check(world, lambda: world.c.controller.ControllerExpandVolume(req, timeout=30),
              {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED})
    prop()


@st.composite
def snapshot_requests(draw: st.DrawFn) -> csi_pb2.CreateSnapshotRequest:
    fault = draw(st.sampled_from(["name", "source", "params"]))
    return csi_pb2.CreateSnapshotRequest(
        name=draw(bad_ids) if fault == "name" else draw(st.one_of(ghost_ids, st.sampled_from(REAL_IDS))),
        source_volume_id=(draw(st.one_of(bad_ids, ghost_ids, st.just(""))) if fault == "source"
                          else draw(any_ids)),
        parameters=draw(st.dictionaries(text, text, min_size=1, max_size=3)) if fault == "params" else {},
    )


def test_create_snapshot(world: World) -> None:
    @SETTINGS
    @given(snapshot_requests())
    def prop(req: csi_pb2.CreateSnapshotRequest) -> None:
        check(world, lambda: world.c.controller.CreateSnapshot(req, timeout=30),
              {C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS})
    prop()


def test_delete_snapshot(world: World) -> None:
    @SETTINGS
    @given(st.one_of(bad_ids, ghost_ids, st.just("")))
    def prop(sid: str) -> None:
        code = check(world, lambda: world.c.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=sid), timeout=30), {C.OK, C.INVALID_ARGUMENT})
        assert code == (C.INVALID_ARGUMENT if not sid else C.OK)
    prop()


def test_list_snapshots(world: World) -> None:
    @SETTINGS
    @given(st.integers(-(1 << 31), (1 << 31) - 1), st.one_of(text, st.binary(max_size=20).map(bytes.hex)),
           any_ids, any_ids)
    def prop(max_entries: int, token: str, source: str, sid: str) -> None:
        check(world, lambda: world.c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
            max_entries=max_entries, starting_token=token, source_volume_id=source, snapshot_id=sid),
            timeout=30), {C.OK, C.ABORTED, C.INVALID_ARGUMENT})
    prop()


# Node calls: either the path is bad (any volume id, real ones included), or the id is
# bad or unknown (with paths that would otherwise be fine).

def node_cases(w: World) -> st.SearchStrategy[tuple[str, str]]:
    return st.one_of(st.tuples(any_ids, bad_paths(w)),
                     st.tuples(st.one_of(bad_ids, ghost_ids, st.just("")),
                               st.one_of(fresh_paths(w), bad_paths(w))))


def test_node_stage(world: World) -> None:
    @SETTINGS
    @given(node_cases(world), st.one_of(any_caps(), st.none()), st.dictionaries(text, text, max_size=2))
    def prop(case: tuple[str, str], cap: csi_pb2.VolumeCapability | None, ctx: dict[str, str]) -> None:
        vid, path = case
        req = csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=path, volume_context=ctx)
        if cap is not None:
            req.volume_capability.CopyFrom(cap)
        check(world, lambda: world.c.node.NodeStageVolume(req, timeout=30),
              {C.INVALID_ARGUMENT, C.NOT_FOUND})
    prop()


def test_node_unstage(world: World) -> None:
    @SETTINGS
    @given(node_cases(world))
    def prop(case: tuple[str, str]) -> None:
        vid, path = case
        check(world, lambda: world.c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=path), timeout=30),
            {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
    prop()


EPHEMERAL = "csi.storage.k8s.io/ephemeral"
BAD_SIZES = ["-1", "0", "0.0", "1e9", "9" * 400, "9" * 30 + "Ei", "1Zi", "Gi", "", "1 Gi", "0x10", "NaN"]


@st.composite
def bad_ephemeral_ctx(draw: st.DrawFn) -> dict[str, str]:
    """The volume context of an inline ephemeral volume with one definite fault."""
    ctx = {EPHEMERAL: "true"}
    fault = draw(st.sampled_from(["key", "size", "fstype", "diskformat"]))
    if fault == "key":
        key = draw(st.one_of(st.sampled_from(["bogus", "mkfsOptions", "FSTYPE"]), text).filter(
            lambda k: k not in ("size", "fsType", "diskformat", "reclaim") and not k.startswith(
                "csi.storage.k8s.io/")))
        ctx[key] = draw(text)
    elif fault == "size":
        ctx["size"] = draw(st.one_of(st.sampled_from(BAD_SIZES),
                                     text.filter(lambda t: not QUANTITY_RE.match(t.strip()))))
    elif fault == "fstype":
        ctx["fsType"] = draw(st.sampled_from(["btrfs", "ntfs", "ext4\0", "EXT4"]))
    else:
        ctx["diskformat"] = draw(st.sampled_from(["thick", "", "THIN"]))
    return ctx


any_ctx = st.one_of(st.dictionaries(text, text, max_size=2), bad_ephemeral_ctx())


def test_node_publish(world: World) -> None:
    @SETTINGS
    @given(st.one_of(st.tuples(any_ids, bad_paths(world), st.one_of(bad_paths(world), fresh_paths(world))),
                     st.tuples(any_ids, fresh_paths(world), bad_paths(world)),
                     st.tuples(st.one_of(bad_ids, st.just("")), fresh_paths(world), fresh_paths(world))),
           st.one_of(any_caps(), st.none()), st.booleans(), any_ctx)
    def prop(case: tuple[str, str, str], cap: csi_pb2.VolumeCapability | None, ro: bool,
             ctx: dict[str, str]) -> None:
        vid, target, staging = case
        req = csi_pb2.NodePublishVolumeRequest(volume_id=vid, target_path=target, staging_target_path=staging,
                                               readonly=ro, volume_context=ctx)
        if cap is not None:
            req.volume_capability.CopyFrom(cap)
        check(world, lambda: world.c.node.NodePublishVolume(req, timeout=30),
              {C.INVALID_ARGUMENT, C.NOT_FOUND, C.OUT_OF_RANGE})
    prop()


def test_node_publish_bad_ephemeral(world: World) -> None:
    """Inline ephemeral volumes are created by NodePublishVolume itself: a well-formed
    target with a bad volume context must be refused before anything is made."""
    @SETTINGS
    @given(ghost_ids, fresh_paths(world), bad_ephemeral_ctx())
    def prop(vid: str, target: str, ctx: dict[str, str]) -> None:
        req = csi_pb2.NodePublishVolumeRequest(volume_id=vid, target_path=target, volume_context=ctx,
                                               volume_capability=capability())
        check(world, lambda: world.c.node.NodePublishVolume(req, timeout=30),
              {C.INVALID_ARGUMENT, C.OUT_OF_RANGE})
    prop()


def test_node_unpublish(world: World) -> None:
    @SETTINGS
    @given(node_cases(world))
    def prop(case: tuple[str, str]) -> None:
        vid, path = case
        check(world, lambda: world.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=path), timeout=30), {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
    prop()


def test_node_get_volume_stats(world: World) -> None:
    real_paths = st.sampled_from([world.fs.target, world.fs.staging, world.blk.target])

    @SETTINGS
    @given(any_ids, st.one_of(bad_paths(world), fresh_paths(world), real_paths))
    def prop(vid: str, path: str) -> None:
        check(world, lambda: world.c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vid, volume_path=path), timeout=30), {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
    prop()


def test_node_expand_volume(world: World) -> None:
    @SETTINGS
    @given(st.one_of(
        st.tuples(any_ids, bad_paths(world), capacities),
        st.tuples(st.sampled_from(["bi-fs", "bi-blk"]), st.sampled_from([world.fs.target, world.blk.target]),
                  st.one_of(bad_capacity(), st.sampled_from([csi_pb2.CapacityRange(required_bytes=MIB),
                                                             csi_pb2.CapacityRange(limit_bytes=8 * MIB)])))),
        st.one_of(any_caps(), st.none()))
    def prop(case: tuple[str, str, csi_pb2.CapacityRange | None], cap: csi_pb2.VolumeCapability | None) -> None:
        vid, path, rng = case
        req = csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=path)
        if rng is not None:
            req.capacity_range.CopyFrom(rng)
        if cap is not None:
            req.volume_capability.CopyFrom(cap)
        check(world, lambda: world.c.node.NodeExpandVolume(req, timeout=30),
              {C.INVALID_ARGUMENT, C.NOT_FOUND, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED})
    prop()


def test_foreign_paths(world: World) -> None:
    """A call naming one volume with another volume's staging or target path must leave
    the other volume alone: unstage and unpublish never unmount a different volume, and
    publish never stacks onto one."""
    fs, blk = world.fs, world.blk
    c = world.c
    for vid in ("ghost-x", "bi-blk", "bi-snap"):
        for path in (fs.staging, fs.target):
            check(world, lambda v=vid, p=path: c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=v, staging_target_path=p), timeout=30), {C.FAILED_PRECONDITION})
            check(world, lambda v=vid, p=path: c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=v, target_path=p), timeout=30), {C.FAILED_PRECONDITION})
    check(world, lambda: c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="bi-fs", target_path=blk.target), timeout=30), {C.FAILED_PRECONDITION})
    check(world, lambda: c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id="bi-fs", staging_target_path=blk.staging), timeout=30), {C.FAILED_PRECONDITION})
    check(world, lambda: c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id="bi-blk", staging_target_path=blk.staging, target_path=fs.target,
        volume_capability=capability(block=True)), timeout=30), {C.ALREADY_EXISTS})
    check(world, lambda: c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id="bi-fs", staging_target_path=fs.staging, target_path=blk.target,
        volume_capability=capability()), timeout=30), {C.ALREADY_EXISTS})
    check(world, lambda: c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id="bi-fs", staging_target_path=blk.staging, target_path=world.d.path("fresh/foreign"),
        volume_capability=capability()), timeout=30), {C.FAILED_PRECONDITION})
