"""`thinloopctl datastore ...`: make a directory a shared datastore, see who holds each
image and which node drivers are alive, and release a fenced node's attachment. Reads the
datastore through this host's mount of it and needs no running driver
(csi_driver.ops.dsstatus); results and exit codes as every thinloopctl command (csi_driver.ops.outcome:
Outcome for what is printed, Failure for one line and its code)."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..volumes.datastore.freeze import pending
from ..volumes.datastore.records import Datastore, DatastoreError, init_marker
from .dsstatus import NodeStatus, ReleaseRefused, holdings, nodes, open_datastore, release
from .outcome import EXIT_FOUND, EXIT_NOT_FOUND, EXIT_UNCHANGED, EXIT_USAGE, Failure, Outcome, table


def _open(a: argparse.Namespace) -> Datastore:
    try:
        return open_datastore(Path(a.data_dir))
    except DatastoreError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None


def cmd_init(a: argparse.Namespace) -> Outcome:
    """Write the marker by hand: for a datastore that is a directory inside a mount, where
    a controller does not make one (it makes it only on a mount point)."""
    try:
        done = init_marker(Path(a.data_dir), a.name, f"thinloopctl on {socket.gethostname()}")
    except DatastoreError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    made = done.startswith("made ")
    code = 0 if made else EXIT_UNCHANGED
    if a.output != "table":
        return Outcome({"data_dir": a.data_dir, "datastore": a.name, "made": made}, code)
    return Outcome(done, code)


def cmd_holders(a: argparse.Namespace) -> Outcome:
    ds = _open(a)
    rows = holdings(ds)
    freezes = pending(ds)
    noted = any(r.note for r in rows) or any(f.note for f in freezes)
    code = EXIT_FOUND if noted else 0  # something that does not add up: look at it
    if a.output != "table":
        return Outcome({"datastore": ds.name, "volumes": [r.to_dict() for r in rows],
                        "nodes": [n.to_dict() for n in nodes(ds)],
                        "freeze_requests": [f.to_dict() for f in freezes]}, code)
    shown = [{"volume": r.volume, "attached_to": "; ".join(r.attached_to) or "-", "lock": r.lock,
              "holders": "; ".join(r.holders) or "-", "note": r.note} for r in rows]
    lines = [f"datastore {ds.name} at {ds.root}",
             table(shown, ["volume", "attached_to", "lock", "holders", "note"]), "",
             "NODES", _nodetable(nodes(ds))]
    if freezes:
        lines += ["", "FREEZE REQUESTS",
                  table([f.to_dict() for f in freezes],
                         ["node", "volume", "state", "controller", "hold_seconds", "requested", "note"])]
    return Outcome("\n".join(lines), code)


def _nodetable(rows: list[NodeStatus]) -> str:
    shown = [{"node": n.node, "alive": "yes" if n.alive else "NO", "state": n.state,
              "heartbeat_age": f"{n.heartbeat_age_seconds:.0f}s", "lock": n.lock, "host": n.host,
              "pid": n.pid, "attached": n.attached}
             for n in rows]
    return table(shown, ["node", "alive", "state", "heartbeat_age", "lock", "host", "pid", "attached"])


def cmd_nodes(a: argparse.Namespace) -> Outcome:
    ds = _open(a)
    rows = nodes(ds)
    if a.output != "table":
        return Outcome({"datastore": ds.name, "nodes": [n.to_dict() for n in rows]})
    return Outcome(_nodetable(rows))


def cmd_release(a: argparse.Namespace) -> Outcome:
    if not a.node_fenced:
        raise Failure(f"releasing {a.volume} from {a.node} lets another node attach it: first make sure "
                      f"{a.node} is fenced (powered off, or cut off from the datastore), then say so with "
                      "--node-fenced", EXIT_USAGE)
    ds = _open(a)
    if not (ds.root / "volumes" / a.volume).is_dir() and ds.attachments.get(a.volume) is None:
        raise Failure(f"no volume {a.volume} in datastore {ds.name}: nothing released", EXIT_NOT_FOUND)
    try:
        done = release(ds, a.volume, a.node)
    except ReleaseRefused as exc:
        raise Failure(f"not released: {exc}") from None
    released = not done[0].endswith("nothing to release")
    code = 0 if released else EXIT_UNCHANGED
    if a.output != "table":
        return Outcome({"volume": a.volume, "node": a.node, "released": released, "done": done}, code)
    return Outcome("\n".join(done), code)


def add_commands(sub: Any, command: Callable[..., argparse.ArgumentParser], data_dir: str) -> None:
    """The `datastore` commands under `sub`, each made by ctl's `command` (global options,
    help layout, what to run to check)."""
    ds = command(sub, "datastore", "a shared datastore: init, holders, nodes, release (reads the "
                 "datastore's mount; no driver needed)", "", "thinloopctl datastore holders")
    ds_sub = ds.add_subparsers(dest="datastore_command", required=True, metavar="DATASTORE_COMMAND",
                               title="datastore commands")

    def local(name: str, fn: Callable[[argparse.Namespace], Outcome], summary: str,
              description: str = "") -> argparse.ArgumentParser:
        sp = command(ds_sub, name, summary, description, "thinloopctl datastore holders")
        sp.set_defaults(local=fn)
        sp.add_argument("--data-dir", default=data_dir,
                        help="the datastore's mount (the drivers' --data-dir) [default: %(default)s; "
                        "env THINLOOP_DATA_DIR]")
        return sp

    sp = local("init", cmd_init, "make a directory of a shared filesystem a datastore, once",
               "Writes the marker (datastore.json) that names the datastore. A controller makes it "
               "by itself only when its --data-dir is a mount point (the datastore's mount), so "
               "that a missing mount never turns the local disk into a datastore; a datastore that "
               "is a directory inside a mount is made with this command. Exit 5 when it already "
               "is that datastore; refused (exit 2) for another name or a directory with volumes.")
    sp.add_argument("--name", required=True, help="the datastore's name: the drivers' --datastore")
    local("holders", cmd_holders, "every volume: the node it is attached to, its image lock, the nodes "
          "that say they hold it; the node drivers; pending freeze requests",
          "Freeze requests are the controller's asks to a node to freeze a volume it has attached, "
          "for a snapshot or clone (shown while pending, with the node's answer). Exit 3 when "
          "something does not add up (the note column says what).")
    local("nodes", cmd_nodes, "the node drivers registered in the datastore, their heartbeat and lock")
    sp = local("release", cmd_release, "remove a fenced node's attachment of a volume, so that another "
               "node can attach it",
               "Refused (exit 1) while that node's driver still holds its node-id lock or any client "
               "still holds the image lock: the node is then still connected, not fenced. Exit 4 for "
               "a volume the datastore does not have; exit 5 when it was not attached to that node.")
    sp.add_argument("volume", help="the volume whose attachment goes")
    sp.add_argument("--node", required=True, help="the node whose attachment goes")
    sp.add_argument("--node-fenced", action="store_true",
                    help="confirm that the node is fenced: powered off, or cut off from the datastore")
