"""The shared-datastore deployment: names, paths, flags and rules that must agree.

deploy/kubernetes/shared (objects), components/shared-datastore (settings),
overlays/shared-datastore and overlays/shared-datastore-nfs, and the chart's
sharedDatastore values render one driver, shared.thinloop.csi.io, whose images
live on a shared filesystem mounted at <datastoreMountRoot>/<datastoreName> on
every node (docs/shared-datastore.md). The required RBAC rules are those of
each sidecar's published RBAC: deploy/kubernetes/rbac.yaml of
external-provisioner v6.3.0, external-attacher v4.12.0 and external-resizer
v2.2.1, deploy/kubernetes/csi-snapshotter/rbac-csi-snapshotter.yaml of
external-snapshotter v8.6.0; every sidecar here elects a leader (leases), none
tracks capacity, and csi-snapshotter has volume group snapshots on (their gate,
rules and class), as in node-local mode but with no labeller: it is central.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from csi_driver.serving.flags import FLAGS, parse_settings
from csi_driver.settings import SettingsError

from .manifests import (
    CHART_DIR,
    DATASTORE_TOPOLOGY_KEY,
    EXAMPLES_DIR,
    KUSTOMIZE_DIR,
    NAMESPACE,
    ROOT,
    SHARED_DRIVER_NAME,
    SHARED_OVERLAYS,
    SHARED_VALUES,
    Obj,
    containers,
    find,
    kustomize,
    kustomize_with,
    load_all,
    render_chart,
)
from .test_consistency import SOCKET_IN_POD, expand, flag, host_path_of, images
from .test_helm import normalise
from .test_no_group_snapshots import COMPONENT as NO_GROUP_SNAPSHOTS
from .test_no_group_snapshots import check_no_group_snapshots, check_only_group_snapshots_removed
from .test_rbac import LEASES, SNAPSHOTTER_GROUP_RULES, WATCH, Rule, Scope, expand_rule, granted, rules
from .test_rbac import REQUIRED as NODE_LOCAL_REQUIRED

DEFAULTS = {"name": "datastore1", "root": "/mnt/thinloop", "kubelet": "/var/lib/kubelet"}
OTHER = {"name": "gv0", "root": "/srv/datastores", "kubelet": "/var/lib/k0s/kubelet"}
CONTROLLER = ("Deployment", "thinloop-shared-controller")
NODE = ("DaemonSet", "thinloop-shared-node")
CONTROLLER_SIDECARS = {"csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "liveness-probe"}
NODE_SIDECARS = {"node-driver-registrar", "liveness-probe"}
CLASSES = {
    "thinloop-shared": "thin",
    "thinloop-shared-zeroedthick": "zeroedthick",
    "thinloop-shared-eagerzeroedthick": "eagerzeroedthick",
    "thinloop-shared-retain": "thin",
}
# The flag that turns the driver into shared mode.
SHARED_MODE_FLAGS = {"--datastore"}

REQUIRED: dict[str, set[Rule]] = {
    # The same published rules as in node-local mode, which test_rbac lists
    # (their namespaced part, leases or capacity, follows from the flags).
    "csi-provisioner": NODE_LOCAL_REQUIRED["csi-provisioner"]["cluster"],
    "csi-resizer": NODE_LOCAL_REQUIRED["csi-resizer"]["cluster"],
    "csi-attacher": (
        rules("", "persistentvolumes", ("get", "list", "watch", "patch"))
        | rules("storage.k8s.io", "csinodes", WATCH)
        | rules("storage.k8s.io", "volumeattachments", ("get", "list", "watch", "patch"))
        | rules("storage.k8s.io", "volumeattachments/status", ("patch",))
    ),
    # Group snapshots included, as in node-local mode.
    "csi-snapshotter": NODE_LOCAL_REQUIRED["csi-snapshotter"]["cluster"],
    "node-driver-registrar": set(),
    "liveness-probe": set(),
}
# With groupSnapshots.enabled=false or components/no-group-snapshots.
REQUIRED_WITHOUT_GROUP_SNAPSHOTS = {**REQUIRED, "csi-snapshotter": REQUIRED["csi-snapshotter"] - SNAPSHOTTER_GROUP_RULES}
GROUP_CLASS = ("VolumeGroupSnapshotClass", "thinloop-shared-groupsnapclass")
SNAPSHOTTER_ROLE = ("ClusterRole", "thinloop-shared-external-snapshotter")


def renderings(shared: list[Obj], shared_chart: list[Obj]) -> list[tuple[str, list[Obj]]]:
    return [("kustomize", shared), ("helm", shared_chart)]


def render_overlay(tmp_path: Path, settings: dict[str, str], overlay: str = "shared-datastore") -> list[Obj]:
    """overlays/OVERLAY built from a copy of deploy/kubernetes with other settings."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE_DIR, tree)
    kfile = tree / "overlays" / overlay / "kustomization.yaml"
    text = kfile.read_text()
    for key, literal in (("name", "datastoreName"), ("root", "datastoreMountRoot"), ("kubelet", "kubeletDir")):
        text, n = re.subn(rf"- {literal}=\S+", f"- {literal}={settings[key]}", text)
        assert n == 1, literal
    kfile.write_text(text)
    return kustomize(tree / "overlays" / overlay)


