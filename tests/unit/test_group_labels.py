"""The VolumeGroupSnapshotContent labeller (csi_driver.ops.grouplabels) against a fake of its
own API wrapper, over data dirs the driver itself filled (the fake OS layer's driver):
which contents a node labels, split groups, conflicts with another node, watch expiry,
backoff, signals, and that the data dir is only read."""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_driver.errors import FailedPrecondition
from csi_driver.ops import ctl
from csi_driver.ops.grouplabels import (
    MANAGED_BY,
    ApiError,
    Labeller,
    NodeData,
    Terminated,
    check_settings,
    claim,
)
from tests.unit.test_group_snapshots import GroupRig

DRIVER = "thinloop.csi.io"
Obj = dict[str, Any]
Event = tuple[str, Obj]
Step = Event | ApiError | Callable[[], Event | None]
"""A watch step: an event to send, an error to raise, or something to do first (whose
result, when not None, is sent)."""


def content(name: str, *, volumes: list[str] | None = None, group: str = "", snapshots: list[str] | None = None,
            driver: str = DRIVER, labels: dict[str, str] | None = None) -> Obj:
    """A VolumeGroupSnapshotContent as the API server sends it (dynamic when `volumes`)."""
    source: Obj = ({"volumeHandles": volumes} if volumes is not None else
                   {"groupSnapshotHandles": {"volumeGroupSnapshotHandle": group,
                                             "volumeSnapshotHandles": snapshots or []}})
    meta: Obj = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshotContent",
            "metadata": meta,
            "spec": {"driver": driver, "deletionPolicy": "Delete", "source": source,
                     "volumeGroupSnapshotRef": {"kind": "VolumeGroupSnapshot", "name": "g", "namespace": "ns"}}}


class FakeContents:
    """The API server's VolumeGroupSnapshotContents, as GroupContents sees them: objects
    with resourceVersions that change on every write, a list that shows the unlabelled
    ones, a watch that replays scripted steps, and a patch refused (409) at a stale
    version. When the last scripted watch ends, `stop` is set."""

    def __init__(self) -> None:
        self.objects: dict[str, Obj] = {}
        self.version = 100
        self.lists = 0
        self.watched_from: list[str] = []
        self.patches: list[tuple[str, str, str]] = []
        """(name, resourceVersion sent, value) of every patch that landed."""
        self.refused: list[tuple[str, int]] = []
        self.list_errors: list[ApiError] = []
        self.watches: list[list[Step]] = []
        self.before_label: Callable[[str], None] | None = None
        self.stop: Callable[[], None] = lambda: None

    def put(self, obj: Obj) -> Obj:
        self.version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[obj["metadata"]["name"]] = obj
        return copy.deepcopy(obj)

    def list(self) -> tuple[list[Obj], str]:
        if self.list_errors:
            raise self.list_errors.pop(0)
        self.lists += 1
        items = [copy.deepcopy(o) for o in self.objects.values() if MANAGED_BY not in o["metadata"].get("labels", {})]
        return items, str(self.version)

    def watch(self, resource_version: str) -> Iterator[tuple[str, Obj]]:
        self.watched_from.append(resource_version)
        steps = self.watches.pop(0) if self.watches else []
        for step in steps:
            if isinstance(step, ApiError):
                raise step
            event = step() if callable(step) else step
            if event is not None:
                yield event
        if not self.watches:
            self.stop()

    def label(self, name: str, resource_version: str, key: str, value: str) -> None:
        if self.before_label is not None:
            self.before_label(name)
        obj = self.objects.get(name)
        if obj is None:
            self.refused.append((name, 404))
            raise ApiError(404, f"{name} not found")
        if obj["metadata"]["resourceVersion"] != resource_version:
            self.refused.append((name, 409))
            raise ApiError(409, f"the object has been modified; resourceVersion {resource_version} is stale")
        obj["metadata"].setdefault("labels", {})[key] = value
        self.put(obj)
        self.patches.append((name, resource_version, value))

    def label_of(self, name: str) -> str | None:
        return self.objects[name]["metadata"].get("labels", {}).get(MANAGED_BY)


