#!/usr/bin/env bash
# Install what the driver, the demo and the tests need: Debian tools and Python packages.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in losetup:util-linux mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs fsfreeze:util-linux \
            findmnt:util-linux fio:fio shellcheck:shellcheck \
            glusterd:glusterfs-server glusterfs:glusterfs-client; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
extra=()
[ -f tests/deploy/requirements.txt ] && extra+=(-r tests/deploy/requirements.txt)
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]" "${extra[@]}" 2>&1 \
  | { grep -v -e "Running pip as the 'root' user" -e "^WARNING: Location" || true; }