def chart_values(settings: dict[str, str], **shared: Any) -> dict[str, Any]:
    values = copy.deepcopy(SHARED_VALUES)
    values["kubeletDir"] = settings["kubelet"]
    values["sharedDatastore"].update(name=settings["name"], mountRoot=settings["root"], **shared)
    return values


def driver_knows(name: str) -> bool:
    """Whether the driver has flag NAME (csi_driver/serving/flags.py's table of flags)."""
    return name in {f.name for f in FLAGS}


def driver_args(objs: list[Obj], container: Obj) -> list[str]:
    return [expand(objs, container, a).replace("<NODE_NAME>", "node-1") for a in container["args"]]


def datastore_mount(pod: Obj, container: Obj) -> tuple[Obj, Obj]:
    mount = next(m for m in container["volumeMounts"] if m["name"] == "datastore")
    volume = next(v for v in pod["volumes"] if v["name"] == "datastore")
    return mount, volume


def check_paths(objs: list[Obj], settings: dict[str, str], controller_claim: bool = False) -> None:
    """The datastore, data dir, topology and kubelet paths of one rendering."""
    name, root, kubelet = settings["name"], settings["root"], settings["kubelet"]
    data_dir = f"{root}/{name}"
    for kind, wname in (CONTROLLER, NODE):
        workload = find(objs, kind, wname)
        pod = workload["spec"]["template"]["spec"]
        driver = containers(workload)["thinloop"]
        assert expand(objs, driver, flag(driver, "--datastore") or "") == name, wname
        assert expand(objs, driver, flag(driver, "--data-dir") or "") == data_dir, wname
        mount, volume = datastore_mount(pod, driver)
        # Only on nodes the operator labelled as mounting the datastore: not on
        # the topology label, which node plugins report only once the controller
        # has made the datastore's marker.
        if not (controller_claim and kind == "Deployment"):
            terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert terms["nodeSelectorTerms"] == [{"matchExpressions": [
                {"key": f"datastore.thinloop.csi.io/{name}", "operator": "In", "values": ["mounted"]}]}], wname
        if controller_claim and kind == "Deployment":
            # The claim is the datastore itself, mounted where the nodes see it.
            assert mount == {"name": "datastore", "mountPath": data_dir}
            assert volume == {"name": "datastore", "persistentVolumeClaim": {"claimName": "thinloop-datastore"}}
            assert not any("hostPath" in v for v in pod["volumes"])
            assert "nodeAffinity" not in pod["affinity"]
            continue
        # The directory holding the mount point, at the same path inside and out,
        # receiving the host's later mounts; never created when missing.
        assert mount["mountPath"] == root and mount["mountPropagation"] == "HostToContainer", wname
        assert volume["hostPath"] == {"path": root, "type": "Directory"}, wname
        assert host_path_of(pod, driver, data_dir) == data_dir, wname
    # The node plugin: kubelet paths, and the socket kubelet is told about.
    ds = find(objs, *NODE)
    pod = ds["spec"]["template"]["spec"]
    cs = containers(ds)
    assert flag(cs["thinloop"], "--endpoint") == "unix://" + SOCKET_IN_POD
    socket = host_path_of(pod, cs["thinloop"], SOCKET_IN_POD)
    registrar = cs["node-driver-registrar"]
    reg_path = expand(objs, registrar, flag(registrar, "--kubelet-registration-path") or "")
    assert reg_path == socket == f"{kubelet}/plugins/{SHARED_DRIVER_NAME}/csi.sock"
    assert host_path_of(pod, registrar, "/registration") == f"{kubelet}/plugins_registry"
    kmount = next(m for m in cs["thinloop"]["volumeMounts"] if m["name"] == "kubelet-dir")
    assert kmount["mountPath"] == kubelet and kmount["mountPropagation"] == "Bidirectional"
    assert host_path_of(pod, cs["thinloop"], kubelet) == kubelet
    assert expand(objs, cs["thinloop"], flag(cs["thinloop"], "--kubelet-dir") or "") == kubelet
    assert host_path_of(pod, cs["thinloop"], "/dev") == "/dev"
    # Every class pinned to the datastore.
    for sc in (o for o in objs if o["kind"] == "StorageClass"):
        assert sc["allowedTopologies"] == [{"matchLabelExpressions": [
            {"key": DATASTORE_TOPOLOGY_KEY, "values": [name]}]}], sc["metadata"]["name"]
    # No default left behind anywhere.
    text = yaml.safe_dump_all(objs)
    for key, default in DEFAULTS.items():
        if settings[key] != default:
            assert default not in text, f"{default} is still in the rendering"


