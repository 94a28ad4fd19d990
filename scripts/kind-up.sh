#!/usr/bin/env bash
# Create a kind cluster, build and load the thinloop image, install the
# snapshot CRDs and snapshot-controller when missing, and deploy thinloop.
#
#   scripts/kind-up.sh            # cluster "thinloop"
#   KIND_CLUSTER_NAME=dev scripts/kind-up.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${KIND_CLUSTER_NAME:-thinloop}"
IMAGE="${THINLOOP_IMAGE:-thinloop/thinloop-csi:0.1.0}"
SNAPSHOTTER_VERSION="v8.6.0"
CRD_URL="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/${SNAPSHOTTER_VERSION}/client/config/crd"

log() { printf '==> %s\n' "$*"; }

for tool in kind docker kubectl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "kind-up.sh: $tool not found in PATH" >&2; exit 1; }
done

install_snapshot_support() {
  if kubectl get crd volumesnapshots.snapshot.storage.k8s.io >/dev/null 2>&1; then
    log "snapshot CRDs already installed"
  else
    log "installing snapshot CRDs ${SNAPSHOTTER_VERSION}"
    kubectl apply \
      -f "${CRD_URL}/snapshot.storage.k8s.io_volumesnapshotclasses.yaml" \
      -f "${CRD_URL}/snapshot.storage.k8s.io_volumesnapshotcontents.yaml" \
      -f "${CRD_URL}/snapshot.storage.k8s.io_volumesnapshots.yaml"
    kubectl wait --for=condition=Established --timeout=60s \
      crd/volumesnapshotclasses.snapshot.storage.k8s.io \
      crd/volumesnapshotcontents.snapshot.storage.k8s.io \
      crd/volumesnapshots.snapshot.storage.k8s.io
  fi
  local existing
  existing="$(kubectl get deployments --all-namespaces \
    -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name} {.spec.template.spec.containers[*].image}{"\n"}{end}' \
    | grep '/snapshot-controller:' || true)"
  if [[ -n "$existing" ]]; then
    log "snapshot-controller already running: ${existing%% *}"
    log "it must run with --enable-distributed-snapshotting for thinloop snapshots"
  else
    log "installing snapshot-controller ${SNAPSHOTTER_VERSION} (distributed snapshotting)"
    kubectl apply -k "${ROOT}/deploy/snapshot-controller"
    kubectl -n kube-system rollout status deployment/snapshot-controller --timeout=180s
  fi
}

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "kind cluster ${CLUSTER} exists"
else
  log "creating kind cluster ${CLUSTER}"
  # The node container gets the host's /dev: loop devices that losetup
  # creates after the node started must be visible to the node plugin.
  config="$(mktemp)"
  trap 'rm -f "$config"' EXIT
  cat >"$config" <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      - hostPath: /dev
        containerPath: /dev
KIND
  kind create cluster --name "$CLUSTER" --config "$config" --wait 180s
fi
kubectl config use-context "kind-${CLUSTER}" >/dev/null

log "building ${IMAGE}"
docker build -t "$IMAGE" "$ROOT"
log "loading ${IMAGE} into kind"
kind load docker-image "$IMAGE" --name "$CLUSTER"

install_snapshot_support

log "deploying thinloop"
kubectl apply -k "${ROOT}/deploy/kubernetes"
kubectl -n thinloop rollout status daemonset/thinloop-node --timeout=300s
kubectl -n thinloop rollout status deployment/thinloop-controller --timeout=300s

log "thinloop is running on kind cluster ${CLUSTER}. Next:"
echo "    scripts/e2e.sh"
