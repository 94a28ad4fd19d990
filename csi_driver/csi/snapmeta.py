"""SnapshotMetadata service (changed block tracking for backup tools). Snapshot images are
sparse files, so the filesystem knows exactly which ranges hold data (SEEK_DATA/SEEK_HOLE);
the delta between two snapshots of one volume is the union of their data ranges, compared
block by block."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import grpc

from ..errors import InvalidArgument, OutOfRange
from ..proto import csi_pb2, csi_pb2_grpc
from ..volumes.snapshots import Snapshots
from ..volumes.store import check_id
from .validation import require

DEFAULT_MAX_RESULTS = 256
COMPARE_BLOCK = 64 << 10
"""Granularity of GetMetadataDelta ranges."""


def data_ranges(path: str, start: int = 0) -> Iterator[tuple[int, int]]:
    """(offset, length) of every allocated range at or after start."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        offset = start
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return  # only a hole remains
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            yield data, hole - data
            offset = hole
    finally:
        os.close(fd)


def _merge(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans = sorted([(o, o + n) for o, n in a] + [(o, o + n) for o, n in b])
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return [(lo, hi - lo) for lo, hi in out]


def _blocks(ranges: list[tuple[int, int]], start: int) -> Iterator[int]:
    """Indexes of the COMPARE_BLOCK-aligned blocks the ranges touch, ascending, each once."""
    last = -1
    for offset, length in ranges:
        first = max(offset, start) // COMPARE_BLOCK
        end = -(-(offset + length) // COMPARE_BLOCK)
        for index in range(max(first, last + 1), end):
            yield index
            last = index


def changed_ranges(base: str, target: str, start: int = 0) -> Iterator[tuple[int, int]]:
    """Ranges of target that differ from base: whole aligned COMPARE_BLOCKs (the last one
    cut at the end of the image), adjacent ones merged, none overlapping."""
    union = _merge(list(data_ranges(base, start)), list(data_ranges(target, start)))
    size = os.path.getsize(target)
    run_start, run_end = -1, -1
    with open(base, "rb", buffering=0) as fb, open(target, "rb", buffering=0) as ft:
        for index in _blocks(union, start):
            lo = index * COMPARE_BLOCK
            n = min(COMPARE_BLOCK, size - lo)
            if n <= 0:
                break
            fb.seek(lo)
            ft.seek(lo)
            if fb.read(n) == ft.read(n):
                continue
            if lo == run_end:
                run_end = lo + n
            else:
                if run_start >= 0:
                    yield run_start, run_end - run_start
                run_start, run_end = lo, lo + n
    if run_start >= 0:
        yield run_start, run_end - run_start


class SnapshotMetadataService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    @staticmethod
    def _pages(ranges: Iterator[tuple[int, int]], max_results: int) -> Iterator[list[csi_pb2.BlockMetadata]]:
        if max_results < 0:
            raise InvalidArgument("max_results must not be negative")
        limit = max_results or DEFAULT_MAX_RESULTS
        page: list[csi_pb2.BlockMetadata] = []
        for offset, length in ranges:
            page.append(csi_pb2.BlockMetadata(byte_offset=offset, size_bytes=length))
            if len(page) == limit:
                yield page
                page = []
        if page:
            yield page

    def GetMetadataAllocated(self, request: csi_pb2.GetMetadataAllocatedRequest,
                             context: grpc.ServicerContext) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        require(request.snapshot_id, "snapshot_id")
        snap = self.snapshots.get(check_id(request.snapshot_id, "snapshot_id"))
        size = snap.size_bytes()
        if request.starting_offset < 0 or request.starting_offset > size:
            raise OutOfRange(f"starting_offset {request.starting_offset} is outside 0..{size}")
        for page in self._pages(data_ranges(str(snap.image), request.starting_offset), request.max_results):
            yield csi_pb2.GetMetadataAllocatedResponse(
                block_metadata_type=csi_pb2.VARIABLE_LENGTH, volume_capacity_bytes=size, block_metadata=page)

    def GetMetadataDelta(self, request: csi_pb2.GetMetadataDeltaRequest,
                         context: grpc.ServicerContext) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        require(request.base_snapshot_id, "base_snapshot_id")
        require(request.target_snapshot_id, "target_snapshot_id")
        base = self.snapshots.get(check_id(request.base_snapshot_id, "base_snapshot_id"))
        target = self.snapshots.get(check_id(request.target_snapshot_id, "target_snapshot_id"))
        if base.meta.source_id != target.meta.source_id:
            raise InvalidArgument(
                f"snapshots {base.id} and {target.id} are of different volumes "
                f"({base.meta.source_id}, {target.meta.source_id})")
        size = target.size_bytes()
        if request.starting_offset < 0 or request.starting_offset > size:
            raise OutOfRange(f"starting_offset {request.starting_offset} is outside 0..{size}")
        ranges = changed_ranges(str(base.image), str(target.image), request.starting_offset)
        for page in self._pages(ranges, request.max_results):
            yield csi_pb2.GetMetadataDeltaResponse(
                block_metadata_type=csi_pb2.VARIABLE_LENGTH, volume_capacity_bytes=size, block_metadata=page)
