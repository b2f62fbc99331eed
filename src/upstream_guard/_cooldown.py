"""The 429 cooldown gate: one throttled call pauses every call to that upstream."""

from __future__ import annotations

import threading


class CooldownGate:
    """Remembers until when an upstream asked the app to stop calling it."""

    __slots__ = ("_lock", "until")

    def __init__(self) -> None:
        """Start open: no cooldown."""
        self.until = 0.0
        self._lock = threading.Lock()

    def remaining(self, now: float) -> float:
        """Seconds of cooldown left (0 when calls may go)."""
        left = self.until - now
        return left if left > 0 else 0.0

    def throttle(self, now: float, seconds: float) -> None:
        """A 429 asked for ``seconds`` of quiet; a later end never moves earlier."""
        with self._lock:
            self.until = max(self.until, now + seconds)