def test_objects(shared: list[Obj], shared_chart: list[Obj]) -> None:
    want = {
        ("CSIDriver", SHARED_DRIVER_NAME), ("ConfigMap", "thinloop-shared-config"),
        ("ServiceAccount", "thinloop-shared-controller"), ("ServiceAccount", "thinloop-shared-node"),
        *(("ClusterRole", f"thinloop-shared-external-{s}") for s in ("provisioner", "attacher", "resizer", "snapshotter")),
        *(("ClusterRoleBinding", f"thinloop-shared-external-{s}")
          for s in ("provisioner", "attacher", "resizer", "snapshotter")),
        ("Role", "thinloop-shared-leader-election"), ("RoleBinding", "thinloop-shared-leader-election"),
        CONTROLLER, ("PodDisruptionBudget", "thinloop-shared-controller"), NODE,
        *(("StorageClass", c) for c in CLASSES), ("VolumeSnapshotClass", "thinloop-shared-snapclass"),
        GROUP_CLASS,
    }
    assert {(o["kind"], o["metadata"]["name"]) for o in shared} == want | {("Namespace", NAMESPACE)}
    assert {(o["kind"], o["metadata"]["name"]) for o in shared_chart} == want


def test_chart_equals_kustomize_overlay(shared: list[Obj], shared_chart: list[Obj]) -> None:
    want = normalise([o for o in shared if o["kind"] != "Namespace"])
    got = normalise(shared_chart)
    assert sorted(got) == sorted(want)
    for key, obj in want.items():
        assert got[key] == obj, f"{key} differs:\n{yaml.safe_dump(got[key])}\nvs\n{yaml.safe_dump(obj)}"


def test_installs_next_to_node_local(base: list[Obj], shared: list[Obj], chart: list[Obj],
                                     shared_chart: list[Obj]) -> None:
    """No object of one driver is also an object of the other (the Namespace aside)."""
    local = normalise([o for o in base if o["kind"] != "Namespace"])
    assert not set(local) & set(normalise([o for o in shared if o["kind"] != "Namespace"]))
    # The chart with both drivers renders exactly the two sets.
    both = normalise(render_chart({"sharedDatastore": {"enabled": True}}))
    assert both == {**normalise(chart), **normalise(shared_chart)}


def test_chart_lints_in_shared_mode() -> None:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    for values in (SHARED_VALUES, {"sharedDatastore": {"enabled": True}}):
        result = helm.lint(str(CHART_DIR), values, strict=True)
        assert result["errors"] == []
        assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]


def test_default_chart_has_no_shared_objects(chart: list[Obj]) -> None:
    text = yaml.safe_dump_all(chart)
    assert SHARED_DRIVER_NAME not in text and "thinloop-shared" not in text


