"""A small typed CSI client over a unix socket, used by thinloopctl, the demo and tests."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from ..proto import csi_pb2, csi_pb2_grpc
from ..settings import grpc_target, socket_path_from_endpoint

AccessMode = csi_pb2.VolumeCapability.AccessMode


def capability(block: bool = False, fs_type: str = "",
               mode: int = AccessMode.SINGLE_NODE_WRITER,
               mount_flags: tuple[str, ...] = ()) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(access_mode=AccessMode(mode=mode))  # type: ignore[arg-type]
    if block:
        cap.block.SetInParent()
    else:
        cap.mount.fs_type = fs_type
        cap.mount.mount_flags.extend(mount_flags)
    return cap


@dataclass
class CsiClient:
    channel: grpc.Channel
    identity: csi_pb2_grpc.IdentityStub
    controller: csi_pb2_grpc.ControllerStub
    node: csi_pb2_grpc.NodeStub
    snapmeta: csi_pb2_grpc.SnapshotMetadataStub
    group: csi_pb2_grpc.GroupControllerStub

    @classmethod
    def connect(cls, endpoint: str, timeout: float = 10.0) -> CsiClient:
        channel = grpc.insecure_channel(grpc_target(socket_path_from_endpoint(endpoint)))
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return cls(channel, csi_pb2_grpc.IdentityStub(channel), csi_pb2_grpc.ControllerStub(channel),
                   csi_pb2_grpc.NodeStub(channel), csi_pb2_grpc.SnapshotMetadataStub(channel),
                   csi_pb2_grpc.GroupControllerStub(channel))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CsiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_socket(path: str, timeout: float = 20.0) -> None:
    import os
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear within {timeout}s")
