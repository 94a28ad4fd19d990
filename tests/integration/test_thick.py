"""Thick stays thick (issue 14, class 2), in node-local and in shared mode. A zeroedthick or eagerzeroedthick volume keeps its
whole size allocated on the node for its whole life. Every path that used to give part of
it back is exercised here, with the image's allocated bytes (st_blocks * 512) measured after
each step: online discard (the old default reclaim), fstrim (by hand and `node trim`), the
loop device's own discard handling (blkdiscard from a block volume's user), ext4's lazy
inode-table init, restage, driver restart, expansion, and snapshot restore and clone."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.host.linux import HostOS
from csi_driver.ops import ctl
from csi_driver.proto import csi_pb2
from csi_driver.volumes.datastore import imagelock
from csi_driver.volumes.datastore.records import init_marker
from csi_driver.volumes.store import Meta
from tests.conftest import NODE_ID, Driver
from tests.helpers import (
    MIB,
    SIZES,
    Published,
    cap_for,
    code_of,
    create,
    delete,
    down,
    publish,
    read_sum,
    stage,
    up,
    write_data,
)

pytestmark = pytest.mark.root

THICK = ("zeroedthick", "eagerzeroedthick")


def allocated(d: Driver, vid: str) -> int:
    return os.stat(d.data_dir / "volumes" / vid / "disk.img").st_blocks * 512


def queue(dev: str, name: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(dev)}/queue/{name}").read_text())


def loop_of(p: Published) -> str:
    """The loop device behind a published volume."""
    if p.fs == "block":
        rdev = os.stat(p.target).st_rdev
        return "/dev/" + os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))
    out = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", p.staging],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out


def churn(p: Published) -> None:
    """What a user does that gives blocks back on a thin volume: write, delete, sync, trim
    (the kernel refuses fstrim on a thick volume's device), and for a block volume the
    user's own discard."""
    if p.fs == "block":
        res = subprocess.run(["blkdiscard", "-f", p.target], capture_output=True, text=True)
        assert res.returncode != 0 and "not supported" in res.stderr, res.stderr
        return
    big = os.path.join(p.target, "churn.bin")
    with open(big, "wb") as f:
        for _ in range(24):
            f.write(os.urandom(MIB))
        os.fsync(f.fileno())
    os.unlink(big)
    os.sync()
    res = subprocess.run(["fstrim", "-v", p.staging], capture_output=True, text=True)
    assert res.returncode != 0 and "not supported" in res.stderr, res.stdout + res.stderr


@pytest.mark.parametrize("fs", ["ext4", "xfs", "block"])
@pytest.mark.parametrize("diskformat", THICK)
def test_thick_volume_keeps_its_allocation_for_life(driver: Driver, capsys: pytest.CaptureFixture[str],
                                                    diskformat: str, fs: str) -> None:
    c = driver.client
    size = SIZES[fs]
    vol = create(c, f"thick-{fs}", size, fs, diskformat=diskformat)
    vid = vol.volume_id
    seen = {"create": allocated(driver, vid)}
    assert vol.volume_context["reclaim"] == "none", "a thick volume's default reclaim is none"

    p = up(c, vid, str(driver.kubelet_dir), fs)
    seen["stage"] = allocated(driver, vid)
    assert queue(loop_of(p), "discard_max_bytes") == 0, "a thick volume's device must refuse discards"
    if fs != "block":
        options = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", p.staging],
                                 capture_output=True, text=True, check=True).stdout
        assert "discard" not in options.split(","), options
    if fs == "ext4":
        # Nothing left for the kernel's lazy inode-table init, which zeroes by discarding.
        out = subprocess.run(["dumpe2fs", str(driver.data_dir / "volumes" / vid / "disk.img")],
                             capture_output=True, text=True, check=True).stdout
        groups = [line for line in out.splitlines() if re.match(r"Group \d+:", line)]
        assert groups and all("ITABLE_ZEROED" in g for g in groups), groups[:3]
    digest = write_data(p, 4 * MIB)
    churn(p)
    seen["write+delete+trim"] = allocated(driver, vid)

    capsys.readouterr()
    assert ctl.main(["-o", "json", "node", "trim", "--data-dir", str(driver.data_dir)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["result"].startswith(f"skipped: {diskformat} volume"), rows
    seen["node trim"] = allocated(driver, vid)

    down(c, p)
    p = up(c, vid, str(driver.kubelet_dir), fs)
    seen["restage"] = allocated(driver, vid)

    driver.restart()
    c = driver.client
    stage(c, vid, p.staging, fs)  # kubelet repeats both after a plugin restart
    publish(c, vid, p.staging, p.target, fs)
    churn(p)
    seen["driver restart"] = allocated(driver, vid)
    assert read_sum(p, 4 * MIB) == digest
    assert all(v >= size for v in seen.values()), seen

    new = 2 * size
    rng = csi_pb2.CapacityRange(required_bytes=new)
    try:
        c.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=p.target, staging_target_path=p.staging, capacity_range=rng))
    except grpc.RpcError as exc:  # ext4 without CAP_SYS_RESOURCE: it grows at the next stage
        assert fs == "ext4" and exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
        down(c, p)
        p = up(c, vid, str(driver.kubelet_dir), fs)
    churn(p)
    grown = allocated(driver, vid)
    assert grown >= new, f"the new part of a {diskformat} volume must be allocated too: {grown}"
    assert read_sum(p, 4 * MIB) == digest

    snap = c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=f"s-{fs}", source_volume_id=vid)).snapshot
    for name, fmt in ((f"same-{fs}", diskformat), (f"thin-{fs}", "thin")):
        req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap_for(fs)],
                                          parameters={"diskformat": fmt},
                                          capacity_range=csi_pb2.CapacityRange(required_bytes=new))
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        c.controller.CreateVolume(req)
    clone = csi_pb2.CreateVolumeRequest(name=f"clone-{fs}", volume_capabilities=[cap_for(fs)],
                                        parameters={"diskformat": diskformat},
                                        capacity_range=csi_pb2.CapacityRange(required_bytes=new))
    clone.volume_content_source.volume.volume_id = vid
    c.controller.CreateVolume(clone)
    assert allocated(driver, f"same-{fs}") >= new and allocated(driver, f"clone-{fs}") >= new
    assert allocated(driver, f"thin-{fs}") < new // 2, "a thin restore of a thick snapshot is thin"
    q = up(c, f"same-{fs}", str(driver.kubelet_dir), fs, name="restored")
    churn(q)
    assert allocated(driver, f"same-{fs}") >= new
    assert read_sum(q, 4 * MIB) == digest
    down(c, q)

    down(c, p)
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for v in (vid, f"same-{fs}", f"thin-{fs}", f"clone-{fs}"):
        delete(c, v)