def test_driver_name_everywhere(shared: list[Obj], shared_chart: list[Obj]) -> None:
    for _, objs in renderings(shared, shared_chart):
        assert find(objs, "CSIDriver")["metadata"]["name"] == SHARED_DRIVER_NAME
        classes = [o for o in objs if o["kind"] == "StorageClass"]
        assert {c["metadata"]["name"] for c in classes} == set(CLASSES)
        assert all(c["provisioner"] == SHARED_DRIVER_NAME for c in classes)
        assert find(objs, "VolumeSnapshotClass")["driver"] == SHARED_DRIVER_NAME
        assert find(objs, *GROUP_CLASS)["driver"] == SHARED_DRIVER_NAME
        for kind, wname in (CONTROLLER, NODE):
            assert flag(containers(find(objs, kind, wname))["thinloop"], "--driver-name") == SHARED_DRIVER_NAME
        pod = find(objs, *NODE)["spec"]["template"]["spec"]
        plugin_dir = next(v for v in pod["volumes"] if v["name"] == "plugin-dir")["hostPath"]["path"]
        assert PurePosixPath(plugin_dir).name == SHARED_DRIVER_NAME


def test_csidriver_spec(shared: list[Obj]) -> None:
    assert find(shared, "CSIDriver")["spec"] == {
        "attachRequired": True,
        "podInfoOnMount": True,
        "fsGroupPolicy": "File",
        "storageCapacity": False,
        # No inline ephemeral volumes: Kubernetes never attaches them, so they would not be fenced.
        "volumeLifecycleModes": ["Persistent"],
    }


def test_paths_at_defaults(shared: list[Obj], shared_chart: list[Obj]) -> None:
    for _, objs in renderings(shared, shared_chart):
        check_paths(objs, DEFAULTS)


def test_settings_reach_every_object(tmp_path: Path) -> None:
    """Each setting is one line of the overlay (or one chart value) and lands everywhere."""
    check_paths(render_overlay(tmp_path, OTHER), OTHER)
    check_paths(render_chart(chart_values(OTHER)), OTHER)


