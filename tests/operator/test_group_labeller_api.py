"""`thinloopctl node label-group-snapshots --watch`, the node pod's sidecar, as a process
against a small local HTTP server that speaks the Kubernetes API for one resource
(cluster-scoped groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshotContents: list with a
label selector, chunked watch with ERROR events, merge patch with a resourceVersion
precondition). The real Kubernetes Python client talks to it through a kubeconfig. As
root the data dir is a read-only bind mount, as in the DaemonSet."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from csi_driver.ops.grouplabels import GROUP, MANAGED_BY, PLURAL, VERSION
from tests.operator.conftest import Ctl
from tests.unit.test_group_labels import DRIVER, content, make_node

Obj = dict[str, Any]
PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
WAIT = 60.0
"""Upper bound on any wait for the labeller (it normally answers within milliseconds)."""


def status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeApi:
    """The API server's state: objects with resourceVersions, open watches, and a record
    of every request. All waiting is on one condition variable."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.objects: dict[str, Obj] = {}
        self.version = 100
        self.watches: list[queue.Queue[Obj | None]] = []
        self.lists: list[str] = []
        """resourceVersion of each list answered."""
        self.watched_from: list[str] = []
        self.patches: list[tuple[str, str, str, str]] = []
        """(name, resourceVersion sent, label value, Content-Type) of each patch that landed."""
        self.refused: list[tuple[str, int]] = []
        self.steal: dict[str, str] = {}
        """name -> node: that node labels the object just before this patch is judged."""
        self.served = True
        """False: the resource is unknown (its CRD is not installed)."""

    def _bump(self, obj: Obj) -> Obj:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[obj["metadata"]["name"]] = obj
        return json.loads(json.dumps(obj))

    def add(self, obj: Obj, *, announce: bool = True) -> Obj:
        with self.cond:
            obj = self._bump(json.loads(json.dumps(obj)))
            if announce:
                for w in self.watches:
                    w.put({"type": "ADDED", "object": obj})
            return obj

    def expire(self) -> None:
        """Every open watch gets 410 Gone and is closed."""
        with self.cond:
            for w in self.watches:
                w.put({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                w.put(None)

    def close(self) -> None:
        with self.cond:
            for w in self.watches:
                w.put(None)

    def wait(self, what: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(what, timeout=WAIT), "the labeller did not get there"

    def label_of(self, name: str) -> str | None:
        with self.cond:
            return self.objects[name]["metadata"].get("labels", {}).get(MANAGED_BY)

    # -- requests ------------------------------------------------------------------------------

    def unlabelled(self) -> list[Obj]:
        return [o for o in self.objects.values() if MANAGED_BY not in o["metadata"].get("labels", {})]

    def patch(self, name: str, body: Obj, content_type: str) -> tuple[int, Obj]:
        with self.cond:
            if name in self.steal:
                self.objects[name]["metadata"].setdefault("labels", {})[MANAGED_BY] = self.steal.pop(name)
                self._bump(self.objects[name])
            obj = self.objects.get(name)
            sent = body.get("metadata", {}).get("resourceVersion", "")
            if obj is None:
                self.refused.append((name, 404))
                self.cond.notify_all()
                return 404, status(404, "NotFound", f"{PLURAL} {name!r} not found")
            if sent != obj["metadata"]["resourceVersion"]:
                self.refused.append((name, 409))
                self.cond.notify_all()
                return 409, status(409, "Conflict", f"Operation cannot be fulfilled on {PLURAL} {name!r}: the "
                                   "object has been modified; please apply your changes to the latest version")
            obj["metadata"].setdefault("labels", {}).update(body["metadata"].get("labels", {}))
            now = self._bump(obj)
            self.patches.append((name, sent, now["metadata"]["labels"][MANAGED_BY], content_type))
            for w in self.watches:  # it no longer matches the selector "!managed-by"
                w.put({"type": "DELETED", "object": now})
            self.cond.notify_all()
            return 200, now


def handler_for(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # chunked watch streams

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, doc: Obj) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path != PATH or not api.served:
                self._send(404, status(404, "NotFound", "the server could not find the requested resource"))
                return
            assert query.get("labelSelector") == f"!{MANAGED_BY}", query
            if query.get("watch") != "true":
                with api.cond:
                    api.lists.append(str(api.version))
                    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VolumeGroupSnapshotContentList",
                           "metadata": {"resourceVersion": str(api.version)}, "items": api.unlabelled()}
                    api.cond.notify_all()
                self._send(200, doc)
                return
            events: queue.Queue[Obj | None] = queue.Queue()
            with api.cond:
                api.watches.append(events)
                api.watched_from.append(query.get("resourceVersion", ""))
                api.cond.notify_all()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while (event := events.get()) is not None:
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the client went away
            finally:
                with api.cond:
                    api.watches.remove(events)
                    api.cond.notify_all()
            self.close_connection = True

        def do_PATCH(self) -> None:
            url = urlsplit(self.path)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not url.path.startswith(PATH + "/"):
                self._send(404, status(404, "NotFound", "no such path"))
                return
            code, doc = api.patch(url.path.rsplit("/", 1)[1], body, self.headers.get("Content-Type", ""))
            self._send(code, doc)

    return Handler


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[FakeApi, Path]]:
    """The fake API and a kubeconfig for it."""
    api = FakeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(api))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    try:
        yield api, kubeconfig
    finally:
        api.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=WAIT)


