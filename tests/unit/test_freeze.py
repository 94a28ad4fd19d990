"""The freeze protocol of shared mode (csi_driver.volumes.datastore.freeze) on a plain shared directory: a
controller and node drivers over one data dir, each node's freeze server polling from a
thread of its own (as in the driver's first process), the fake OS layer for freezes, real
files, renames and byte-range locks for the protocol. A controller that dies is a separate
process. On GlusterFS with real filesystems: tests/shared/test_freeze_gluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_driver.errors import FailedPrecondition, NotFound, Unavailable
from csi_driver.proto import csi_pb2
from csi_driver.volumes.datastore import freeze
from csi_driver.volumes.datastore.freeze import FreezeClient, FreezeServer
from csi_driver.volumes.datastore.records import Datastore
from csi_driver.volumes.recovery import thaw_frozen
from tests.fakeos import FakeOS
from tests.unit.test_shared import SharedRig, freeze_files, image_lock, three_rigs, wait_until

CTX: Any = None
ROOT = Path(__file__).resolve().parents[2]


def snapshot(ctl: SharedRig, name: str, vid: str) -> csi_pb2.Snapshot:
    return ctl.ctrl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=vid), CTX).snapshot


def watch_copies(ctl: SharedRig, during: Any) -> list[Any]:
    """Run `during(source)` at each of the controller's copies; returns what it returned."""
    seen: list[Any] = []
    copy = ctl.os.copy_image

    def watched(source: Path, dest: Path, *, sparse: bool = True, shared: bool = True) -> None:
        seen.append(during(source))
        copy(source, dest, sparse=sparse, shared=shared)

    ctl.os.copy_image = watched  # type: ignore[method-assign]
    return seen


def snapshot_dirs(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "snapshots").iterdir()) if (data / "snapshots").is_dir() else []


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "datastore"


@pytest.fixture
def rigs(tmp_path: Path, data: Path) -> Iterator[dict[str, SharedRig]]:
    with three_rigs(tmp_path, data) as made:
        yield made


@pytest.fixture
def attached(rigs: dict[str, SharedRig]) -> Iterator[dict[str, SharedRig]]:
    """Volume v1 (ext4) attached read-write and staged on node a."""
    rigs["ctl"].create("v1")
    rigs["a"].stage("v1", rigs["ctl"].publish("v1", "a"))
    yield rigs


def test_a_snapshot_of_a_volume_in_use_on_a_node_is_taken_with_it_frozen_there(
        attached: dict[str, SharedRig], data: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctl, a = attached["ctl"], attached["a"]
    caplog.set_level("INFO", "csi_driver.volumes.datastore.freeze")
    seen = watch_copies(ctl, lambda _src: (set(a.os.frozen), freeze_files(data)))
    snap = snapshot(ctl, "s1", "v1")
    assert snap.ready_to_use and snapshot_dirs(data) == ["s1"]
    ((frozen, files),) = seen
    assert frozen == {a.staging("v1")}
    request = next(f for f in files if f.endswith(".request"))
    assert request.startswith("freeze/a/v1@") and request.replace(".request", ".ack") in files
    body = json.loads((data / request).read_text()) if (data / request).exists() else None
    assert body is None or (body["volume_id"], body["node_id"], body["generation"]) == ("v1", "a", 1)
    assert a.os.frozen == set() and freeze_files(data) == []  # thawed before the call returned
    assert a.driver.freezer is not None and a.driver.freezer.stats.served["frozen"] == 1
    assert sum(a.driver.freezer.stats.auto_thaws.values()) == 0
    node_lines = [r.getMessage() for r in caplog.records if r.message.startswith("freeze v1@")
                  and ("froze" in r.message or "thawed" in r.message)]
    assert len([m for m in node_lines if ": froze " in m]) == 1, node_lines
    assert len([m for m in node_lines if ": thawed " in m and "withdrew" in m]) == 1, node_lines
    # a clone of it is made the same way
    clone = ctl.ctrl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="c1", volume_capabilities=[csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))],
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 << 20),
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id="v1"))), CTX).volume
    assert clone.volume_id == "c1" and seen[-1][0] == {a.staging("v1")}