def test_eagerzeroedthick_restore_has_every_byte_written(driver: Driver) -> None:
    """A restore into eagerzeroedthick writes the zeros of the snapshot's holes too (not
    only fallocated: unwritten extents), and shares no block with the snapshot."""
    c = driver.client
    create(c, "ez-src", 64 * MIB, "ext4")
    c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="ez-snap", source_volume_id="ez-src"))
    req = csi_pb2.CreateVolumeRequest(name="ez-dst", volume_capabilities=[cap_for("ext4")],
                                      parameters={"diskformat": "eagerzeroedthick"},
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=96 * MIB))
    req.volume_content_source.snapshot.snapshot_id = "ez-snap"
    c.controller.CreateVolume(req)
    image = driver.data_dir / "volumes" / "ez-dst" / "disk.img"
    extents = subprocess.run(["filefrag", "-v", str(image)], capture_output=True, text=True, check=True).stdout
    assert "unwritten" not in extents and "shared" not in extents, extents
    assert allocated(driver, "ez-dst") >= 96 * MIB
    c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="ez-snap"))
    delete(c, "ez-dst")
    delete(c, "ez-src")


@pytest.mark.parametrize("diskformat", THICK)
def test_discard_with_a_thick_diskformat_is_refused_and_changes_nothing(driver: Driver, diskformat: str) -> None:
    c = driver.client
    before = sorted(os.listdir(driver.data_dir / "volumes"))
    code = code_of(lambda: create(c, "bad", 64 * MIB, "ext4", diskformat=diskformat, reclaim="discard"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(os.listdir(driver.data_dir / "volumes")) == before
    req = csi_pb2.CreateVolumeRequest(name="bad-vac", volume_capabilities=[cap_for("ext4")],
                                      parameters={"reclaim": "discard"},
                                      mutable_parameters={"diskformat": diskformat},
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MIB))
    with pytest.raises(grpc.RpcError) as info:
        c.controller.CreateVolume(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "keeps its whole size allocated" in str(info.value.details())
    assert sorted(os.listdir(driver.data_dir / "volumes")) == before

    vol = create(c, "thick", 64 * MIB, "ext4", diskformat=diskformat)
    meta = (driver.data_dir / "volumes" / "thick" / "meta.json").read_text()
    assert code_of(c.controller.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"reclaim": "discard"})) == grpc.StatusCode.INVALID_ARGUMENT
    assert (driver.data_dir / "volumes" / "thick" / "meta.json").read_text() == meta
    eph = str(driver.kubelet_dir / "pods" / "eph" / "mount")
    assert code_of(c.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-eph-thick", target_path=eph, volume_capability=cap_for("ext4"),
        volume_context={"csi.storage.k8s.io/ephemeral": "true", "diskformat": diskformat,
                        "reclaim": "discard", "size": "64Mi"})) == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists(driver.data_dir / "volumes" / "csi-eph-thick")
    delete(c, vol.volume_id)


