"""The guard's errors: one base class, ``UpstreamUnavailable``, that every guard error shares."""

from __future__ import annotations


class UpstreamUnavailable(Exception):  # noqa: N818 - the name is the public contract
    """An upstream could not be used for this call; ``retry_after_s`` says when to try again."""

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        reason: str,
        retry_after_s: float | None = None,
    ) -> None:
        """Describe the failure: which upstream, a short machine-readable reason, and a wait."""
        super().__init__(message)
        self.upstream = upstream
        self.reason = reason
        self.retry_after_s = retry_after_s


class CircuitOpenError(UpstreamUnavailable):
    """The upstream's breaker is open (or its half-open probes are all taken): not called."""


class RetriesExhaustedError(UpstreamUnavailable):
    """Every allowed attempt failed, or the deadline or retry budget ended the call."""


class RateLimitedError(UpstreamUnavailable):
    """The upstream throttled the app (429): calls pause until its Retry-After has passed."""


class BulkheadFullError(UpstreamUnavailable):
    """The upstream already has ``max_concurrency`` calls in flight."""
