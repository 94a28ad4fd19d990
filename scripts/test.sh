#!/usr/bin/env bash
# The test command: installs what is missing, lints, type-checks, runs every test tier.
# Integration tests need root (real loop devices, mkfs, mount); they are skipped, visibly,
# without it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
./scripts/install-deps.sh
echo "== ruff"; "$PYTHON" -m ruff check csi_driver tests scripts
echo "== mypy"; "$PYTHON" -m mypy
echo "== pytest"
set +e
"$PYTHON" -m pytest -W error "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
fi
exit "$rc"
