"""The Helm chart renders the kustomize base, and follows its values.

The chart is rendered with helm-python-sdk, which runs Helm's own template
engine (the Helm Go SDK, bundled as a shared library), so no helm binary is
needed. The test skips, visibly, when that package is missing.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from .manifests import CHART_DIR, NAMESPACE, Obj, containers, find, render_chart

HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance"}


def normalise(objs: list[Obj]) -> dict[tuple[str, str, str], Obj]:
    out = {}
    for obj in objs:
        obj = copy.deepcopy(obj)
        labels = obj["metadata"].get("labels", {})
        for key in HELM_ONLY_LABELS:
            labels.pop(key, None)
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        assert key not in out, f"duplicate {key}"
        out[key] = obj
    return out


def test_chart_equals_kustomize_base(base: list[Obj], chart: list[Obj]) -> None:
    want = normalise([o for o in base if o["kind"] != "Namespace"])
    got = normalise(chart)
    assert sorted(got) == sorted(want)
    for key, obj in want.items():
        assert got[key] == obj, f"{key} differs:\n{yaml.safe_dump(got[key])}\nvs\n{yaml.safe_dump(obj)}"
    # The Namespace is helm's --create-namespace; everything else is namespaced there.
    assert all(o["metadata"].get("namespace", NAMESPACE) == NAMESPACE for o in chart)


def test_chart_labels(chart: list[Obj]) -> None:
    for obj in chart:
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_chart_values_are_used() -> None:
    values: dict[str, Any] = {
        "driverName": "loop.example.org",
        "kubeletDir": "/var/lib/k0s/kubelet",
        "dataDir": "/srv/thinloop",
        "images": {"driver": {"tag": "9.9.9"}},
        "node": {"nodeSelector": {"disk": "fast"}},
        "storageClasses": [{"name": "fast", "parameters": {"fsType": "xfs"}, "reclaimPolicy": "Retain"}],
        "volumeSnapshotClass": {"enabled": False},
        "metricsPort": 0,
    }
    objs = render_chart(values)
    assert find(objs, "CSIDriver")["metadata"]["name"] == "loop.example.org"
    sc = find(objs, "StorageClass")
    assert (sc["metadata"]["name"], sc["provisioner"], sc["reclaimPolicy"]) == ("fast", "loop.example.org", "Retain")
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer" and sc["allowVolumeExpansion"] is True
    assert not [o for o in objs if o["kind"] == "VolumeSnapshotClass"]
    ds = find(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    # Helm merges maps with the defaults.
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "disk": "fast"}
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert paths == {
        "plugin-dir": "/var/lib/k0s/kubelet/plugins/loop.example.org",
        "registration-dir": "/var/lib/k0s/kubelet/plugins_registry",
        "kubelet-dir": "/var/lib/k0s/kubelet",
        "dev": "/dev",
        "data-dir": "/srv/thinloop",
    }
    cs = containers(ds)
    assert cs["thinloop"]["image"] == "thinloop/thinloop-csi:9.9.9"
    assert "--driver-name=loop.example.org" in cs["thinloop"]["args"]
    assert not any(a.startswith("--metrics-address") for a in cs["thinloop"]["args"])
    assert ("--kubelet-registration-path=$(KUBELET_DIR)/plugins/loop.example.org/csi.sock"
            in cs["node-driver-registrar"]["args"])
    assert find(objs, "ConfigMap")["data"]["kubeletDir"] == "/var/lib/k0s/kubelet"


def test_chart_lints() -> None:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    result = helm.lint(str(CHART_DIR))
    assert result["errors"] == []
    # Severity 1 is INFO (e.g. "icon is recommended"); nothing worse.
    assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]


def test_group_snapshots_can_be_switched_off() -> None:
    """On a cluster without the groupsnapshot.storage.k8s.io v1 CRDs the gate must be off
    (csi-snapshotter would start no controller): no gate, no rules, no class."""
    on = render_chart()
    assert "--feature-gates=CSIVolumeGroupSnapshot=true" in containers(find(on, "DaemonSet"))["csi-snapshotter"]["args"]
    assert find(on, "VolumeGroupSnapshotClass")["driver"] == "thinloop.csi.io"
    off = render_chart({"groupSnapshots": {"enabled": False}})
    assert not [a for a in containers(find(off, "DaemonSet"))["csi-snapshotter"]["args"] if "feature-gates" in a]
    assert not [o for o in off if o["kind"] == "VolumeGroupSnapshotClass"]
    assert "groupsnapshot.storage.k8s.io" not in yaml.safe_dump(off)


def test_a_default_storage_class_can_be_chosen() -> None:
    objs = render_chart({"defaultStorageClass": "thinloop-xfs"})
    marked = {o["metadata"]["name"]: o["metadata"].get("annotations", {}) for o in objs if o["kind"] == "StorageClass"}
    assert marked["thinloop-xfs"] == {"storageclass.kubernetes.io/is-default-class": "true"}
    assert [n for n, a in marked.items() if a] == ["thinloop-xfs"]
    plain = render_chart()
    assert not [o for o in plain if o["kind"] == "StorageClass" and o["metadata"].get("annotations")]


def test_a_default_storage_class_that_does_not_exist_is_refused() -> None:
    with pytest.raises(Exception, match="defaultStorageClass \"nope\" names none of storageClasses"):
        render_chart({"defaultStorageClass": "nope"})
