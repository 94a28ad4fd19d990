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

log() { printf '==> %s\n' "$*"; }

for tool in minikube docker kubectl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "minikube-up.sh: $tool not found in PATH" >&2; exit 1; }
done

# shellcheck source=scripts/lib/cluster.sh
source "${ROOT}/scripts/lib/cluster.sh"

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

deploy_thinloop

log "thinloop is running on minikube profile ${PROFILE}. Next:"
echo "    scripts/e2e.sh"
