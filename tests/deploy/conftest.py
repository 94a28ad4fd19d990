"""Fixtures for the deployment tests: the manifests rendered once per session."""

from __future__ import annotations

import pytest

from .manifests import KUSTOMIZE_DIR, SHARED_VALUES, Obj, kustomize, render_chart


@pytest.fixture(scope="session")
def base() -> list[Obj]:
    return kustomize(KUSTOMIZE_DIR)


@pytest.fixture(scope="session")
def chart() -> list[Obj]:
    return render_chart()


@pytest.fixture(scope="session")
def shared() -> list[Obj]:
    return kustomize(KUSTOMIZE_DIR / "overlays" / "shared-datastore")


@pytest.fixture(scope="session")
def shared_chart() -> list[Obj]:
    return render_chart(SHARED_VALUES)
