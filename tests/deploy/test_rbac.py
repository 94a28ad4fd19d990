"""Each sidecar's ServiceAccount is granted what the sidecar needs, and no more.

The required rules are those of each sidecar's published RBAC
(deploy/kubernetes/rbac.yaml of external-provisioner v6.3.0 and
external-resizer v2.2.1, deploy/kubernetes/csi-snapshotter/ of
external-snapshotter v8.6.0), adjusted to how thinloop runs them:
- provisioner and snapshotter run with --node-deployment, which does no
  leader election: no leases;
- --capacity-ownerref-level=1 reads only the pod (no replicasets);
- csi-snapshotter runs with --feature-gates=CSIVolumeGroupSnapshot=true, so it
  has the groupsnapshot.storage.k8s.io rules of that RBAC.
group-snapshot-labeller (thinloopctl node label-group-snapshots --watch,
csi_driver/ops/grouplabels.py) lists, watches and patches VolumeGroupSnapshotContents;
those verbs are also csi-snapshotter's on the same ServiceAccount, so its own
ClusterRole is checked by name as well.
node-driver-registrar and livenessprobe use no API at all.
"""

from __future__ import annotations

from collections import defaultdict

from .manifests import NAMESPACE, Obj, containers, find, render_chart

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)
Scope = str  # "cluster" or "namespace"

WATCH = ("get", "list", "watch")
EVENTS = ("list", "watch", "create", "update", "patch")
LEASES = ("get", "list", "watch", "create", "update", "delete")


def rules(group: str, resource: str, verbs: tuple[str, ...] | list[str]) -> set[Rule]:
    return {(group, resource, v) for v in verbs}


# csi-snapshotter's rules for volume group snapshots (--feature-gates=CSIVolumeGroupSnapshot=true):
# in both modes, and in neither with group snapshots off (Helm groupSnapshots.enabled=false,
# components/no-group-snapshots).
SNAPSHOTTER_GROUP_RULES: set[Rule] = (
    rules("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", WATCH)
    | rules("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", ("get", "list", "watch", "update", "patch"))
    | rules("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", ("update", "patch"))
)

REQUIRED: dict[str, dict[Scope, set[Rule]]] = {
    "csi-provisioner": {
        "cluster": (
            rules("", "persistentvolumes", ("get", "list", "watch", "create", "patch", "delete"))
            | rules("", "persistentvolumeclaims", ("get", "list", "watch", "update"))
            | rules("storage.k8s.io", "storageclasses", WATCH)
            | rules("", "events", EVENTS)
            | rules("snapshot.storage.k8s.io", "volumesnapshots", ("get", "list", "watch", "update"))
            | rules("snapshot.storage.k8s.io", "volumesnapshotcontents", ("get", "list"))
            | rules("storage.k8s.io", "csinodes", WATCH)
            | rules("", "nodes", WATCH)
            | rules("storage.k8s.io", "volumeattachments", WATCH)
            | rules("storage.k8s.io", "volumeattributesclasses", ("get",))
        ),
        "namespace": (
            rules("storage.k8s.io", "csistoragecapacities",
                  ("get", "list", "watch", "create", "update", "patch", "delete"))
            | rules("", "pods", ("get",))
        ),
    },
    "csi-snapshotter": {
        "cluster": (
            rules("", "events", EVENTS)
            | rules("snapshot.storage.k8s.io", "volumesnapshotclasses", WATCH)
            | rules("snapshot.storage.k8s.io", "volumesnapshotcontents", ("get", "list", "watch", "update", "patch"))
            | rules("snapshot.storage.k8s.io", "volumesnapshotcontents/status", ("update", "patch"))
            | SNAPSHOTTER_GROUP_RULES
        ),
        "namespace": set(),
    },
    "csi-resizer": {
        "cluster": (
            rules("", "persistentvolumes", ("get", "list", "watch", "patch"))
            | rules("", "persistentvolumeclaims", WATCH)
            | rules("", "pods", WATCH)
            | rules("", "persistentvolumeclaims/status", ("patch",))
            | rules("", "events", EVENTS)
            | rules("storage.k8s.io", "volumeattributesclasses", WATCH)
        ),
        "namespace": rules("coordination.k8s.io", "leases", LEASES),
    },
    "group-snapshot-labeller": {
        "cluster": rules("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", ("list", "watch", "patch")),
        "namespace": set(),
    },
    "node-driver-registrar": {"cluster": set(), "namespace": set()},
    "liveness-probe": {"cluster": set(), "namespace": set()},
}
LABELLER_ROLE = "thinloop-group-snapshot-labeller"


