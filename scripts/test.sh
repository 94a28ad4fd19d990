#!/usr/bin/env bash
# The test command, run as root (or with sudo): installs what is missing (Debian tools, and
# the package with its test extras into .venv/), then lints, type-checks and runs every
# test tier with .venv's Python. Without root the integration tests are skipped, visibly.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
esac
./scripts/install-deps.sh --test
# Everything below, and every program the tests start by name (scripts/sanity.sh's
# python3, thinloopctl), is .venv's.
export PATH="$PWD/.venv/bin:$PATH"
export PYTHON="$PWD/.venv/bin/python"
echo "== ruff"; python -m ruff check csi_driver benchmarks tests scripts
echo "== mypy"; python -m mypy
echo "== pytest"
set +e
python -m pytest -W error "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
fi
exit "$rc"