def make_node(root: Path, *volumes: str) -> GroupRig:
    root.mkdir()
    rig = GroupRig(root)
    for v in volumes:
        rig.create(v)
    return rig


@pytest.fixture
def node_a(tmp_path: Path) -> GroupRig:
    """A node whose driver made volumes vol-a, vol-c and a group of both (group-1)."""
    rig = make_node(tmp_path / "a", "vol-a", "vol-c")
    rig.cut("group-1", "vol-c", "vol-a")
    return rig


@pytest.fixture
def node_b(tmp_path: Path) -> GroupRig:
    """Another node, holding vol-b and vol-d."""
    return make_node(tmp_path / "b", "vol-b", "vol-d")


def labeller(api: FakeContents, rig: GroupRig, node: str, pauses: list[float] | None = None) -> Labeller:
    lab = Labeller(api, node, DRIVER, NodeData(rig.data),
                   pause=(pauses.append if pauses is not None else None))
    api.stop = lab.stop.set
    return lab


# -- which contents -----------------------------------------------------------------------------


def test_labels_only_its_drivers_unlabelled_local_contents(node_a: GroupRig, node_b: GroupRig,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    api = FakeContents()
    api.put(content("mine", volumes=["vol-c", "vol-a"]))
    api.put(content("other-driver", volumes=["vol-a"], driver="other.csi.io"))
    api.put(content("taken", volumes=["vol-a"], labels={MANAGED_BY: "node-z"}))
    api.put(content("elsewhere", volumes=["vol-b", "vol-d"]))
    api.put(content("nowhere", volumes=["vol-zzz"]))
    api.put(content("bad-handle", volumes=["../a/volumes/vol-a", "vol-a/../vol-a"]))
    caplog.set_level(logging.INFO, "thinloop.grouplabels")
    done = labeller(api, node_a, "node-a").sweep()
    assert [d.name for d in done] == ["mine"]
    assert "vol-a, vol-c are all here" in done[0].reason
    assert api.patches == [("mine", "101", "node-a")]
    assert api.label_of("taken") == "node-z" and api.label_of("other-driver") is None
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("labelled")] == [
        f"labelled VolumeGroupSnapshotContent mine {MANAGED_BY}=node-a: its volume(s) vol-a, vol-c are all here"]
    # The other node takes its own and leaves the first node's alone.
    assert [d.name for d in labeller(api, node_b, "node-b").sweep()] == ["elsewhere"]
    assert api.label_of("mine") == "node-a" and api.label_of("elsewhere") == "node-b"


def test_a_split_group_goes_to_the_node_of_its_first_volume_whose_driver_refuses_it(
        node_a: GroupRig, node_b: GroupRig) -> None:
    """vol-a (node a) sorts before vol-b and vol-d (node b): node a labels it, node b does
    not, and node a's driver answers FAILED_PRECONDITION naming vol-b and vol-d, the error
    csi-snapshotter writes into the group's status. Reversed, node b takes it."""
    api = FakeContents()
    api.put(content("split", volumes=["vol-d", "vol-b", "vol-a"]))
    assert labeller(api, node_b, "node-b").sweep() == []
    done = labeller(api, node_a, "node-a").sweep()
    assert [(d.name, d.node) for d in done] == [("split", "node-a")]
    assert "holds vol-a, the first of the group's volumes by id, but not vol-b, vol-d" in done[0].reason
    with pytest.raises(FailedPrecondition, match=r"vol-b, vol-d are not on node n1 .* while vol-a are"):
        node_a.cut("groupsnapshot-split", "vol-d", "vol-b", "vol-a")
    api.put(content("split-2", volumes=["vol-c", "vol-b"]))
    assert labeller(api, node_a, "node-a").sweep() == []
    assert [d.name for d in labeller(api, node_b, "node-b").sweep()] == ["split-2"]


