"""Staging is per (volume, staging path), not per volume (issue 14, class 3), and a call
that is refused leaves the node exactly as it found it.

CSI lets one volume be staged at more than one staging path on a node (two
PersistentVolumes naming one image by static provisioning, or kubelet retrying with a new
path). Unstaging one path removes what that path holds and detaches the loop device only
when no other staging path or publish of the volume still needs it."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_driver.host.linux import HostOS
from csi_driver.proto import csi_pb2
from tests import kernel
from tests.conftest import Driver
from tests.helpers import SIZES, create, delete, publish, read_sum, stage, write_data
from tests.helpers import Published as Pub

pytestmark = pytest.mark.root
C = grpc.StatusCode


def unstage(d: Driver, vid: str, staging: str) -> None:
    d.client.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))


def unpublish(d: Driver, vid: str, target: str) -> None:
    d.client.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))


def node_state(d: Driver) -> tuple[list[str], list[str]]:
    """Mount points under the test dir and the loop devices of its images: what a refused
    call must leave unchanged."""
    host = HostOS()
    mounts = sorted(kernel.mounts_under(d.root, host))
    loops = sorted(f"{lp.device}:{lp.backing_file}:{lp.readonly}" for lp in host.loop_devices()
                   if lp.backing_file.startswith(os.path.realpath(d.root) + "/"))
    return mounts, loops


@pytest.mark.parametrize("fs", ["ext4", "block"])
def test_two_staging_paths_unstage_one_keeps_the_other(driver: Driver, fs: str) -> None:
    c = driver.client
    vid = create(c, f"two-{fs}", SIZES[fs], fs).volume_id
    a, b = driver.path("plugins/pv-a/globalmount"), driver.path("plugins/pv-b/globalmount")
    ta, tb = driver.path("pods/pod-a/vol"), driver.path("pods/pod-b/vol")
    stage(c, vid, a, fs)
    stage(c, vid, b, fs)
    publish(c, vid, a, ta, fs)
    publish(c, vid, b, tb, fs)
    pub_b = Pub(vid, fs, b, tb)
    digest = write_data(pub_b)

    unpublish(driver, vid, ta)
    for _ in range(2):  # kubelet retries until OK; the first answer must already be OK
        unstage(driver, vid, a)
    assert not kernel.mounts_under(os.path.dirname(a)), "A's staging left something mounted"
    assert read_sum(pub_b) == digest, "B's publish lost its device"
    # B still works: a new publish from B, and its data.
    tc = driver.path("pods/pod-c/vol")
    publish(c, vid, b, tc, fs)
    assert read_sum(Pub(vid, fs, b, tc)) == digest
    unpublish(driver, vid, tc)
    unpublish(driver, vid, tb)
    unstage(driver, vid, b)
    assert kernel.loops_under(driver.root) == [], "the last unstage detaches the device"
    assert kernel.mounts_under(driver.kubelet_dir) == []
    delete(c, vid)


@pytest.mark.parametrize("fs", ["ext4", "block"])
def test_unstage_while_still_published_answers_ok_and_the_pod_keeps_its_data(driver: Driver, fs: str) -> None:
    """Kubelet unpublishes first; a CO that does not still must not get a refusal that
    changed half of the node. The publish keeps working; its unpublish then detaches."""
    c = driver.client
    vid = create(c, f"pub-{fs}", SIZES[fs], fs).volume_id
    s, t = driver.path("plugins/pv/globalmount"), driver.path("pods/p/vol")
    stage(c, vid, s, fs)
    publish(c, vid, s, t, fs)
    p = Pub(vid, fs, s, t)
    digest = write_data(p)
    unstage(driver, vid, s)
    assert read_sum(p) == digest and t in kernel.mounts_under(driver.kubelet_dir)
    unpublish(driver, vid, t)
    assert kernel.loops_under(driver.root) == [], "nothing needs the device any more: detached"
    assert kernel.mounts_under(driver.kubelet_dir) == []
    delete(c, vid)


def test_refused_unstage_and_unpublish_change_nothing(driver: Driver) -> None:
    """A path holding this volume under something else (a foreign mount stacked on top,
    or on the bottom) is refused before anything is unmounted."""
    c = driver.client
    vid = create(c, "stacked", SIZES["ext4"], "ext4").volume_id
    s, t = driver.path("plugins/pv/globalmount"), driver.path("pods/p/vol")
    stage(c, vid, s, "ext4")
    publish(c, vid, s, t, "ext4")
    for path, call in ((s, unstage), (t, unpublish)):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path], check=True)  # someone else's, on top
        try:
            before = node_state(driver)
            with pytest.raises(grpc.RpcError) as info:
                call(driver, vid, path)
            assert info.value.code() == C.FAILED_PRECONDITION
            assert node_state(driver) == before, f"a refused call on {path} changed the node"
        finally:
            subprocess.run(["umount", path], check=True)
    # This volume's filesystem stacked by hand over someone else's mount (below it).
    other = driver.path("plugins/other/globalmount")
    os.makedirs(other)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", other], check=True)
    device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", s], capture_output=True,
                            text=True, check=True).stdout.strip()
    subprocess.run(["mount", device, other], check=True)
    try:
        before = node_state(driver)
        with pytest.raises(grpc.RpcError) as info:
            unstage(driver, vid, other)
        assert info.value.code() == C.FAILED_PRECONDITION
        assert node_state(driver) == before, "the refused unstage unmounted the top layer first"
    finally:
        while other in kernel.mounts_under(driver.kubelet_dir):
            subprocess.run(["umount", other], check=True)
    unpublish(driver, vid, t)
    unstage(driver, vid, s)
    delete(c, vid)


def test_refused_stage_attaches_nothing(driver: Driver) -> None:
    c = driver.client
    a = create(c, "a", SIZES["ext4"], "ext4").volume_id
    b = create(c, "b", SIZES["ext4"], "ext4").volume_id
    s = driver.path("plugins/pv/globalmount")
    stage(c, a, s, "ext4")
    before = node_state(driver)
    for fs in ("ext4", "block"):
        with pytest.raises(grpc.RpcError) as info:
            stage(c, b, s, fs)
        assert info.value.code() == C.ALREADY_EXISTS
        assert node_state(driver) == before, "a refused stage attached or mounted something"
    unstage(driver, a, s)
    delete(c, a)
    delete(c, b)


# -- a property: any sequence of node calls over two staging paths and two targets ---------


@dataclass
class Model:
    """What should be staged and published, from the calls that answered OK."""

    staged: set[str] = field(default_factory=set)
    published: dict[str, str] = field(default_factory=dict)  # target -> staging path it came from


CALLS = st.lists(st.tuples(st.sampled_from(["stage", "publish", "unpublish", "unstage"]),
                           st.sampled_from([0, 1]), st.sampled_from([0, 1])), min_size=1, max_size=12)


@pytest.mark.parametrize("fs", ["ext4", "block"])
def test_any_call_sequence_keeps_staging_per_path(driver: Driver, fs: str) -> None:
    c = driver.client
    vid = create(c, f"prop-{fs}", SIZES[fs], fs).volume_id
    stagings = [driver.path(f"plugins/pv-{i}/globalmount") for i in range(2)]
    targets = [driver.path(f"pods/pod-{i}/vol") for i in range(2)]

    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(CALLS)
    def prop(calls: list[tuple[str, int, int]]) -> None:
        model = Model()
        digest = ""
        try:
            for name, i, j in calls:
                s, t = stagings[i], targets[j]
                before = node_state(driver)
                # Publishing needs the volume staged at that path (mount), or its device
                # attached at all (block: staging only attaches it).
                refusal = name == "publish" and (
                    s not in model.staged if fs != "block" else not (model.staged or model.published))
                try:
                    if name == "stage":
                        stage(c, vid, s, fs)
                        model.staged.add(s)
                    elif name == "publish":
                        publish(c, vid, s, t, fs)
                        model.published.setdefault(t, s)
                    elif name == "unpublish":
                        unpublish(driver, vid, t)
                        model.published.pop(t, None)
                    else:
                        unstage(driver, vid, s)
                        model.staged.discard(s)
                except grpc.RpcError as exc:
                    assert refusal and exc.code() == C.FAILED_PRECONDITION, (name, model, exc.details())
                    assert node_state(driver) == before, f"refused {name} changed the node"
                    continue
                assert not refusal, (name, s, t, model)
                # Every staging path and publish the model has is there; the device is
                # attached exactly while something needs it.
                mounts, loops = node_state(driver)
                for t2 in model.published:
                    assert t2 in mounts, (name, model, mounts)
                assert bool(loops) == bool(model.staged or model.published), (name, model, loops)
                if model.published and not digest:
                    digest = write_data(Pub(vid, fs, "", next(iter(model.published))), seed=7)
                for t2 in model.published:
                    assert read_sum(Pub(vid, fs, "", t2)) == digest
        finally:
            for t in targets:
                unpublish(driver, vid, t)
            for s in stagings:
                unstage(driver, vid, s)
            assert node_state(driver) == ([], []), "teardown left something behind"
    prop()
    delete(c, vid)


def test_a_block_volume_staged_by_an_older_driver_keeps_its_device_across_publishes(driver: Driver) -> None:
    """Before staging paths were mounts, a block volume's stage only attached its device.
    After an upgrade, the unpublish of such a volume must not detach it (kubelet still
    holds it staged and publishes it again); its unstage still does."""
    c = driver.client
    vid = create(c, "legacy-blk", SIZES["block"], "block").volume_id
    image = driver.data_dir / "volumes" / vid / "disk.img"
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                            capture_output=True, text=True, check=True).stdout.strip()
    s = driver.path("plugins/pv/globalmount")
    os.makedirs(s)
    t = driver.path("pods/p/vol")
    publish(c, vid, s, t, "block")
    digest = write_data(Pub(vid, "block", s, t))
    unpublish(driver, vid, t)
    assert kernel.loops_under(driver.root) == [device], "an unpublish detached a staged device"
    publish(c, vid, s, t, "block")
    assert read_sum(Pub(vid, "block", s, t)) == digest
    unpublish(driver, vid, t)
    unstage(driver, vid, s)
    assert kernel.loops_under(driver.root) == []
    delete(c, vid)
