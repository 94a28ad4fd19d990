"""`bench.py compare`: thinloop and the floor in alternation (A B A B ...), round after
round at each concurrency, so that drift hits both sides alike; medians of the rounds,
the thinloop/raw ratio as the last lines, and the plots (--plot)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from csi_driver.ops.client import CsiClient

from . import stats
from .common import MIB, STEPS, BenchError, bench_root, names_for
from .driver import local_driver
from .lifecycle import Layout, print_run, thinloop_run
from .raw import raw_run
from .watch import memory_line, tree_memory


def headline(res: dict[str, Any]) -> dict[str, float]:
    """The figures of one run that are compared across rounds."""
    figs = {"volumes_per_second": res["volumes_per_second"],
            "seconds_per_volume": stats.ratio(res["wall_seconds"], res["volumes"]),
            "lifecycle_p50": res["lifecycle"]["p50"]}
    for step, s in res["steps"].items():
        figs[f"{step}_p50"] = s["p50"]
        figs[f"{step}_p95"] = s["p95"]
    for k, v in res.get("driver", {}).items():
        figs[f"driver_{k}"] = v
    return figs


def mode_compare(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": args.rounds, "concurrency": args.concurrency, "per_round": []}
    per: dict[tuple[str, int], list[dict[str, float]]] = {}
    paired: dict[int, list[float]] = {c: [] for c in args.concurrency}
    with bench_root(Path(args.base_dir)) as root, local_driver(root) as drv, \
            CsiClient.connect(drv.endpoint) as client:
        mem = tree_memory(drv.pid)
        out["driver_idle_bytes"], out["driver_idle_rss_bytes"] = mem["resident_bytes"], mem["rss_bytes"]
        print(f"thinloop pid {drv.pid}: idle {memory_line(mem)}; "
              f"{os.cpu_count()} CPUs")
        layout = Layout(drv.kubelet_dir)
        raw_root = root / "raw"
        for r in range(args.rounds):
            for c in args.concurrency:
                a = thinloop_run(client, layout, names_for(f"r{r}-c{c}", args.count), args.size,
                                 args.fs, c, drv.pid)
                b = raw_run(raw_root, names_for(f"r{r}-c{c}", args.count), args.size, args.fs, c)
                print_run(f"round {r + 1} thinloop c={c}", a)
                print_run(f"round {r + 1} raw      c={c}", b)
                out["per_round"].append({"round": r, "concurrency": c, "thinloop": a, "raw": b})
                per.setdefault(("thinloop", c), []).append(headline(a))
                per.setdefault(("raw", c), []).append(headline(b))
                paired[c].append(stats.ratio(b["volumes_per_second"], a["volumes_per_second"]))
    medians = {f"{kind}/c{c}": stats.median_of_dicts(v) for (kind, c), v in per.items()}
    out["medians"] = medians
    out["ratio_time_thinloop_over_raw"] = {str(c): stats.median(v) for c, v in paired.items()}
    seq = min(args.concurrency)
    thin_seq_rate = medians[f"thinloop/c{seq}"]["volumes_per_second"]
    print(f"\nmedians over {args.rounds} rounds ({args.count} volumes of {args.size} bytes, {args.fs}):")
    print(f"{'':14}{'vol/s':>8}{'lifecycle p50':>15}" + "".join(f"{s[:14]:>16}" for s in STEPS))
    for c in args.concurrency:
        for kind in ("thinloop", "raw"):
            m = medians[f"{kind}/c{c}"]
            print(f"{kind:>8} c={c:<3}{m['volumes_per_second']:8.2f}{m['lifecycle_p50'] * 1e3:12.1f} ms"
                  + "".join(f"{m.get(f'{s}_p50', math.nan) * 1e3:13.2f} ms" for s in STEPS))
        t, w = medians[f"thinloop/c{c}"], medians[f"raw/c{c}"]
        peak = t.get("driver_peak_resident_bytes", math.nan) / MIB
        print(f"   c={c}: vol/s thinloop/raw {stats.ratio(t['volumes_per_second'], w['volumes_per_second']):.2f}"
              f", thinloop vs its own c={seq}: "
              f"{stats.ratio(t['volumes_per_second'], thin_seq_rate):.2f}x, driver peak memory {peak:.1f} MiB")
    if args.plot:
        plot_compare(out, Path(args.plot))
    for c in sorted(args.concurrency, reverse=True):
        if c != seq:
            print(stats.format_ratio(f"time per volume, concurrency {c}",
                                          out["ratio_time_thinloop_over_raw"][str(c)]))
    print(stats.format_ratio("sequential" if seq == 1 else f"concurrency {seq}",
                                  out["ratio_time_thinloop_over_raw"][str(seq)]))
    return out


def plot_compare(out: dict[str, Any], outdir: Path) -> list[Path]:
    """Latency per RPC (p50 bars, p95 whiskers) at the lowest concurrency, and volumes per
    second against concurrency. matplotlib is needed only here."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib (pip install matplotlib)") from None
    outdir.mkdir(parents=True, exist_ok=True)
    med = out["medians"]
    conc = sorted(out["concurrency"])
    seq = conc[0]
    made = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    xs = list(range(len(STEPS)))
    for i, kind in enumerate(("thinloop", "raw")):
        m = med[f"{kind}/c{seq}"]
        p50 = [m.get(f"{s}_p50", math.nan) * 1e3 for s in STEPS]
        p95 = [m.get(f"{s}_p95", math.nan) * 1e3 for s in STEPS]
        err = [[0.0] * len(STEPS), [max(0.0, b - a) for a, b in zip(p50, p95, strict=True)]]
        ax.bar([x + (i - 0.5) * width for x in xs], p50, width, yerr=err, capsize=3,
               label=f"{kind} (p50, whisker to p95)")
    ax.set_xticks(xs, [s.replace("Volume", "").replace("Node", "Node\n") for s in STEPS])
    ax.set_ylabel("ms")
    ax.set_title(f"Latency per step, concurrency {seq} (median of rounds)")
    ax.legend()
    fig.tight_layout()
    path = outdir / "latency_per_rpc.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("thinloop", "raw"):
        ax.plot(conc, [med[f"{kind}/c{c}"]["volumes_per_second"] for c in conc], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel(f"concurrency (this machine has {os.cpu_count()} CPUs)")
    ax.set_ylabel("volumes / second (full lifecycle)")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = outdir / "volumes_per_second.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    for p in made:
        print(f"plot: {p}")
    return made
