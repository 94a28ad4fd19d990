"""Keys in flight hold across processes (the handler workers) and die with their holder."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from csi_driver.errors import Aborted
from csi_driver.inflight import LOCK_FILE, InFlight


def test_a_held_key_is_refused_in_the_same_process(tmp_path: Path) -> None:
    f = InFlight(tmp_path)
    with f.hold("vol:a"), pytest.raises(Aborted, match="vol:a"), f.hold("vol:a"):
        pass
    with f.hold("vol:a"):
        assert f.busy() == 1
    assert f.busy() == 0


def test_keys_conflict_between_two_holders_of_the_lock_file(tmp_path: Path) -> None:
    first, second = InFlight(tmp_path), InFlight(tmp_path)
    with first.hold("vol:a", "snapshot:s"):
        with pytest.raises(Aborted, match="snapshot:s"), second.hold("snapshot:s", "vol:b"):
            pass
        with second.hold("vol:b"):  # other keys are free, and a refused hold took none
            pass
    with second.hold("vol:a", "snapshot:s"):
        pass


def test_a_key_held_by_another_process_is_refused_until_it_dies(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other process: hold the key, say so, wait to be killed
        try:
            os.close(r)
            with InFlight(tmp_path).hold("vol:x"):
                os.write(w, b"1")
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
        ours = InFlight(tmp_path)
        with pytest.raises(Aborted, match="vol:x"), ours.hold("vol:x"):
            pass
        with ours.hold("vol:y"):
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    with InFlight(tmp_path).hold("vol:x"):  # the kernel dropped the dead holder's lock
        pass


def test_the_lock_file_is_made_at_start_and_holds_no_data(tmp_path: Path) -> None:
    f = InFlight(tmp_path)
    assert (tmp_path / LOCK_FILE).stat().st_size == 0
    with f.hold("vol:a"):
        pass
    assert (tmp_path / LOCK_FILE).stat().st_size == 0


def test_without_a_lock_dir_keys_hold_in_this_process_only(tmp_path: Path) -> None:
    f = InFlight()
    with f.hold("vol:a"), pytest.raises(Aborted), f.hold("vol:a"):
        pass
    assert list(tmp_path.iterdir()) == []
