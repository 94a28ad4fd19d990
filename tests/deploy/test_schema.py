"""Every rendered object validates against the Kubernetes OpenAPI schema.

Core kinds use the strict JSON schemas that kubernetes-validate bundles per
Kubernetes release (no network). CRD-typed objects (snapshot.storage.k8s.io,
groupsnapshot.storage.k8s.io, monitoring.coreos.com) have no core schema and
their CRDs are not available offline here, so they are checked against small
structural schemas below, written from the fields the CRDs define.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest

from .manifests import (
    EXAMPLES_DIR,
    KUSTOMIZE_DIR,
    METRICS_DIR,
    SHARED_OVERLAYS,
    Obj,
    iter_files,
    kustomize,
    kustomize_with,
    load_all,
)

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

# The newest release whose schemas the package bundles (1.37 with >=1.37.0).
K8S_VERSION = kv.latest_version()

_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_META = {"type": "object", "required": ["name"], "properties": {"name": _NAME}}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
}
_RELABEL = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "sourceLabels": {"type": "array", "items": {"type": "string"}},
            "targetLabel": {"type": "string"},
        },
        "additionalProperties": False,
    },
}
_ENDPOINT = {
    "type": "object",
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "relabelings": _RELABEL,
    },
    "additionalProperties": False,
}
_MONITOR_SPEC = {
    "selector": _LABEL_SELECTOR,
    "namespaceSelector": {
        "type": "object",
        "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
        "additionalProperties": False,
    },
}

_SNAPSHOT_CLASS = {  # VolumeSnapshotClass and VolumeGroupSnapshotClass have the same fields
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
    "properties": {
        "apiVersion": {}, "kind": {}, "metadata": _META,
        "driver": {"type": "string", "minLength": 1},
        "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): _SNAPSHOT_CLASS,
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["source"],
                "properties": {
                    "volumeSnapshotClassName": {"type": "string"},
                    "source": {
                        "type": "object",
                        "properties": {
                            "persistentVolumeClaimName": {"type": "string"},
                            "volumeSnapshotContentName": {"type": "string"},
                        },
                        "minProperties": 1,
                        "maxProperties": 1,
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshotClass"): _SNAPSHOT_CLASS,
    ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshot"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["source"],
                "properties": {
                    "volumeGroupSnapshotClassName": {"type": "string"},
                    "source": {
                        "type": "object",
                        "properties": {
                            "selector": {
                                "type": "object",
                                "properties": {
                                    "matchLabels": _LABEL_SELECTOR["properties"]["matchLabels"],
                                    "matchExpressions": {"type": "array", "items": {"type": "object"}},
                                },
                                "minProperties": 1,
                                "additionalProperties": False,
                            },
                            "volumeGroupSnapshotContentName": {"type": "string"},
                        },
                        "minProperties": 1,
                        "maxProperties": 1,
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {**_MONITOR_SPEC, "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    **_MONITOR_SPEC,
                    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def validate(obj: Obj) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.Draft202012Validator(CRD_SCHEMAS[key]).validate(obj)
        return
    try:
        kv.validate(obj, K8S_VERSION, strict=True)
    except kv.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise AssertionError(f"{obj['kind']} {obj['metadata'].get('name')}: {exc.message} at {where}") from None


def label(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def test_schema_version_is_current() -> None:
    major, minor = (int(p) for p in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 34)


def test_every_kind_has_a_schema(base: list[Obj], chart: list[Obj]) -> None:
    """No object may slip through unvalidated because its kind is unknown."""
    for obj in base + chart:
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            continue
        kv.validate(obj, K8S_VERSION)  # raises SchemaNotFoundError for unknown kinds


def test_kustomize_base_validates(base: list[Obj]) -> None:
    assert len(base) >= 15
    for obj in base:
        validate(obj)


@pytest.mark.parametrize("overlay", ["microk8s", "k0s", *SHARED_OVERLAYS])
def test_overlays_validate(overlay: str) -> None:
    for obj in kustomize(KUSTOMIZE_DIR / "overlays" / overlay):
        validate(obj)


@pytest.mark.parametrize("resource", [".", "overlays/microk8s", *(f"overlays/{o}" for o in SHARED_OVERLAYS)])
def test_no_group_snapshots_component_validates(tmp_path: Path, resource: str) -> None:
    objs = kustomize_with(tmp_path, KUSTOMIZE_DIR / resource, [KUSTOMIZE_DIR / "components" / "no-group-snapshots"])
    assert len(objs) >= 15
    for obj in objs:
        validate(obj)


def test_helm_chart_validates(chart: list[Obj]) -> None:
    assert len(chart) >= 15
    for obj in chart:
        validate(obj)


def test_shared_kinds_have_schemas(shared: list[Obj], shared_chart: list[Obj]) -> None:
    """The shared-datastore objects (PodDisruptionBudget, PV, PVC too) are all validated."""
    nfs = kustomize(KUSTOMIZE_DIR / "overlays" / "shared-datastore-nfs")
    for obj in shared + shared_chart + nfs:
        if (obj["apiVersion"], obj["kind"]) not in CRD_SCHEMAS:
            kv.validate(obj, K8S_VERSION)


def test_shared_helm_chart_validates(shared_chart: list[Obj]) -> None:
    assert len(shared_chart) >= 20
    for obj in shared_chart:
        validate(obj)


@pytest.mark.parametrize("path", list(iter_files(EXAMPLES_DIR)), ids=lambda p: p.name)
def test_example_validates(path) -> None:  # type: ignore[no-untyped-def]
    objs = load_all(path.read_text())
    assert objs
    for obj in objs:
        validate(obj)


def test_metrics_examples_validate() -> None:
    objs = [o for p in iter_files(METRICS_DIR) if p.name != "kustomization.yaml" for o in load_all(p.read_text())]
    assert {o["kind"] for o in objs} == {"Service", "ServiceMonitor", "PodMonitor"}
    for obj in objs:
        validate(obj)
    rendered = kustomize(METRICS_DIR)
    assert {label(o) for o in rendered} == {"Service/thinloop-node-metrics", "ServiceMonitor/thinloop-node"}


def test_structural_schemas_reject_mistakes() -> None:
    """The hand-written CRD schemas are not vacuous."""
    bad = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
           "metadata": {"name": "x"}, "driver": "thinloop.csi.io", "deletionPolicy": "Keep"}
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    group = {"apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshot",
             "metadata": {"name": "x"}, "spec": {"source": {"selector": {"matchLabel": {"a": "b"}}}}}
    with pytest.raises(jsonschema.ValidationError):
        validate(group)
    typo = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x"},
            "spec": {"selector": {}, "podMetricEndpoints": [{"port": "metrics"}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate(typo)


def test_core_schema_rejects_unknown_fields() -> None:
    """strict mode catches a misspelt field, so a pass means something."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "volumeMount": []}]}}
    with pytest.raises(AssertionError):
        validate(pod)
