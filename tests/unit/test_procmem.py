"""procmem: the driver's processes found by command line, and their memory with each
physical page counted once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from benchmarks import procmem

pytestmark = pytest.mark.root  # frame numbers in /proc/PID/pagemap are shown to root only


def test_a_forked_child_is_one_of_ours_and_a_command_it_runs_is_not() -> None:
    cmd = subprocess.Popen(["sleep", "30"])
    child = os.fork()
    if child == 0:
        signal.pause()
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while child not in procmem.driver_processes(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.01)
        found = procmem.driver_processes(os.getpid())
        assert found[0] == os.getpid()
        assert child in found
        assert cmd.pid not in found
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        cmd.kill()
        cmd.wait()


def test_a_page_shared_after_fork_is_counted_once() -> None:
    ballast = bytearray(os.urandom(32 << 20))  # 32 MiB written before the fork: shared after
    child = os.fork()
    if child == 0:
        signal.pause()
        os._exit(0)
    try:
        me = psutil.Process().memory_info().rss
        time.sleep(0.1)
        it = psutil.Process(child).memory_info().rss
        both = procmem.resident_bytes([os.getpid(), child])
        alone = procmem.resident_bytes([os.getpid()])
        assert both is not None and alone is not None
        assert abs(alone - me) < 0.05 * me, "one process: its RSS"
        assert it > 32 << 20, "the child maps the ballast too"
        assert both < me + it - (30 << 20), "the ballast is counted once"
        # A union is never smaller than its part, but the two reads are moments apart and this
        # process's other threads (gRPC's, left by earlier tests) may free pages in between.
        assert both >= alone - (8 << 20)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert len(ballast) == 32 << 20


def test_a_gone_process_gives_none() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert procmem.resident_bytes([p.pid]) is None


def test_a_child_sharing_its_parents_memory_is_not_counted() -> None:
    """A vfork child before exec has its parent's command line and address space."""
    assert procmem._same_memory(os.getpid(), os.getpid())
    child = os.fork()
    if child == 0:
        signal.pause()
        os._exit(0)
    try:
        assert not procmem._same_memory(os.getpid(), child)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
