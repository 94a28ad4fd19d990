"""Keys in flight hold across processes (the handler workers) and die with their holder."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from csi_driver.errors import Aborted
from csi_driver.volumes.inflight import LOCK_FILE, InFlight


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


def test_a_key_left_in_a_forked_child_for_a_moment_is_taken_once_it_is_gone(tmp_path: Path) -> None:
    """A child forked while a call held its key keeps a copy of the descriptor until it
    closes it before exec; a second process waits that moment out instead of answering
    ABORTED for a call that has already finished."""
    holder = InFlight(tmp_path)
    with holder.hold("vol:x"):
        pid = os.fork()
        if pid == 0:  # a child between fork and exec: it has the descriptor, for a moment
            time.sleep(0.1)
            os._exit(0)
    try:
        with InFlight(tmp_path).hold("vol:x"):  # another worker: the call that comes next
            pass
    finally:
        os.waitpid(pid, 0)


def test_a_key_held_longer_than_the_grace_is_refused(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
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
        start = time.monotonic()
        with pytest.raises(Aborted, match="vol:x"), InFlight(tmp_path).hold("vol:x"):
            pass
        assert time.monotonic() - start >= 0.2  # it waited the grace out, then refused
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