def test_a_raw_block_volume_is_flushed_not_frozen(rigs: dict[str, SharedRig], data: Path) -> None:
    ctl, a = rigs["ctl"], rigs["a"]
    ctl.create("b1", fs="block")
    a.stage("b1", ctl.publish("b1", "a", fs="block"), fs="block")
    seen = watch_copies(ctl, lambda _src: (set(a.os.frozen), [c for c in a.os.calls if c[0] == "sync"]))
    snapshot(ctl, "s1", "b1")
    ((frozen, syncs),) = seen
    assert frozen == set() and len(syncs) == 1 and syncs[0][1].startswith("/dev/loop")
    assert a.driver.freezer is not None
    wait_until(lambda: freeze_files(data) == [] and a.driver.freezer is not None and not a.driver.freezer.held)
    assert a.driver.freezer.stats.served["synced"] == 1


def test_a_node_whose_driver_does_not_run_is_named_and_nothing_is_left(
        attached: dict[str, SharedRig], data: Path) -> None:
    ctl, a = attached["ctl"], attached["a"]
    a.close()  # its node-id lock goes; its loop device (and image lock) stays
    with pytest.raises(Unavailable, match=r"attached read-write to node a.*driver is not running"):
        snapshot(ctl, "s1", "v1")
    assert snapshot_dirs(data) == [] and freeze_files(data) == []


def test_a_node_that_does_not_answer_is_named_and_a_late_freeze_is_undone(
        attached: dict[str, SharedRig], data: Path) -> None:
    """The node's driver holds its lock but reads no requests (stuck): the controller gives up
    after its wait, naming the node, and withdraws the request; the node, reading at last,
    finds nothing to freeze. A node that froze just as the controller gave up thaws at its
    next poll, because the request is gone."""
    ctl, a = attached["ctl"], attached["a"]
    server = a.driver.freezer
    assert server is not None and ctl.driver.volumes is not None and ctl.driver.volumes.freezes is not None
    server._stop.set()  # the thread stops; the driver (its node-id lock) lives on
    assert server._thread is not None
    server._thread.join()
    ctl.driver.volumes.freezes.ack_grace = 0.2
    with pytest.raises(Unavailable, match="node a did not answer the request to freeze volume v1") as info:
        snapshot(ctl, "s1", "v1")
    assert "withdrawn" in str(info.value)
    assert freeze_files(data) == [] and snapshot_dirs(data) == []
    server.poll()
    assert a.os.frozen == set() and freeze_files(data) == []
    # late: the node freezes between the controller's last look and its withdrawal
    client = FreezeClient(Datastore.open("ds1", data), hold_seconds=60)
    target = client.target("v1", data / "volumes" / "v1" / "disk.img")
    assert target is not None
    sent = client._send(target, 0.02)
    server.poll()
    assert a.os.frozen == {a.staging("v1")}
    sent.withdraw()
    server.poll()
    assert a.os.frozen == set() and freeze_files(data) == []
    assert sum(server.stats.auto_thaws.values()) == 0


def test_the_hold_expires_the_node_records_it_before_it_thaws_and_the_copy_is_discarded(
        attached: dict[str, SharedRig], data: Path) -> None:
    ctl, a = attached["ctl"], attached["a"]
    assert ctl.driver.volumes is not None and ctl.driver.volumes.freezes is not None
    ctl.driver.volumes.freezes.hold_seconds = 0.1
    recorded_at_thaw: list[list[str]] = []
    thaw = a.os.thaw

    def thaw_watched(point: str) -> None:
        recorded_at_thaw.append([f for f in freeze_files(data) if f.endswith(".thawed")])
        thaw(point)

    a.os.thaw = thaw_watched  # type: ignore[method-assign]
    # The copy outlasts the hold: it waits until node a has thawed by itself.
    plain = ctl.os.copy_image
    watch_copies(ctl, lambda _src: wait_until(lambda: not a.os.frozen))
    with pytest.raises(Unavailable, match=r"node a thawed volume v1 before the copy was done .the hold expired"):
        snapshot(ctl, "s1", "v1")
    assert len(recorded_at_thaw) == 1 and len(recorded_at_thaw[0]) == 1  # the record came first
    assert snapshot_dirs(data) == []  # the copy is discarded
    assert a.driver.freezer is not None and a.driver.freezer.stats.auto_thaws["hold_expired"] == 1
    wait_until(lambda: freeze_files(data) == [])
    a.os.thaw = thaw  # type: ignore[method-assign]
    ctl.os.copy_image = plain  # type: ignore[method-assign]
    ctl.driver.volumes.freezes.hold_seconds = 60
    assert snapshot(ctl, "s1", "v1").ready_to_use  # the retry


