#!/usr/bin/env bash
# End-to-end checks of a running thinloop deployment, against the current
# kube context (scripts/kind-up.sh or scripts/minikube-up.sh set one up).
# Runs the manifests from examples/ in a scratch namespace; each check prints
# PASS or FAIL, and the script exits non-zero when any check failed.
#
#   scripts/e2e.sh
#   E2E_NAMESPACE=mine E2E_KEEP=1 scripts/e2e.sh   # keep the namespace after
#   scripts/e2e.sh --shared                        # the shared-datastore driver (or E2E_SHARED=1)
#
# --shared needs the shared-datastore driver (deploy/kubernetes/overlays/
# shared-datastore) and at least two schedulable nodes whose node plugin
# reports the datastore; it moves examples/shared-deployment.yaml from node to
# node and checks the data each time (docs/shared-datastore.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EX="${ROOT}/examples"
NS="${E2E_NAMESPACE:-thinloop-e2e}"
DRIVER_NS="${THINLOOP_NAMESPACE:-thinloop}"
WAIT="${E2E_TIMEOUT:-180}"
DATA_DIR=/var/lib/thinloop
PASSED=0
FAILED=0

log() { printf '    %s\n' "$*"; }
k() { kubectl -n "$NS" "$@"; }

# run_check DESCRIPTION FUNCTION: the function returns non-zero on failure.
run_check() {
  local desc="$1"
  shift
  echo "--- ${desc}"
  if "$@"; then
    echo "PASS: ${desc}"
    PASSED=$((PASSED + 1))
  else
    echo "FAIL: ${desc}"
    FAILED=$((FAILED + 1))
  fi
}

# retry SECONDS COMMAND...: run COMMAND every 2 s until it succeeds.
retry() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 2
  done
}

pod_ready() { k wait --for=condition=Ready "pod/$1" --timeout="${WAIT}s" >/dev/null; }
node_of() { k get pod "$1" -o jsonpath='{.spec.nodeName}'; }
pv_of() { k get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
handle_of_pv() { kubectl get pv "$1" -o jsonpath='{.spec.csi.volumeHandle}'; }

# The node plugin pod on node $1.
plugin_pod() {
  kubectl -n "$DRIVER_NS" get pods -l app.kubernetes.io/name=thinloop,app.kubernetes.io/component=node \
    --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}'
}
# Volume ids present on node $1, one per line.
node_volumes() {
  local pod
  pod="$(plugin_pod "$1")" || return 1
  kubectl -n "$DRIVER_NS" exec "$pod" -c thinloop -- ls -1 "${DATA_DIR}/volumes"
}
volume_on_node() { node_volumes "$1" | grep -qx "$2"; }
volume_not_on_node() { ! volume_on_node "$1" "$2"; }
pv_gone() { ! kubectl get pv "$1" >/dev/null 2>&1; }
pvc_gone() { ! k get pvc "$1" >/dev/null 2>&1; }
pv_phase_is() { [[ "$(kubectl get pv "$1" -o jsonpath='{.status.phase}')" == "$2" ]]; }
read_file() { k exec "$1" -- cat "$2"; }
file_is() { [[ "$(read_file "$1" "$2")" == "$3" ]]; }
# Filesystem size in KiB of mount point $2 in pod $1.
fs_kib() { k exec "$1" -- df -k "$2" | awk 'NR == 2 { print $2 }'; }
fs_at_least() { local kib; kib="$(fs_kib "$1" "$2")" && ((kib >= $3)); }

cleanup() {
  if [[ "${E2E_KEEP:-0}" == "1" ]]; then
    echo "keeping namespace ${NS}"
    return
  fi
  kubectl delete namespace "$NS" --ignore-not-found --wait=true --timeout=300s >/dev/null 2>&1 || true
}

TOKEN="thinloop-e2e-$(date +%s)-${RANDOM}"
KEPT_TOKEN="kept-${TOKEN}"