def test_modify_thin_to_zeroedthick_stops_discarding(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "to-thick", 64 * MIB, "ext4")
    assert vol.volume_context["reclaim"] == "discard"
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    bad = {"diskformat": "zeroedthick", "reclaim": "discard"}
    meta = (driver.data_dir / "volumes" / "to-thick" / "meta.json").read_text()
    thin_alloc = allocated(driver, "to-thick")
    assert code_of(c.controller.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(
        volume_id="to-thick", mutable_parameters=bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert allocated(driver, "to-thick") == thin_alloc, "a refused modify preallocated the image"
    assert (driver.data_dir / "volumes" / "to-thick" / "meta.json").read_text() == meta

    c.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
        volume_id="to-thick", mutable_parameters={"diskformat": "zeroedthick"}))
    after = Meta.from_json((driver.data_dir / "volumes" / "to-thick" / "meta.json").read_text())
    assert (after.diskformat, after.reclaim) == ("zeroedthick", "none")
    options = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", p.staging],
                             capture_output=True, text=True, check=True).stdout
    assert "discard" not in options.strip().split(","), options
    assert queue(loop_of(p), "discard_max_bytes") == 0
    churn(p)
    assert allocated(driver, "to-thick") >= 64 * MIB
    down(c, p)
    delete(c, vol.volume_id)


def test_an_old_thick_volume_with_discard_in_its_metadata_is_mounted_without_it(driver: Driver) -> None:
    """Thick volumes made before the rule got reclaim: discard by default; the stored value
    no longer reaches the mount."""
    c = driver.client
    create(c, "legacy", 64 * MIB, "ext4", diskformat="zeroedthick")
    path = driver.data_dir / "volumes" / "legacy" / "meta.json"
    path.write_text(path.read_text().replace('"reclaim": "none"', '"reclaim": "discard"'))
    assert '"reclaim": "discard"' in path.read_text()
    p = up(c, "legacy", str(driver.kubelet_dir), "ext4")
    churn(p)
    assert allocated(driver, "legacy") >= 64 * MIB
    listed = c.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="legacy"))
    assert listed.volume.volume_context["reclaim"] == "none"
    down(c, p)
    delete(c, "legacy")


