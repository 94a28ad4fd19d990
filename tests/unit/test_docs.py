"""README.md and docs/ against the code, both ways: every flag, StorageClass parameter,
ephemeral volume attribute, metric and thinloopctl command the docs name exists, and every
one the driver and thinloopctl have is documented. Commands in the docs run from a clone
as written (the project's Python is .venv's), and Helm installs name the namespace.

Flags of other programs that the docs quote (sidecars, kubectl, helm, losetup, fio, ...)
are listed in EXTERNAL_FLAGS with their owner; the scripts' own flags (bench.py, soak.py,
the demo, install-deps.sh) are checked one way, from the docs to the scripts' parsers."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver.csi.node import EPHEMERAL_ATTRS
from csi_driver.csi.validation import K8S_PREFIX, STORAGECLASS_PARAMETERS, resolve_params
from csi_driver.host.oslayer import FILESYSTEMS
from csi_driver.ops import ctl
from csi_driver.serving.driver import Driver
from csi_driver.serving.flags import FLAGS
from csi_driver.serving.metrics import Metrics
from csi_driver.settings import Settings
from csi_driver.volumes.datastore.records import init_marker
from csi_driver.volumes.params import DISKFORMATS, RECLAIM_MODES
from tests.fakeos import FakeOS
from tests.helpers import cap_for

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {p.relative_to(ROOT).as_posix(): p.read_text() for p in DOCS}
OPERATIONS = TEXT["docs/operations.md"]

EXTERNAL_FLAGS = {
    # CSI sidecars (deploy/kubernetes/base/*.yaml)
    "--node-deployment": "csi-provisioner, csi-snapshotter", "--enable-capacity": "csi-provisioner",
    "--strict-topology": "csi-provisioner", "--kubelet-registration-path": "node-driver-registrar",
    "--enable-distributed-snapshotting": "snapshot-controller", "--leader-election": "csi-resizer",
    "--health-port": "livenessprobe", "--feature-gates": "csi-snapshotter, snapshot-controller",
    "--extra-create-metadata": "csi-provisioner",
    "--disable-force-detach-on-timeout": "kube-controller-manager",
    # cluster tools
    "--set": "helm", "--namespace": "helm", "--create-namespace": "helm", "--field-selector": "kubectl",
    "--for": "kubectl wait", "--set-json": "helm",
    # the commands the driver's OS layer stands for, and the benchmarks' tools
    "--direct-io": "losetup", "--sector-size": "losetup", "--detach": "losetup", "--bind": "mount",
    "--make-rshared": "mount",
    "--freeze": "fsfreeze", "--unfreeze": "fsfreeze", "--sparse": "cp", "--reflink": "cp",
    "--direct": "fio", "--ioengine": "fio", "--gil": "py-spy",
    # the image build
    "--no-install-recommends": "apt-get", "--no-cache-dir": "pip",
}
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def parser_options(p: argparse.ArgumentParser) -> Iterator[str]:
    for action in p._actions:
        yield from (o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parser_options(sub)


def subcommands(p: argparse.ArgumentParser, prefix: str = "") -> Iterator[str]:
    """Every command line that runs something: `list`, `node status` (not `node`)."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from subcommands(sub, prefix + name + " ")
                else:
                    yield prefix + name


CTL = ctl.build_parser()
DRIVER_FLAGS = {f.name for f in FLAGS}
CTL_FLAGS = set(parser_options(CTL)) - {"--help"}
SCRIPT_FLAGS = {m for path in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                                ROOT / "csi_driver" / "ops" / "demo.py"]
                for m in re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", path.read_text())}
SCRIPT_FLAGS |= set(re.findall(r"^  (--[a-z-]+)\)", (ROOT / "scripts" / "install-deps.sh").read_text(), re.M))
SCRIPT_FLAGS |= set(re.findall(r'"\$\{1:-\}" == "(--[a-z-]+)"', (ROOT / "scripts" / "e2e.sh").read_text()))


def code_spans(text: str) -> Iterator[str]:
    """Inline code and the lines of fenced blocks: where commands are written."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            yield line
        else:
            yield from re.findall(r"`([^`]+)`", line)


def section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start:end if end > 0 else len(text)]


def table_first_cells(text: str) -> list[list[str]]:
    """The backticked names of each table row's first cell."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            rows.append(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return rows


# -- flags --------------------------------------------------------------------------------------


def test_every_flag_the_docs_name_exists() -> None:
    known = DRIVER_FLAGS | CTL_FLAGS | SCRIPT_FLAGS | set(EXTERNAL_FLAGS) | {"--help", "--version"}
    unknown = {(name, flag) for name, text in TEXT.items() for flag in FLAG_RE.findall(text) if flag not in known}
    assert not unknown, f"flags named in the docs that nothing has: {sorted(unknown)}"


