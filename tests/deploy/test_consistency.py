"""The names, paths and flags that must agree across the deployment files."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from csi_driver.serving.flags import parse_settings
from csi_driver.settings import DEFAULT_DRIVER_NAME, TOPOLOGY_KEY

from .manifests import (
    CHART_DIR,
    DATASTORE_TOPOLOGY_KEY,
    EXAMPLES_DIR,
    KUSTOMIZE_DIR,
    ROOT,
    SCRIPTS,
    Obj,
    containers,
    find,
    iter_files,
    kustomize,
    kustomize_with,
    load_all,
)

SOCKET_IN_POD = "/csi/csi.sock"
SIDECARS = {"csi-provisioner", "csi-snapshotter", "csi-resizer", "node-driver-registrar", "liveness-probe"}
LABELLER = "group-snapshot-labeller"
"""The one sidecar that talks to the API server only, never to the driver's socket."""
KUBELET_DIRS = {
    None: "/var/lib/kubelet",
    "microk8s": "/var/snap/microk8s/common/var/lib/kubelet",
    "k0s": "/var/lib/k0s/kubelet",
}


def flag(container: Obj, name: str) -> str | None:
    for arg in container.get("args", []):
        if arg == name or arg.startswith(name + "="):
            return arg.partition("=")[2] if "=" in arg else ""
    return None


def env_value(objs: list[Obj], container: Obj, name: str) -> str:
    """The value of env var NAME, resolving configMapKeyRef against OBJS."""
    for env in container.get("env", []):
        if env["name"] != name:
            continue
        if "value" in env:
            return str(env["value"])
        ref = env["valueFrom"]["configMapKeyRef"]
        return str(find(objs, "ConfigMap", ref["name"])["data"][ref["key"]])
    raise AssertionError(f"{container['name']} has no env {name}")


def expand(objs: list[Obj], container: Obj, text: str) -> str:
    """Expand $(VAR) as kubelet does, for the variables tests can know."""
    def sub(m: re.Match[str]) -> str:
        if m.group(1) in {"NODE_NAME", "NAMESPACE", "POD_NAME"}:
            return f"<{m.group(1)}>"
        return env_value(objs, container, m.group(1))
    return re.sub(r"\$\(([A-Z_]+)\)", sub, text)


