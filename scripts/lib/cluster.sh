#!/usr/bin/env bash
# Shared by kind-up.sh and minikube-up.sh (sourced, not run): the steps after the
# cluster exists and the image is loaded. Needs ROOT, IMAGE, SNAPSHOTTER_VERSION and log().

CRD_URL="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/${SNAPSHOTTER_VERSION}/client/config/crd"

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

deploy_thinloop() {
  log "deploying thinloop"
  kubectl apply -k "${ROOT}/deploy/kubernetes"
  # The manifests name the default image; point the workloads at the one just loaded.
  kubectl -n thinloop set image daemonset/thinloop-node "thinloop=${IMAGE}"
  kubectl -n thinloop set image deployment/thinloop-controller "thinloop=${IMAGE}"
  kubectl -n thinloop rollout status daemonset/thinloop-node --timeout=300s
  kubectl -n thinloop rollout status deployment/thinloop-controller --timeout=300s
}
