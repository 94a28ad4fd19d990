"""components/no-group-snapshots: the deploy for a cluster without the
groupsnapshot.storage.k8s.io v1 CRDs.

There csi-snapshotter with --feature-gates=CSIVolumeGroupSnapshot=true starts no
controller at all (single snapshots included) and the VolumeGroupSnapshotClass
cannot be applied, so the component takes out the gate, the labeller sidecar
and its role, csi-snapshotter's group rules and the class, and nothing else:
what Helm's groupSnapshots.enabled=false renders. The same component serves the
shared-datastore overlays (tests/deploy/test_shared.py checks those).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .manifests import KUSTOMIZE_DIR, Obj, containers, find, kustomize_with, render_chart
from .test_consistency import LABELLER
from .test_helm import normalise
from .test_rbac import LABELLER_ROLE, REQUIRED, check, without_group_snapshots

COMPONENT = KUSTOMIZE_DIR / "components" / "no-group-snapshots"
GATE = "--feature-gates=CSIVolumeGroupSnapshot=true"
GROUP_API = "groupsnapshot.storage.k8s.io"
NODE = ("DaemonSet", "thinloop-node")
SNAPSHOTTER_ROLE = ("ClusterRole", "thinloop-external-snapshotter")
# What the component removes whole.
GONE = {("VolumeGroupSnapshotClass", "thinloop-groupsnapclass"), ("ClusterRole", LABELLER_ROLE),
        ("ClusterRoleBinding", LABELLER_ROLE)}


def names(objs: list[Obj]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objs}


def check_no_group_snapshots(objs: list[Obj]) -> None:
    """No trace of group snapshots anywhere in OBJS."""
    assert not [o for o in objs if o["kind"] == "VolumeGroupSnapshotClass"]
    text = yaml.safe_dump_all(objs)
    assert GROUP_API not in text and "CSIVolumeGroupSnapshot" not in text
    for workload in (o for o in objs if o["kind"] in {"DaemonSet", "Deployment"}):
        assert LABELLER not in containers(workload), workload["metadata"]["name"]


def check_only_group_snapshots_removed(full: list[Obj], off: list[Obj], workload: tuple[str, str],
                                       role: tuple[str, str], gone: set[tuple[str, str]]) -> None:
    """OFF is FULL less GONE, less the gate and the labeller in WORKLOAD, and less the group
    rules of ROLE; every other object, container and argument is as it was."""
    assert names(off) == names(full) - gone
    assert gone <= names(full)
    for obj in off:
        key = (obj["kind"], obj["metadata"]["name"])
        before = find(full, *key)
        if key == workload:
            was, now = containers(before), containers(obj)
            assert list(now) == [n for n in was if n != LABELLER]
            for name, c in now.items():
                want = copy.deepcopy(was[name])
                if "args" in want:
                    want["args"] = [a for a in want["args"] if a != GATE]
                assert c == want, name
            assert GATE in was["csi-snapshotter"]["args"]
            # Nothing else in the pod or the workload changed.
            strip = copy.deepcopy(obj), copy.deepcopy(before)
            for o in strip:
                del o["spec"]["template"]["spec"]["containers"]
            assert strip[0] == strip[1]
        elif key == role:
            assert obj["rules"] == [r for r in before["rules"] if GROUP_API not in r["apiGroups"]]
            assert len(obj["rules"]) == len(before["rules"]) - 3
            assert {k: v for k, v in obj.items() if k != "rules"} == \
                {k: v for k, v in before.items() if k != "rules"}
        else:
            assert obj == before, key


@pytest.fixture(scope="module")
def off(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    return kustomize_with(tmp_path_factory.mktemp("off"), KUSTOMIZE_DIR, [COMPONENT])


def test_removes_group_snapshots(off: list[Obj]) -> None:
    check_no_group_snapshots(off)


def test_removes_nothing_else(base: list[Obj], off: list[Obj]) -> None:
    check_only_group_snapshots_removed(base, off, NODE, SNAPSHOTTER_ROLE, GONE)


def test_rbac_without_group_snapshots(off: list[Obj]) -> None:
    """csi-snapshotter keeps exactly its single-snapshot rules."""
    check(off, without_group_snapshots(REQUIRED))


def test_same_as_helm_switched_off(off: list[Obj]) -> None:
    want = normalise([o for o in off if o["kind"] != "Namespace"])
    got = normalise(render_chart({"groupSnapshots": {"enabled": False}}))
    assert sorted(got) == sorted(want)
    for key, obj in want.items():
        assert got[key] == obj, f"{key} differs:\n{yaml.safe_dump(got[key])}\nvs\n{yaml.safe_dump(obj)}"


def test_works_on_an_overlay(tmp_path: Path) -> None:
    overlay = KUSTOMIZE_DIR / "overlays" / "microk8s"
    objs = kustomize_with(tmp_path, overlay, [COMPONENT])
    check_no_group_snapshots(objs)
    full = kustomize_with(tmp_path, overlay, [])
    check_only_group_snapshots_removed(full, objs, NODE, SNAPSHOTTER_ROLE, GONE)


RULE_BEFORE_GROUP_RULES = (
    '  - apiGroups: ["groupsnapshot.storage.k8s.io"]\n    resources: ["volumegroupsnapshotclasses"]',
    '  - apiGroups: [""]\n    resources: ["nodes"]\n    verbs: ["get"]\n'
    '  - apiGroups: ["groupsnapshot.storage.k8s.io"]\n    resources: ["volumegroupsnapshotclasses"]',
)


@pytest.mark.parametrize(("render", "path", "old", "new"), [
    # An argument added before the gate: its position now holds that one.
    (".", "base/node.yaml", "            - --node-deployment=true\n            - --timeout=120s\n",
     "            - --node-deployment=true\n            - --timeout=120s\n            - --retry-interval-max=5m\n"),
    # A rule added before the group rules.
    (".", "base/rbac-node.yaml", *RULE_BEFORE_GROUP_RULES),
    # The same in shared mode.
    ("overlays/shared-datastore", "shared/controller.yaml",
     "            # A snapshot is a copy of the image on the datastore.\n",
     "            - --retry-interval-max=5m\n"),
    ("overlays/shared-datastore", "shared/rbac-controller.yaml", *RULE_BEFORE_GROUP_RULES),
], ids=["argument-before-the-gate", "rule-before-the-group-rules",
        "shared-argument-before-the-gate", "shared-rule-before-the-group-rules"])
def test_a_layout_change_stops_the_render(tmp_path: Path, render: str, path: str, old: str, new: str) -> None:
    """The JSON patches' test ops refuse to remove from a position that holds something else."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE_DIR, tree)
    target = tree / path
    text = target.read_text()
    assert text.count(old) == 1
    target.write_text(text.replace(old, new))
    kustomize_with(tmp_path, tree / render, [])  # renders without the component
    with pytest.raises(subprocess.CalledProcessError) as failed:
        kustomize_with(tmp_path, tree / render, [tree / "components" / "no-group-snapshots"])
    assert "test failed" in failed.value.stderr