def host_path_of(pod_spec: Obj, container: Obj, path_in_container: str) -> str:
    """Map a path inside the container to the host path its hostPath mount provides."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    best = None
    for mount in container["volumeMounts"]:
        mp = PurePosixPath(mount["mountPath"])
        p = PurePosixPath(path_in_container)
        covers = p == mp or mp in p.parents
        if covers and (best is None or len(mp.parts) > len(PurePosixPath(best["mountPath"]).parts)):
            best = mount
    assert best is not None, f"{path_in_container} is not on any mount of {container['name']}"
    vol = volumes[best["name"]]
    assert "hostPath" in vol, f"{path_in_container} is not on a hostPath volume"
    rel = PurePosixPath(path_in_container).relative_to(best["mountPath"])
    return str(PurePosixPath(vol["hostPath"]["path"]) / rel)


def all_renderings(base: list[Obj], chart: list[Obj]) -> list[tuple[str, list[Obj]]]:
    return [("kustomize", base), ("helm", chart)]


def test_driver_name_everywhere(base: list[Obj], chart: list[Obj]) -> None:
    name = DEFAULT_DRIVER_NAME
    for _, objs in all_renderings(base, chart):
        assert find(objs, "CSIDriver")["metadata"]["name"] == name
        classes = [o for o in objs if o["kind"] == "StorageClass"]
        assert {c["metadata"]["name"] for c in classes} == {
            "thinloop", "thinloop-ext3-thin", "thinloop-xfs", "thinloop-retain"}
        assert all(c["provisioner"] == name for c in classes)
        assert find(objs, "VolumeSnapshotClass")["driver"] == name
        for kind, wname in (("DaemonSet", "thinloop-node"), ("Deployment", "thinloop-controller")):
            driver = containers(find(objs, kind, wname))["thinloop"]
            assert flag(driver, "--driver-name") == name
        pod = find(objs, "DaemonSet")["spec"]["template"]["spec"]
        plugin_dir = next(v for v in pod["volumes"] if v["name"] == "plugin-dir")["hostPath"]["path"]
        assert PurePosixPath(plugin_dir).name == name
    for path in iter_files(EXAMPLES_DIR):
        text = path.read_text()
        for m in re.finditer(r"driver: (\S+)", text):
            assert m.group(1) == name, path


def test_csidriver_spec(base: list[Obj]) -> None:
    spec = find(base, "CSIDriver")["spec"]
    assert spec == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "fsGroupPolicy": "File",
        "storageCapacity": True,
        "volumeLifecycleModes": ["Persistent", "Ephemeral"],
    }


def test_storage_classes(base: list[Obj]) -> None:
    sc = {o["metadata"]["name"]: o for o in base if o["kind"] == "StorageClass"}
    assert sc["thinloop"]["parameters"] == {"csi.storage.k8s.io/fstype": "ext4", "diskformat": "thin"}
    assert sc["thinloop-ext3-thin"]["parameters"] == {"diskformat": "thin", "fsType": "ext3"}
    assert sc["thinloop-xfs"]["parameters"]["csi.storage.k8s.io/fstype"] == "xfs"
    assert sc["thinloop-retain"]["reclaimPolicy"] == "Retain"
    for name, obj in sc.items():
        assert obj["volumeBindingMode"] == "WaitForFirstConsumer", name
        assert obj["allowVolumeExpansion"] is True, name
        if name != "thinloop-retain":
            assert obj["reclaimPolicy"] == "Delete", name
        for key, value in obj.get("parameters", {}).items():
            # Only parameters the driver accepts.
            assert key.startswith("csi.storage.k8s.io/") or key in {"fsType", "diskformat", "reclaim"}, key
            if key in {"fsType", "csi.storage.k8s.io/fstype"}:
                assert value in {"ext3", "ext4", "xfs"}
            if key == "diskformat":
                assert value in {"thin", "zeroedthick", "eagerzeroedthick"}
    snap = find(base, "VolumeSnapshotClass", "thinloop-snapclass")
    assert snap["deletionPolicy"] == "Delete"


@pytest.mark.parametrize("overlay", [None, "microk8s", "k0s"])
def test_registrar_path_is_the_socket_the_host_path_provides(overlay: str | None) -> None:
    objs = kustomize(KUSTOMIZE_DIR if overlay is None else KUSTOMIZE_DIR / "overlays" / overlay)
    kubelet_dir = KUBELET_DIRS[overlay]
    ds = find(objs, "DaemonSet", "thinloop-node")
    pod = ds["spec"]["template"]["spec"]
    c = containers(ds)
    registrar = c["node-driver-registrar"]
    reg_path = expand(objs, registrar, flag(registrar, "--kubelet-registration-path") or "")
    # The socket the driver listens on, seen from the host.
    endpoint = flag(c["thinloop"], "--endpoint") or ""
    assert endpoint == "unix://" + SOCKET_IN_POD
    on_host = host_path_of(pod, c["thinloop"], SOCKET_IN_POD)
    assert reg_path == on_host == f"{kubelet_dir}/plugins/{DEFAULT_DRIVER_NAME}/csi.sock"
    assert host_path_of(pod, registrar, "/registration") == f"{kubelet_dir}/plugins_registry"
    # The kubelet dir: same path inside and out, Bidirectional, and the flag.
    mount = next(m for m in c["thinloop"]["volumeMounts"] if m["name"] == "kubelet-dir")
    assert mount["mountPath"] == kubelet_dir
    assert mount["mountPropagation"] == "Bidirectional"
    assert host_path_of(pod, c["thinloop"], kubelet_dir) == kubelet_dir
    assert expand(objs, c["thinloop"], flag(c["thinloop"], "--kubelet-dir") or "") == kubelet_dir
    # Nothing else in the DaemonSet still names the default kubelet dir.
    if overlay is not None:
        assert "/var/lib/kubelet" not in yaml.safe_dump(ds).replace(kubelet_dir, "")


def test_node_plugin_mounts(base: list[Obj]) -> None:
    ds = find(base, "DaemonSet", "thinloop-node")
    pod = ds["spec"]["template"]["spec"]
    driver = containers(ds)["thinloop"]
    assert driver["securityContext"]["privileged"] is True
    assert host_path_of(pod, driver, "/dev") == "/dev"
    data = next(v for v in pod["volumes"] if v["name"] == "data-dir")["hostPath"]
    assert data == {"path": "/var/lib/thinloop", "type": "DirectoryOrCreate"}
    assert host_path_of(pod, driver, "/var/lib/thinloop") == "/var/lib/thinloop"
    assert flag(driver, "--data-dir") == "/var/lib/thinloop"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]


def test_every_sidecar_talks_to_the_mounted_socket(base: list[Obj], chart: list[Obj]) -> None:
    for _, objs in all_renderings(base, chart):
        seen = set()
        for kind, name in (("DaemonSet", "thinloop-node"), ("Deployment", "thinloop-controller")):
            workload = find(objs, kind, name)
            cs = containers(workload)
            driver_endpoint = flag(cs["thinloop"], "--endpoint")
            assert driver_endpoint == "unix://" + SOCKET_IN_POD
            driver_mount = next(m for m in cs["thinloop"]["volumeMounts"] if m["mountPath"] == "/csi")
            for cname, c in cs.items():
                if cname in ("thinloop", LABELLER):
                    continue
                seen.add(cname)
                assert flag(c, "--csi-address") == SOCKET_IN_POD, cname
                mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/csi")
                assert mount["name"] == driver_mount["name"], cname
        assert seen == SIDECARS
        assert "csi-attacher" not in seen


def test_group_snapshot_labeller(base: list[Obj], chart: list[Obj]) -> None:
    """The sidecar runs thinloopctl's labeller, with arguments thinloopctl accepts, for
    the driver's name, on this node (NODE_NAME from the downward API, as csi-snapshotter
    gets it), over the driver's data dir mounted read-only, and nothing else."""
    from csi_driver.ops import ctl
    for _, objs in all_renderings(base, chart):
        ds = find(objs, "DaemonSet", "thinloop-node")
        pod = ds["spec"]["template"]["spec"]
        cs = containers(ds)
        lab, driver = cs[LABELLER], cs["thinloop"]
        assert lab["image"] == driver["image"] and lab["command"] == ["thinloopctl"]
        args = ctl.build_parser().parse_args(lab["args"])
        assert args.local is ctl.cmd_node_label_group_snapshots and args.watch is True
        assert args.driver_name == flag(driver, "--driver-name") == DEFAULT_DRIVER_NAME
        assert args.data_dir == flag(driver, "--data-dir")
        assert host_path_of(pod, lab, args.data_dir) == host_path_of(pod, driver, args.data_dir)
        assert lab["volumeMounts"] == [{"name": "data-dir", "mountPath": args.data_dir, "readOnly": True}]
        assert lab["env"] == cs["csi-snapshotter"]["env"] == [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
        assert lab["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                          "capabilities": {"drop": ["ALL"], "add": ["DAC_READ_SEARCH"]}}
        assert "ports" not in lab and "livenessProbe" not in lab


def test_sidecar_flags(base: list[Obj]) -> None:
    node = containers(find(base, "DaemonSet", "thinloop-node"))
    prov = node["csi-provisioner"]
    for f, v in (("--node-deployment", "true"), ("--strict-topology", ""), ("--immediate-topology", "false"),
                 ("--extra-create-metadata", ""), ("--enable-capacity", ""), ("--capacity-ownerref-level", "1")):
        assert flag(prov, f) == v, f
    envs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in prov["env"]}
    assert envs == {"NODE_NAME": "spec.nodeName", "NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    snap = node["csi-snapshotter"]
    assert flag(snap, "--node-deployment") == "true"
    assert flag(snap, "--feature-gates") == "CSIVolumeGroupSnapshot=true"  # the gate of v8.6.0
    assert snap["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    assert flag(node["liveness-probe"], "--health-port") == "9808"
    probe = node["thinloop"]["livenessProbe"]["httpGet"]
    port = next(p for p in node["thinloop"]["ports"] if p["name"] == probe["port"])
    assert probe["path"] == "/healthz" and port["containerPort"] == 9808
    ctrl = containers(find(base, "Deployment", "thinloop-controller"))
    assert flag(ctrl["thinloop"], "--mode") == "controller"
    assert flag(node["thinloop"], "--mode") == "all"
    assert flag(ctrl["csi-resizer"], "--leader-election") == "true"


def test_driver_args_parse(base: list[Obj], chart: list[Obj]) -> None:
    """The flags in the manifests are ones the driver accepts."""
    for _, objs in all_renderings(base, chart):
        for kind in ("DaemonSet", "Deployment"):
            for workload in (o for o in objs if o["kind"] == kind):
                driver = containers(workload)["thinloop"]
                args = [expand(objs, driver, a).replace("<NODE_NAME>", "node-1") for a in driver["args"]]
                settings = parse_settings(args, environ={})
                assert settings.driver_name == DEFAULT_DRIVER_NAME
                assert settings.node_id == "node-1"


def test_resources_everywhere(base: list[Obj]) -> None:
    for obj in base:
        if obj["kind"] not in {"DaemonSet", "Deployment"}:
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            res = c["resources"]
            assert set(res["requests"]) == {"cpu", "memory"}, c["name"]
            assert set(res["limits"]) == {"cpu", "memory"}, c["name"]


def images(objs: list[Obj]) -> dict[str, str]:
    out = {}
    for obj in objs:
        if obj["kind"] in {"DaemonSet", "Deployment"}:
            for c in obj["spec"]["template"]["spec"]["containers"]:
                repo, _, tag = c["image"].rpartition(":")
                out[repo] = tag
                assert c["imagePullPolicy"] == "IfNotPresent"
    return out


def test_images_pinned(base: list[Obj], chart: list[Obj]) -> None:
    expected = {
        "thinloop/thinloop-csi": "0.1.0",
        "registry.k8s.io/sig-storage/csi-provisioner": "v6.3.0",
        "registry.k8s.io/sig-storage/csi-snapshotter": "v8.6.0",
        "registry.k8s.io/sig-storage/csi-resizer": "v2.2.1",
        "registry.k8s.io/sig-storage/csi-node-driver-registrar": "v2.17.0",
        "registry.k8s.io/sig-storage/livenessprobe": "v2.19.0",
    }
    assert images(base) == expected
    assert images(chart) == expected
    # snapshot-controller and CRDs in the scripts use the csi-snapshotter release.
    snap_tag = expected["registry.k8s.io/sig-storage/csi-snapshotter"]
    sc = yaml.safe_load((ROOT / "deploy" / "snapshot-controller" / "kustomization.yaml").read_text())
    assert all(f"/external-snapshotter/{snap_tag}/" in r for r in sc["resources"])
    assert sc["images"] == [{"name": "registry.k8s.io/sig-storage/snapshot-controller", "newTag": snap_tag}]
    assert "--enable-distributed-snapshotting=true" in yaml.safe_dump(sc["patches"])
    assert "--feature-gates=CSIVolumeGroupSnapshot=true" in yaml.safe_dump(sc["patches"])
    for script in SCRIPTS[:2]:
        assert f'SNAPSHOTTER_VERSION="{snap_tag}"' in script.read_text()


def test_topology_key(base: list[Obj]) -> None:
    assert TOPOLOGY_KEY == "topology.thinloop.csi.io/node"
    static = load_all((EXAMPLES_DIR / "static-pv.yaml").read_text())
    pv = find(static, "PersistentVolume")
    term = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert term["key"] == TOPOLOGY_KEY
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert TOPOLOGY_KEY in docs
    # Any topology.* key mentioned in deployment files is one of the driver's
    # (node-local, or shared datastore: tests/deploy/test_shared.py).
    keys = {TOPOLOGY_KEY, DATASTORE_TOPOLOGY_KEY}
    for path in [*iter_files(EXAMPLES_DIR), *KUSTOMIZE_DIR.rglob("*.yaml"), *CHART_DIR.rglob("*.yaml")]:
        for m in re.finditer(r"topology\.[a-z0-9.]+/[a-z]+", path.read_text()):
            assert m.group(0) in keys, path
    for m in re.finditer(r"topology\.[a-z0-9.]+/[a-z]+", docs):
        assert m.group(0) in keys


def test_examples_cover_the_issue() -> None:
    objs = {p.name: load_all(p.read_text()) for p in iter_files(EXAMPLES_DIR)}
    deploy = find(objs["deployment-postgres.yaml"], "Deployment")
    assert deploy["spec"]["strategy"]["type"] == "Recreate" and deploy["spec"]["replicas"] == 1
    assert find(objs["statefulset.yaml"], "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert find(objs["block-pvc-pod.yaml"], "PersistentVolumeClaim")["spec"]["volumeMode"] == "Block"
    assert find(objs["block-pvc-pod.yaml"], "Pod")["spec"]["containers"][0]["volumeDevices"]
    restore = find(objs["restore.yaml"], "PersistentVolumeClaim")
    assert restore["spec"]["dataSource"]["name"] == find(objs["snapshot.yaml"], "VolumeSnapshot")["metadata"]["name"]
    inline = find(objs["ephemeral-inline.yaml"], "Pod")["spec"]["volumes"][0]["csi"]
    assert inline == {"driver": DEFAULT_DRIVER_NAME, "volumeAttributes": {"size": "256Mi", "fsType": "ext4"}}
    assert "ephemeral" in find(objs["generic-ephemeral.yaml"], "Pod")["spec"]["volumes"][0]
    pv = find(objs["static-pv.yaml"], "PersistentVolume")
    assert pv["spec"]["csi"]["volumeAttributes"]["fsType"] == "ext4"
    assert find(objs["static-pv.yaml"], "PersistentVolumeClaim")["spec"]["volumeName"] == pv["metadata"]["name"]
    small = find(objs["pvc-pod.yaml"], "PersistentVolumeClaim")
    big = find(objs["pvc-expand.yaml"], "PersistentVolumeClaim")
    assert small["metadata"]["name"] == big["metadata"]["name"]
    assert small["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert big["spec"]["resources"]["requests"]["storage"] == "2Gi"


CLUSTER_SCOPED = {"Namespace", "CSIDriver", "ClusterRole", "ClusterRoleBinding", "StorageClass",
                  "VolumeSnapshotClass", "VolumeGroupSnapshotClass", "PersistentVolume"}


def test_namespaces(base: list[Obj], chart: list[Obj]) -> None:
    """Cluster-scoped objects carry no namespace; all others live in thinloop."""
    for _, objs in all_renderings(base, chart):
        for obj in objs:
            ns = obj["metadata"].get("namespace")
            if obj["kind"] in CLUSTER_SCOPED:
                assert ns is None, f"{obj['kind']} {obj['metadata']['name']} has namespace {ns}"
            else:
                assert ns == "thinloop", f"{obj['kind']} {obj['metadata']['name']}"


def test_group_snapshot_example_selects_both_claims(base: list[Obj]) -> None:
    """The VolumeGroupSnapshot's selector picks exactly the two claims of one pod, names
    the deployed class, and the restore fills one claim from each member snapshot."""
    objs = load_all((EXAMPLES_DIR / "group-snapshot.yaml").read_text())
    group = find(objs, "VolumeGroupSnapshot")
    selector = group["spec"]["source"]["selector"]["matchLabels"]
    claims = [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    chosen = [c["metadata"]["name"] for c in claims if selector.items() <= c["metadata"]["labels"].items()]
    assert chosen == ["thinloop-db-data", "thinloop-db-wal"]
    pod_claims = [v["persistentVolumeClaim"]["claimName"] for v in find(objs, "Pod")["spec"]["volumes"]]
    assert sorted(pod_claims) == chosen, "one pod uses both: they are made on one node"
    assert group["spec"]["volumeGroupSnapshotClassName"] == \
        find(base, "VolumeGroupSnapshotClass")["metadata"]["name"]
    restored = [o for o in load_all((EXAMPLES_DIR / "group-restore.yaml").read_text())
                if o["kind"] == "PersistentVolumeClaim"]
    assert [(r["spec"]["dataSource"]["kind"], r["spec"]["dataSource"]["name"]) for r in restored] == \
        [("VolumeSnapshot", "${DATA_SNAPSHOT}"), ("VolumeSnapshot", "${WAL_SNAPSHOT}")]


def test_data_dir_mount_needs_no_shared_root(base: list[Obj], chart: list[Obj]) -> None:
    """A container mount with propagation other than None fails to start on a host whose
    / is a private mount (no systemd); the data dir holds no mount the host needs."""
    for _, objs in all_renderings(base, chart):
        ds = find(objs, "DaemonSet", "thinloop-node")
        mount = next(m for m in containers(ds)["thinloop"]["volumeMounts"] if m["name"] == "data-dir")
        assert "mountPropagation" not in mount


def test_default_storage_class_component(tmp_path: Path) -> None:
    objs = kustomize_with(tmp_path, KUSTOMIZE_DIR, [KUSTOMIZE_DIR / "components" / "default-storageclass"])
    marked = {o["metadata"]["name"]: o["metadata"].get("annotations", {}) for o in objs if o["kind"] == "StorageClass"}
    assert marked["thinloop"] == {"storageclass.kubernetes.io/is-default-class": "true"}
    assert [n for n, a in marked.items() if a] == ["thinloop"]
