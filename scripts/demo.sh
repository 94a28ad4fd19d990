#!/usr/bin/env bash
# The demo command: installs what is missing, then serves the driver on a scratch data dir
# and walks one volume through its whole life (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
exec "${PYTHON:-python3}" -m csi_driver.demo "$@"
