"""Benchmark-only code: scripts/bench.py (one module per mode: lifecycle, raw, compare, fio,
scale, shared; cli wires them) and what it shares with scripts/soak.py (stats, procmem,
the driver's processes seen from outside in watch).

Not part of the driver: not installed, not in the image. It may use the driver's client,
its generated stubs and the host's read paths and sweep, as any client would; nothing in
csi_driver imports it (an import-linter contract in pyproject.toml says so)."""
