"""One RPC handler runs the driver's Python at a time; calls that block pass the baton on.

Python runs one thread at a time anyway (the GIL), but it gives the GIL up around every
system call, however short. With eight handler threads waiting for it, every sysfs read
and stat became a hand-over between threads: at concurrency 8 the driver spent about twice
as much CPU in the kernel's futex and scheduler paths as at concurrency 1, for the same
work. A handler that waits for the baton sleeps until the holder reaches a call that
really waits (a command, fsync, mount, a loop ioctl, a sleep), so the GIL is not contended
in between and the waiting overlaps as before.

Rules that keep this free of deadlocks: only unary handlers hold the baton (the server's
interceptor takes it), and a holder never waits for anything, a lock included, except
inside ``blocking()``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_state = threading.local()


def _holding() -> bool:
    return bool(getattr(_state, "held", False))


@contextmanager
def held() -> Iterator[None]:
    """Run the body as the baton's holder (reentrant: a holder just goes on)."""
    if _holding():
        yield
        return
    _lock.acquire()
    _state.held = True
    try:
        yield
    finally:
        _state.held = False
        _lock.release()


@contextmanager
def blocking() -> Iterator[None]:
    """Around a call that waits: let another handler run meanwhile."""
    if not _holding():
        yield
        return
    _state.held = False
    _lock.release()
    try:
        yield
    finally:
        _lock.acquire()
        _state.held = True


@contextmanager
def locked(lock: threading.Lock) -> Iterator[None]:
    """Hold `lock`; wait for it, if need be, without holding the baton."""
    if not lock.acquire(blocking=False):
        with blocking():
            lock.acquire()
    try:
        yield
    finally:
        lock.release()