def test_controller_through_a_claim(tmp_path: Path) -> None:
    nfs = kustomize(KUSTOMIZE_DIR / "overlays" / "shared-datastore-nfs")
    check_paths(nfs, DEFAULTS, controller_claim=True)
    other = render_overlay(tmp_path, OTHER, overlay="shared-datastore-nfs")
    check_paths(other, OTHER, controller_claim=True)
    pv = find(nfs, "PersistentVolume")
    claim = find(nfs, "PersistentVolumeClaim", "thinloop-datastore")
    assert pv["spec"]["claimRef"] == {"namespace": NAMESPACE, "name": "thinloop-datastore"}
    assert claim["spec"]["volumeName"] == pv["metadata"]["name"]
    assert claim["spec"]["accessModes"] == pv["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {"vers=4.2", "hard", "lookupcache=none", "acdirmin=0", "acdirmax=0"} <= set(pv["spec"]["mountOptions"])
    # The chart's controllerVolume renders the same workloads.
    values = chart_values(DEFAULTS, controllerVolume={"persistentVolumeClaim": {"claimName": "thinloop-datastore"}})
    chart = render_chart(values)
    want = normalise([o for o in nfs if o["kind"] not in {"Namespace", "PersistentVolume", "PersistentVolumeClaim"}])
    assert normalise(chart) == want


def test_storage_classes(shared: list[Obj]) -> None:
    for obj in (o for o in shared if o["kind"] == "StorageClass"):
        name = obj["metadata"]["name"]
        # Reachable from every node that mounts the datastore: no reason to wait for the scheduler.
        assert obj["volumeBindingMode"] == "Immediate", name
        assert obj["allowVolumeExpansion"] is True, name
        assert obj["reclaimPolicy"] == ("Retain" if name.endswith("-retain") else "Delete"), name
        assert obj["parameters"] == {"csi.storage.k8s.io/fstype": "ext4", "diskformat": CLASSES[name]}, name
    assert find(shared, "VolumeSnapshotClass")["deletionPolicy"] == "Delete"
    assert find(shared, *GROUP_CLASS)["deletionPolicy"] == "Delete"


def test_workloads_and_sidecar_flags(shared: list[Obj], shared_chart: list[Obj]) -> None:
    for _, objs in renderings(shared, shared_chart):
        ctrl_obj = find(objs, *CONTROLLER)
        ctrl, node = containers(ctrl_obj), containers(find(objs, *NODE))
        assert set(ctrl) == {"thinloop", *CONTROLLER_SIDECARS}
        # No provisioner or snapshotter on the nodes: provisioning is central.
        assert set(node) == {"thinloop", *NODE_SIDECARS}
        assert flag(ctrl["thinloop"], "--mode") == "controller"
        assert flag(node["thinloop"], "--mode") == "node"
        assert ctrl_obj["spec"]["replicas"] >= 2
        for cs in (ctrl, node):
            socket_volume = next(m["name"] for m in cs["thinloop"]["volumeMounts"] if m["mountPath"] == "/csi")
            for cname, c in cs.items():
                if cname != "thinloop":
                    assert flag(c, "--csi-address") == SOCKET_IN_POD, cname
                    assert any(m == {"name": socket_volume, "mountPath": "/csi"} for m in c["volumeMounts"]), cname
            assert flag(cs["liveness-probe"], "--health-port") == "9808"
            probe = cs["thinloop"]["livenessProbe"]["httpGet"]
            port = next(p for p in cs["thinloop"]["ports"] if p["name"] == probe["port"])
            assert probe["path"] == "/healthz" and port["containerPort"] == 9808
        prov = ctrl["csi-provisioner"]
        # Central provisioning; Topology is GA and default-on in v6 (a gate that
        # a later release drops would stop the sidecar), no capacity tracking.
        for absent in ("--node-deployment", "--enable-capacity", "--feature-gates", "--capacity-ownerref-level"):
            assert flag(prov, absent) is None, absent
        assert flag(prov, "--strict-topology") == "" and flag(prov, "--extra-create-metadata") == ""
        assert flag(ctrl["csi-snapshotter"], "--node-deployment") is None
        # Group snapshots; central, so it takes up every content and needs no labeller.
        assert flag(ctrl["csi-snapshotter"], "--feature-gates") == "CSIVolumeGroupSnapshot=true"
        assert "group-snapshot-labeller" not in ctrl
        ports: set[int] = set()
        for cname in CONTROLLER_SIDECARS - {"liveness-probe"}:
            c = ctrl[cname]
            assert flag(c, "--leader-election") == "true", cname
            assert flag(c, "--leader-election-namespace") == "$(NAMESPACE)", cname
            assert c["env"] == [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
            # The leader-election health check restarts a leader that lost its Lease.
            endpoint = flag(c, "--http-endpoint") or ""
            port_no = int(endpoint.removeprefix(":"))
            probe = c["livenessProbe"]["httpGet"]
            assert probe["path"] == "/healthz/leader-election", cname
            assert next(p for p in c["ports"] if p["name"] == probe["port"])["containerPort"] == port_no, cname
            ports.add(port_no)
        assert len(ports) == 4 and not ports & {9808, 9809}


def test_no_feature_gate_the_sidecar_does_not_know() -> None:
    """The provisioner's Topology gate is GA in v6.3.0 and to be removed: not passed anywhere."""
    for path in [*KUSTOMIZE_DIR.rglob("*.yaml"), *CHART_DIR.rglob("*.yaml")]:
        assert "Topology=true" not in path.read_text(), path


def test_images_pinned_like_node_local(base: list[Obj], chart: list[Obj], shared: list[Obj],
                                       shared_chart: list[Obj]) -> None:
    attacher = {"registry.k8s.io/sig-storage/csi-attacher": "v4.12.0"}
    assert images(shared) == {**images(base), **attacher}
    assert images(shared_chart) == {**images(chart), **attacher}


def check_rbac(objs: list[Obj], required: dict[str, set[Rule]] = REQUIRED) -> None:
    need: dict[str, dict[Scope, set[Rule]]] = defaultdict(lambda: defaultdict(set))
    for kind, wname in (CONTROLLER, NODE):
        workload = find(objs, kind, wname)
        sa = workload["spec"]["template"]["spec"]["serviceAccountName"]
        need[sa]  # an account whose sidecars need nothing must hold nothing
        for cname, c in containers(workload).items():
            if cname == "thinloop":
                continue
            need[sa]["cluster"] |= required[cname]
            if flag(c, "--leader-election") == "true":
                need[sa]["namespace"] |= rules("coordination.k8s.io", "leases", LEASES)
    for sa, scopes in need.items():
        have = granted(objs, sa)
        for scope in ("cluster", "namespace"):
            missing = scopes[scope] - have[scope]
            assert not missing, f"{sa} lacks {scope} rules {sorted(missing)}"
            extra = have[scope] - scopes[scope]
            assert not extra, f"{sa} has {scope} rules no sidecar needs: {sorted(extra)}"
    # Every role is bound (to the accounts above, by the loop), and none has a wildcard.
    roles = {(o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] in {"Role", "ClusterRole"}}
    bound = {(o["roleRef"]["kind"], o["roleRef"]["name"]) for o in objs if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}}
    assert roles == bound
    for obj in (o for o in objs if o["kind"] in {"Role", "ClusterRole"}):
        for rule in obj["rules"]:
            assert all("*" not in rule.get(k, []) for k in ("apiGroups", "resources", "verbs")), obj
            assert expand_rule(rule)
    # The node pod needs no API access and gets no token.
    node_pod = find(objs, *NODE)["spec"]["template"]["spec"]
    assert node_pod["automountServiceAccountToken"] is False
    assert find(objs, "ServiceAccount", "thinloop-shared-node")["automountServiceAccountToken"] is False


def test_rbac(shared: list[Obj], shared_chart: list[Obj]) -> None:
    for _, objs in renderings(shared, shared_chart):
        check_rbac(objs)


def test_group_snapshots_can_be_switched_off() -> None:
    """groupSnapshots.enabled=false applies to this driver too: no gate, no rules, no class,
    and nothing else changed; alone or next to the node-local driver."""
    off_values = {**SHARED_VALUES, "groupSnapshots": {"enabled": False}}
    on, off = render_chart(SHARED_VALUES), render_chart(off_values)
    check_no_group_snapshots(off)
    check_only_group_snapshots_removed(on, off, CONTROLLER, SNAPSHOTTER_ROLE, {GROUP_CLASS})
    check_rbac(off, REQUIRED_WITHOUT_GROUP_SNAPSHOTS)
    both = render_chart({"sharedDatastore": {"enabled": True}, "groupSnapshots": {"enabled": False}})
    check_no_group_snapshots(both)


@pytest.mark.parametrize("overlay", SHARED_OVERLAYS)
def test_no_group_snapshots_component(tmp_path: Path, overlay: str) -> None:
    """components/no-group-snapshots on the shared overlays: what the chart renders with
    groupSnapshots.enabled=false, and nothing else removed."""
    path = KUSTOMIZE_DIR / "overlays" / overlay
    full, off = kustomize(path), kustomize_with(tmp_path, path, [NO_GROUP_SNAPSHOTS])
    check_no_group_snapshots(off)
    check_only_group_snapshots_removed(full, off, CONTROLLER, SNAPSHOTTER_ROLE, {GROUP_CLASS})
    check_rbac(off, REQUIRED_WITHOUT_GROUP_SNAPSHOTS)
    values = chart_values(DEFAULTS)
    values["groupSnapshots"] = {"enabled": False}
    if overlay == "shared-datastore-nfs":
        values["sharedDatastore"]["controllerVolume"] = {"persistentVolumeClaim": {"claimName": "thinloop-datastore"}}
    want = normalise([o for o in off if o["kind"] not in {"Namespace", "PersistentVolume", "PersistentVolumeClaim"}])
    assert normalise(render_chart(values)) == want


def test_rbac_check_catches_mistakes(shared: list[Obj]) -> None:
    broken = copy.deepcopy(shared)
    role = find(broken, "ClusterRole", "thinloop-shared-external-attacher")
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["volumeattachments/status"]]
    with pytest.raises(AssertionError, match="volumeattachments/status"):
        check_rbac(broken)
    extra = copy.deepcopy(shared)
    find(extra, "ClusterRole", "thinloop-shared-external-provisioner")["rules"].append(
        {"apiGroups": ["storage.k8s.io"], "resources": ["csistoragecapacities"], "verbs": ["create"]})
    with pytest.raises(AssertionError, match="no sidecar needs"):
        check_rbac(extra)