check_write() {
  k apply -f "${EX}/pvc-pod.yaml" || return 1
  pod_ready thinloop-app || return 1
  k exec thinloop-app -- sh -c "echo '${TOKEN}' > /data/e2e.txt && sync" || return 1
  file_is thinloop-app /data/e2e.txt "$TOKEN"
}

check_persist() {
  local node
  node="$(node_of thinloop-app)" || return 1
  k delete pod thinloop-app --wait=true --timeout="${WAIT}s" || return 1
  k apply -f "${EX}/pvc-pod.yaml" || return 1
  pod_ready thinloop-app || return 1
  log "first pod on ${node}, new pod on $(node_of thinloop-app)"
  file_is thinloop-app /data/e2e.txt "$TOKEN"
}

check_snapshot_restore() {
  k apply -f "${EX}/snapshot.yaml" || return 1
  k wait --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/thinloop-snap --timeout="${WAIT}s" || return 1
  k apply -f "${EX}/restore.yaml" || return 1
  pod_ready thinloop-restore-reader || return 1
  file_is thinloop-restore-reader /data/e2e.txt "$TOKEN"
}

check_expand() {
  local before
  before="$(fs_kib thinloop-app /data)" || return 1
  k apply -f "${EX}/pvc-expand.yaml" || return 1
  # 1Gi -> 2Gi; the filesystem must pass 1.5 GiB.
  retry "$WAIT" fs_at_least thinloop-app /data 1572864 || return 1
  log "filesystem size ${before} KiB -> $(fs_kib thinloop-app /data) KiB"
}

