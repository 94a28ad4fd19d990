#!/usr/bin/env bash
# Shared by kind-up.sh and minikube-up.sh (sourced, not run): the steps after the
# cluster exists and the image is loaded. Needs ROOT, IMAGE, SNAPSHOTTER_VERSION and log().

CRD_URL="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/${SNAPSHOTTER_VERSION}/client/config/crd"

# install_crds GROUP KIND...: the CRDs of the external-snapshotter release, unless the
# first is there already.
install_crds() {
  local group=$1; shift
  if kubectl get crd "$1.${group}" >/dev/null 2>&1; then
    log "${group} CRDs already installed"
    return
  fi
  log "installing ${group} CRDs ${SNAPSHOTTER_VERSION}"
  local kind files=() names=()
  for kind in "$@"; do
    files+=(-f "${CRD_URL}/${group}_${kind}.yaml")
    names+=("crd/${kind}.${group}")
  done
  kubectl apply "${files[@]}"
  kubectl wait --for=condition=Established --timeout=60s "${names[@]}"
}

install_snapshot_support() {
  install_crds snapshot.storage.k8s.io volumesnapshots volumesnapshotclasses volumesnapshotcontents
  # csi-snapshotter runs with the CSIVolumeGroupSnapshot gate, and then starts no
  # controller until these v1 CRDs exist.
  install_crds groupsnapshot.storage.k8s.io \
    volumegroupsnapshots volumegroupsnapshotclasses volumegroupsnapshotcontents
  local existing
  existing="$(kubectl get deployments --all-namespaces \
    -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name} {.spec.template.spec.containers[*].image}{"\n"}{end}' \
    | grep '/snapshot-controller:' || true)"
  if [[ -n "$existing" ]]; then
    log "snapshot-controller already running: ${existing%% *}"
    log "it must run with --enable-distributed-snapshotting for thinloop snapshots"
    log "and with --feature-gates=CSIVolumeGroupSnapshot=true for group snapshots"
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
