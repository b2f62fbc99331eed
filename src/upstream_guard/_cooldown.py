"""The 429 cooldown gate: one throttled call pauses every call to that upstream."""

from __future__ import annotations

import threading
from collections.abc import Callable


class CooldownGate:
    """Remembers until when an upstream asked the app to stop calling it."""

    __slots__ = ("_lock", "on_throttle", "until")

    def __init__(self) -> None:
        """Start open: no cooldown."""
        self.until = 0.0
        self._lock = threading.Lock()
        self.on_throttle: Callable[[], None] | None = None
        """Called after a throttle moved the end later (shared state publishes it)."""

    def remaining(self, now: float) -> float:
        """Seconds of cooldown left (0 when calls may go)."""
        left = self.until - now
        return left if left > 0 else 0.0

    def throttle(self, now: float, seconds: float) -> None:
        """A 429 asked for ``seconds`` of quiet; a later end never moves earlier."""
        with self._lock:
            later = now + seconds > self.until
            if later:
                self.until = now + seconds
        if later and self.on_throttle is not None:
            self.on_throttle()

    def adopt(self, now: float, seconds: float) -> None:
        """Take another worker's cooldown (quietly: it is not news to publish again)."""
        with self._lock:
            self.until = max(self.until, now + seconds)