check_block() {
  k apply -f "${EX}/block-pvc-pod.yaml" || return 1
  pod_ready thinloop-block-app || return 1
  k exec thinloop-block-app -- test -b /dev/xvda || return 1
  k exec thinloop-block-app -- sh -c \
    "printf '%s' '${TOKEN}' | dd of=/dev/xvda bs=4096 count=1 conv=sync,fsync 2>/dev/null" || return 1
  [[ "$(k exec thinloop-block-app -- head -c "${#TOKEN}" /dev/xvda)" == "$TOKEN" ]]
}

check_inline_ephemeral() {
  local node with_pod without_pod gone
  k apply -f "${EX}/ephemeral-inline.yaml" || return 1
  pod_ready thinloop-inline || return 1
  node="$(node_of thinloop-inline)" || return 1
  # A 256Mi volume: the filesystem is a little smaller.
  fs_at_least thinloop-inline /scratch 200000 || return 1
  with_pod="$(node_volumes "$node")" || return 1
  k delete pod thinloop-inline --wait=true --timeout="${WAIT}s" || return 1
  without_pod="$(node_volumes "$node")" || return 1
  # Volumes present with the pod and absent after it: the ephemeral one.
  gone="$(comm -23 <(sort <<<"$with_pod") <(sort <<<"$without_pod"))"
  if [[ -z "$gone" ]]; then
    log "no volume of ${node} disappeared with the pod"
    return 1
  fi
  log "ephemeral volume ${gone} removed from ${node}"
}

check_generic_ephemeral() {
  local pv handle node
  k apply -f "${EX}/generic-ephemeral.yaml" || return 1
  pod_ready thinloop-generic || return 1
  node="$(node_of thinloop-generic)" || return 1
  pv="$(pv_of thinloop-generic-scratch)" || return 1
  handle="$(handle_of_pv "$pv")" || return 1
  volume_on_node "$node" "$handle" || return 1
  k delete pod thinloop-generic --wait=true --timeout="${WAIT}s" || return 1
  retry "$WAIT" pvc_gone thinloop-generic-scratch || return 1
  retry "$WAIT" pv_gone "$pv" || return 1
  retry 60 volume_not_on_node "$node" "$handle"
}

check_delete() {
  local pv handle node
  node="$(node_of thinloop-app)" || return 1
  pv="$(pv_of thinloop-pvc)" || return 1
  handle="$(handle_of_pv "$pv")" || return 1
  volume_on_node "$node" "$handle" || return 1
  # Restored claim and snapshot first, then the source claim.
  k delete pod thinloop-restore-reader thinloop-app --wait=true --timeout="${WAIT}s" || return 1
  k delete pvc thinloop-restored --wait=true --timeout="${WAIT}s" || return 1
  k delete volumesnapshot thinloop-snap --wait=true --timeout="${WAIT}s" || return 1
  k delete pvc thinloop-pvc --wait=true --timeout="${WAIT}s" || return 1
  retry "$WAIT" pv_gone "$pv" || return 1
  retry 60 volume_not_on_node "$node" "$handle" || return 1
  log "volume ${handle} removed from ${node}"
}

KEPT_PV=""
KEPT_HANDLE=""
KEPT_NODE=""
check_retain() {
  k apply -f "${EX}/pvc-retain.yaml" || return 1
  pod_ready thinloop-kept-writer || return 1
  k exec thinloop-kept-writer -- sh -c "echo '${KEPT_TOKEN}' > /data/e2e.txt && sync" || return 1
  KEPT_NODE="$(node_of thinloop-kept-writer)" || return 1
  KEPT_PV="$(pv_of thinloop-kept)" || return 1
  KEPT_HANDLE="$(handle_of_pv "$KEPT_PV")" || return 1
  k delete pod thinloop-kept-writer --wait=true --timeout="${WAIT}s" || return 1
  k delete pvc thinloop-kept --wait=true --timeout="${WAIT}s" || return 1
  retry "$WAIT" pv_phase_is "$KEPT_PV" Released || return 1
  volume_on_node "$KEPT_NODE" "$KEPT_HANDLE" || return 1
  log "volume ${KEPT_HANDLE} kept on ${KEPT_NODE} (PV ${KEPT_PV} Released)"
}

check_static_pv() {
  [[ -n "$KEPT_HANDLE" ]] || { log "no retained volume to reuse"; return 1; }
  kubectl delete pv "$KEPT_PV" --wait=true --timeout="${WAIT}s" || return 1
  sed -e "s/VOLUME_ID/${KEPT_HANDLE}/" -e "s/NODE_NAME/${KEPT_NODE}/" "${EX}/static-pv.yaml" | k apply -f - || return 1
  k apply -f - <<'POD' || return 1
apiVersion: v1
kind: Pod
metadata:
  name: thinloop-static-reader
spec:
  containers:
    - name: reader
      image: busybox:1.36
      command: ["sh", "-c", "exec sleep 3600"]
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: thinloop-static
POD
  pod_ready thinloop-static-reader || return 1
  file_is thinloop-static-reader /data/e2e.txt "$KEPT_TOKEN"
}

# Static volumes are never deleted by the driver: remove the image by hand.
cleanup_static() {
  k delete pod thinloop-static-reader --ignore-not-found --wait=true --timeout="${WAIT}s" >/dev/null 2>&1 || true
  k delete pvc thinloop-static --ignore-not-found --wait=true --timeout="${WAIT}s" >/dev/null 2>&1 || true
  kubectl delete pv thinloop-static "${KEPT_PV:-thinloop-static}" --ignore-not-found --wait=true >/dev/null 2>&1 || true
  if [[ -n "$KEPT_HANDLE" && -n "$KEPT_NODE" ]]; then
    local pod
    if pod="$(plugin_pod "$KEPT_NODE")"; then
      kubectl -n "$DRIVER_NS" exec "$pod" -c thinloop -- rm -rf "${DATA_DIR}/volumes/${KEPT_HANDLE}" || true
    fi
  fi
}

check_statefulset() {
  local i
  k apply -f "${EX}/statefulset.yaml" || return 1
  k rollout status statefulset/web --timeout="${WAIT}s" || return 1
  for i in 0 1; do
    file_is "web-${i}" /data/index.html "web-${i}" || return 1
  done
}

main() {
  if [[ "${1:-}" == "--shared" || "${E2E_SHARED:-0}" == "1" ]]; then
    main_shared
    return
  fi
  kubectl get csidriver thinloop.csi.io >/dev/null || { echo "thinloop is not installed in this cluster" >&2; exit 1; }
  echo "context: $(kubectl config current-context), namespace: ${NS}"
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  trap cleanup EXIT

  run_check "pod writes data to a new volume" check_write
  run_check "recreated pod reads the same data" check_persist
  run_check "snapshot restored to a new claim has the same data" check_snapshot_restore
  run_check "expanded claim: the pod sees the new size" check_expand
  run_check "block claim usable as a device" check_block
  run_check "inline ephemeral volume gone with its pod" check_inline_ephemeral
  run_check "generic ephemeral volume gone with its pod" check_generic_ephemeral
  run_check "deleted claim: image gone from the node" check_delete
  run_check "Retain class: image kept after the claim is deleted" check_retain
  run_check "static PersistentVolume over the kept image has its data" check_static_pv
  cleanup_static
  run_check "StatefulSet replicas each get their own volume" check_statefulset

  echo "${PASSED} passed, ${FAILED} failed"
  ((FAILED == 0))
}

# --- shared datastore (--shared) ---------------------------------------------

SHARED_DRIVER=shared.thinloop.csi.io
DATASTORE_KEY=topology.thinloop.csi.io/datastore
SHARED_APP=shared-app
SHARED_CLAIM=shared-data
CORDONED=""

# The Deployment's running pod that is not being deleted.
shared_pod() {
  k get pods -l "app=${SHARED_APP}" \
    -o jsonpath='{range .items[*]}{.metadata.name} {.status.phase} {.metadata.deletionTimestamp}{"\n"}{end}' \
    | awk '$2 == "Running" && $3 == "" { print $1; exit }'
}
shared_ready() { k rollout status "deployment/${SHARED_APP}" --timeout="${WAIT}s" >/dev/null; }
# The nodes whose shared node plugin reports the datastore, one per line.
datastore_nodes() { kubectl get nodes -l "$DATASTORE_KEY" -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'; }
# node names of the VolumeAttachments of PersistentVolume $1, one per line.
attached_nodes() {
  kubectl get volumeattachments \
    -o jsonpath='{range .items[*]}{.spec.source.persistentVolumeName} {.spec.nodeName} {.status.attached}{"\n"}{end}' \
    | awk -v pv="$1" '$1 == pv { print $2, $3 }'
}
# The one attachment of PV $1 is to node $2 and attached.
attached_only_to() { [[ "$(attached_nodes "$1")" == "$2 true" ]]; }
pod_on_other_node() {
  local pod node
  pod="$(shared_pod)" && [[ -n "$pod" ]] || return 1
  node="$(node_of "$pod")" && [[ -n "$node" && "$node" != "$1" ]]
}
pod_on_node() {
  local pod
  pod="$(shared_pod)" && [[ -n "$pod" ]] && [[ "$(node_of "$pod")" == "$1" ]]
}
shared_data_dir() {
  local name root
  name="$(kubectl -n "$DRIVER_NS" get configmap thinloop-shared-config -o jsonpath='{.data.datastoreName}')" || return 1
  root="$(kubectl -n "$DRIVER_NS" get configmap thinloop-shared-config -o jsonpath='{.data.datastoreMountRoot}')" || return 1
  echo "${root}/${name}"
}
# Volume ids on the datastore, seen through the shared node plugin on node $1.
datastore_volumes() {
  local pod dir
  dir="$(shared_data_dir)" || return 1
  pod="$(kubectl -n "$DRIVER_NS" get pods -l app.kubernetes.io/name=thinloop,app.kubernetes.io/component=shared-node \
    --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}')" || return 1
  kubectl -n "$DRIVER_NS" exec "$pod" -c thinloop -- ls -1 "${dir}/volumes"
}
volume_gone_from_datastore() {
  local ids
  ids="$(datastore_volumes "$1")" || return 1
  ! grep -qx "$2" <<<"$ids"
}

uncordon() {
  if [[ -n "$CORDONED" ]]; then
    kubectl uncordon "$CORDONED" >/dev/null || true
    CORDONED=""
  fi
}

cleanup_shared() {
  uncordon
  cleanup
}

SHARED_FIRST_NODE=""
SHARED_PV=""

check_shared_write() {
  local pod
  k apply -f "${EX}/shared-deployment.yaml" || return 1
  shared_ready || return 1
  pod="$(shared_pod)" || return 1
  SHARED_FIRST_NODE="$(node_of "$pod")" || return 1
  SHARED_PV="$(pv_of "$SHARED_CLAIM")" || return 1
  k exec "$pod" -- sh -c "echo '${TOKEN}' > /data/e2e.txt && sync" || return 1
  file_is "$pod" /data/e2e.txt "$TOKEN" || return 1
  log "pod ${pod} on ${SHARED_FIRST_NODE}, volume ${SHARED_PV}"
  attached_only_to "$SHARED_PV" "$SHARED_FIRST_NODE"
}

# Cordon the pod's node and delete the pod: the Deployment's new pod must start
# on another node with the same data, and the attachment must follow it.
check_shared_move() {
  local pod node
  CORDONED="$SHARED_FIRST_NODE"
  kubectl cordon "$SHARED_FIRST_NODE" >/dev/null || return 1
  k delete pod -l "app=${SHARED_APP}" --wait=true --timeout="${WAIT}s" || return 1
  retry "$WAIT" pod_on_other_node "$SHARED_FIRST_NODE" || return 1
  shared_ready || return 1
  pod="$(shared_pod)" || return 1
  node="$(node_of "$pod")" || return 1
  log "moved from ${SHARED_FIRST_NODE} to ${node}"
  file_is "$pod" /data/e2e.txt "$TOKEN" || return 1
  # nodes.log: one line per start, the first node then this one.
  [[ "$(read_file "$pod" /data/nodes.log | tail -n 2 | tr '\n' ' ')" == "${SHARED_FIRST_NODE} ${node} " ]] || return 1
  retry "$WAIT" attached_only_to "$SHARED_PV" "$node"
}

# Back to the first node with a nodeSelector change (a new rollout).
check_shared_move_back() {
  local pod
  uncordon
  k patch deployment "$SHARED_APP" --type merge \
    -p "{\"spec\":{\"template\":{\"spec\":{\"nodeSelector\":{\"kubernetes.io/hostname\":\"${SHARED_FIRST_NODE}\"}}}}}" \
    || return 1
  shared_ready || return 1
  retry "$WAIT" pod_on_node "$SHARED_FIRST_NODE" || return 1
  pod="$(shared_pod)" || return 1
  file_is "$pod" /data/e2e.txt "$TOKEN" || return 1
  retry "$WAIT" attached_only_to "$SHARED_PV" "$SHARED_FIRST_NODE"
}

check_shared_delete() {
  local handle
  handle="$(handle_of_pv "$SHARED_PV")" || return 1
  k delete deployment "$SHARED_APP" --wait=true --timeout="${WAIT}s" || return 1
  k delete pvc "$SHARED_CLAIM" --wait=true --timeout="${WAIT}s" || return 1
  retry "$WAIT" pv_gone "$SHARED_PV" || return 1
  retry 60 volume_gone_from_datastore "$SHARED_FIRST_NODE" "$handle" || return 1
  log "volume ${handle} removed from the datastore"
}

main_shared() {
  local nodes
  kubectl get csidriver "$SHARED_DRIVER" >/dev/null \
    || { echo "the shared-datastore driver is not installed in this cluster" >&2; exit 1; }
  nodes="$(datastore_nodes | grep -c . || true)"
  if ((nodes < 2)); then
    echo "--shared needs two nodes labelled ${DATASTORE_KEY} (found ${nodes})" >&2
    exit 1
  fi
  echo "context: $(kubectl config current-context), namespace: ${NS}, ${nodes} nodes see the datastore"
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  trap cleanup_shared EXIT

  run_check "pod writes data to a volume on the datastore" check_shared_write
  run_check "pod moved to another node (cordon + delete) reads the same data" check_shared_move
  run_check "pod moved back (nodeSelector) reads the same data" check_shared_move_back
  run_check "deleted claim: image gone from the datastore" check_shared_delete

  echo "${PASSED} passed, ${FAILED} failed"
  ((FAILED == 0))
}

main "$@"
