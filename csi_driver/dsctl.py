"""`thinloopctl datastore ...`: who holds each image of a shared datastore, which node
drivers are alive, and the release of a fenced node's attachment. Reads the datastore
through this host's mount of it; needs no running driver (csi_driver.dsstatus)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .config import DEFAULT_DATA_DIR
from .ctl import EXIT_FAILED, EXIT_USAGE, Outcome, _table
from .datastore import DatastoreError
from .dsstatus import NodeStatus, ReleaseRefused, holdings, nodes, open_datastore, release


def _fail(message: str, code: int = EXIT_FAILED) -> Outcome:
    print(f"thinloopctl: {message}", file=sys.stderr)
    return Outcome(None, code)


def cmd_holders(a: argparse.Namespace) -> Outcome:
    try:
        ds = open_datastore(Path(a.data_dir))
    except DatastoreError as exc:
        return _fail(str(exc), EXIT_USAGE)
    rows = holdings(ds)
    if a.output != "table":
        return Outcome({"datastore": ds.name, "volumes": [r.to_dict() for r in rows]})
    shown = [{"volume": r.volume, "attached_to": "; ".join(r.attached_to) or "-", "lock": r.lock,
              "holders": "; ".join(r.holders) or "-", "note": r.note} for r in rows]
    alive = {n.node: n for n in nodes(ds)}
    lines = [f"datastore {ds.name} at {ds.root}",
             _table(shown, ["volume", "attached_to", "lock", "holders", "note"]), "",
             "NODES", _node_table(list(alive.values()))]
    return Outcome("\n".join(lines))


def _node_table(rows: list[NodeStatus]) -> str:
    shown = [{"node": n.node, "alive": "yes" if n.alive else "NO", "state": n.state,
              "heartbeat_age": f"{n.heartbeat_age_seconds:.0f}s", "lock": n.lock, "host": n.host,
              "pid": n.pid, "attached": n.attached}
             for n in rows]
    return _table(shown, ["node", "alive", "state", "heartbeat_age", "lock", "host", "pid", "attached"])


def cmd_nodes(a: argparse.Namespace) -> Outcome:
    try:
        ds = open_datastore(Path(a.data_dir))
    except DatastoreError as exc:
        return _fail(str(exc), EXIT_USAGE)
    rows = nodes(ds)
    if a.output != "table":
        return Outcome({"datastore": ds.name, "nodes": [n.to_dict() for n in rows]})
    return Outcome(_node_table(rows))


def cmd_release(a: argparse.Namespace) -> Outcome:
    if not a.node_fenced:
        return _fail(f"releasing {a.volume} from {a.node} lets another node attach it: first make sure "
                     f"{a.node} is fenced (powered off, or cut off from the datastore), then say so with "
                     "--node-fenced", EXIT_USAGE)
    try:
        ds = open_datastore(Path(a.data_dir))
        done = release(ds, a.volume, a.node)
    except DatastoreError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ReleaseRefused as exc:
        return _fail(f"not released: {exc}")
    if a.output != "table":
        return Outcome({"volume": a.volume, "node": a.node, "done": done})
    return Outcome("\n".join(done))


def add_commands(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                 output: Callable[[argparse.ArgumentParser], None]) -> None:
    data_dir = os.environ.get("THINLOOP_DATA_DIR", DEFAULT_DATA_DIR)
    ds = sub.add_parser("datastore", help="a shared datastore: holders, nodes, release (reads the "
                        "datastore's mount; no driver needed)")
    ds_sub = ds.add_subparsers(dest="datastore_command", required=True)

    def local(name: str, fn: Callable[[argparse.Namespace], Outcome], help_: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = ds_sub.add_parser(name, help=help_, description=help_)
        output(sp)
        sp.set_defaults(local=fn)
        sp.add_argument("--data-dir", default=data_dir,
                        help="the datastore's mount (the drivers' --data-dir; default %(default)s)")
        return sp

    local("holders", cmd_holders, "every volume: the node it is attached to, its image lock, the nodes "
          "that say they hold it; and the node drivers")
    local("nodes", cmd_nodes, "the node drivers registered in the datastore, their heartbeat and lock")
    sp = local("release", cmd_release, "remove a fenced node's attachment of a volume, so that another "
               "node can attach it (refused while that node still holds the node or image lock)")
    sp.add_argument("volume")
    sp.add_argument("--node", required=True, help="the node whose attachment goes")
    sp.add_argument("--node-fenced", action="store_true",
                    help="confirm that the node is fenced: powered off, or cut off from the datastore")
