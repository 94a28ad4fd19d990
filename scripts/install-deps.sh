#!/usr/bin/env bash
# Install what thinloop needs, into this clone and never into the system's Python.
#
#   scripts/install-deps.sh           the driver and the demo: Debian tools, and .venv/
#                                     with the package and its runtime dependencies
#   scripts/install-deps.sh --test    also the tools and Python packages of the tests
#
# Debian packages are installed (apt-get, as root) only when a tool is missing. Python
# packages go into the project's virtual environment .venv/, made with $PYTHON (default
# python3; it must be 3.11 or newer), so a system Python that PEP 668 marks as
# externally managed (Debian 12's) is never touched. Safe to run again: a second run
# installs nothing unless a tool went missing or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

test_deps=false
case "${1:-}" in
  --test) test_deps=true ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  *) echo "install-deps.sh: unknown argument '$1' (expected --test or nothing)" >&2; exit 2 ;;
esac

# command:Debian package, one per line. The driver runs these (csi_driver/host/linux.py).
RUNTIME_TOOLS=(
  losetup:util-linux
  blkid:util-linux
  fsfreeze:util-linux
  fstrim:util-linux
  findmnt:util-linux
  mount:mount
  umount:mount
  mkfs.ext4:e2fsprogs
  mkfs.ext3:e2fsprogs
  resize2fs:e2fsprogs
  e2fsck:e2fsprogs
  mkfs.xfs:xfsprogs
  xfs_growfs:xfsprogs
  cp:coreutils
)
# Only the tests use these (GlusterFS: the shared-datastore tests' datastore, tests/gluster.py).
TEST_TOOLS=(
  fio:fio
  shellcheck:shellcheck
  glusterd:glusterfs-server
  gluster:glusterfs-cli
  glusterfs:glusterfs-client
)

say() { echo "install-deps: $*"; }

apt_install() {  # apt_install PACKAGE...: install Debian packages, or say how
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "missing Debian packages: $* (install them as root: apt-get install $*)" >&2
    return 1
  fi
  say "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

tools=("${RUNTIME_TOOLS[@]}")
if $test_deps; then tools+=("${TEST_TOOLS[@]}"); fi
need_apt=()
for tool in "${tools[@]}"; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  mapfile -t need_apt < <(printf '%s\n' "${need_apt[@]}" | sort -u)
  apt_install "${need_apt[@]}" || $test_deps  # the tests skip, visibly, what a missing tool stops
fi

# -- Python: a virtual environment in .venv/ ----------------------------------------------
PYTHON=${PYTHON:-python3}
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  [ "$PYTHON" = python3 ] && apt_install python3 python3-venv
fi
if ! py_ok "$PYTHON"; then
  echo "install-deps: thinloop needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing)." \
       "Set PYTHON to one (PYTHON=python3.12 $0)" >&2
  exit 1
fi
if ! py_ok .venv/bin/python; then
  # Debian ships venv's pip bootstrap (ensurepip) in a package of its own.
  if ! "$PYTHON" -m ensurepip --version >/dev/null 2>&1; then
    apt_install "python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
  fi
  rm -rf .venv
  say "making the virtual environment .venv with $(command -v "$PYTHON") ($("$PYTHON" -V 2>&1))"
  "$PYTHON" -m venv .venv
fi

# Install again only when what is asked for changed (the package itself is editable).
if $test_deps; then
  what=(-e ".[test]" -r tests/deploy/requirements.txt)
  stamp=.venv/.thinloop-test
else
  what=(-e .)
  stamp=.venv/.thinloop-runtime
fi
digest=$(cat pyproject.toml tests/deploy/requirements.txt | sha256sum | cut -d' ' -f1)
installed() { [ "$(cat "$1" 2>/dev/null)" = "$digest" ]; }
# The test set holds the runtime one.
if { installed .venv/.thinloop-test || installed "$stamp"; } && .venv/bin/python -c 'import csi_driver' 2>/dev/null
then
  exit 0
fi
say "installing Python packages into .venv: ${what[*]} (the first time takes a minute or two)"
PIP_ROOT_USER_ACTION=ignore .venv/bin/python -m pip install -q --disable-pip-version-check "${what[@]}" 2>&1 \
  | { grep -v -e "^WARNING: Location" || true; }
echo "$digest" >"$stamp"
