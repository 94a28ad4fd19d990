#!/usr/bin/env bash
# The demo command, run as root (or with sudo): installs what is missing (Debian tools, and
# the package into .venv/), then serves the driver on a scratch data dir and walks one
# volume through its whole life, printing each step and the commands to repeat it.
# Extra arguments go to the demo (--data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
esac
if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: needs root (loop devices, mkfs and mount are real): run it as root, or as sudo $0" >&2
  exit 2
fi
./scripts/install-deps.sh
exec .venv/bin/python -m csi_driver.ops.demo "$@"
