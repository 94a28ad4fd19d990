"""Start-up recovery: leftovers of interrupted operations (temporary directories, trash,
half-written metadata temp files) are finished or removed, and each action is logged."""

from __future__ import annotations

import os

import pytest

from tests.conftest import Driver
from tests.helpers import MIB, create, delete, down, read_sum, up, write_data
from tests.reliability.support import leftovers, listed_snapshots, listed_volumes, start_ready

pytestmark = pytest.mark.root


def test_leftovers_are_cleared_and_logged(driver: Driver) -> None:
    c = driver.client
    vol = create(c, "keeper", 32 * MIB)
    p = up(c, vol.volume_id, str(driver.kubelet_dir), "ext4")
    digest = write_data(p)
    meta_before = (driver.data_dir / "volumes" / "keeper" / "meta.json").read_text()
    driver.stop()

    vols = driver.data_dir / "volumes"
    snaps = driver.data_dir / "snapshots"
    (vols / ".tmp-ghost.1234abcd").mkdir()
    (vols / ".tmp-ghost.1234abcd" / "disk.img").write_bytes(b"\0" * 4096)
    (vols / ".trash-gone.5678abcd").mkdir()
    (vols / ".trash-gone.5678abcd" / "disk.img").write_bytes(b"\0" * 4096)
    (snaps / ".tmp-snap.0000aaaa").mkdir()
    (vols / "keeper" / ".tmp-meta.json.deadbeef").write_text('{"name": "kee')  # torn write
    outside = driver.root / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    os.symlink(outside, vols / ".trash-evil.9999ffff")  # planted: must not be followed

    start_ready(driver)
    log = driver.log()
    for expected in ("recovery: removed unfinished volume .tmp-ghost.1234abcd",
                     "recovery: finished deleting volume .trash-gone.5678abcd",
                     "recovery: removed unfinished snapshot .tmp-snap.0000aaaa",
                     "recovery: removed half-written file",
                     "recovery: finished deleting volume .trash-evil.9999ffff"):
        assert expected in log, expected
    assert leftovers(driver) == []
    assert (outside / "precious").read_text() == "keep me", "recovery followed a symlink out"
    assert (vols / "keeper" / "meta.json").read_text() == meta_before
    c = driver.client
    assert listed_volumes(c) == ["keeper"]
    assert listed_snapshots(c) == []
    assert read_sum(p) == digest, "the staged volume was untouched by recovery"
    down(c, p)
    delete(c, "keeper")


def test_clean_start_logs_no_recovery(driver: Driver) -> None:
    create(driver.client, "quiet", 32 * MIB)
    driver.restart()
    assert "recovery:" not in driver.log()
    delete(driver.client, "quiet")