def test_the_readme_flag_table_is_the_drivers_flags() -> None:
    table = section(TEXT["README.md"], "## Driver flags")
    documented = {name for row in table_first_cells(table) for name in row}
    assert documented == DRIVER_FLAGS
    for flag in FLAGS:  # and the defaults agree
        row = next(line for line in table.splitlines()
                   if line.startswith("| `") and f"`{flag.name}`" in line.split("|")[1])
        if flag.default and flag.name not in ("--log-level", "--log-format"):
            assert f"`{flag.default}`" in row, (flag.name, flag.default, row)


def test_every_thinloopctl_option_is_documented() -> None:
    missing = {flag for flag in CTL_FLAGS if flag not in OPERATIONS}
    assert not missing, f"thinloopctl options docs/operations.md does not mention: {sorted(missing)}"


# -- StorageClass parameters and ephemeral attributes ----------------------------------------------


@pytest.mark.parametrize("doc", ["README.md", "docs/deploy.md"])
def test_storageclass_parameter_tables_are_the_codes(doc: str) -> None:
    table = section(TEXT[doc], "## StorageClass parameters")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    names = {n for row in table_first_cells(table) for n in row} - {K8S_PREFIX + "*"}
    assert names == {*STORAGECLASS_PARAMETERS, K8S_PREFIX + "fstype"}
    allowed = {"fsType": FILESYSTEMS, "diskformat": DISKFORMATS, "reclaim": RECLAIM_MODES}
    for row in rows:
        cells = row.split("|")
        key = next((k for k in allowed if f"`{k}`" in cells[1]), None)
        if key is None:
            continue
        assert set(re.findall(r"`([^`]+)`", cells[2])) == set(allowed[key]), row
        for value in allowed[key]:
            resolve_params({key: value}, [cap_for("")])
    assert "made at create time" in table
    assert resolve_params({K8S_PREFIX + "fstype": "xfs"}, [cap_for("")]).fs_type == "xfs"


@pytest.mark.parametrize("doc", ["README.md", "docs/deploy.md"])
def test_ephemeral_attributes_are_the_codes(doc: str) -> None:
    sentence = re.search(r"Inline\s+ephemeral\s+volumes\s+take\s+(.*?)\s+as\s", TEXT[doc], re.S)
    assert sentence, doc
    named = {w for w in re.findall(r"`([^`]+)`", sentence.group(1)) if w[0].isalpha()}
    assert named == EPHEMERAL_ATTRS


# -- metrics ------------------------------------------------------------------------------------


def metric_families(tmp: Path) -> set[str]:
    """What a node-local driver and a shared-mode one export."""
    datastore = tmp / "datastore"
    datastore.mkdir()
    init_marker(datastore, "ds1", "test")
    families = set()
    for settings in (Settings(socket_path=tmp / "csi.sock", node_id="n1", data_dir=tmp / "data"),
                     Settings(socket_path=tmp / "shared.sock", node_id="n1", data_dir=datastore, datastore="ds1")):
        registry = Metrics.for_driver(Driver.build(settings, oslayer=FakeOS())).registry
        families |= {family.name for family in registry.collect()}
    return families


def family_of(name: str) -> str:
    return re.sub(r"_(total|info|bucket|sum|count|created)$", "", name)


def test_metric_names_both_ways(tmp_path: Path) -> None:
    families = metric_families(tmp_path)
    assert all(f.startswith("thinloop_") for f in families)
    named = {family_of(m) for text in TEXT.values() for m in re.findall(r"\bthinloop_[a-z_]*[a-z]", text)}
    assert named - families == set(), "metrics named in the docs that the driver does not export"
    table = section(OPERATIONS, "## Metrics")
    documented = {family_of(n) for row in table_first_cells(table) for n in row}
    assert families - documented == set(), "metrics missing from the table in docs/operations.md"


# -- thinloopctl commands -----------------------------------------------------------------------

VALUE_OPTIONS = {"-o", "--output", "--endpoint", "--timeout", "--data-dir", "--kubelet-dir", "--kubeconfig",
                 "--driver-name", "--node-id", "--node", "--name"}


def documented_commands() -> set[str]:
    found = set()
    for text in TEXT.values():
        for span in code_spans(text):
            for m in re.finditer(r"\bthinloopctl((?:\s+[^\s|;&]+)*)", span):
                words = iter(m.group(1).split())
                path: list[str] = []
                for word in words:
                    word = word.strip("[]")
                    if word.startswith("-"):
                        if word in VALUE_OPTIONS:
                            next(words, None)
                        continue
                    path.append(word)
                    if word not in ("node", "datastore"):  # groups of commands
                        break
                if path:
                    found.add(" ".join(path))
    return found


