#!/usr/bin/env bash
# Run csi-sanity (kubernetes-csi/csi-test) against thinloop on a temp data dir, once with
# mount volumes and once with block volumes. Prints csi-sanity's summary lines; exits
# non-zero on any failure. Exits 0 with a SKIPPED: line when csi-sanity is not on PATH.
# CSI_SANITY names another build (e.g. CSI_SANITY=csi-sanity-master); SANITY_ARGS adds
# csi-sanity flags (e.g. SANITY_ARGS=-ginkgo.focus=GroupController).
set -euo pipefail
cd "$(dirname "$0")/.."

SANITY=${CSI_SANITY:-csi-sanity}
if ! command -v "$SANITY" >/dev/null 2>&1; then
  echo "SKIPPED: $SANITY is not on PATH (build it from kubernetes-csi/csi-test: cmd/csi-sanity)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "sanity.sh: needs root (loop devices, mkfs, mount)" >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
SIZE=${SANITY_VOLUME_SIZE:-1073741824}          # 1 GiB thin volumes
EXPAND=${SANITY_EXPAND_SIZE:-2147483648}         # grown to 2 GiB
work=$(mktemp -d /tmp/thinloop-sanity.XXXXXX)
sock="$work/csi.sock"
driver_pid=""

# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
  set +e  # best effort: an empty grep must not turn a pass into a failure
  if [ -n "$driver_pid" ] && kill -0 "$driver_pid" 2>/dev/null; then
    kill -TERM "$driver_pid"; wait "$driver_pid" || true
  fi
  # Whatever a failed spec left: unmount (deepest first), detach, remove.
  findmnt -rn -o TARGET | grep "^$work/" | sort -r | while read -r m; do umount -l "$m" || true; done
  losetup -a | grep "$work/" | cut -d: -f1 | while read -r d; do losetup -d "$d" || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$PYTHON" -m csi_driver --endpoint "unix://$sock" --data-dir "$work/data" \
  --kubelet-dir "$work" --node-id sanity-node --log-level warning 2>"$work/driver.log" &
driver_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done

# ext4 grows online only with CAP_SYS_RESOURCE (bit 24 of CapEff); without it (some
# sandboxes) the mount-volume run uses xfs, which grows online with CAP_SYS_ADMIN.
params=tests/sanity/volume-params.yaml
capeff=$(awk '/^CapEff/ {print $2}' /proc/self/status)
if (( (16#$capeff >> 24 & 1) == 0 )); then
  echo "note: no CAP_SYS_RESOURCE here, so ext4 cannot grow online: mount volumes use xfs"
  params=tests/sanity/volume-params-xfs.yaml
fi

read -r -a extra_args <<<"${SANITY_ARGS:-}"
status=0
for access in mount block; do
  rm -rf "${work:?}/mnt" "${work:?}/staging"
  echo "== csi-sanity ($access volumes)"
  set +e
  "$SANITY" -csi.endpoint "unix://$sock" \
    -csi.mountdir "$work/mnt" -csi.stagingdir "$work/staging" \
    -csi.testvolumeaccesstype "$access" \
    -csi.testvolumesize "$SIZE" -csi.testvolumeexpandsize "$EXPAND" \
    -csi.testvolumeparameters "$params" \
    -csi.testvolumemutableparameters tests/sanity/mutable-params.yaml \
    "${extra_args[@]}" >"$work/sanity-$access.out" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    status=1
    sed 's/\x1b\[[0-9;]*m//g' "$work/sanity-$access.out" | grep -E "^\s*\[FAIL\]" -A1 | head -60 || true
  fi
  # csi-sanity colours its output; strip that for the summary lines.
  sed 's/\x1b\[[0-9;]*m//g' "$work/sanity-$access.out" \
    | grep -E "^Ran [0-9]+ of [0-9]+ Specs|Passed \| [0-9]+ Failed" | paste -sd' ' - || true
  if [ -n "${SANITY_KEEP_OUTPUT:-}" ]; then cp "$work/sanity-$access.out" "$SANITY_KEEP_OUTPUT-$access.out"; fi
done
if [ "$status" -ne 0 ]; then
  echo "-- driver log (last 40 lines)"; tail -40 "$work/driver.log"
fi
exit "$status"
