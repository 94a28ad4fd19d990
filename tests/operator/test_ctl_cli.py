"""thinloopctl's command line against a scripted CSI server (no root, no kernel objects):
endpoints checked by the driver's own rules before dialling, every call under a deadline,
Ctrl-C as one line, misuse refused before any RPC, errors as JSON in -o json, global
options before or after the subcommand, and help that says what each command takes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.ops import ctl
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.settings import grpc_target
from tests.operator.conftest import Ctl

GIB = 1 << 30


class Identity(csi_pb2_grpc.IdentityServicer):
    def GetPluginInfo(self, request: Any, context: Any) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name="fake.csi.io", vendor_version="9")

    def GetPluginCapabilities(self, request: Any, context: Any) -> csi_pb2.GetPluginCapabilitiesResponse:
        svc = csi_pb2.PluginCapability.Service
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=svc(type=svc.CONTROLLER_SERVICE))])

    def Probe(self, request: Any, context: Any) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse()


class Controller(csi_pb2_grpc.ControllerServicer):
    """Answers ListVolumes with one volume; CreateVolume and ListSnapshots block until
    released, so that a client can be left waiting."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def ControllerGetCapabilities(self, request: Any, context: Any) -> csi_pb2.ControllerGetCapabilitiesResponse:
        rpc = csi_pb2.ControllerServiceCapability.RPC
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=rpc(type=t))
            for t in (rpc.LIST_VOLUMES, rpc.GET_CAPACITY)])

    def GetCapacity(self, request: Any, context: Any) -> csi_pb2.GetCapacityResponse:
        return csi_pb2.GetCapacityResponse(available_capacity=5 * GIB)

    def ListVolumes(self, request: Any, context: Any) -> csi_pb2.ListVolumesResponse:
        self.calls.append("ListVolumes")
        vol = csi_pb2.Volume(volume_id="v1", capacity_bytes=3 * GIB, volume_context={"fsType": "xfs"})
        return csi_pb2.ListVolumesResponse(entries=[csi_pb2.ListVolumesResponse.Entry(volume=vol)])

    def _block(self) -> None:
        self.entered.set()
        self.release.wait(60)

    def CreateVolume(self, request: Any, context: Any) -> csi_pb2.CreateVolumeResponse:
        self.calls.append("CreateVolume")
        self._block()
        return csi_pb2.CreateVolumeResponse(volume=csi_pb2.Volume(volume_id=request.name))

    def ListSnapshots(self, request: Any, context: Any) -> csi_pb2.ListSnapshotsResponse:
        self.calls.append("ListSnapshots")
        self._block()
        return csi_pb2.ListSnapshotsResponse()


class Fake:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.controller = Controller()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), self.server)
        csi_pb2_grpc.add_ControllerServicer_to_server(self.controller, self.server)
        self.server.add_insecure_port(grpc_target(path))
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"unix://{self.path}"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Fake]:
    f = Fake(tmp_path / "csi.sock")
    try:
        yield f
    finally:
        f.controller.release.set()
        f.server.stop(grace=None).wait()


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_info_against_an_identity_and_controller_only_driver(fake: Fake, run_ctl: Ctl) -> None:
    r = run_ctl("--endpoint", fake.endpoint, "-o", "json", "info")
    assert r.code == 0, r.err
    assert r.json() == {"name": "fake.csi.io", "version": "9", "services": ["controller"], "ready": True,
                        "not_ready_reason": None, "node_id": None, "topology": None,
                        "available_capacity": 5 * GIB}
    table = run_ctl("info", "--endpoint", fake.endpoint)
    assert "available_capacity   5.0GiB" in table.out and "node_id              - (no Node service)" in table.out


@pytest.mark.parametrize(("endpoint", "code", "words"), [
    ("tcp://127.0.0.1:5", 2, "only unix:// endpoints are supported"),
    ("unix://relative.sock", 2, "the socket path must be absolute"),
    ("unix:///" + "x" * 120, 2, "holds at most 107"),
    ("unix://{tmp}/absent.sock", 1, "no socket at {tmp}/absent.sock (--endpoint): is the driver running here?"),
    ("unix://{tmp}/file", 2, "{tmp}/file is not a socket"),
    ("unix://{tmp}/stale.sock", 1, "nothing listens on {tmp}/stale.sock (Connection refused)"),
])
def test_a_wrong_endpoint_is_one_line_before_any_dial(tmp_path: Path, run_ctl: Ctl, endpoint: str, code: int,
                                                      words: str) -> None:
    (tmp_path / "file").write_text("x")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))  # bound, never listening: what a killed driver leaves
    stale.close()
    r = run_ctl("--endpoint", endpoint.format(tmp=tmp_path), "list")
    assert r.code == code
    assert words.format(tmp=tmp_path) in one_line(r.err)
    assert r.out == ""