def without_group_snapshots(required: dict[str, dict[Scope, set[Rule]]]) -> dict[str, dict[Scope, set[Rule]]]:
    """REQUIRED as it is with group snapshots off: no labeller, and csi-snapshotter without its
    groupsnapshot.storage.k8s.io rules."""
    out = {name: dict(scopes) for name, scopes in required.items() if name != "group-snapshot-labeller"}
    out["csi-snapshotter"]["cluster"] = required["csi-snapshotter"]["cluster"] - SNAPSHOTTER_GROUP_RULES
    return out


def expand_rule(rule: Obj) -> set[Rule]:
    return {(g, r, v) for g in rule.get("apiGroups", [""]) for r in rule["resources"] for v in rule["verbs"]}


def granted(objs: list[Obj], sa: str) -> dict[Scope, set[Rule]]:
    """Everything bound to ServiceAccount SA in NAMESPACE, split by scope."""
    out: dict[Scope, set[Rule]] = defaultdict(set)
    for binding in objs:
        if binding["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace") == NAMESPACE
                   for s in binding["subjects"]):
            continue
        ref = binding["roleRef"]
        role = find(objs, ref["kind"], ref["name"])
        if binding["kind"] == "RoleBinding":
            assert binding["metadata"]["namespace"] == NAMESPACE
            scope = "namespace"
        else:
            scope = "cluster"
        if ref["kind"] == "Role":
            assert role["metadata"]["namespace"] == NAMESPACE
        for rule in role["rules"]:
            out[scope] |= expand_rule(rule)
    return out


def sidecar_accounts(objs: list[Obj]) -> dict[str, str]:
    """Sidecar container name -> ServiceAccount of its pod."""
    out = {}
    for obj in objs:
        if obj["kind"] in {"DaemonSet", "Deployment"}:
            sa = obj["spec"]["template"]["spec"]["serviceAccountName"]
            for name in containers(obj):
                if name != "thinloop":
                    out[name] = sa
    return out


def check(objs: list[Obj], required: dict[str, dict[Scope, set[Rule]]] = REQUIRED) -> None:
    accounts = sidecar_accounts(objs)
    assert set(accounts) == set(required)
    need_by_sa: dict[str, dict[Scope, set[Rule]]] = defaultdict(lambda: defaultdict(set))
    for sidecar, sa in accounts.items():
        have = granted(objs, sa)
        for scope in ("cluster", "namespace"):
            missing = required[sidecar][scope] - have[scope]
            assert not missing, f"{sidecar} ({sa}) lacks {scope} rules {sorted(missing)}"
            need_by_sa[sa][scope] |= required[sidecar][scope]
    # Least privilege: an account holds only what its sidecars need.
    for sa, need in need_by_sa.items():
        have = granted(objs, sa)
        for scope in ("cluster", "namespace"):
            extra = have[scope] - need[scope]
            assert not extra, f"{sa} has {scope} rules no sidecar needs: {sorted(extra)}"


def test_rbac_kustomize(base: list[Obj]) -> None:
    check(base)


def test_rbac_helm(chart: list[Obj]) -> None:
    check(chart)


def test_rbac_helm_without_group_snapshots() -> None:
    """groupSnapshots.enabled=false takes the group rules and the labeller's role with it."""
    check(render_chart({"groupSnapshots": {"enabled": False}}), without_group_snapshots(REQUIRED))


def test_no_wildcards(base: list[Obj], chart: list[Obj]) -> None:
    for obj in base + chart:
        for rule in obj.get("rules", []) if obj["kind"] in {"Role", "ClusterRole"} else []:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), (obj["metadata"]["name"], rule)
            assert "resourceNames" not in rule or rule["resourceNames"]


def test_no_attacher(base: list[Obj]) -> None:
    text = repr(base)
    assert "csi-attacher" not in text and "external-attacher" not in text


def test_check_catches_a_missing_verb(base: list[Obj]) -> None:
    import copy

    import pytest

    broken = copy.deepcopy(base)
    role = find(broken, "Role", "thinloop-external-provisioner-cfg")
    role["rules"][0]["verbs"].remove("patch")
    with pytest.raises(AssertionError, match="csistoragecapacities"):
        check(broken)
    extra = copy.deepcopy(base)
    find(extra, "ClusterRole", "thinloop-external-resizer")["rules"].append(
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    with pytest.raises(AssertionError, match="no sidecar needs"):
        check(extra)


def test_the_labeller_has_a_role_of_its_own(base: list[Obj], chart: list[Obj]) -> None:
    """Exactly its rules, bound to the node pod's ServiceAccount: it must not lean on
    csi-snapshotter's role, whose rules follow that sidecar's needs."""
    for objs in (base, chart):
        sa = sidecar_accounts(objs)["group-snapshot-labeller"]
        binding = find(objs, "ClusterRoleBinding", LABELLER_ROLE)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": LABELLER_ROLE}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
        role = find(objs, "ClusterRole", LABELLER_ROLE)
        assert set().union(*map(expand_rule, role["rules"])) == REQUIRED["group-snapshot-labeller"]["cluster"]