CONTROLLER = """
import os, sys
from pathlib import Path
from csi_driver.volumes.datastore.records import Datastore
from csi_driver.volumes.recovery import thaw_frozen
from csi_driver.volumes.datastore.freeze import FreezeClient
data = Path(sys.argv[1])
client = FreezeClient(Datastore.open("ds1", data), hold_seconds=3600)
target = client.target("v1", data / "volumes" / "v1" / "disk.img")
with client.frozen([target]):
    print("frozen", flush=True)
    sys.stdin.readline()
    os._exit(0)  # dies mid-copy: no withdrawal; the kernel drops the request's lock
"""


def test_a_controller_that_dies_mid_copy_is_seen_by_its_lock_and_the_node_thaws(
        attached: dict[str, SharedRig], data: Path) -> None:
    """Another process is the controller; it dies while the node holds the freeze (a hold of
    an hour). The node sees the request's lock free at its next poll, records the early thaw,
    thaws, and removes the abandoned request, then its own answers."""
    a = attached["a"]
    with subprocess.Popen([sys.executable, "-c", CONTROLLER, str(data)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            assert proc.stdout.readline().strip() == "frozen"
            assert a.os.frozen == {a.staging("v1")}
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    wait_until(lambda: not a.os.frozen and freeze_files(data) == [])
    assert a.driver.freezer is not None and a.driver.freezer.stats.auto_thaws["controller_gone"] == 1


def test_a_node_driver_restarted_while_frozen_records_the_thaw_first(
        attached: dict[str, SharedRig], data: Path) -> None:
    """The node's driver dies holding a freeze (its thread simply stops: nothing thaws). Its
    next start records the early thaw before the server's recovery thaws the filesystem, so
    the controller, still copying, discards its copy."""
    ctl, a = attached["ctl"], attached["a"]
    old = a.driver.freezer
    assert old is not None and ctl.driver.volumes is not None and ctl.driver.volumes.freezes is not None
    client = ctl.driver.volumes.freezes
    target = client.target("v1", data / "volumes" / "v1" / "disk.img")
    assert target is not None
    held = client.frozen([target])
    held.__enter__()
    try:
        assert a.os.frozen == {a.staging("v1")}
        old._stop.set()  # "kill -9": no thaw
        assert old._thread is not None
        old._thread.join()
        new = FreezeServer("a", Datastore.open("ds1", data), a.driver.store, a.os,  # type: ignore[arg-type]
                           a.driver.inflight, {}, 0.02)
        actions = new.recover()
        assert len(actions) == 1 and "before thawing it" in actions[0]
        assert new.stats.auto_thaws["driver_restarted"] == 1
        assert any(f.endswith(".thawed") for f in freeze_files(data))
        for h in old.held.values():
            h.keys.close()  # what the dead process held went with it (not the freeze)
        old.held.clear()
    except BaseException:
        held.__exit__(None, None, None)
        raise
    with pytest.raises(Unavailable, match="the node's driver restarted"):
        held.__exit__(None, None, None)
    assert a.driver.store is not None
    assert thaw_frozen(a.driver.store, a.os)  # the server's recovery, after the record
    assert a.os.frozen == set()
    new.poll()
    assert freeze_files(data) == []


def test_a_graceful_stop_records_and_thaws(attached: dict[str, SharedRig], data: Path) -> None:
    ctl, a = attached["ctl"], attached["a"]
    assert ctl.driver.volumes is not None and ctl.driver.volumes.freezes is not None
    client = ctl.driver.volumes.freezes
    target = client.target("v1", data / "volumes" / "v1" / "disk.img")
    assert target is not None
    with pytest.raises(Unavailable, match="stopped while the filesystem was frozen"), client.frozen([target]):
        assert a.os.frozen == {a.staging("v1")}
        a.close()
        assert a.os.frozen == set()
        assert any(f.endswith(".thawed") for f in freeze_files(data))
    assert freeze_files(data) != []  # the node is gone: its answers wait for a controller's start-up
    swept = freeze.sweep(Datastore.open("ds1", data))
    assert freeze_files(data) == [] and len(swept) == 1


def test_a_group_across_two_nodes_freezes_all_then_copies_all(rigs: dict[str, SharedRig], data: Path) -> None:
    """x on a, y on b, z attached nowhere: every copy is made with x and y frozen, each by its
    node; all are thawed after. One refusal (a volume b does not serve) thaws everything and
    leaves nothing."""
    from csi_driver.csi.groupcontroller import GroupControllerService
    ctl, a, b = rigs["ctl"], rigs["a"], rigs["b"]
    for v in ("x", "y", "z"):
        ctl.create(v)
    a.stage("x", ctl.publish("x", "a"))
    b.stage("y", ctl.publish("y", "b"))
    assert ctl.driver.groups is not None
    group = GroupControllerService(ctl.driver.groups, ctl.driver.inflight)
    seen = watch_copies(ctl, lambda src: (src.parent.name, set(a.os.frozen), set(b.os.frozen),
                                          image_lock(data, src.parent.name)))

    def cut(name: str) -> csi_pb2.VolumeGroupSnapshot:
        return group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name=name, source_volume_ids=["z", "y", "x"]), CTX).group_snapshot

    made = cut("g1")
    assert made.ready_to_use and len(made.snapshots) == 3
    fa, fb = {a.staging("x")}, {b.staging("y")}
    assert seen == [("x", fa, fb, "exclusive"), ("y", fa, fb, "exclusive"), ("z", fa, fb, "shared")]
    assert not a.os.frozen and not b.os.frozen and freeze_files(data) == []  # all thawed, then it returned
    # b refuses for good: y is not served there (a split brain found at its start)
    b.driver.fenced["y"] = "attached here, but the records say otherwise"
    seen.clear()
    with pytest.raises(FailedPrecondition, match="node b refused to freeze volume y: volume y is not served"):
        cut("g2")
    assert seen == []
    wait_until(lambda: not a.os.frozen and freeze_files(data) == [])
    assert sorted(snapshot_dirs(data)) == sorted(s.snapshot_id for s in made.snapshots)
    assert [p.name for p in (data / "group-snapshots").iterdir()] == ["g1"]