@contextmanager
def read_only_view(data: Path, at: Path) -> Iterator[Path]:
    """As root, `data` bind-mounted read-only at `at` (the DaemonSet's readOnly mount) and
    unmounted afterwards; otherwise `data` itself."""
    if os.geteuid() != 0:
        yield data
        return
    at.mkdir()
    subprocess.run(["mount", "--bind", str(data), str(at)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], check=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (at / "volumes" / "write-probe").mkdir()
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=True)


def test_the_sidecar_labels_through_the_real_client_resumes_after_410_and_stops_on_sigterm(
        workdir: Path, api_server: tuple[FakeApi, Path]) -> None:
    api, kubeconfig = api_server
    node = make_node(workdir / "node-a", "vol-a", "vol-c")
    with read_only_view(node.data, workdir / "ro-data") as data:
        run_the_sidecar(api, kubeconfig, data, workdir / "labeller.log")


def run_the_sidecar(api: FakeApi, kubeconfig: Path, data: Path, log: Path) -> None:
    api.add(content("c-listed", volumes=["vol-c", "vol-a"]))
    api.add(content("c-other", volumes=["vol-b"]))
    api.add(content("c-race", volumes=["vol-a"]))
    api.steal["c-race"] = "node-z"  # another node labels it between our list and our patch
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "THINLOOP_"))}
    env["NODE_NAME"] = "node-a"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi_driver.ops.ctl", "node", "label-group-snapshots", "--watch",
             "--data-dir", str(data), "--driver-name", DRIVER, "--kubeconfig", str(kubeconfig)],
            stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        # The first list: c-listed labelled, c-race lost to node-z (409, not an error).
        api.wait(lambda: len(api.watches) == 1)
        assert [p[0] for p in api.patches] == ["c-listed"] and api.refused == [("c-race", 409)]
        assert api.watched_from == [api.lists[0]]
        # A content added while it watches.
        api.add(content("c-added", volumes=["vol-c"]))
        api.wait(lambda: len(api.patches) == 2)
        # One added while nobody watches, then the watch expires: it lists again.
        api.add(content("c-gap", volumes=["vol-a", "vol-c"]), announce=False)
        api.expire()
        api.wait(lambda: len(api.patches) == 3 and len(api.watches) == 1 and len(api.watched_from) == 2)
        assert len(api.lists) == 2 and api.watched_from[1] == api.lists[1]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, lines
    assert out.decode().strip() == "stopped by SIGTERM after labelling 3 VolumeGroupSnapshotContent(s)"
    assert [(name, value) for name, _, value, _ in api.patches] == [
        ("c-listed", "node-a"), ("c-added", "node-a"), ("c-gap", "node-a")]
    # Each patch names the resourceVersion the decision was made on, as a merge patch.
    assert all(ctype == "application/merge-patch+json" for *_, ctype in api.patches)
    assert {n: api.label_of(n) for n in api.objects} == {
        "c-listed": "node-a", "c-other": None, "c-race": "node-z", "c-added": "node-a", "c-gap": "node-a"}
    labelled = [line for line in lines if " labelled VolumeGroupSnapshotContent " in line]
    assert [line.split(" labelled VolumeGroupSnapshotContent ")[1].split()[0] for line in labelled] == [
        "c-listed", "c-added", "c-gap"]
    assert "stopped by SIGTERM after 3 label(s)" in lines[-1]
    assert not [line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line], lines


def test_once_reports_api_trouble_in_one_line(api_server: tuple[FakeApi, Path], tmp_path: Path,
                                              run_ctl: Ctl) -> None:
    """One pass (no --watch) that cannot list: the resource is not served, or nothing
    answers. One line each, exit 1, nothing labelled."""
    api, kubeconfig = api_server
    node = make_node(tmp_path / "node-a", "vol-a")
    api.add(content("c", volumes=["vol-a"]))
    api.served = False
    args = ["node", "label-group-snapshots", "--node-name", "node-a", "--data-dir", str(node.data),
            "--kubeconfig", str(kubeconfig)]
    missing = run_ctl(*args)
    assert (missing.code, missing.out) == (1, "")
    assert missing.err.splitlines() == [
        "thinloopctl: Kubernetes API: 404: the server could not find the requested resource (is the "
        "groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshotContent CRD installed?)"]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = tmp_path / "closed-kubeconfig"
    closed.write_text(kubeconfig.read_text().replace(kubeconfig_server(kubeconfig), f"http://127.0.0.1:{port}"))
    nobody = run_ctl(*args[:-1], str(closed))
    assert nobody.code == 1 and nobody.out == ""
    assert len(nobody.err.splitlines()) == 1 and nobody.err.startswith("thinloopctl: Kubernetes API: no answer: ")
    api.served = True
    done = run_ctl(*args, "-o", "json")
    assert (done.code, done.json()) == (0, [{"content": "c", "node": "node-a",
                                              "reason": "its volume(s) vol-a are all here"}])


def kubeconfig_server(kubeconfig: Path) -> str:
    return str(yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"])
