"""A set of keys with an operation in flight: a second request for the same key is
refused with ABORTED (the CO retries it), never queued behind the first."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Aborted


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold every key for the duration of the block, or raise Aborted at once."""
        wanted = {k for k in keys if k}
        with self._lock:
            busy = wanted & self._keys
            if busy:
                raise Aborted(f"an operation on {', '.join(sorted(busy))} is already in progress")
            self._keys |= wanted
        try:
            yield
        finally:
            with self._lock:
                self._keys -= wanted

    def busy(self) -> int:
        with self._lock:
            return len(self._keys)