def test_driver_flags_exist(shared: list[Obj], shared_chart: list[Obj]) -> None:
    """Every flag the manifests pass is one of csi_driver/serving/flags.py's, --datastore among them."""
    for _, objs in renderings(shared, shared_chart):
        for kind, wname in (CONTROLLER, NODE):
            driver = containers(find(objs, kind, wname))["thinloop"]
            names = {a.partition("=")[0] for a in driver_args(objs, driver)}
            unknown = {n for n in names if not driver_knows(n)}
            assert not unknown, f"{wname}: the driver has no {sorted(unknown)}"
            assert names >= SHARED_MODE_FLAGS


def test_driver_accepts_the_shared_arguments(shared: list[Obj], shared_chart: list[Obj]) -> None:
    """The driver parses the manifests' arguments, and its shared-mode defaults match them."""
    for _, objs in renderings(shared, shared_chart):
        for kind, wname in (CONTROLLER, NODE):
            driver = containers(find(objs, kind, wname))["thinloop"]
            args = driver_args(objs, driver)
            try:
                settings = parse_settings(args, environ={})
                default_name = parse_settings([a for a in args if not a.startswith("--driver-name")],
                                              environ={}).driver_name
            except SettingsError as exc:
                raise AssertionError(f"{wname}: the driver refuses {args}: {exc}") from exc
            assert settings.driver_name == SHARED_DRIVER_NAME
            assert default_name == SHARED_DRIVER_NAME, "the driver's default name in shared mode"
            assert settings.mode == flag(driver, "--mode")
            assert settings.shared and settings.datastore == DEFAULTS["name"]
            assert settings.topology == {DATASTORE_TOPOLOGY_KEY: DEFAULTS["name"]}
            # The data dir is the mount point <root>/<name> (where the controller may make the
            # marker), and each node driver is known by its Kubernetes node name.
            assert settings.data_dir == Path(f"{DEFAULTS['root']}/{DEFAULTS['name']}")
            assert settings.node_id == "node-1"
            assert flag(driver, "--node-id") == "$(NODE_NAME)"
            env = {e["name"]: e for e in driver["env"]}
            assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
            # Served where the sidecars dial, in the mode the workload is for.
            assert settings.runs_node == (kind == "DaemonSet") and settings.runs_controller == (kind == "Deployment")
    sources = "".join(p.read_text() for p in (ROOT / "csi_driver").rglob("*.py"))
    assert DATASTORE_TOPOLOGY_KEY in sources


