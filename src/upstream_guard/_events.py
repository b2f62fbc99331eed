"""What users see of each guarded call: a frozen ``CallEvent``, handed to subscribers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._pipeline import CallRecord

log = logging.getLogger("upstream_guard")


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One finished guarded call, refused, stale and cancelled ones included.

    ``outcome`` is ``success``, ``failure``, ``throttled``, ``client_error``, ``refused``,
    ``stale`` or ``cancelled``; ``reason`` says why (``ok``, ``no_healthy_upstream``,
    ``timeout``, ``circuit_open``, ``cooldown``, ``bulkhead_full``, ``status_404``...).
    ``endpoint`` is the path template (``/v1/tracks/{id}``), never the concrete path, so
    it is safe as a metric label. No header, query string or body is ever part of it.
    """

    upstream: str
    endpoint: str
    method: str
    outcome: str
    reason: str
    status: int | None
    attempts: int
    duration_s: float
    breaker_state: str = "closed"
    retries: int = 0
    """Retries sent (attempts beyond the first that a decision allowed)."""
    coalesced: bool = False
    """The call shared another caller's upstream call instead of making its own."""
    hedged: bool = False
    """An extra attempt ran in parallel with a slow one."""
    pace_wait_s: float = 0.0
    """Time the call waited for its slot of the upstream's pace."""

    @classmethod
    def of(cls, record: CallRecord) -> CallEvent:
        """The event of a finished call's record."""
        return cls(
            upstream=record.upstream,
            endpoint=record.endpoint,
            method=record.method,
            outcome=str(record.outcome),
            reason=record.reason,
            status=record.status,
            attempts=record.attempts,
            duration_s=record.duration_s,
            breaker_state=record.breaker_state,
            retries=sum(1 for r in record.retries or () if r.retried),
            coalesced=record.coalesced,
            hedged=record.hedges > 0,
            pace_wait_s=record.pace_wait_s,
        )


Subscriber = Callable[[CallEvent], None]


class Subscribers:
    """The functions called after every guarded call; safe to change from any thread.

    ``listeners`` is a tuple replaced on every change, so a call in flight reads it once
    without a lock. A subscriber that raises is logged and skipped: it never breaks a call.
    """

    __slots__ = ("_lock", "listeners")

    def __init__(self) -> None:
        """None yet."""
        self._lock = threading.Lock()
        self.listeners: tuple[Subscriber, ...] = ()

    def add(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn`` after every call from now on; returns the function that stops it."""
        with self._lock:
            self.listeners = (*self.listeners, fn)

        def unsubscribe() -> None:
            with self._lock:
                listeners = list(self.listeners)
                if fn in listeners:
                    listeners.remove(fn)
                self.listeners = tuple(listeners)

        return unsubscribe

    def publish(self, record: CallRecord) -> None:
        """Tell every subscriber about a finished call."""
        event = CallEvent.of(record)
        for fn in self.listeners:
            try:
                fn(event)
            except Exception:
                log.exception("upstream_guard: a call subscriber raised; the call goes on")
