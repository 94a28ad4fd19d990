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
from types import TracebackType

_lock = threading.Lock()
_state = threading.local()


def _holding() -> bool:
    return bool(getattr(_state, "held", False))


class _Held:
    """Run the body as the baton's holder (reentrant: a holder just goes on). A class,
    not a generator context manager: it is entered several times per call."""

    def __enter__(self) -> None:
        self.entered = not _holding()
        if self.entered:
            _lock.acquire()
            _state.held = True

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.entered:
            _state.held = False
            _lock.release()


class _Blocking:
    """Around a call that waits: let another handler run meanwhile."""

    def __enter__(self) -> None:
        self.released = _holding()
        if self.released:
            _state.held = False
            _lock.release()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.released:
            _lock.acquire()
            _state.held = True


def held() -> _Held:
    return _Held()


def blocking() -> _Blocking:
    return _Blocking()


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
