"""Per-task context: which guard applies, the inbound request's record, and re-entrancy."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._guard import Guard

# Outcomes of a logical call that mean "this upstream let the request down".
FAILED_OUTCOMES = frozenset({"failure", "refused", "throttled"})


@dataclass(slots=True)
class RequestContext:
    """What one inbound request saw of its upstreams; set by the middleware."""

    deadline: float | None = None
    """Absolute deadline on the guard's clock, or None."""
    failed: dict[str, str] = field(default_factory=dict)
    """Upstream name -> reason, for each upstream that failed this request."""
    used: dict[str, float] = field(default_factory=dict)
    """Upstream name -> seconds spent calling it."""
    stale: bool = False
    """Whether a stale copy answered one of the calls."""


current_guard: ContextVar[Guard | None] = ContextVar("upstream_guard_current", default=None)
request_context: ContextVar[RequestContext | None] = ContextVar(
    "upstream_guard_request", default=None
)
# Set while a guard drives a call, so that instrumented transports underneath pass through.
guarding: ContextVar[bool] = ContextVar("upstream_guard_guarding", default=False)
