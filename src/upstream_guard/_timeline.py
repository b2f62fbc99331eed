"""The dashboard's timeline: per upstream, calls per second by outcome and the breaker's state.

Kept in memory for the last ``window_s`` seconds (three minutes by default), from the
guard's call events, its breakers' state changes and the fallback answers the middleware
gives. Seconds are on the guard's wall clock, so the page can label them "12:03:10".
A new series (pace, say) is a new name in ``SERIES`` and a call to ``count``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ._events import CallEvent

SERIES = ("live", "stale", "fallback", "refused", "failed")
"""What the timeline counts per second, in the order the page stacks them."""
OUTCOME_SERIES = {
    "success": "live",
    "client_error": "live",  # the upstream answered as it should: the caller's mistake
    "stale": "stale",
    "refused": "refused",
    "failure": "failed",
    "throttled": "failed",
}
"""Call outcomes by series; ``cancelled`` calls (the caller went away) are not drawn."""
_INDEX = {name: i for i, name in enumerate(SERIES)}
_KEPT_CHANGES = 256


class Timeline:
    """Per-second counts and state changes of each upstream over the last ``window_s``."""

    def __init__(
        self,
        upstreams: list[str],
        *,
        wall: Callable[[], float],
        state_of: Callable[[str], str],
        window_s: int = 180,
    ) -> None:
        """Start every upstream in its current state (``state_of(name)``)."""
        self.window_s = window_s
        self._wall = wall
        self._state_of = state_of
        self._lock = threading.Lock()  # events come from event loops and client threads
        self._seconds: dict[str, deque[list[int]]] = {
            name: deque(maxlen=window_s) for name in upstreams
        }
        now = wall()
        self._changes: dict[str, deque[tuple[float, str]]] = {
            name: deque([(now, state_of(name))], maxlen=_KEPT_CHANGES) for name in upstreams
        }

    def count(self, upstream: str, series: str, n: int = 1) -> None:
        """Add ``n`` to ``series`` of ``upstream`` in the current second."""
        seconds = self._seconds.get(upstream)
        if seconds is None:
            return
        second = int(self._wall())
        with self._lock:
            if not seconds or seconds[-1][0] != second:
                seconds.append([second, *([0] * len(SERIES))])
            seconds[-1][1 + _INDEX[series]] += n

    def on_event(self, event: CallEvent) -> None:
        """Count a finished call (a guard subscriber)."""
        series = OUTCOME_SERIES.get(event.outcome)
        if series is not None:
            self.count(event.upstream, series)

    def on_state_change(self, breaker: str, old: str, new: str) -> None:  # noqa: ARG002
        """A breaker moved (a guard state hook): note its upstream's state now."""
        self.note_state(breaker.split(" ", 1)[0])

    def note_state(self, upstream: str) -> None:
        """Record the upstream's state if it changed since the last record."""
        changes = self._changes.get(upstream)
        if changes is None:
            return
        state = self._state_of(upstream)
        with self._lock:
            if changes[-1][1] != state:
                changes.append((self._wall(), state))

    def data(self, upstream: str) -> dict[str, Any]:
        """The window as the page draws it: counted seconds, and state bands from..to."""
        self.note_state(upstream)  # an open breaker turns half-open without an event
        now = self._wall()
        start = now - self.window_s
        with self._lock:
            seconds = [s for s in self._seconds.get(upstream, ()) if s[0] >= start - 1]
            changes = list(self._changes.get(upstream, ()))
        bands = []
        for i, (since, state) in enumerate(changes):
            until = changes[i + 1][0] if i + 1 < len(changes) else now
            if until >= start:
                bands.append({"from": max(since, start), "to": until, "state": state})
        return {
            "now": now,
            "window_s": self.window_s,
            "series": list(SERIES),
            "seconds": seconds,
            "bands": bands,
        }