def test_thinloopctl_commands_both_ways() -> None:
    commands = set(subcommands(CTL))
    named = documented_commands()
    assert named - commands == set(), "thinloopctl commands named in the docs that do not exist"
    assert commands - named == set(), "thinloopctl commands the docs never show"
    assert "modify" in section(TEXT["README.md"], "## Operating it")


# -- commands as written ------------------------------------------------------------------------


def test_doc_commands_use_the_projects_python() -> None:
    """`python ARGS` or `pip install <this project>` at a command's start means the
    system's interpreter, which has none of the project's packages (and which PEP 668
    guards on Debian): from a clone they are .venv/bin/python and .venv/bin/pip."""
    bad = []
    for name, text in TEXT.items():
        for span in code_spans(text):
            for command in re.split(r"&&|;|\|", span):
                words = command.split()
                while words and (words[0] in ("sudo", "$", "env") or "=" in words[0]):
                    words = words[1:]
                if len(words) > 1 and re.fullmatch(r"python3?(\.\d+)?", words[0]):
                    bad.append((name, span.strip()))
                if words[:2] in (["pip", "install"], ["pip3", "install"]) and \
                        any(w.strip("'\"").startswith((".", "-e", "-r", "thinloop")) for w in words[2:]):
                    bad.append((name, span.strip()))
    assert not bad, bad


def test_helm_installs_name_the_namespace() -> None:
    for name, text in TEXT.items():
        for span in code_spans(text):
            if "helm install" in span:
                assert re.search(r"(-n|--namespace) thinloop\b", span), (name, span)


def test_the_license_pyproject_declares_is_there_verbatim() -> None:
    import hashlib
    import tomllib
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_bytes()
    # The Apache License 2.0 as the ASF publishes it (Debian: /usr/share/common-licenses/Apache-2.0).
    assert hashlib.sha256(text).hexdigest() == "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
    assert "License" in TEXT["README.md"].split("## License", 1)[1]


# -- files and modules the docs name --------------------------------------------------------

SKIP_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}


def repo_files() -> set[str]:
    """Every file of the checkout, as a path from its root."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        rel = Path(dirpath).relative_to(ROOT)
        out |= {(rel / f).as_posix() for f in filenames}
    return out


FILES = repo_files()
PY_NAME = re.compile(r"(?<![\w./-])((?:[\w-]+/)*\w+\.py)(?![\w/])")
MODULE_NAME = re.compile(r"\bcsi_driver(?:\.\w+)+")


def names_a_file(path: str) -> bool:
    """A path from the root, a path under csi_driver/ (docs/architecture.md writes them so),
    or a bare file name that some file of the checkout has."""
    if "/" in path:
        return path in FILES or f"csi_driver/{path}" in FILES
    return any(f == path or f.endswith("/" + path) for f in FILES)


def test_every_python_file_the_docs_name_exists() -> None:
    named = {(doc, m) for doc, text in TEXT.items() for span in code_spans(text) for m in PY_NAME.findall(span)}
    assert named, "the check checks nothing"
    missing = sorted((doc, path) for doc, path in named if not names_a_file(path))
    assert not missing, f"files named in the docs that the checkout does not have: {missing}"


def module_file(dotted: str) -> str | None:
    base = dotted.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if candidate in FILES:
            return candidate
    return None


def names_a_module(dotted: str) -> bool:
    """csi_driver.<package>.<module>, or that followed by one name the module defines."""
    parts = dotted.split(".")
    if module_file(dotted):
        return True
    module = module_file(".".join(parts[:-1]))
    return module is not None and re.search(rf"^(def |class |){parts[-1]}\b", (ROOT / module).read_text(),
                                            re.M) is not None


def test_every_module_the_docs_and_docstrings_name_exists() -> None:
    """csi_driver.<package>.<module>[.<name>] in the docs and in the code's own prose."""
    sources = [*TEXT.items(), *((p.relative_to(ROOT).as_posix(), p.read_text())
                                for d in ("csi_driver", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")
                                if "proto" not in p.parts)]
    named = {(where, dotted) for where, text in sources for dotted in MODULE_NAME.findall(text)}
    assert named, "the check checks nothing"
    wrong = sorted((where, dotted) for where, dotted in named if not names_a_module(dotted))
    assert not wrong, f"modules (or names in them) that do not exist: {wrong}"