def _attach(host: HostOS, image: Path, *, discard: bool, how: str) -> str:
    """Attach as node-local mode does ("path": attach_loop), or as a shared-mode stage does
    ("fd": lock the image through one open of it and hand that open file to the loop
    device, csi_driver.volumes.datastore.imagelock and HostOS.attach_loop_fd, never losetup)."""
    if how == "path":
        return host.attach_loop(image, readonly=False, discard=discard).device
    fd = imagelock.open_locked(image, readonly=False, direct=False)
    try:
        return host.attach_loop_fd(fd, image, readonly=False, direct_io=True, discard=discard).device
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["path", "fd"])
def test_a_device_that_cannot_discard_is_never_handed_to_a_thin_volume(workdir: Path, how: str) -> None:
    """Switching discards off is one way for a loop device (the kernel then refuses any
    other value), so the device of a thick volume is removed after detach, and a device
    found in that state (left by a crash, or by hand) is passed over for a thin volume.
    The same for shared mode's attach of an open file, whose lock lives in the device."""
    host = HostOS()
    thick, thin = workdir / "thick.img", workdir / "thin.img"
    with open(thick, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 16 * MIB)
    with open(thin, "wb") as f:
        f.truncate(16 * MIB)
    dev = _attach(host, thick, discard=False, how=how)
    assert host.discard_disabled(dev) and queue(dev, "discard_max_bytes") == 0
    if how == "fd":
        assert imagelock.path_lock_state(thick) == imagelock.EXCLUSIVE  # held by the device alone
    host.detach_loop(dev)
    assert imagelock.path_lock_state(thick) == imagelock.FREE
    assert not host.discard_disabled(dev), "the thick volume's device was left unable to discard"

    # A device left in that state by someone else, then a thin attach.
    crippled = subprocess.run(["losetup", "--find", "--show", str(thick)], capture_output=True, text=True,
                              check=True).stdout.strip()
    Path(f"/sys/block/{os.path.basename(crippled)}/queue/discard_max_bytes").write_text("0")
    subprocess.run(["losetup", "--detach", crippled], check=True)
    try:
        assert host.discard_disabled(crippled)
        got = _attach(host, thin, discard=True, how=how)
        try:
            assert queue(got, "discard_max_bytes") > 0, "a thin volume got a device that cannot discard"
        finally:
            host.detach_loop(got)
    finally:
        if host.discard_disabled(crippled):  # not handed out to us: remove it here
            host._remove_device(os.path.basename(crippled))
    assert not host.discard_disabled(crippled)


def _attach_detach(kind: str, how: str, image: str, rounds: int) -> list[str]:
    host = HostOS()
    errors = []
    for _ in range(rounds):
        try:
            host.detach_loop(_attach(host, Path(image), discard=kind == "thin", how=how))
        except Exception as exc:  # reported, not raised: the parent counts them
            errors.append(f"{kind} ({how}): {type(exc).__name__}: {exc}")
    return errors


def test_attaches_in_other_processes_survive_thick_devices_being_removed(workdir: Path) -> None:
    """Four processes attach and detach at once, two of them thick images (whose devices
    are removed after each detach), two of them as shared mode does (attach_loop_fd). A
    device number handed out by LOOP_CTL_GET_FREE can vanish before it is configured
    (ENXIO); the attach takes another instead of failing."""
    images = []
    for i, (kind, how) in enumerate((("thick", "path"), ("thin", "fd"), ("thick", "fd"), ("thin", "path"))):
        image = workdir / f"{kind}-{i}.img"
        with open(image, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 8 * MIB)
        images.append((kind, how, str(image)))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        errors = [e for found in pool.starmap(_attach_detach, [(k, h, i, 80) for k, h, i in images]) for e in found]
    assert errors == []


@pytest.fixture
def shared_driver(workdir: Path) -> Iterator[Driver]:
    """A shared-mode driver (controller and node, --datastore ds1) on a local directory made
    a datastore by hand, as sanity.sh runs one."""
    data = workdir / "data"
    data.mkdir()
    init_marker(data, "ds1", "test")
    d = Driver(workdir, ["--datastore", "ds1"]).start()
    try:
        yield d
    finally:
        d.shutdown()


@pytest.mark.parametrize("diskformat", THICK)
def test_thick_volume_stays_thick_in_shared_mode(shared_driver: Driver, diskformat: str) -> None:
    d, c = shared_driver, shared_driver.client
    vid = create(c, f"sh-{diskformat}", 64 * MIB, "ext4", diskformat=diskformat).volume_id
    size = 64 * MIB
    token = dict(c.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=NODE_ID, volume_capability=cap_for("ext4"))).publish_context)
    staging, target = d.path(f"plugins/staging/{vid}"), d.path(f"pods/{vid}/mount")
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=cap_for("ext4"), publish_context=token))
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap_for("ext4"),
        publish_context=token))
    p = Published(vid, "ext4", staging, target)
    dev = loop_of(p)
    assert queue(dev, "discard_max_bytes") == 0, "a thick volume's device must refuse discards"
    assert "discard" not in subprocess.run(["findmnt", "-n", "-o", "OPTIONS", "--mountpoint", staging],
                                           capture_output=True, text=True, check=True).stdout
    churn(p)
    assert allocated(d, vid) >= size
    down(c, p)
    assert not HostOS().discard_disabled(dev), "the device was left unable to discard after detach"
    assert imagelock.path_lock_state(d.data_dir / "volumes" / vid / "disk.img") == imagelock.FREE
    c.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID))
    assert allocated(d, vid) >= size
    delete(c, vid)