def test_pre_provisioned_contents_go_to_the_node_with_the_record_or_first_snapshot(
        node_a: GroupRig, node_b: GroupRig) -> None:
    group = node_a.get("group-1")
    snaps = [s.snapshot_id for s in group.snapshots]
    assert sorted(snaps) == ["group-1-vol-a", "group-1-vol-c"]
    api = FakeContents()
    api.put(content("static", group="group-1", snapshots=snaps))
    api.put(content("no-record", group="group-gone", snapshots=list(reversed(snaps))))
    api.put(content("unknown", group="group-x", snapshots=["snap-x"]))
    assert labeller(api, node_b, "node-b").sweep() == []
    done = {d.name: d.reason for d in labeller(api, node_a, "node-a").sweep()}
    assert done == {"static": "the record of volume group snapshot group-1 is here",
                    "no-record": "it holds snapshot group-1-vol-a, the first of the group's snapshots by id "
                                 "(the record of group group-gone is not here)"}
    assert api.label_of("unknown") is None


def test_the_data_dir_is_only_read(node_a: GroupRig, tmp_path: Path) -> None:
    """Every file-system event the labeller causes while judging contents, as Python's
    audit hooks report them (PEP 578): none writes, creates, renames or removes; and a
    data dir without volumes/ is left without it."""
    events: list[tuple[str, tuple[Any, ...]]] = []
    active = [False]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if active[0] and (event == "open" or event.startswith(("os.", "shutil."))):
            events.append((event, args))

    sys.addaudithook(hook)  # cannot be removed: inert outside `active`
    active[0] = True
    (tmp_path / "probe").write_text("the hook sees writes")
    active[0] = False
    assert any("probe" in str(args) for _, args in events), events
    events.clear()
    bare = tmp_path / "bare"
    bare.mkdir()
    api = FakeContents()
    api.put(content("mine", volumes=["vol-a", "vol-c"]))
    api.put(content("static", group="group-1", snapshots=["group-1-vol-a"]))
    api.put(content("pre", group="group-x", snapshots=["group-1-vol-c"]))
    api.put(content("elsewhere", volumes=["vol-b"]))
    active[0] = True
    try:
        done = labeller(api, node_a, "node-a").sweep()
        assert [claim(c, DRIVER, NodeData(bare)) for c in api.objects.values()] == [None] * 4
    finally:
        active[0] = False
    assert sorted(d.name for d in done) == ["mine", "pre", "static"]
    writes = [(e, a) for e, a in events
              if e != "open" or (len(a) > 2 and isinstance(a[2], int) and a[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))]
    assert writes == []
    assert os.listdir(bare) == []


def test_settings_are_checked(tmp_path: Path) -> None:
    check_settings("node-1", DRIVER, tmp_path)
    for node, driver, data, message in (
            ("", DRIVER, tmp_path, "no node name: set NODE_NAME"),
            ("x" * 64, DRIVER, tmp_path, "cannot be a label value"),
            ("node 1", DRIVER, tmp_path, "cannot be a label value"),
            ("node-1", "", tmp_path, "no driver name"),
            ("node-1", DRIVER, tmp_path / "missing", "is not a directory")):
        with pytest.raises(ValueError, match=message):
            check_settings(node, driver, data)


# -- conflicts ---------------------------------------------------------------------------------


def test_a_label_another_node_set_first_is_a_conflict_and_not_an_error(
        node_a: GroupRig, caplog: pytest.LogCaptureFixture) -> None:
    """Between this node's list and its patch another writer labels the content: the patch,
    made at the listed resourceVersion, is refused with 409, the other label stays, nothing
    is raised, and the change that arrives through the watch is judged and left alone."""
    api = FakeContents()
    listed = api.put(content("race", volumes=["vol-a"]))

    def other_node_first(name: str) -> None:
        api.before_label = None
        obj = copy.deepcopy(api.objects[name])
        obj["metadata"]["labels"] = {MANAGED_BY: "node-z"}
        api.watches[0].insert(0, ("MODIFIED", api.put(obj)))

    api.before_label = other_node_first
    api.watches = [[]]
    caplog.set_level(logging.INFO, "thinloop.grouplabels")
    lab = labeller(api, node_a, "node-a")
    lab.run()
    assert api.refused == [("race", 409)]
    assert api.patches == [] and lab.labelled == []
    assert api.label_of("race") == "node-z"
    assert listed["metadata"]["resourceVersion"] == "101"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("changed before it could be labelled" in r.getMessage() for r in caplog.records)


