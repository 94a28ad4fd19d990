"""The driver's processes and the memory they hold together, for the benchmark and the soak.

The driver may be several processes (the server, the worker spawner and the workers it
forks, csi_driver.serving.workers). Forked processes share every page neither has written since,
so summing their RSS counts those pages once per process and overstates; summing the
server's RSS and the others' private pages misses pages that two children share with each
other but no longer with the server. What the machine holds is the set of physical pages
mapped by any of them, which /proc/PID/pagemap gives as page frame numbers (root only: for
other users the kernel reports the frame numbers as 0).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import platform
from collections.abc import Iterable
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63
_FRAME = (1 << 55) - 1
_ENTRY = 8


_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_KCMP_VM = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _same_memory(a: int, b: int) -> bool:
    """Whether two processes share one address space: a child made with vfork (as Python's
    subprocess does) that has not yet run exec. Unknown (False) where kcmp is not known."""
    return _KCMP is not None and _libc.syscall(_KCMP, a, b, _KCMP_VM, 0, 0) == 0


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return out


def driver_processes(pid: int) -> list[int]:
    """`pid` and its descendants running the same command line (its forked spawner and
    workers), not the commands they run (mkfs, mount), nor a child caught between vfork and
    exec of such a command (same command line, but its parent's memory)."""
    argv = _cmdline(pid)
    out, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        for child in _children(parent):
            with contextlib.suppress(OSError):
                if _cmdline(child) == argv and not _same_memory(parent, child):
                    out.append(child)
                    todo.append(child)
    return out


def _frames(pid: int, into: set[int]) -> bool:
    """Add the frames of pid's resident pages; False when the kernel hides them."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for line in maps:
            fields = line.split()
            if fields[1].startswith("---") or fields[-1] == "[vsyscall]":
                continue  # no access: nothing resident; vsyscall: not readable here
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(lo // PAGE * _ENTRY)
            entries = array.array("Q")
            entries.frombytes(pagemap.read((hi - lo) // PAGE * _ENTRY))
            for e in entries:
                if e & _PRESENT:
                    frame = e & _FRAME
                    if frame == 0:
                        return False
                    into.add(frame)
    return True


def resident_bytes(pids: Iterable[int]) -> int | None:
    """Bytes of physical memory mapped by any of `pids`, each page counted once; None when
    the kernel does not show frame numbers (not root) or a process is gone."""
    frames: set[int] = set()
    try:
        for pid in pids:
            if not _frames(pid, frames):
                return None
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return len(frames) * PAGE
