"""Rendering and lookup helpers for the deployment tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
CHART_DIR = ROOT / "deploy" / "helm" / "thinloop"
EXAMPLES_DIR = ROOT / "examples"
METRICS_DIR = ROOT / "deploy" / "metrics"
SCRIPTS = [ROOT / "scripts" / n for n in ("kind-up.sh", "minikube-up.sh", "e2e.sh")]
# Every shell file in the repository, for shellcheck.
SHELL_FILES = sorted([*(ROOT / "scripts").glob("*.sh"), *(ROOT / "scripts" / "lib").glob("*.sh"), ROOT / ".ci" / "run"])
NAMESPACE = "thinloop"

# The shared-datastore deployment (docs/shared-datastore.md): its driver name
# and topology key are the contract the driver's --datastore mode implements
# (tests/deploy/test_shared.py checks the driver agrees once it has the flag).
SHARED_DRIVER_NAME = "shared.thinloop.csi.io"
DATASTORE_TOPOLOGY_KEY = "topology.thinloop.csi.io/datastore"
SHARED_OVERLAYS = ("shared-datastore", "shared-datastore-nfs")
# Chart values that render what overlays/shared-datastore renders.
SHARED_VALUES: dict[str, Any] = {"nodeLocal": {"enabled": False}, "sharedDatastore": {"enabled": True}}

Obj = dict[str, Any]


def load_all(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomize(path: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize base")
    out = subprocess.run([kubectl, "kustomize", str(path)], check=True,
                         capture_output=True, text=True, timeout=120)
    return load_all(out.stdout)


def kustomize_with(tmp_path: Path, resource: Path, components: list[Path]) -> list[Obj]:
    """RESOURCE with COMPONENTS, through an overlay of one's own as the docs show it."""
    overlay = Path(tempfile.mkdtemp(prefix="overlay-", dir=tmp_path))
    # kustomize takes relative paths only.
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(resource, overlay)],
        "components": [os.path.relpath(c, overlay) for c in components]}))
    return kustomize(overlay)


def render_chart(values: dict[str, Any] | None = None) -> list[Obj]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed: cannot render the chart")
    with helm.Chart.load(str(CHART_DIR)) as chart:
        files = chart.render(values or {}, name="thinloop", namespace=NAMESPACE)
    objs: list[Obj] = []
    for name in sorted(files):
        if name.endswith((".yaml", ".yml")):
            objs.extend(load_all(files[name]))
    return objs


def find(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def containers(obj: Obj) -> dict[str, Obj]:
    return {c["name"]: c for c in obj["spec"]["template"]["spec"]["containers"]}


def iter_files(directory: Path) -> Iterator[Path]:
    yield from sorted(directory.glob("*.yaml"))
