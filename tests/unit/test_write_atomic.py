"""write_atomic: all or nothing, and nothing left behind when the disk is full."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from csi_driver.volumes import store


def test_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    target.write_text("old")
    store.write_atomic(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "meta.json"
    target.write_text("old")

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store.os, "write", full)
    with pytest.raises(OSError) as exc:
        store.write_atomic(target, "new")
    assert exc.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
