#!/usr/bin/env bash
# Run csi-sanity (kubernetes-csi/csi-test) against thinloop on a temp data dir: the node-local
# driver with mount volumes and with block volumes, then the shared-mode driver (--datastore,
# ControllerPublish with fencing) with mount volumes. Prints csi-sanity's summary lines; exits
# non-zero on any failure. Exits 0 with a SKIPPED: line when csi-sanity is not on PATH.
# CSI_SANITY names another build (e.g. CSI_SANITY=csi-sanity-master); SANITY_ARGS adds
# csi-sanity flags (e.g. SANITY_ARGS=-ginkgo.focus=GroupController). SANITY_RUNS: which runs,
# of "mount block shared" (the default: all three). SANITY_DATASTORE_DIR: run the shared mode
# on a directory of that shared filesystem's mount instead of a local temp one.
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
shared_sock="$work/shared/csi.sock"
shared_data=${SANITY_DATASTORE_DIR:+$SANITY_DATASTORE_DIR/thinloop-sanity-$$}
shared_data=${shared_data:-$work/datastore}
driver_pid=""
shared_pid=""

# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
  set +e  # best effort: an empty grep must not turn a pass into a failure
  for pid in "$driver_pid" "$shared_pid"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"; wait "$pid" || true
    fi
  done
  # Whatever a failed spec left: unmount (deepest first), detach, remove.
  findmnt -rn -o TARGET | grep "^$work/" | sort -r | while read -r m; do umount -l "$m" || true; done
  losetup -a | grep -e "$work/" -e "$shared_data/" | cut -d: -f1 | while read -r d; do losetup -d "$d" || true; done
  if [ -n "${SANITY_DATASTORE_DIR:-}" ]; then rm -rf "$shared_data"; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$PYTHON" -m csi_driver --endpoint "unix://$sock" --data-dir "$work/data" \
  --kubelet-dir "$work" --node-id sanity-node --log-level warning 2>"$work/driver.log" &
driver_pid=$!
# Shared mode: controller and node in one process, as csi-sanity calls both on one socket.
# An attach limit lets the attach-limit spec run (-csi.testnodevolumeattachlimit). The
# datastore is a plain directory here, not a mount point: made a datastore by hand, once.
mkdir -p "$shared_data"
"$PYTHON" -m csi_driver.ops.ctl datastore init --data-dir "$shared_data" --name sanity >/dev/null
"$PYTHON" -m csi_driver --endpoint "unix://$shared_sock" --data-dir "$shared_data" \
  --kubelet-dir "$work" --node-id sanity-node --datastore sanity --max-volumes-per-node 16 \
  --log-level warning 2>"$work/shared-driver.log" &
shared_pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && [ -S "$shared_sock" ] && break; sleep 0.1; done

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
read -r -a runs <<<"${SANITY_RUNS:-mount block shared}"
for run in "${runs[@]}"; do
  access=$run endpoint=$sock log="$work/driver.log" more=()
  label="$run volumes"
  if [ "$run" = shared ]; then
    access=mount endpoint=$shared_sock log="$work/shared-driver.log" more=(-csi.testnodevolumeattachlimit)
    label="shared mode, mount volumes"
  fi
  rm -rf "${work:?}/mnt" "${work:?}/staging"
  echo "== csi-sanity ($label)"
  set +e
  "$SANITY" -csi.endpoint "unix://$endpoint" \
    -csi.mountdir "$work/mnt" -csi.stagingdir "$work/staging" \
    -csi.testvolumeaccesstype "$access" \
    -csi.testvolumesize "$SIZE" -csi.testvolumeexpandsize "$EXPAND" \
    -csi.testvolumeparameters "$params" \
    -csi.testvolumemutableparameters tests/sanity/mutable-params.yaml \
    "${more[@]}" "${extra_args[@]}" >"$work/sanity-$run.out" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    status=1
    sed 's/\x1b\[[0-9;]*m//g' "$work/sanity-$run.out" | grep -E "^\s*\[FAIL\]" -A1 | head -60 || true
    echo "-- driver log (last 40 lines)"; tail -40 "$log"
  fi
  # csi-sanity colours its output; strip that for the summary lines.
  sed 's/\x1b\[[0-9;]*m//g' "$work/sanity-$run.out" \
    | grep -E "^Ran [0-9]+ of [0-9]+ Specs|Passed \| [0-9]+ Failed" | paste -sd' ' - || true
  if [ -n "${SANITY_KEEP_OUTPUT:-}" ]; then cp "$work/sanity-$run.out" "$SANITY_KEEP_OUTPUT-$run.out"; fi
done
exit "$status"
