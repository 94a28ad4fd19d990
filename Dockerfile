# thinloop CSI driver image.
#
#   docker build -t thinloop/thinloop-csi:0.1.0 .
#
# The gRPC stubs are committed under csi_driver/proto (made by
# scripts/gen_proto.sh), so the build installs the source tree as it is and
# needs no protoc. Regenerate them in the tree, not in the image.

# A version-pinned slim base. For byte-for-byte reproducible builds pin the
# digest as well (python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# .dockerignore keeps tests, docs, deploy files and VCS data out.
COPY . .
# Build wheels (the package and everything it needs, kube extra included) so
# the runtime stage gets neither the source nor pip's build dependencies.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[kube]"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="thinloop-csi" \
      org.opencontainers.image.description="CSI driver: node-local Kubernetes volumes backed by sparse loopback files" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.vendor="thinloop"

# The tools the driver runs on the node: losetup, blkid, mount, umount,
# findmnt (util-linux, mount), mkfs.ext3/ext4, resize2fs (e2fsprogs),
# mkfs.xfs, xfs_growfs (xfsprogs). Versions follow the pinned Debian release
# of the base image, so the packages are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      util-linux \
      mount \
      e2fsprogs \
      xfsprogs \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /wheels /wheels
# The wheel's own dependencies (grpcio, protobuf, ...) are pinned by the
# package metadata. The kube extra lets `thinloopctl node orphans`, run in the
# node pod, read PersistentVolumes through the in-cluster config, and runs the
# group-snapshot-labeller sidecar (thinloopctl node label-group-snapshots).
RUN pip install --no-cache-dir --no-index --find-links /wheels "thinloop[kube]==${VERSION}" \
 && rm -rf /wheels

ENV PYTHONUNBUFFERED=1
# The node plugin must run as root (loop devices, mounts); the controller
# Deployment drops privilege escalation in its securityContext.
ENTRYPOINT ["thinloop-csi"]
