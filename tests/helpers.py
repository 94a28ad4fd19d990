"""Small helpers for driving a volume through its life in tests."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import grpc
import pytest

from csi_driver.ops.client import CsiClient, capability
from csi_driver.proto import csi_pb2

MIB = 1 << 20
GIB = 1 << 30
SIZES = {"ext4": 64 * MIB, "xfs": 320 * MIB, "block": 32 * MIB}
"""A small volume of each kind (mkfs.xfs needs 300 MiB)."""


def cap_for(fs: str) -> csi_pb2.VolumeCapability:
    return capability(block=True) if fs == "block" else capability(fs_type=fs)


def create(c: CsiClient, name: str, size: int, fs: str = "ext4", **params: str) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap_for(fs)], parameters=params,
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=size))
    return c.controller.CreateVolume(req).volume


@dataclass
class Published:
    volume_id: str
    fs: str
    staging: str
    target: str

    @property
    def data_path(self) -> str:
        return self.target if self.fs == "block" else os.path.join(self.target, "data.bin")


def stage(c: CsiClient, vid: str, staging: str, fs: str) -> None:
    os.makedirs(staging, exist_ok=True)  # kubelet makes the staging dir
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging, volume_capability=cap_for(fs)))


def publish(c: CsiClient, vid: str, staging: str, target: str, fs: str, readonly: bool = False) -> None:
    c.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=staging, target_path=target,
        volume_capability=cap_for(fs), readonly=readonly))


def up(c: CsiClient, vid: str, kubelet: str, fs: str, name: str = "") -> Published:
    staging = os.path.join(kubelet, "plugins", "staging", name or vid)
    target = os.path.join(kubelet, "pods", name or vid, "mount")
    stage(c, vid, staging, fs)
    publish(c, vid, staging, target, fs)
    return Published(vid, fs, staging, target)


def down(c: CsiClient, p: Published) -> None:
    c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=p.volume_id, target_path=p.target))
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=p.volume_id,
                                                              staging_target_path=p.staging))


def delete(c: CsiClient, vid: str) -> None:
    c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))


def write_data(p: Published, size: int = 4 * MIB, seed: int = 1) -> str:
    """Write pseudo-random bytes through the published path, fsync, return the sha256."""
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    flags = os.O_WRONLY | (0 if p.fs == "block" else os.O_CREAT | os.O_TRUNC)
    fd = os.open(p.data_path, flags, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def read_sum(p: Published, size: int = 4 * MIB) -> str:
    with open(p.data_path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def code_of(fn: object, *args: object) -> grpc.StatusCode:
    """Call fn(*args) expecting an RpcError; return its code."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def tree(path: str) -> list[str]:
    """Every file and dir under path (to show that a failed call changed nothing)."""
    out = []
    for root, dirs, files in os.walk(path):
        out += [os.path.join(root, n) for n in sorted(dirs + files)]
    return sorted(out)
