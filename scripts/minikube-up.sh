#!/usr/bin/env bash
# Start a minikube cluster, build and load the thinloop image, install the
# snapshot CRDs and snapshot-controller when missing, and deploy thinloop.
#
#   scripts/minikube-up.sh                      # profile "thinloop"
#   MINIKUBE_PROFILE=dev MINIKUBE_DRIVER=kvm2 scripts/minikube-up.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${MINIKUBE_PROFILE:-thinloop}"
DRIVER="${MINIKUBE_DRIVER:-}"
IMAGE="${THINLOOP_IMAGE:-thinloop/thinloop-csi:0.1.0}"
SNAPSHOTTER_VERSION="v8.6.0"
CRD_URL="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/${SNAPSHOTTER_VERSION}/client/config/crd"

log() { printf '==> %s\n' "$*"; }

for tool in minikube docker kubectl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "minikube-up.sh: $tool not found in PATH" >&2; exit 1; }
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

if minikube status --profile "$PROFILE" >/dev/null 2>&1; then
  log "minikube profile ${PROFILE} is running"
else
  log "starting minikube profile ${PROFILE}"
  start_args=(start --profile "$PROFILE" --wait=all)
  if [[ -n "$DRIVER" ]]; then
    start_args+=(--driver "$DRIVER")
  fi
  minikube "${start_args[@]}"
fi
# minikube start points the current context at the profile; make sure.
kubectl config use-context "$PROFILE" >/dev/null

log "building ${IMAGE}"
docker build -t "$IMAGE" "$ROOT"
log "loading ${IMAGE} into minikube"
minikube image load "$IMAGE" --profile "$PROFILE"

install_snapshot_support

log "deploying thinloop"
kubectl apply -k "${ROOT}/deploy/kubernetes"
kubectl -n thinloop rollout status daemonset/thinloop-node --timeout=300s
kubectl -n thinloop rollout status deployment/thinloop-controller --timeout=300s

log "thinloop is running on minikube profile ${PROFILE}. Next:"
echo "    scripts/e2e.sh"