def test_a_node_busy_with_the_volume_answers_once_it_is_done(attached: dict[str, SharedRig], data: Path) -> None:
    ctl, a = attached["ctl"], attached["a"]
    done: list[object] = []
    with a.driver.inflight.hold("vol:v1"):  # a NodeExpandVolume, say, in flight on node a
        t = threading.Thread(target=lambda: done.append(snapshot(ctl, "s1", "v1")))
        t.start()
        wait_until(lambda: any(f.endswith(".request") for f in freeze_files(data)))
        assert a.driver.freezer is not None
        wait_until(lambda: a.driver.freezer is not None and bool(a.driver.freezer._busy))
        assert a.os.frozen == set() and not any(f.endswith(".ack") for f in freeze_files(data))
    t.join(timeout=60)
    assert len(done) == 1


def test_an_attachment_that_changed_is_refused_for_now(attached: dict[str, SharedRig], data: Path) -> None:
    ctl = attached["ctl"]
    assert ctl.driver.volumes is not None and ctl.driver.volumes.freezes is not None
    client = ctl.driver.volumes.freezes
    target = client.target("v1", data / "volumes" / "v1" / "disk.img")
    assert target is not None
    stale = freeze.Target("v1", "a", target.generation + 5, target.incarnation, target.image)
    with pytest.raises(Unavailable, match="now gives this node generation 1, not the request's generation 6"), \
            client.frozen([stale]):
        pass
    wait_until(lambda: freeze_files(data) == [])


def test_the_controller_checks_after_the_copy_that_the_freeze_held(attached: dict[str, SharedRig],
                                                                   data: Path) -> None:
    """Each of the three checks after the copy discards it on its own: a thaw record, a
    request that went (this controller's lock was lost and someone removed it), an
    attachment that changed."""
    ctl, a = attached["ctl"], attached["a"]
    assert ctl.driver.volumes is not None and ctl.driver.volumes.freezes is not None
    client = ctl.driver.volumes.freezes
    target = client.target("v1", data / "volumes" / "v1" / "disk.img")
    assert target is not None

    def request() -> Path:
        return next(p for p in (data / "freeze" / "a").iterdir() if p.name.endswith(".request"))

    with pytest.raises(Unavailable, match=r"its request( and ack)? went"), client.frozen([target]):
        request().unlink()
    wait_until(lambda: not a.os.frozen and freeze_files(data) == [])
    with pytest.raises(Unavailable, match="attachment of volume v1 to node a changed"), client.frozen([target]):
        ctl.unpublish("v1", "a")  # (the CO would have been refused: the controller's key is held)
        ctl.publish("v1", "a")
    wait_until(lambda: not a.os.frozen and freeze_files(data) == [])


