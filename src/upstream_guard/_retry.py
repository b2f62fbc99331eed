"""Retry decisions: backoff, the retry budget and the deadline. Plain code, no I/O."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from ._classify import Outcome
from ._settings import RetrySettings

# What is left of the deadline below which a retry is not worth starting.
_MIN_ATTEMPT_S = 0.001


class RetryBudget:
    """A token bucket: each call earns ``ratio`` retries, plus ``min_per_s`` every second.

    A sick upstream then sees at most about ``1 + ratio`` times its normal request rate.
    """

    __slots__ = ("_cap", "_counted", "_last", "_lock", "_min_per_s", "_ratio", "_tokens", "calls")

    def __init__(self, ratio: float, min_per_s: float, now: float) -> None:
        """Start full, so the first failures of a quiet app can still be retried."""
        self._ratio = ratio
        self._min_per_s = min_per_s
        self._cap = max(10.0, 10.0 * min_per_s)
        self._tokens = self._cap
        self._last = now
        self._lock = threading.Lock()
        self.calls = 0
        """Calls started: ``GuardedCall.begin`` counts each in place (no call, no lock: one
        lost to a thread race costs a fifth of a retry). Each earns ``ratio`` of a retry,
        paid into the bucket when it is next read."""
        self._counted = 0

    def _earn(self) -> None:
        # Under the lock. Capping once what calls earned since the last read comes to the
        # same as capping at each call: nothing was taken out in between.
        calls = self.calls
        if calls != self._counted:
            self._tokens = min(self._cap, self._tokens + (calls - self._counted) * self._ratio)
            self._counted = calls

    def try_withdraw(self, now: float) -> bool:
        """Spend one retry if the bucket has one."""
        with self._lock:
            self._earn()
            elapsed = now - self._last
            if elapsed > 0:
                self._tokens = min(self._cap, self._tokens + elapsed * self._min_per_s)
                self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    @property
    def tokens(self) -> float:
        """Retries currently in the bucket."""
        with self._lock:
            self._earn()
            return self._tokens


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether to try again, after how long, and why."""

    retry: bool
    delay_s: float
    reason: str
    honoured_retry_after: bool = False


def full_jitter(attempt: int, settings: RetrySettings, rng: random.Random) -> float:
    """Backoff before retry number ``attempt`` (1-based): uniform in [0, min(max, base*2^(n-1))]."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * (2 ** (attempt - 1)))
    return rng.uniform(0.0, ceiling)


def decide_retry(  # noqa: PLR0911 - one early exit per rule reads best
    *,
    settings: RetrySettings,
    method: str,
    attempt: int,
    outcome: Outcome,
    reason: str,
    status: int | None,
    retry_after_s: float | None,
    repeated_reason: bool,
    remaining_s: float,
    budget: RetryBudget,
    now: float,
    rng: random.Random,
) -> RetryDecision:
    """Decide after attempt number ``attempt`` (1-based) whether to send another."""
    if outcome is not Outcome.FAILURE and outcome is not Outcome.THROTTLED:
        return RetryDecision(retry=False, delay_s=0.0, reason="not_retryable")
    if method not in settings.methods:
        return RetryDecision(retry=False, delay_s=0.0, reason="method_not_retried")
    if status is not None and status not in settings.statuses:
        return RetryDecision(retry=False, delay_s=0.0, reason="status_not_retried")
    if attempt >= settings.attempts:
        return RetryDecision(retry=False, delay_s=0.0, reason="attempts_exhausted")
    if repeated_reason and reason == "no_healthy_upstream":
        # The edge has nothing to route to: one retry may land on a recovered host, two won't.
        return RetryDecision(retry=False, delay_s=0.0, reason="no_healthy_upstream")
    honoured = False
    if retry_after_s is not None:
        if retry_after_s > settings.max_retry_after_s:
            return RetryDecision(retry=False, delay_s=0.0, reason="retry_after_too_long")
        delay, honoured = retry_after_s, True
    else:
        delay = full_jitter(attempt, settings, rng)
    if delay + _MIN_ATTEMPT_S >= remaining_s:
        return RetryDecision(retry=False, delay_s=0.0, reason="deadline")
    if not budget.try_withdraw(now):
        return RetryDecision(retry=False, delay_s=0.0, reason="budget_exhausted")
    return RetryDecision(retry=True, delay_s=delay, reason=reason, honoured_retry_after=honoured)
