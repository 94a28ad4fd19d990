"""scripts/bench.py's command line: one subcommand per mode, each in its own module."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import BenchError, machine_info, parse_int_list, parse_size
from .compare import mode_compare
from .fio import mode_fio
from .lifecycle import mode_lifecycle
from .raw import mode_raw
from .scale import mode_scale
from .shared import mode_shared


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """The command line; `description` is what --help shows first (scripts/bench.py's
    docstring)."""
    p = argparse.ArgumentParser(prog="bench.py", description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
        sp.add_argument("--base-dir", default="/var/tmp",
                        help="where the temp dirs (data, kubelet, images) go (default /var/tmp)")

    def volumes(sp: argparse.ArgumentParser, count: int, size: str) -> None:
        sp.add_argument("--count", type=int, default=count, help="volumes per run")
        sp.add_argument("--size", type=parse_size, default=parse_size(size))
        sp.add_argument("--fs", default="ext4", choices=("ext3", "ext4", "xfs"))
        sp.add_argument("--concurrency", type=parse_int_list, default=[1],
                        help="comma-separated list, one run each (e.g. 1,8)")

    sp = sub.add_parser("lifecycle", help="N volumes through the whole CSI lifecycle")
    common(sp)
    volumes(sp, 20, "1Gi")
    sp.add_argument("--endpoint", help="unix:///path.sock of a running driver (default: start "
                    "thinloop on a temp dir)")
    sp.add_argument("--kubelet-dir", help="the driver's --kubelet-dir (required with --endpoint)")
    sp.add_argument("--pid", type=int, help="driver pid for RSS/CPU (default: who listens on the socket)")

    sp = sub.add_parser("raw", help="the same lifecycle with plain commands (the floor)")
    common(sp)
    volumes(sp, 20, "1Gi")

    sp = sub.add_parser("compare", help="thinloop and raw in alternation; ratio as the last line")
    common(sp)
    volumes(sp, 20, "1Gi")
    sp.add_argument("--rounds", type=int, default=3)
    sp.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR (needs matplotlib)")

    sp = sub.add_parser("fio", help="direct I/O on a thinloop volume against the host directory")
    common(sp)
    sp.add_argument("--size", type=parse_size, default=parse_size("4Gi"), help="volume size")
    sp.add_argument("--file-size", type=parse_size, default=parse_size("1Gi"), help="fio file size")
    sp.add_argument("--fs", default="ext4", choices=("ext3", "ext4", "xfs"))
    sp.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    sp.add_argument("--rounds", type=int, default=2)

    sp = sub.add_parser("scale", help="1,000 volumes: start-up, GetCapacity, ListVolumes, stage")
    common(sp)
    sp.add_argument("--volumes", type=int, default=1000)
    sp.add_argument("--size", type=parse_size, default=parse_size("16Mi"),
                    help="thin size of each (the sum of sizes must fit the free space)")
    sp.add_argument("--fs", default="ext4", choices=("ext3", "ext4", "xfs"))
    sp.add_argument("--concurrency", type=int, default=4, help="parallel CreateVolume calls")
    sp.add_argument("--page-size", type=int, default=100, help="ListVolumes max_entries")
    sp.add_argument("--reps", type=int, default=5)

    sp = sub.add_parser("shared", help="shared mode: a volume moving between two nodes; fio on it "
                        "against a plain file of the same datastore")
    common(sp)
    sp.add_argument("--datastore-dirs", default="", metavar="CTL,A,B",
                    help="three mounts of one shared filesystem (the controller's, node a's, node b's); "
                    "default: a GlusterFS volume of the benchmark's own, one FUSE client per host")
    sp.add_argument("--moves", type=int, default=20)
    sp.add_argument("--size", type=parse_size, default=parse_size("4Gi"), help="volume size")
    sp.add_argument("--file-size", type=parse_size, default=parse_size("1Gi"), help="fio file size")
    sp.add_argument("--fs", default="ext4", choices=("ext3", "ext4", "xfs"))
    sp.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    sp.add_argument("--rounds", type=int, default=2)
    return p


MODES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "lifecycle": mode_lifecycle, "raw": mode_raw, "compare": mode_compare, "fio": mode_fio,
    "scale": mode_scale, "shared": mode_shared,
}


def main(argv: Sequence[str] | None = None, description: str = "") -> int:
    args = build_parser(description).parse_args(argv)
    if os.geteuid() != 0:
        print("bench.py: needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    try:
        result = MODES[args.mode](args)
    except BenchError as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.py: interrupted; everything it made was torn down", file=sys.stderr)
        return 130
    if args.json:
        doc = {"mode": args.mode, "machine": machine_info(),
               "args": {k: v for k, v in vars(args).items() if k != "json"}, "result": result}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    return 0
