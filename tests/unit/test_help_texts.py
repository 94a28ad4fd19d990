"""--help of every command and script says its whole first paragraph: no description cut
mid-sentence at a line break."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON_ENTRIES = {  # argv after the interpreter -> the file whose docstring is the description
    ("-m", "csi_driver.ops.demo"): ROOT / "csi_driver" / "ops" / "demo.py",
    ("-m", "csi_driver.ops.ctl"): ROOT / "csi_driver" / "ops" / "ctl.py",
    (str(ROOT / "scripts" / "soak.py"),): ROOT / "scripts" / "soak.py",
    (str(ROOT / "scripts" / "bench.py"),): ROOT / "scripts" / "bench.py",
}
SHELL_ENTRIES = ["demo.sh", "test.sh", "install-deps.sh"]


def words(text: str) -> str:
    return " ".join(text.split())


def run_help(argv: list[str], **env: str) -> str:
    res = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
                         env={**os.environ, "COLUMNS": "90", **env})
    assert res.stderr == ""
    return res.stdout


@pytest.mark.parametrize("entry", list(PYTHON_ENTRIES), ids=lambda e: e[-1].rsplit("/", 1)[-1])
def test_python_help_holds_the_whole_first_paragraph(entry: tuple[str, ...]) -> None:
    doc = ast.get_docstring(ast.parse(PYTHON_ENTRIES[entry].read_text())) or ""
    first = words(doc.split("\n\n")[0])
    assert first.endswith((".", ":")), f"the docstring's first paragraph is not a sentence: {first!r}"
    assert first in words(run_help([sys.executable, *entry]))


@pytest.mark.parametrize("script", SHELL_ENTRIES)
def test_script_help_is_its_whole_header(script: str) -> None:
    path = ROOT / "scripts" / script
    header = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    # PYTHON=/bin/false: a script that ignored --help would stop at once, installing nothing.
    out = run_help(["bash", str(path)], PYTHON="/bin/false")
    assert words(" ".join(header)) == words(out)
    assert words(out).endswith(".") or words(out).endswith(")")
