from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver.csi.validation import (
    DEFAULT_SIZE,
    GIB,
    MIB,
    check_mount_flags,
    confine,
    resolve_params,
    size_from_range,
)
from csi_driver.errors import InvalidArgument, OutOfRange
from csi_driver.proto import csi_pb2
from csi_driver.volumes.params import parse_quantity
from csi_driver.volumes.store import check_id
from tests.helpers import cap_for


def rng(required: int = 0, limit: int = 0) -> csi_pb2.CapacityRange:
    return csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)


@pytest.mark.parametrize(("required", "limit", "fs", "expected"), [
    (0, 0, "ext4", DEFAULT_SIZE),                  # absent: the documented default
    (GIB, 0, "ext4", GIB),                          # exact
    (GIB + 1, 0, "ext4", GIB + MIB),                # rounded up to a MiB
    (1, 0, "ext4", 16 * MIB),                       # raised to the fs minimum
    (1, 0, "xfs", 300 * MIB),
    (1, 0, "", MIB),                                # raw block: a MiB
    (0, 512 * MIB, "ext4", 512 * MIB),              # only a limit below the default
    (0, 4 * GIB, "ext4", DEFAULT_SIZE),
    (5 * MIB, 20 * MIB, "ext4", 16 * MIB),
])
def test_size_from_range(required: int, limit: int, fs: str, expected: int) -> None:
    assert size_from_range(rng(required, limit), fs) == expected


def test_size_absent_range_is_default() -> None:
    assert size_from_range(None, "ext4") == DEFAULT_SIZE


@pytest.mark.parametrize(("required", "limit", "fs", "error"), [
    (-1, 0, "ext4", InvalidArgument),
    (0, -5, "ext4", InvalidArgument),
    (2 * GIB, GIB, "ext4", InvalidArgument),        # contradictory
    (0, 10 * MIB, "ext4", OutOfRange),              # the fs minimum does not fit the limit
    (100 * MIB, 200 * MIB, "xfs", OutOfRange),
    (GIB + 1, GIB + 2, "ext4", OutOfRange),         # the MiB rounding does not fit
    (1 << 62, 0, "ext4", OutOfRange),               # beyond the largest volume
])
def test_size_errors(required: int, limit: int, fs: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        size_from_range(rng(required, limit), fs)


def test_params_defaults_and_sources() -> None:
    p = resolve_params({}, [cap_for("")])
    assert (p.fs_type, p.diskformat, p.reclaim, p.access_type) == ("ext4", "thin", "discard", "mount")
    assert resolve_params({"fsType": "xfs"}, [cap_for("")]).fs_type == "xfs"
    assert resolve_params({"csi.storage.k8s.io/fstype": "ext3"}, [cap_for("")]).fs_type == "ext3"
    assert resolve_params({}, [cap_for("xfs")]).fs_type == "xfs"
    assert resolve_params({}, [cap_for("block")]).fs_type == ""
    assert resolve_params({"fsType": "xfs"}, [cap_for("block")]).fs_type == ""  # class-wide fsType
    extra = resolve_params({"csi.storage.k8s.io/pvc/name": "data"}, [cap_for("")]).extra
    assert extra == {"csi.storage.k8s.io/pvc/name": "data"}


@pytest.mark.parametrize(("params", "caps", "needle"), [
    ({"bogus": "1", "other": "2"}, ["ext4"], "'bogus', 'other'"),
    ({"fsType": "ntfs"}, [""], "ntfs"),
    ({"fsType": "xfs"}, ["ext4"], "different values"),
    ({"diskformat": "thick"}, [""], "diskformat"),
    ({"reclaim": "sometimes"}, [""], "reclaim"),
    ({}, [], "volume_capabilities is required"),
])
def test_params_rejected_with_a_named_reason(params: dict[str, str], caps: list[str], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        resolve_params(params, [cap_for(c) for c in caps])


@pytest.mark.parametrize("mode", [3, 4, 5, 0])
def test_multi_node_modes_refused(mode: int) -> None:
    cap = cap_for("ext4")
    cap.access_mode.mode = mode  # type: ignore[assignment]
    with pytest.raises(InvalidArgument):
        resolve_params({}, [cap])


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".hidden", "a\0b", "x" * 129, "a b", "é", "-lead",
                                 "name\n", "x" * 128 + "\n"])
def test_ids_that_could_escape_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        check_id(bad, "name")


@pytest.mark.parametrize("bad", ["noatime\n", "ro\n"])
def test_mount_flags_with_a_trailing_newline_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        check_mount_flags([bad])


def test_ids_kubernetes_makes_are_accepted() -> None:
    for good in ("pvc-0b8f0b2e-1f0a-4f55-9d3b-5a2c1e0d9f11", "csi-7c1f", "snapshot-1", "x" * 128):
        assert check_id(good, "name") == good


def test_confine(tmp_path: Path) -> None:
    root = tmp_path / "kubelet"
    (root / "pods").mkdir(parents=True)
    assert confine(str(root / "pods" / "t"), root, "p") == str(root / "pods" / "t")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "pods" / "link").symlink_to(outside)
    for bad in ("relative/path", str(outside), str(root), str(root / ".." / "elsewhere"),
                str(root / "pods" / "link" / "t"), str(root / "pods" / "link")):
        with pytest.raises(InvalidArgument):
            confine(bad, root, "target_path")


@pytest.mark.parametrize(("text", "value"), [("256Mi", 256 * MIB), ("1Gi", GIB), ("1G", 10**9),
                                             ("1073741824", GIB), ("1.5Gi", 3 * GIB // 2)])
def test_quantity(text: str, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1Gi", "0", "1Qi"])
def test_bad_quantity(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_quantity(text)


def test_confine_says_which_way_a_path_is_wrong(tmp_path: Path) -> None:
    root = tmp_path / "kubelet"
    root.mkdir()
    with pytest.raises(InvalidArgument, match=r"is the kubelet directory .* itself; it must be a path below it"):
        confine(str(root), root, "target_path")
    with pytest.raises(InvalidArgument, match="is outside the kubelet directory"):
        confine(str(tmp_path), root, "target_path")

