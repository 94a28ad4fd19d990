"""WorkerPool's error paths that need no fork: a call to a worker whose socket is gone is
UNAVAILABLE (the driver is about to restart), never INTERNAL."""

from __future__ import annotations

import socket

import grpc
import pytest

from csi_driver.proto import csi_pb2
from csi_driver.serving.workers import Remote, WorkerPool, _Worker


def test_a_call_to_a_vanished_worker_is_unavailable() -> None:
    pool = WorkerPool(1)
    ours, theirs = socket.socketpair()
    theirs.close()
    ours.shutdown(socket.SHUT_WR)  # writing now fails as it would to a dead worker
    pool.workers.append(_Worker(0, 12345, ours))
    with pytest.raises(Remote) as info:
        pool.call("Node/NodeGetCapabilities", csi_pb2.NodeGetCapabilitiesRequest(),
                  csi_pb2.NodeGetCapabilitiesResponse)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert pool.busy() == 0, "the call left no outstanding entry"
    ours.close()


def test_no_spawner_to_ask_is_unavailable() -> None:
    pool = WorkerPool(1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    pool._ctl = ours
    with pytest.raises(Remote) as info:
        pool.call("Node/NodeGetCapabilities", csi_pb2.NodeGetCapabilitiesRequest(),
                  csi_pb2.NodeGetCapabilitiesResponse)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    ours.close()
