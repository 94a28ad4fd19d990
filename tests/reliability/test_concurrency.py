"""Races: many CreateVolume calls with one name, overlapping node calls on one volume, and
many volumes staged at once (loop device allocation races)."""

from __future__ import annotations

import concurrent.futures
import os
import random
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from csi_driver.ops.client import CsiClient
from csi_driver.proto import csi_pb2
from tests import kernel
from tests.conftest import Driver
from tests.helpers import MIB, cap_for, create, delete, down, publish, read_sum, stage, up, write_data
from tests.reliability.support import assert_everything_owned, leftovers, listed_volumes, mounts_of

pytestmark = pytest.mark.root


def outcome(fn: Callable[[], object]) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def test_fifty_creates_with_one_name(driver: Driver) -> None:
    c = driver.client
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: outcome(lambda: create(c, "one", 32 * MIB)), range(50)))
    codes = {code for code, _ in results}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}, results
    oks = [v for code, v in results if code == grpc.StatusCode.OK]
    assert oks, "at least the first call succeeds"
    assert {v.volume_id for v in oks} == {"one"}  # type: ignore[attr-defined]
    assert {v.capacity_bytes for v in oks} == {32 * MIB}  # type: ignore[attr-defined]
    assert listed_volumes(c) == ["one"]
    assert os.listdir(driver.data_dir / "volumes") == ["one"], "no temporary directory is left"
    again = create(c, "one", 32 * MIB)  # and the name stays idempotent
    assert again.volume_id == "one"
    delete(c, "one")


@pytest.mark.parametrize("fs", ["ext4", "block"])
def test_overlapping_node_calls_on_one_volume(driver: Driver, fs: str) -> None:
    """Threads fire stage, publish (two targets), unpublish and unstage at random. Every
    answer is OK, ABORTED (overlap) or FAILED_PRECONDITION (wrong order); at the end a
    clean sequence brings the volume to a known state, and mounts are never stacked."""
    c = driver.client
    vol = create(c, f"busy-{fs}", 32 * MIB, fs)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), fs)
    digest = write_data(p)
    targets = [p.target, driver.path(f"pods/second-{fs}/mount")]
    rng = random.Random(7)

    def call(i: int) -> grpc.StatusCode:
        op = rng.choice(["stage", "publish", "unpublish", "unstage"])
        target = targets[i % 2]
        if op == "stage":
            fn: Callable[[], object] = lambda: stage(c, vol.volume_id, p.staging, fs)  # noqa: E731
        elif op == "publish":
            fn = lambda: publish(c, vol.volume_id, p.staging, target, fs)  # noqa: E731
        elif op == "unpublish":
            fn = lambda: c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(  # noqa: E731
                volume_id=vol.volume_id, target_path=target))
        else:
            fn = lambda: c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(  # noqa: E731
                volume_id=vol.volume_id, staging_target_path=p.staging))
        return outcome(fn)[0]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(call, range(200)))
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION}
    assert set(codes) <= allowed, {str(x) for x in codes}
    assert grpc.StatusCode.ABORTED in codes, "the calls did overlap"
    for path in (p.staging, *targets):
        assert mounts_of(path) <= 1, f"mounts stacked at {path}"
    assert_everything_owned(driver, c)

    # The final state is whatever a clean sequence makes it.
    stage(c, vol.volume_id, p.staging, fs)
    for t in targets:
        publish(c, vol.volume_id, p.staging, t, fs)
    assert read_sum(p) == digest
    for t in targets:
        c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=t))
        assert not os.path.lexists(t)
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id,
                                                              staging_target_path=p.staging))
    assert kernel.loops_under(driver.root) == [] and kernel.mounts_under(driver.kubelet_dir) == []
    delete(c, vol.volume_id)


def test_twenty_volumes_staged_at_once(driver: Driver) -> None:
    c = driver.client
    names = [f"par-{i:02d}" for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda n: create(c, n, 16 * MIB, "ext4" if n[-1] in "02468" else "block"), names))

    def bring_up(n: str) -> tuple[str, str]:
        fs = "ext4" if n[-1] in "02468" else "block"
        p = up(c, n, str(driver.kubelet_dir), fs)
        return n, write_data(p, MIB, seed=int(n[-2:]))

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        sums = dict(pool.map(bring_up, names))
    loops = kernel.loops_under(driver.root)
    assert len(loops) == 20 and len(set(loops)) == 20, loops
    assert_everything_owned(driver, c)

    def bring_down(n: str) -> None:
        fs = "ext4" if n[-1] in "02468" else "block"
        p = up(c, n, str(driver.kubelet_dir), fs)  # idempotent: already there
        assert read_sum(p, MIB) == sums[n]
        down(c, p)
        delete(c, n)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(bring_down, names))
    assert kernel.loops_under(driver.root) == [] and kernel.mounts_under(driver.root) == []
    assert listed_volumes(c) == [] and leftovers(driver) == []


def test_concurrent_clients(driver: Driver) -> None:
    """Separate connections behave as one: the in-flight guard is per volume, not per
    channel."""
    clients = [CsiClient.connect(f"unix://{driver.socket}") for _ in range(4)]
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: outcome(lambda: clients[i % 4].controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(name="shared", volume_capabilities=[cap_for("block")],
                                            capacity_range=csi_pb2.CapacityRange(required_bytes=MIB))
            )), range(16)))
        assert {code for code, _ in results} <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}
        assert listed_volumes(driver.client) == ["shared"]
    finally:
        for cl in clients:
            cl.close()
    p = up(driver.client, "shared", str(driver.kubelet_dir), "block")
    down(driver.client, p)
    delete(driver.client, "shared")


def test_thick_and_thin_volumes_cycle_at_once(driver: Driver) -> None:
    """A thick volume's device is removed after its unstage (it can never discard again)
    while other workers attach: a device number taken from LOOP_CTL_GET_FREE may vanish
    before it is configured (ENXIO), which is retried. Every thin volume still gets a
    device that discards, every thick one a device that does not."""
    c = driver.client
    names = [f"mix-{i:02d}" for i in range(12)]

    def fmt(n: str) -> str:
        return "zeroedthick" if int(n[-2:]) % 2 else "thin"

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda n: create(c, n, 16 * MIB, "ext4", diskformat=fmt(n)), names))

    def cycle(n: str) -> list[str]:
        problems = []
        for round_ in range(3):
            p = up(c, n, str(driver.kubelet_dir), "ext4")
            dev = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(os.stat(p.target).st_dev)}:"
                                                    f"{os.minor(os.stat(p.target).st_dev)}"))
            discard = int(Path(f"/sys/block/{dev}/queue/discard_max_bytes").read_text())
            if (discard == 0) != (fmt(n) != "thin"):
                problems.append(f"{n} round {round_}: {dev} discard_max_bytes {discard}")
            down(c, p)
        return problems

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        problems = [p for found in pool.map(cycle, names) for p in found]
    assert problems == []
    for n in names:
        delete(c, n)
    assert kernel.loops_under(driver.root) == [] and kernel.mounts_under(driver.root) == []