def test_a_content_deleted_before_its_label_is_not_an_error(node_a: GroupRig) -> None:
    api = FakeContents()
    api.put(content("short-lived", volumes=["vol-a"]))
    api.before_label = lambda name: api.objects.pop(name)
    assert labeller(api, node_a, "node-a").sweep() == []
    assert api.refused == [("short-lived", 404)]


# -- the watch ----------------------------------------------------------------------------------


def test_watch_labels_new_contents_and_lists_again_after_410(node_a: GroupRig) -> None:
    """List, watch from the list's version, label what is added; a 410 Gone (the version
    is too old to watch from) makes it list again, which finds the content added while
    nobody watched, and watch from the new list's version."""
    api = FakeContents()
    api.put(content("first", volumes=["vol-a"]))
    gap: list[Obj] = []
    api.watches = [
        [lambda: ("ADDED", api.put(content("added", volumes=["vol-c"]))),
         lambda: ("ADDED", api.put(content("not-mine", volumes=["vol-b"]))),
         lambda: ("BOOKMARK", {"metadata": {"resourceVersion": str(api.version)}}),
         lambda: gap.append(api.put(content("in-the-gap", volumes=["vol-a", "vol-c"]))),
         ApiError(410, "too old resource version: 105 (106)")],
        [],
    ]
    lab = labeller(api, node_a, "node-a")
    lab.run()
    assert [d.name for d in lab.labelled] == ["first", "added", "in-the-gap"]
    assert api.lists == 2
    # first@101 is listed; added@103, not-mine@105, in-the-gap@106; the second list is at 106.
    assert gap[0]["metadata"]["resourceVersion"] == "106"
    assert api.watched_from == ["101", "106"]
    assert {n: api.label_of(n) for n in api.objects} == {
        "first": "node-a", "added": "node-a", "not-mine": None, "in-the-gap": "node-a"}


def test_watch_resumes_from_the_last_version_after_the_server_closes_it(node_a: GroupRig) -> None:
    api = FakeContents()
    api.watches = [[lambda: ("ADDED", api.put(content("one", volumes=["vol-a"])))], []]
    lab = labeller(api, node_a, "node-a")
    lab.run()
    assert api.lists == 1
    # The second watch starts where the first left off: after "one" (and its label).
    assert api.watched_from == ["100", "101"]
    assert [d.name for d in lab.labelled] == ["one"]


