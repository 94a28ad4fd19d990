"""Full disk: the data dir lives on a small filesystem of its own. Creating beyond the room
is refused with RESOURCE_EXHAUSTED and leaves nothing; a thin volume whose backing
filesystem fills under a writer is reported abnormal while the driver stays healthy; once
space is freed the volume works again."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.ops.client import CsiClient
from csi_driver.proto import csi_pb2
from tests.conftest import Driver
from tests.helpers import MIB, Published, cap_for, code_of, create, delete, down, read_sum, tree, up, write_data
from tests.reliability.support import start_ready

pytestmark = pytest.mark.root

DISK = 600 * MIB


@pytest.fixture
def small(workdir: Path) -> Iterator[Driver]:
    """A driver whose --data-dir is the root of a 600 MiB ext4 filesystem (no reserved
    blocks), loop-mounted inside the test dir."""
    image = workdir / "small.img"
    with open(image, "wb") as f:
        f.truncate(DISK)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    d = Driver(workdir)
    d.data_dir.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(d.data_dir)], check=True)
    try:
        start_ready(d)
        yield d
    finally:
        try:
            d.shutdown()
        finally:
            subprocess.run(["umount", str(d.data_dir)], check=False)


def free(d: Driver) -> int:
    st = os.statvfs(d.data_dir)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int, d: Driver) -> None:
    """Fill the data filesystem with a file of someone else's until `leave` bytes are free."""
    size = free(d) - leave
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def test_create_beyond_the_room_leaves_nothing(small: Driver) -> None:
    c = small.client
    before = tree(str(small.data_dir))
    for fs, size, fmt in [("ext4", 2 * DISK, "thin"), ("block", DISK, "eagerzeroedthick"),
                          ("ext4", DISK, "zeroedthick")]:
        req = csi_pb2.CreateVolumeRequest(
            name=f"big-{fmt}", volume_capabilities=[cap_for(fs)], parameters={"diskformat": fmt},
            capacity_range=csi_pb2.CapacityRange(required_bytes=size))
        assert code_of(c.controller.CreateVolume, req) == grpc.StatusCode.RESOURCE_EXHAUSTED
    cap = c.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    assert 0 < cap <= free(small)
    assert tree(str(small.data_dir)) == before, "a refused CreateVolume left something"


def test_racing_thick_creates_run_out(small: Driver) -> None:
    """Two thick volumes that each fit but not together: when they race, both pass the
    room check and at least one hits ENOSPC while writing its image. Each gets OK or
    RESOURCE_EXHAUSTED, only what succeeded is listed, a failed one leaves nothing (so the
    space it took is free again: one more volume of that size fits afterwards)."""
    c = small.client
    size = int(free(small) * 0.6) // MIB * MIB

    def make(name: str) -> str:
        try:
            create(c, name, size, "block", diskformat="eagerzeroedthick")
            return "OK"
        except grpc.RpcError as exc:
            return str(exc.code().name)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        codes = dict(zip(["race-a", "race-b"], pool.map(make, ["race-a", "race-b"]), strict=True))
    assert set(codes.values()) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    made = sorted(n for n, code in codes.items() if code == "OK")
    assert len(made) <= 1, codes
    assert sorted(os.listdir(small.data_dir / "volumes")) == made, "a failed create left something"
    for name in made:
        delete(c, name)
    create(c, "after", size, "block", diskformat="eagerzeroedthick")
    delete(c, "after")


def stats(c: CsiClient, p: Published) -> csi_pb2.NodeGetVolumeStatsResponse:
    resp: csi_pb2.NodeGetVolumeStatsResponse = c.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=p.volume_id, volume_path=p.target))
    return resp


def test_thin_volume_on_a_full_disk(small: Driver) -> None:
    c = small.client
    vol = create(c, "thin", 400 * MIB)
    p = up(c, vol.volume_id, str(small.kubelet_dir), "ext4")
    digest = write_data(p, 4 * MIB)
    assert not stats(c, p).volume_condition.abnormal
    spare = create(c, "spare", 16 * MIB, "block")
    filler = small.data_dir / "filler"
    fill(filler, 32 * MIB, small)

    # The writer writes more than the host disk has left.
    chunk = os.urandom(MIB)
    failure = 0
    fd = os.open(os.path.join(p.target, "big.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(128):
            os.write(fd, chunk)
        os.fsync(fd)
    except OSError as exc:
        failure = exc.errno or -1
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            failure = failure or exc.errno or -1
    assert failure in (errno.EIO, errno.ENOSPC), f"the writer was not stopped: {failure}"

    cond = stats(c, p).volume_condition
    assert cond.abnormal and "full" in cond.message, cond
    listed = [e for e in c.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
              if e.volume.volume_id == "thin"]
    assert listed[0].status.volume_condition.abnormal
    assert "full" in listed[0].status.volume_condition.message
    # The driver stays healthy: it answers Probe and serves other calls.
    c.identity.Probe(csi_pb2.ProbeRequest())
    assert code_of(lambda: create(c, "more", 64 * MIB)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert c.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity < 64 * MIB
    assert len(c.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries) == 2
    delete(c, spare.volume_id)
    assert c.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id

    # Space is freed: the volume works again (after a restage, which remounts the fs).
    filler.unlink()
    down(c, p)
    p = up(c, vol.volume_id, str(small.kubelet_dir), "ext4")
    assert read_sum(p) == digest, "data written before the disk filled is intact"
    write_data(p, 64 * MIB, seed=7)
    cond = stats(c, p).volume_condition
    assert not cond.abnormal, cond.message
    down(c, p)
    delete(c, vol.volume_id)
