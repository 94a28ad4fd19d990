#!/usr/bin/env python3
"""thinloop benchmarks: the CSI lifecycle against any endpoint, the same lifecycle done with
plain commands (the floor), both in alternation, the data path with fio, and the driver at
1,000 volumes.

    .venv/bin/python scripts/bench.py lifecycle --endpoint unix:///run/csi.sock --kubelet-dir /var/lib/kubelet
    .venv/bin/python scripts/bench.py raw --count 20 --concurrency 1,8
    .venv/bin/python scripts/bench.py compare --count 20 --rounds 3 --concurrency 1,2,4,8,16 --plot docs/img
    .venv/bin/python scripts/bench.py fio --runtime 10
    .venv/bin/python scripts/bench.py scale --volumes 1000
    .venv/bin/python scripts/bench.py shared --moves 20 --runtime 10   # shared mode on a GlusterFS of its own

Every mode takes --json FILE. Needs root, loop devices, mkfs and mount. Every run removes the
loop devices and mounts it made, also on failure and on Ctrl-C.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
