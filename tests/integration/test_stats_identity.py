"""NodeGetVolumeStats and NodeExpandVolume answer for the volume named, never for whatever
is at the path (issue 14, class 4). The path must hold this very volume (its image's
identity behind the mount, as unpublish and unstage check); otherwise NOT_FOUND, the spec's
answer for "volume not found at volume_path", and nothing changes."""

from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_driver.proto import csi_pb2
from tests.conftest import Driver
from tests.helpers import MIB, Published, create, delete, down, up

pytestmark = pytest.mark.root
C = grpc.StatusCode


def stats(d: Driver, vid: str, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
    resp: csi_pb2.NodeGetVolumeStatsResponse = d.client.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path))
    return resp


def total_bytes(resp: csi_pb2.NodeGetVolumeStatsResponse) -> int:
    return next(u.total for u in resp.usage if u.unit == csi_pb2.VolumeUsage.BYTES)


def image_size(d: Driver, vid: str) -> int:
    return os.stat(d.data_dir / "volumes" / vid / "disk.img").st_size


@pytest.fixture
def three(driver: Driver) -> dict[str, Published]:
    """ext4 volumes a (64 MiB) and b (128 MiB), block volume c (32 MiB), each staged and
    published; and a's old staging dir left empty by an earlier unstage."""
    c = driver.client
    k = str(driver.kubelet_dir)
    vols = {"a": ("ext4", 64 * MIB), "b": ("ext4", 128 * MIB), "c": ("block", 32 * MIB)}
    out = {}
    for vid, (fs, size) in vols.items():
        create(c, vid, size, fs)
        if vid == "a":
            old = up(c, "a", k, "ext4", name="a-old")
            down(c, old)
            os.makedirs(old.staging, exist_ok=True)  # kubelet leaves (or recreates) the directory
            os.makedirs(old.target, exist_ok=True)
            out["a-old"] = old
        out[vid] = up(c, vid, k, fs)
    return out


def test_stats_and_expand_refuse_a_path_that_holds_another_volume(driver: Driver,
                                                                  three: dict[str, Published]) -> None:
    a, b, blk, old = three["a"], three["b"], three["c"], three["a-old"]
    assert 50 * MIB < total_bytes(stats(driver, "a", a.target)) <= 64 * MIB
    assert total_bytes(stats(driver, "c", blk.target)) == 32 * MIB
    for vid, path in (("a", b.target), ("a", b.staging), ("a", old.staging), ("a", old.target),
                      ("a", blk.target), ("c", a.target), ("c", b.staging), ("b", blk.target)):
        with pytest.raises(grpc.RpcError) as info:
            stats(driver, vid, path)
        assert info.value.code() == C.NOT_FOUND, (vid, path, info.value.details())
        sizes = {v: image_size(driver, v) for v in ("a", "b", "c")}
        with pytest.raises(grpc.RpcError) as info:
            driver.client.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
                volume_id=vid, volume_path=path, capacity_range=csi_pb2.CapacityRange(required_bytes=256 * MIB)))
        assert info.value.code() == C.NOT_FOUND, (vid, path, info.value.details())
        assert {v: image_size(driver, v) for v in ("a", "b", "c")} == sizes, "a refused expand grew an image"
    for p in (a, b, blk):
        down(driver.client, p)
    for vid in ("a", "b", "c"):
        delete(driver.client, vid)


def test_stats_of_any_volume_at_any_path(driver: Driver, three: dict[str, Published]) -> None:
    holds = {(vid, p) for vid in ("a", "b") for p in (three[vid].target, three[vid].staging)}
    holds |= {("c", three["c"].target), ("c", three["c"].staging)}  # a block staging dir holds its bind
    paths = sorted({p for pub in three.values() for p in (pub.staging, pub.target)})
    expected_total = {"a": 64 * MIB, "b": 128 * MIB, "c": 32 * MIB}

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(["a", "b", "c"]), st.sampled_from(paths))
    def prop(vid: str, path: str) -> None:
        try:
            resp = stats(driver, vid, path)
        except grpc.RpcError as exc:
            assert (vid, path) not in holds, (vid, path, exc.details())
            assert exc.code() == C.NOT_FOUND, exc.details()
            return
        assert (vid, path) in holds, f"stats of {vid} at {path} answered for what is there"
        total = total_bytes(resp)
        assert 0.75 * expected_total[vid] < total <= expected_total[vid], (vid, path, total)
        assert not resp.volume_condition.abnormal, resp.volume_condition.message
    prop()
    for p in (three["a"], three["b"], three["c"]):
        down(driver.client, p)
    for vid in ("a", "b", "c"):
        delete(driver.client, vid)
