"""scripts/install-deps.sh: the Debian tools it checks are the ones the driver runs, each
with the package that ships it, and Python packages only ever go into .venv/."""

from __future__ import annotations

import re
from pathlib import Path

from csi_driver.host.linux import REQUIRED_TOOLS, TOOL_PACKAGES

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "scripts" / "install-deps.sh").read_text()


def array(name: str) -> dict[str, str]:
    body = re.search(rf"^{name}=\((.*?)^\)", SCRIPT, re.S | re.M)
    assert body, name
    pairs = [line.split("#")[0].strip() for line in body.group(1).splitlines()]
    return dict(p.split(":", 1) for p in pairs if p)


def test_runtime_tools_are_the_drivers_with_their_packages() -> None:
    runtime = array("RUNTIME_TOOLS")
    assert set(REQUIRED_TOOLS) <= set(runtime)
    for tool in REQUIRED_TOOLS:
        assert runtime[tool] == TOOL_PACKAGES[tool], tool
    assert set(array("TEST_TOOLS")) >= {"fio", "shellcheck", "glusterd", "gluster", "glusterfs"}


def test_python_packages_go_into_the_projects_venv_only() -> None:
    for script in (ROOT / "scripts").glob("*.sh"):
        for line in script.read_text().splitlines():
            if "pip install" in line:
                assert ".venv/bin/python -m pip install" in line, f"{script.name}: {line.strip()}"
    for script in ("demo.sh", "test.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "./scripts/install-deps.sh" in text
        assert ".venv/bin" in text, script
    assert "-m venv .venv" in SCRIPT and "--system-site-packages" not in SCRIPT