def test_example_moves_between_nodes() -> None:
    objs = load_all((EXAMPLES_DIR / "shared-deployment.yaml").read_text())
    claim = find(objs, "PersistentVolumeClaim")
    deploy = find(objs, "Deployment")
    assert claim["spec"]["storageClassName"] in CLASSES
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # One writer at a time: the old pod (and the attachment) goes before the new one comes.
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    volume = deploy["spec"]["template"]["spec"]["volumes"][0]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # scripts/e2e.sh's shared path drives this very example.
    script = (ROOT / "scripts" / "e2e.sh").read_text()
    assert "shared-deployment.yaml" in script
    for name in (claim["metadata"]["name"], deploy["metadata"]["name"]):
        assert name in script


def test_docs_cover_the_deployment() -> None:
    doc = (ROOT / "docs" / "shared-datastore.md").read_text()
    assert "```mermaid" in doc
    assert "## How the driver fences" in doc
    for term in (SHARED_DRIVER_NAME, DATASTORE_TOPOLOGY_KEY, "overlays/shared-datastore",
                 "components/shared-datastore-claim", "datastoreName", "datastoreMountRoot",
                 "node.kubernetes.io/out-of-service", "HostToContainer", "examples/shared-deployment.yaml",
                 "datastore.thinloop.csi.io/<datastoreName>=mounted", "RequiresMountsFor"):
        assert term in doc, term
    # Every chart value of the shared mode is documented.
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for key in values["sharedDatastore"]:
        assert f"sharedDatastore.{key}" in doc, key
    assert "nodeLocal.enabled" in doc
    for page in (ROOT / "README.md", ROOT / "docs" / "deploy.md"):
        assert "shared-datastore.md" in page.read_text(), page
