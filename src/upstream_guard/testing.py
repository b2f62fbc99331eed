"""Test helpers for users of upstream_guard and for its own tests: a clock that never waits."""

from __future__ import annotations

import threading

import anyio.lowlevel

__all__ = ["FakeClock"]


class FakeClock:
    """A clock that moves only when told to, or when the guard sleeps on it.

    Pass it as ``Guard(settings, clock=FakeClock())``: backoffs and Retry-After waits then
    take no wall time, and ``advance()`` moves past a breaker's reset timeout at once.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_800_000_000.0) -> None:
        """Start at ``start`` seconds (monotonic) and ``wall_start`` (epoch seconds)."""
        self._now = start
        self._wall_offset = wall_start - start
        self._lock = threading.Lock()
        self.slept: list[float] = []

    def monotonic(self) -> float:
        """The fake monotonic time."""
        return self._now

    def wall(self) -> float:
        """The fake epoch time, moving with the monotonic one."""
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        with self._lock:
            self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the wait, move time forward, and yield to the event loop once."""
        self.slept.append(seconds)
        self.advance(seconds)
        await anyio.lowlevel.checkpoint()

    def sleep_sync(self, seconds: float) -> None:
        """Record the wait and move time forward."""
        self.slept.append(seconds)
        self.advance(seconds)