def test_api_errors_back_off_and_the_content_is_not_forgotten(
        node_a: GroupRig, caplog: pytest.LogCaptureFixture) -> None:
    """The API fails twice before the first list: pauses of 1-2 s, then 2-3 s (exponential
    with jitter). A patch that fails with 500 lists again after a pause, so the content is
    labelled then."""
    api = FakeContents()
    api.put(content("flaky", volumes=["vol-a"]))
    api.list_errors = [ApiError(0, "connection refused"), ApiError(404, "the server could not find the resource")]
    failures = [ApiError(500, "etcdserver: leader changed")]

    def fail_once(name: str) -> None:
        if failures:
            raise failures.pop()

    api.before_label = fail_once
    api.watches = [[]]
    pauses: list[float] = []
    caplog.set_level(logging.INFO, "thinloop.grouplabels")
    lab = labeller(api, node_a, "node-a", pauses)
    lab.run()
    assert len(pauses) == 3
    assert 1 <= pauses[0] <= 2 and 2 <= pauses[1] <= 3 and 4 <= pauses[2] <= 5
    assert api.lists == 2 and [d.name for d in lab.labelled] == ["flaky"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "is the groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshotContent CRD installed?" in warnings[1]
    assert "500: etcdserver: leader changed" in warnings[2]


# -- signals -----------------------------------------------------------------------------------


def test_a_signal_during_a_patch_waits_for_its_answer_and_its_log_line(
        node_a: GroupRig, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeContents()
    api.put(content("last", volumes=["vol-a"]))
    lab = labeller(api, node_a, "node-a")
    api.before_label = lambda name: lab.on_signal(signal.SIGTERM, None)
    caplog.set_level(logging.INFO, "thinloop.grouplabels")
    with pytest.raises(Terminated) as stopped:
        lab.run()
    assert stopped.value.signum == signal.SIGTERM
    assert api.label_of("last") == "node-a" and [d.name for d in lab.labelled] == ["last"]
    assert any(r.getMessage().startswith("labelled VolumeGroupSnapshotContent last") for r in caplog.records)
    assert lab.stop.is_set()


def test_a_signal_while_waiting_stops_at_once(node_a: GroupRig) -> None:
    api = FakeContents()
    api.list_errors = [ApiError(503, "unavailable")]

    def pause(seconds: float) -> None:
        lab.on_signal(signal.SIGINT, None)

    lab = Labeller(api, "node-a", DRIVER, NodeData(node_a.data), pause=pause)
    with pytest.raises(Terminated):
        lab.run()
    assert api.lists == 0


# -- thinloopctl --------------------------------------------------------------------------------


def test_ctl_once_through_the_seam(node_a: GroupRig, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    api = FakeContents()
    api.put(content("mine", volumes=["vol-a"]))
    args = argparse.Namespace(node_name="node-a", driver_name=DRIVER, data_dir=str(node_a.data), kubeconfig="",
                              watch=False, output="json")
    out = ctl.cmd_node_label_group_snapshots(args, api=api)
    assert out.code == 0
    assert out.value == [{"content": "mine", "node": "node-a", "reason": "its volume(s) vol-a are all here"}]
    args.output = "table"
    again = ctl.cmd_node_label_group_snapshots(args, api=api)
    assert again.value.startswith("nothing to label")


def test_ctl_watch_ends_cleanly_on_sigterm(node_a: GroupRig) -> None:
    """The command's own signal handler: SIGTERM (sent to this process) while the watch
    waits ends it with exit status 0 and a summary, and the handlers are put back."""
    import argparse
    api = FakeContents()
    api.put(content("mine", volumes=["vol-a"]))
    api.watches = [[lambda: os.kill(os.getpid(), signal.SIGTERM)], []]
    before = signal.getsignal(signal.SIGTERM)
    args = argparse.Namespace(node_name="node-a", driver_name=DRIVER, data_dir=str(node_a.data), kubeconfig="",
                              watch=True, output="json")
    out = ctl.cmd_node_label_group_snapshots(args, api=api)
    assert out.code == 0
    assert out.value == {"labelled": [{"content": "mine", "node": "node-a",
                                       "reason": "its volume(s) vol-a are all here"}], "stopped_by": "SIGTERM"}
    assert signal.getsignal(signal.SIGTERM) is before


def test_it_imports_nothing_of_the_csi_faces_or_the_server() -> None:
    """The labeller sits beside the driver, over the store's layout only."""
    import subprocess
    code = ("import sys, csi_driver.ops.grouplabels; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('csi_driver.'))))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    beyond = ("csi_driver.csi", "csi_driver.serving", "csi_driver.volumes.lifecycle", "csi_driver.volumes.snapshots",
              "csi_driver.volumes.groupsnapshots", "csi_driver.host.linux", "csi_driver.host.syscalls",
              "csi_driver.proto")
    assert not {m for m in loaded if m.startswith(beyond)}, loaded
    assert "csi_driver.volumes.store" in loaded and "csi_driver.volumes.grouprecords" in loaded


def test_a_server_that_ends_every_watch_at_once_is_not_asked_in_a_tight_loop(
        node_a: GroupRig, caplog: pytest.LogCaptureFixture) -> None:
    """Watches that end at once with no event (an API server or proxy closing them) are
    paused after, 1, 2, 4 ... s, as failures are; a watch that brings an event resets it."""
    api = FakeContents()
    api.watches = [[], [], [], [lambda: ("ADDED", api.put(content("one", volumes=["vol-a"])))], [], []]
    pauses: list[float] = []
    lab = labeller(api, node_a, "node-a", pauses)
    lab.run()
    assert pauses == [1.0, 2.0, 4.0, 1.0]  # the last watch ends it: stop is set, no pause
    assert [d.name for d in lab.labelled] == ["one"]
    assert "the watch ended at once with no event (1 in a row)" in caplog.text
