"""Time, behind a seam: the library never reads or sleeps on the wall clock directly."""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    """Where the guard reads time and how it waits; tests inject a fake one."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    def wall(self) -> float:
        """Seconds since the epoch (to read HTTP-date Retry-After values)."""

    async def sleep(self, seconds: float) -> None:
        """Wait in async code (any anyio backend)."""

    def sleep_sync(self, seconds: float) -> None:
        """Wait in a thread."""


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time``, ``anyio.sleep``, ``time.sleep``."""

    __slots__ = ()

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)
    sleep_sync = staticmethod(time.sleep)

    async def sleep(self, seconds: float) -> None:
        """Wait on the running event loop."""
        await anyio.sleep(seconds)
