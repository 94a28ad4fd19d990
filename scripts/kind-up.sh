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

log() { printf '==> %s\n' "$*"; }

for tool in kind docker kubectl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "kind-up.sh: $tool not found in PATH" >&2; exit 1; }
done

# shellcheck source=scripts/lib/cluster.sh
source "${ROOT}/scripts/lib/cluster.sh"

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

deploy_thinloop

log "thinloop is running on kind cluster ${CLUSTER}. Next:"
echo "    scripts/e2e.sh"
