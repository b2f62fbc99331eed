"""upstream_guard: keep ASGI apps healthy when the Spotify Web API (or any upstream) is not."""

from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    RateLimitedError,
    RetriesExhaustedError,
    UpstreamUnavailable,
)
from ._events import CallEvent
from ._guard import Guard
from ._middleware import UpstreamGuardMiddleware, install
from ._settings import (
    BreakerSettings,
    CoalesceSettings,
    FallbackSettings,
    GuardSettings,
    HedgeSettings,
    PaceSettings,
    RetrySettings,
    SettingsError,
    TimeoutSettings,
    UpstreamSettings,
)

__version__ = "0.1.0"

__all__ = [
    "BreakerSettings",
    "BulkheadFullError",
    "CallEvent",
    "CircuitOpenError",
    "CoalesceSettings",
    "FallbackSettings",
    "Guard",
    "GuardSettings",
    "HedgeSettings",
    "PaceSettings",
    "RateLimitedError",
    "RetriesExhaustedError",
    "RetrySettings",
    "SettingsError",
    "TimeoutSettings",
    "UpstreamGuardMiddleware",
    "UpstreamSettings",
    "UpstreamUnavailable",
    "install",
]
