"""The bulkhead: at most ``max_concurrency`` calls in flight to one upstream."""

from __future__ import annotations

import threading


class Bulkhead:
    """A counter shared by async tasks and threads; full means refuse, never queue."""

    __slots__ = ("_limit", "_lock", "in_flight")

    def __init__(self, limit: int) -> None:
        """Allow ``limit`` calls at once."""
        self._limit = limit
        self._lock = threading.Lock()
        self.in_flight = 0

    def try_acquire(self) -> bool:
        """Take a place, or return False when all are taken."""
        with self._lock:
            if self.in_flight >= self._limit:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        """Give a place back."""
        with self._lock:
            self.in_flight -= 1
