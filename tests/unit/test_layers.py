"""The package's layers, read from its import graph by import-linter: the contracts in
pyproject.toml ([tool.importlinter]; the layers are drawn in docs/architecture.md) hold
for the code as it is, and they do catch a lower layer that imports a higher one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the packages under `tree`, with `tree`'s pyproject.toml; the
    packages are imported from `tree` (PYTHONPATH comes before the editable install)."""
    return subprocess.run([sys.executable, "-c", LINT], cwd=tree, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tree)}, check=False)


def test_the_import_contracts_hold() -> None:
    res = lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("csi_driver", "benchmarks"):
        shutil.copytree(ROOT / package, dst / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def plant(path: Path, line: str) -> None:
    """Add an import after the module's `from __future__` line."""
    text = path.read_text()
    future = "from __future__ import annotations\n"
    assert future in text, path
    path.write_text(text.replace(future, future + line + "\n", 1))


def test_a_lower_layer_importing_a_higher_one_is_caught(tmp_path: Path) -> None:
    """The host's runner importing serving's metrics: the layers contract names the very
    import, and the circle it closes is reported too."""
    copy_tree(tmp_path)
    assert lint_imports(tmp_path).returncode == 0, "the copy starts clean"
    plant(tmp_path / "csi_driver" / "host" / "runner.py", "from ..serving import metrics  # noqa: F401")
    res = lint_imports(tmp_path)
    assert res.returncode != 0
    assert "csi_driver.host is not allowed to import csi_driver.serving" in res.stdout
    assert "csi_driver.host.runner -> csi_driver.serving.metrics" in res.stdout
    assert "no circles" in res.stdout.split("Broken contracts")[1]


def test_the_model_importing_a_csi_face_and_ops_importing_serving_are_caught(tmp_path: Path) -> None:
    copy_tree(tmp_path)
    plant(tmp_path / "csi_driver" / "volumes" / "store.py", "from ..csi import validation  # noqa: F401")
    plant(tmp_path / "csi_driver" / "ops" / "orphans.py", "from ..serving import preflight  # noqa: F401")
    res = lint_imports(tmp_path)
    assert res.returncode != 0
    assert "csi_driver.volumes.store -> csi_driver.csi.validation" in res.stdout
    assert "csi_driver.ops.orphans -> csi_driver.serving.preflight" in res.stdout


def test_a_new_module_has_to_be_given_a_layer(tmp_path: Path) -> None:
    copy_tree(tmp_path)
    (tmp_path / "csi_driver" / "freeze.py").write_text('"""A module no layer names yet."""\n')
    res = lint_imports(tmp_path)
    assert res.returncode != 0
    assert "The following modules are not listed as layers:\n\n- csi_driver.freeze" in res.stdout