def test_the_endpoint_from_the_environment_is_named_as_such(tmp_path: Path, run_ctl: Ctl,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THINLOOP_ENDPOINT", "tcp://h:1")
    r = run_ctl("list")
    assert r.code == 2 and one_line(r.err).startswith("thinloopctl: THINLOOP_ENDPOINT 'tcp://h:1'")


def test_global_options_after_the_subcommand(fake: Fake, run_ctl: Ctl) -> None:
    r = run_ctl("list", "--endpoint", fake.endpoint, "-o", "json", "--timeout", "30")
    assert r.code == 0, r.err
    assert r.json() == [{"id": "v1", "size": 3 * GIB, "fs": "xfs", "diskformat": "", "in_use": False,
                         "condition": ""}]
    before = run_ctl("-o", "yaml", "--endpoint", fake.endpoint, "list")
    assert before.yaml() == r.json()
    table = run_ctl("--endpoint", fake.endpoint, "list")
    assert table.out.splitlines()[1].split()[:3] == ["v1", "3.0GiB", "xfs"]


@pytest.mark.parametrize(("argv", "words"), [
    (["create", "v", "--param", "fsType"], "--param 'fsType': expected key=value (e.g. --param fsType=xfs)"),
    (["create", "v", "--block", "--fs-type", "ext4"], "argument --fs-type: not allowed with argument --block"),
    (["create", "v", "--size", "lots"], "--size: size 'lots' is not a quantity"),
    (["create", "v", "--from-snapshot", "s", "--from-volume", "v"], "not allowed with argument"),
    (["modify", "v", "reclaim"], "parameter 'reclaim': expected key=value"),
    (["lsit"], "invalid choice: 'lsit'"),
    (["list", "--timeout", "0"], "must be above 0"),
])
def test_misuse_is_refused_before_any_call(fake: Fake, run_ctl: Ctl, argv: list[str], words: str) -> None:
    r = run_ctl("--endpoint", fake.endpoint, *argv)
    assert r.code == 2
    assert words in one_line(r.err)
    assert "CreateVolume" not in fake.controller.calls
    j = run_ctl("--endpoint", fake.endpoint, "-o", "json", *argv)
    assert j.code == 2 and j.err == ""
    assert j.json()["error"]["kind"] == "USAGE" and words in j.json()["error"]["message"]
    assert j.json()["error"]["exit_code"] == 2


def test_a_call_past_its_deadline_says_the_driver_may_still_finish_it(fake: Fake, run_ctl: Ctl) -> None:
    r = run_ctl("--endpoint", fake.endpoint, "--timeout", "0.5", "create", "v9", "--size", "1Gi")
    assert r.code == 1
    assert one_line(r.err) == ("thinloopctl: CreateVolume had no answer within 0.5 s (--timeout); the driver "
                               "may still finish it: check with `thinloopctl list`")
    j = run_ctl("--endpoint", fake.endpoint, "--timeout", "0.5", "-o", "json", "snapshots")
    assert j.code == 1 and j.json()["error"]["kind"] == "DEADLINE_EXCEEDED"
    assert "check with `thinloopctl snapshots`" in j.json()["error"]["message"]


def test_ctrl_c_is_one_line_that_says_how_to_check(fake: Fake) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "csi_driver.ops.ctl", "--endpoint", fake.endpoint,
                             "create", "v9"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert fake.controller.entered.wait(60), "the call never reached the server"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert one_line(err) == ("thinloopctl: interrupted: CreateVolume was sent; the driver may still finish it: "
                             "check with `thinloopctl list`")
    assert out == ""


def test_every_subcommand_says_what_it_does_and_what_it_takes() -> None:
    parser = ctl.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, ctl.argparse._SubParsersAction))
    seen = 0
    for name, sp in _walk(subs):
        assert sp.description and len(sp.description.split()) >= 4, name
        for action in sp._actions:
            if isinstance(action, ctl.argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.dest} has no help"
        seen += 1
    assert seen >= 19
    stats = _help("stats")
    assert "where it is published (the target path" in stats
    expand = _help("expand")
    assert "512Mi" in expand and "--path" in expand and "exit 5 when nothing changed" in " ".join(expand.split())
    create = _help("create")
    assert "[default: 1Gi]" in create


def _walk(subs: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, sp in subs.choices.items():
        yield prefix + name, sp
        for action in sp._actions:
            if isinstance(action, ctl.argparse._SubParsersAction):
                yield from _walk(action, prefix + name + " ")


def _help(command: str) -> str:
    res = subprocess.run([sys.executable, "-m", "csi_driver.ops.ctl", *command.split(), "--help"], check=True,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    return res.stdout


def test_version() -> None:
    res = subprocess.run([sys.executable, "-m", "csi_driver.ops.ctl", "--version"], check=True, capture_output=True,
                         text=True)
    assert res.stdout.strip() == "thinloopctl 0.1.0"
