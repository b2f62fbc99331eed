"""Per-task context: the inbound request being served (and its guard), and re-entrancy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._classify import UNAVAILABLE_OUTCOMES
from ._telemetry import annotate_inbound

if TYPE_CHECKING:
    from ._guard import Guard


Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


class RequestContext:
    """What one inbound request saw of its upstreams; made by the middleware per request.

    Kept small: it is built on every request, most of which never call an upstream. The
    defaults live on the class, so a request that calls none sets two attributes.
    """

    deadline: float | None = None
    """Absolute deadline on the guard's clock, or None."""
    failed: dict[str, str] | None = None
    """Upstream name -> reason, for each upstream that failed this request."""
    used: dict[str, float] | None = None
    """Upstream name -> seconds spent calling it."""
    stale = False
    """Whether a stale copy answered one of the calls."""
    started = False
    """Whether the response has started (then no fallback can be sent)."""
    answered_by = "app"
    """Who answered: ``app``, or the guard's ``fallback``, ``unavailable`` (503 problem)."""

    guard: Guard
    """Set by the middleware, with ``server_send``, right after creating it (no ``__init__``:
    creating the object stays in C, a frame less on every request)."""
    server_send: Send
    """The server's ``send``, which ``send`` wraps."""

    def note(self, upstream: str, outcome: str, reason: str, seconds: float) -> None:
        """Record one logical call made while serving this request."""
        used = self.used
        if used is None:
            used = self.used = {}
        used[upstream] = used.get(upstream, 0.0) + seconds
        if outcome in UNAVAILABLE_OUTCOMES:
            if self.failed is None:
                self.failed = {}
            self.failed[upstream] = reason
        elif outcome == "stale":
            self.stale = True

    async def send(self, message: Message) -> None:
        """The app's ``send``: remembers the start, adds Server-Timing to it."""
        if message["type"] == "http.response.start":
            self.started = True
            if self.used:
                # Now, not later: the inbound span may end with the response.
                annotate_inbound(list(self.used), self.answered_by, stale=self.stale)
                if self.guard.settings.server_timing:
                    parts = [f"{name};dur={s * 1000:.1f}" for name, s in self.used.items()]
                    header = (b"server-timing", ", ".join(parts).encode("latin-1"))
                    message["headers"] = [*message.get("headers", ()), header]
        await self.server_send(message)


request_context: ContextVar[RequestContext | None] = ContextVar(
    "upstream_guard_request", default=None
)


class _State:
    __slots__ = ("patched",)

    def __init__(self) -> None:
        self.patched = False


state = _State()
"""``state.patched``: whether client libraries are instrumented (then drivers mark ``guarding``)."""

# Set while a guard drives a call, so that instrumented transports underneath pass through.
guarding: ContextVar[bool] = ContextVar("upstream_guard_guarding", default=False)
