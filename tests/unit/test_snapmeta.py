from __future__ import annotations

from pathlib import Path

from csi_driver.csi.snapmeta import COMPARE_BLOCK, changed_ranges, data_ranges

MIB = 1 << 20


def sparse(path: Path, size: int, writes: dict[int, bytes]) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return str(path)


def test_delta_blocks_are_aligned_and_never_overlap(tmp_path: Path) -> None:
    base = sparse(tmp_path / "a", MIB, {0: b"x" * 4096, 16384: b"y" * 4096})
    target = sparse(tmp_path / "b", MIB, {0: b"X" * 4096, 16384: b"Y" * 4096})
    assert list(changed_ranges(base, target)) == [(0, COMPARE_BLOCK)]


def test_delta_merges_adjacent_blocks_and_honours_start(tmp_path: Path) -> None:
    base = sparse(tmp_path / "a", 4 * MIB, {})
    target = sparse(tmp_path / "b", 4 * MIB, {MIB: b"z" * (3 * COMPARE_BLOCK), 3 * MIB: b"w"})
    assert list(changed_ranges(base, target)) == [(MIB, 3 * COMPARE_BLOCK), (3 * MIB, COMPARE_BLOCK)]
    assert list(changed_ranges(base, target, start=2 * MIB)) == [(3 * MIB, COMPARE_BLOCK)]


def test_equal_data_is_no_change_and_holes_are_not_data(tmp_path: Path) -> None:
    same = {8192: b"q" * 100}
    base = sparse(tmp_path / "a", MIB, same)
    target = sparse(tmp_path / "b", MIB, same)
    assert list(changed_ranges(base, target)) == []
    assert all(offset < MIB for offset, _ in data_ranges(target))
    assert list(data_ranges(sparse(tmp_path / "c", MIB, {}))) == []