def test_thinloopctl_shows_pending_requests_and_a_controller_start_sweeps_the_abandoned(
        attached: dict[str, SharedRig], data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from csi_driver.ops import ctl as thinloopctl
    ctl, a = attached["ctl"], attached["a"]
    assert a.driver.freezer is not None and ctl.driver.volumes is not None
    a.driver.freezer._stop.set()  # node a's server reads nothing: the requests stay
    assert a.driver.freezer._thread is not None
    a.driver.freezer._thread.join()
    client = ctl.driver.volumes.freezes
    assert client is not None
    target = client.target("v1", data / "volumes" / "v1" / "disk.img")
    assert target is not None
    live = client._send(target, 0.02)
    dead = client._send(target, 0.02)
    os.close(dead.fd)  # its controller is gone
    try:
        assert thinloopctl.main(["-o", "json", "datastore", "holders", "--data-dir", str(data)]) == thinloopctl.EXIT_FOUND
        doc = json.loads(capsys.readouterr().out)
        rows = {r["request_id"]: r for r in doc["freeze_requests"]}
        assert rows[live.request_id]["state"] == "waiting" and rows[live.request_id]["note"] == ""
        assert rows[live.request_id]["controller"].endswith("(holds it)")
        assert rows[dead.request_id]["controller"].endswith("(gone)") and "no controller" in rows[dead.request_id]["note"]
        assert thinloopctl.main(["datastore", "holders", "--data-dir", str(data)]) == thinloopctl.EXIT_FOUND
        assert "FREEZE REQUESTS" in capsys.readouterr().out
        swept = freeze.sweep(Datastore.open("ds1", data))
        assert swept == [f"removed freeze request {dead.request_id} to node a: its controller is gone"]
        assert freeze_files(data) == [f"freeze/a/{live.request_id}.request"]
    finally:
        live.withdraw()


def test_the_freeze_metrics(attached: dict[str, SharedRig], data: Path) -> None:
    from csi_driver.serving.metrics import Metrics
    ctl, a = attached["ctl"], attached["a"]
    snapshot(ctl, "s1", "v1")
    wait_until(lambda: freeze_files(data) == [])
    samples = {(s.name, s.labels.get("outcome") or s.labels.get("reason") or ""): s.value
               for family in Metrics.for_driver(a.driver).registry.collect() for s in family.samples
               if s.name.startswith("thinloop_datastore_")}
    assert samples[("thinloop_datastore_freeze_requests_total", "frozen")] == 1
    assert samples[("thinloop_datastore_freeze_requests_total", "refused")] == 0
    assert samples[("thinloop_datastore_auto_thaws_total", "hold_expired")] == 0
    assert samples[("thinloop_datastore_frozen_volumes", "")] == 0


def test_unknown_volume_and_settings(rigs: dict[str, SharedRig]) -> None:
    from csi_driver.serving.flags import SettingsError, parse_settings
    with pytest.raises(NotFound):
        snapshot(rigs["ctl"], "s1", "ghost")
    s = parse_settings(["--node-id", "n", "--datastore", "d", "--freeze-poll-seconds", "0.2",
                        "--freeze-hold-seconds", "30"], {})
    assert (s.freeze_poll_seconds, s.freeze_hold_seconds) == (0.2, 30)
    for argv in (["--freeze-poll-seconds", "0"], ["--freeze-hold-seconds", "0.5"], ["--freeze-hold-seconds", "x"]):
        with pytest.raises(SettingsError, match=argv[0]):
            parse_settings(["--node-id", "n", *argv], {})


def test_fake_os_sync_is_recorded() -> None:
    fake = FakeOS()
    fake.sync_device("/dev/loop3")
    assert fake.calls == [("sync", "/dev/loop3")]


def test_a_thaw_that_fails_is_tried_again_and_holds_the_volume_until_it_works(
        attached: dict[str, SharedRig], data: Path) -> None:
    """fsfreeze --unfreeze failing does not drop the held entry: the filesystem is still
    frozen, so the volume's in-flight key stays taken (NodeUnstage waits), the ack stays
    (the controller and `datastore holders` see it held) and every poll tries again."""
    from csi_driver.errors import Aborted
    from csi_driver.host.runner import CommandError
    ctl, a = attached["ctl"], attached["a"]
    server = a.driver.freezer
    assert server is not None and ctl.driver.volumes is not None and ctl.driver.volumes.freezes is not None
    ctl.driver.volumes.freezes.ack_grace = 0.2
    broken = threading.Event()
    broken.set()
    tries: list[str] = []
    thaw = a.os.thaw

    def failing_thaw(mount_point: str) -> None:
        tries.append(mount_point)
        if broken.is_set():
            raise CommandError(["fsfreeze", "--unfreeze", mount_point], 1, "injected")
        thaw(mount_point)

    a.os.thaw = failing_thaw  # type: ignore[method-assign]
    assert snapshot(ctl, "s1", "v1").ready_to_use  # the copy was made frozen: it stands
    wait_until(lambda: len(tries) >= 3)
    assert a.os.frozen == {a.staging("v1")} and list(server.held)
    assert any(f.endswith(".ack") for f in freeze_files(data))
    with pytest.raises(Aborted), a.driver.inflight.hold("vol:v1"):
        pass
    broken.clear()
    wait_until(lambda: not server.held and freeze_files(data) == [])
    assert a.os.frozen == set()
    with a.driver.inflight.hold("vol:v1"):
        pass


def test_the_volume_stays_held_when_the_node_fails_after_it_froze(
        attached: dict[str, SharedRig], data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after the freeze (here right after the ack is written) must not let go of
    the volume's in-flight key while the filesystem is frozen: the held entry owns it."""
    from csi_driver.errors import Aborted
    ctl, a = attached["ctl"], attached["a"]
    monkeypatch.setattr(freeze.failpoints, "_ACTIVE", {"freeze.node.after_ack": "error"})

    def key_taken(_src: Path) -> bool:
        try:
            with a.driver.inflight.hold("vol:v1"):
                return False
        except Aborted:
            return True

    seen = watch_copies(ctl, key_taken)
    assert snapshot(ctl, "s1", "v1").ready_to_use
    assert seen == [True]
    wait_until(lambda: a.driver.freezer is not None and not a.driver.freezer.held and freeze_files(data) == [])
    assert a.os.frozen == set()


def test_a_request_the_node_cannot_read_is_refused_and_the_others_are_served(
        attached: dict[str, SharedRig], data: Path) -> None:
    """A malformed request (sorted before v1's) gets a lasting refusal; it neither stops the
    poll nor comes back at the next one."""
    from csi_driver.volumes.datastore import imagelock
    ctl = attached["ctl"]
    where = data / "freeze" / "a"
    where.mkdir(parents=True, exist_ok=True)
    bad = where / "a0@bad.request"
    bad.write_text("{not json")
    fd = os.open(bad, os.O_RDWR | os.O_CLOEXEC)  # held, as a live controller holds its request
    try:
        assert imagelock.try_lock(fd, exclusive=True)
        assert snapshot(ctl, "s1", "v1").ready_to_use
        wait_until(lambda: (where / "a0@bad.ack").exists())
        ack = json.loads((where / "a0@bad.ack").read_text())
        assert ack["state"] == "refused" and ack["lasting"] is True
    finally:
        os.close(fd)
    bad.unlink()
    wait_until(lambda: freeze_files(data) == [])


def test_a_datastore_hiccup_after_the_node_check_leaves_no_request(
        attached: dict[str, SharedRig], data: Path) -> None:
    """The node's record is read once, before any request is written: a read of it failing
    later cannot leave a request (and a frozen filesystem) behind a failed call."""
    ctl, a = attached["ctl"], attached["a"]
    nodes = ctl.driver.datastore.nodes if ctl.driver.datastore is not None else None
    assert nodes is not None
    get = nodes.get
    calls: list[str] = []

    def flaky_get(node_id: str) -> Any:
        calls.append(node_id)
        if len(calls) > 1:
            raise OSError(5, "injected EIO")
        return get(node_id)

    nodes.get = flaky_get  # type: ignore[method-assign]
    assert snapshot(ctl, "s1", "v1").ready_to_use
    assert calls == ["a"]
    wait_until(lambda: a.driver.freezer is not None and not a.driver.freezer.held and freeze_files(data) == [])
    assert a.os.frozen == set()
