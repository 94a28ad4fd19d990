"""`thinloopctl node orphans`: what nothing owns is found, and only that is removed.

Real loop devices and mounts for the kernel side (no cluster here: the "not judged" path);
a fake PersistentVolume list, handed in through the ClusterView seam, for the cluster side."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from csi_driver.ops import ctl, orphans
from csi_driver.volumes.store import Meta, Store
from tests import kernel
from tests.conftest import Driver
from tests.fakeos import FakeOS
from tests.helpers import MIB, create, delete, down, up
from tests.operator.conftest import Ctl

DRIVER = "thinloop.csi.io"


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def _attach(image: Path) -> str:
    return subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.root
@pytest.mark.usefixtures("no_cluster")
def test_loop_and_mount_orphans_removed_and_nothing_else(
        driver: Driver, run_ctl: Ctl, monkeypatch: pytest.MonkeyPatch) -> None:
    c = driver.client
    live = create(c, "orph-live", 64 * MIB, "ext4")
    idle = create(c, "orph-idle", 32 * MIB, "ext4")
    p = up(c, live.volume_id, str(driver.kubelet_dir), "ext4")
    data = driver.data_dir
    # A half-deleted volume whose loop device and mount survived a crash.
    trash = data / "volumes" / ".trash-crashed.0001"
    trash.mkdir()
    (trash / "disk.img").write_bytes(b"")
    os.truncate(trash / "disk.img", 32 * MIB)
    subprocess.run(["mkfs.ext4", "-q", str(trash / "disk.img")], check=True)
    stale_loop = _attach(trash / "disk.img")
    stale_mount = driver.path("pods/dead-pod/mount")
    os.makedirs(stale_mount)
    subprocess.run(["mount", stale_loop, stale_mount], check=True)
    # A loop device whose image file was removed from under it.
    gone = data / "volumes" / "removed-by-hand"
    gone.mkdir()
    (gone / "disk.img").write_bytes(bytes(1 << 20))
    deleted_loop = _attach(gone / "disk.img")
    shutil.rmtree(gone)
    d = str(data)
    try:
        r = run_ctl("-o", "json", "node", "orphans", "--data-dir", d)
        assert r.code == 3, r.err
        doc = r.json()
        assert doc["cluster_checked"] is False and "not judged" in doc["cluster_note"]
        assert "not judged" in r.err
        found = {(o["kind"], o["id"]) for o in doc["orphans"]}
        assert found == {("mount", stale_mount), ("loop", stale_loop), ("loop", deleted_loop)}
        assert all(o["deletable"] for o in doc["orphans"])

        monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
        declined = run_ctl("node", "orphans", "--data-dir", d, "--delete")
        assert declined.code == 3 and "Delete these 3 object(s)?" in declined.err
        assert stale_loop in kernel.loops_under(driver.root)

        removed = run_ctl("-o", "json", "node", "orphans", "--data-dir", d, "--delete", "--yes")
        assert removed.code == 0, removed.out
        assert {r["message"] for r in removed.json()["results"]} == {"unmounted", "detached"}
        assert run_ctl("node", "orphans", "--data-dir", d).code == 0

        # What is owned is untouched: the live volume is still attached and mounted.
        assert stale_mount not in kernel.mounts_under(driver.root)
        assert p.target in kernel.mounts_under(driver.root)
        assert len(kernel.loops_under(driver.root)) == 1
        assert (data / "volumes" / idle.volume_id / "disk.img").exists()
    finally:
        kernel.cleanup(Path(stale_mount))
        subprocess.run(["losetup", "-d", stale_loop, deleted_loop], capture_output=True, check=False)
        down(c, p)
        delete(c, live.volume_id)
        delete(c, idle.volume_id)


def test_no_cluster_message(no_cluster: None) -> None:
    reason = orphans.load_cluster()
    assert isinstance(reason, str)
    assert "no Kubernetes API access" in reason and "not judged" in reason
    missing = orphans.load_cluster("/nonexistent/kubeconfig")
    assert isinstance(missing, str) and "/nonexistent/kubeconfig does not exist" in missing


# -- the cluster side, with a fake PV list --------------------------------------------------------


def _volume(store: Store, vid: str, *, ephemeral: bool = False, kind: str = "volume") -> None:
    coll = store.volumes if kind == "volume" else store.snapshots

    def build(image: Path) -> None:
        with open(image, "wb") as f:
            f.truncate(8 * MIB)

    coll.create(vid, Meta(name=f"name-{vid}", kind=kind, fs_type="ext4", ephemeral=ephemeral), build)


def _pv(name: str, handle: str, phase: str = "Bound", node: str = "node-a",
        driver: str = DRIVER) -> orphans.PersistentVolume:
    return orphans.PersistentVolume(name, driver, handle, phase, "Retain", "ns/claim", node)


@pytest.fixture
def node(tmp_path: Path) -> tuple[Store, FakeOS]:
    store = Store(tmp_path / "data")
    fake = FakeOS()
    for vid in ("v-bound", "v-orphan", "v-busy", "v-other-driver", "v-released", "v-released-busy"):
        _volume(store, vid)
    _volume(store, "e-live", ephemeral=True)
    _volume(store, "e-dead", ephemeral=True)
    _volume(store, "s-kept", kind="snapshot")
    _volume(store, "s-orphan", kind="snapshot")
    for vid in ("v-busy", "e-live", "v-released-busy"):
        entry = store.volumes.get(vid)
        assert entry is not None
        fake.attach_loop(entry.image, readonly=False)
    return store, fake


def _view(deleted: list[str]) -> orphans.ClusterView:
    pvs = [_pv("pv-bound", "v-bound"), _pv("pv-busy", "v-busy"),
           _pv("pv-foreign", "v-other-driver", driver="other.csi.io"),
           _pv("pv-released", "v-released", "Released"),
           _pv("pv-released-busy", "v-released-busy", "Released"),
           _pv("pv-elsewhere", "v-on-node-b", "Released", node="node-b"),
           _pv("pv-image-gone", "v-long-gone", "Released", node="node-a")]
    return orphans.ClusterView(pvs, {"s-kept"}, deleted.append)


def test_images_and_released_pvs_are_judged_against_the_pv_list(node: tuple[Store, FakeOS]) -> None:
    store, fake = node
    report = orphans.find(store, fake, DRIVER, "node-a", _view([]))
    assert report.cluster_note == ""
    got = {(o.kind, o.id): o for o in report.orphans}
    assert set(got) == {
        ("image", "v-orphan"), ("image", "v-other-driver"), ("image", "e-dead"),
        ("snapshot-image", "s-orphan"),
        ("released-pv", "pv-released"), ("released-pv", "pv-released-busy"),
        ("released-pv", "pv-elsewhere"), ("released-pv", "pv-image-gone")}
    assert got[("image", "v-orphan")].deletable
    assert "ephemeral" in got[("image", "e-dead")].detail
    assert not got[("released-pv", "pv-released-busy")].deletable
    assert "in use" in got[("released-pv", "pv-released-busy")].reason
    assert not got[("released-pv", "pv-elsewhere")].deletable
    assert "node-b" in got[("released-pv", "pv-elsewhere")].reason


def test_remove_deletes_only_orphans_and_never_what_is_in_use(node: tuple[Store, FakeOS]) -> None:
    store, fake = node
    deleted_pvs: list[str] = []
    view = _view(deleted_pvs)
    report = orphans.find(store, fake, DRIVER, "node-a", view)
    # Between looking and deleting, someone starts using an orphan: it must survive.
    entry = store.volumes.get("v-other-driver")
    assert entry is not None
    fake.attach_loop(entry.image, readonly=False)

    outcomes = {(o.orphan.kind, o.orphan.id): o for o in orphans.remove(report, store, fake, view)}
    assert outcomes[("image", "v-orphan")].deleted
    assert not outcomes[("image", "v-other-driver")].deleted
    assert outcomes[("image", "v-other-driver")].message.startswith("skipped: in use")
    assert not outcomes[("released-pv", "pv-released-busy")].deleted
    assert not outcomes[("released-pv", "pv-elsewhere")].deleted
    assert sorted(deleted_pvs) == ["pv-image-gone", "pv-released"]
    assert store.volumes.ids() == ["e-live", "v-bound", "v-busy", "v-other-driver", "v-released-busy"]
    assert store.snapshots.ids() == ["s-kept"]
    assert not [c for c in fake.calls if c[0] == "detach"], "no loop device of a volume was touched"


def test_ctl_orphans_json_shape_through_the_seam(node: tuple[Store, FakeOS]) -> None:
    store, _ = node
    args = ctl.build_parser().parse_args(
        ["-o", "json", "node", "orphans", "--data-dir", str(store.data_dir), "--node-id", "node-a"])
    out = ctl.cmd_node_orphans(args, cluster=_view([]))
    assert out.code == 3
    doc = out.value
    assert doc["cluster_checked"] is True and doc["cluster_note"] == ""
    assert {o["kind"] for o in doc["orphans"]} == {"image", "snapshot-image", "released-pv"}
    assert all(set(o) == {"kind", "id", "detail", "deletable", "reason", "path"} for o in doc["orphans"])


def test_young_volumes_and_a_cluster_without_our_pvs_are_not_judged(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    fake = FakeOS()
    store.volumes.create("v-new", Meta(name="v-new", fs_type="ext4", created=time.time()),
                         lambda image: image.write_bytes(b""))
    store.volumes.create("v-old", Meta(name="v-old", fs_type="ext4"), lambda image: image.write_bytes(b""))
    view = orphans.ClusterView([_pv("pv-x", "v-elsewhere")], set(), [].append)
    got = {o.id for o in orphans.find(store, fake, DRIVER, "node-a", view).orphans}
    assert got == {"v-old"}, "a volume made a moment ago may not have its PV yet"
    empty = orphans.find(store, fake, DRIVER, "node-a", orphans.ClusterView([], set(), [].append))
    assert empty.orphans == [] and "driver-name" in empty.cluster_note


def test_young_snapshots_and_snapshots_with_no_cluster_record_are_not_judged(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    fake = FakeOS()
    store.snapshots.create("s-new", Meta(name="s-new", kind="snapshot", created=time.time()),
                           lambda image: image.write_bytes(b""))
    store.snapshots.create("s-old", Meta(name="s-old", kind="snapshot"), lambda image: image.write_bytes(b""))
    view = orphans.ClusterView([_pv("pv-x", "v-elsewhere")], {"s-other"}, [].append)
    got = {o.id for o in orphans.find(store, fake, DRIVER, "node-a", view).orphans}
    assert got == {"s-old"}, "the snapshotter records a new snapshot's handle only after CreateSnapshot"
    nothing = orphans.find(store, fake, DRIVER, "node-a", orphans.ClusterView([], set(), [].append))
    assert nothing.orphans == [] and "driver-name" in nothing.cluster_note


def test_a_group_member_is_never_removed_alone(tmp_path: Path) -> None:
    """An unreferenced member of a committed volume group snapshot is reported, not
    deletable, with the command that deletes its group; one whose group record is gone
    stands alone and is deletable."""
    from csi_driver.volumes.grouprecords import GROUPS_DIR
    store = Store(tmp_path / "data")
    fake = FakeOS()
    for sid in ("g-a", "lone-a"):
        group = sid.partition("-")[0]
        store.snapshots.create(sid, Meta(name=sid, kind="snapshot", group_snapshot_id=group),
                               lambda image: image.write_bytes(b""))
    (store.data_dir / GROUPS_DIR / "g").mkdir(parents=True)
    view = orphans.ClusterView([_pv("pv-x", "v-elsewhere")], set(), [].append)
    found = {o.id: o for o in orphans.find(store, fake, DRIVER, "node-a", view).orphans}
    assert not found["g-a"].deletable
    assert found["g-a"].reason == "part of volume group snapshot g: thinloopctl delete-group-snapshot g"
    assert found["lone-a"].deletable
    orphans.remove(orphans.Report(list(found.values())), store, fake, view)
    assert store.snapshots.ids() == ["g-a"]


def test_loop_orphans_by_identity_and_never_another_data_dirs(tmp_path: Path) -> None:
    from csi_driver.host.oslayer import LoopDevice, file_id
    store = Store(tmp_path / "data")
    store.volumes.create("v", Meta(name="v"), lambda image: image.write_bytes(b"x"))
    entry = store.volumes.get("v")
    assert entry is not None
    ident = file_id(entry.image)
    assert ident is not None
    dev = ident[:2]

    def loop(path: str, inode: int) -> LoopDevice:
        return LoopDevice("/dev/loop9", path, "7:9", True, False, 1, (*dev, inode))

    data = str(store.data_dir)
    live_elsewhere = loop("/volumes/v/disk.img", ident[2])          # ours, seen from another namespace
    detached = loop("/volumes/gone/disk.img", ident[2] + 1_000_000)  # could be any data dir's: not judged
    stale = loop(f"{data}/volumes/gone/disk.img (deleted)", ident[2] + 3_000_000)  # ours, deleted
    other_dir = loop(str(tmp_path / "other" / "volumes" / "w" / "disk.img"), ident[2] + 2_000_000)
    got = orphans._orphan_loops(store, [live_elsewhere, detached, stale, other_dir])
    assert got == [stale]
