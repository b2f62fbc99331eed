"""Retry decisions and the retry budget, without I/O."""

from __future__ import annotations

import random

import httpx
import pytest

from conftest import make_settings
from upstream_guard import Guard
from upstream_guard._classify import Outcome
from upstream_guard._retry import RetryBudget, decide_retry, full_jitter
from upstream_guard._settings import RetrySettings

pytestmark = pytest.mark.anyio


def decide(**overrides):
    args = {
        "settings": RetrySettings(),
        "method": "GET",
        "attempt": 1,
        "outcome": Outcome.FAILURE,
        "reason": "status_503",
        "status": 503,
        "retry_after_s": None,
        "repeated_reason": False,
        "remaining_s": 10.0,
        "budget": RetryBudget(0.2, 1.0, 0.0),
        "now": 0.0,
        "rng": random.Random(1),
    }
    args.update(overrides)
    return decide_retry(**args)


@pytest.mark.parametrize(
    ("overrides", "retry", "reason"),
    [
        ({}, True, "status_503"),
        ({"method": "POST"}, False, "method_not_retried"),
        ({"outcome": Outcome.CLIENT_ERROR, "status": 404}, False, "not_retryable"),
        ({"attempt": 3}, False, "attempts_exhausted"),
        ({"status": 501}, False, "status_not_retried"),
        ({"reason": "no_healthy_upstream", "repeated_reason": True}, False, "no_healthy_upstream"),
        (
            {"outcome": Outcome.THROTTLED, "status": 429, "retry_after_s": 30.0},
            False,
            "retry_after_too_long",
        ),
        ({"outcome": Outcome.THROTTLED, "status": 429, "retry_after_s": 0.5}, True, "status_503"),
        ({"remaining_s": 0.0}, False, "deadline"),
        ({"budget": RetryBudget(0.0, 0.0, 0.0)}, True, "status_503"),
    ],
)
def test_rules(overrides, retry, reason):
    """Each rule of the retry decision, one at a time."""
    decision = decide(**overrides)
    assert decision.retry is retry
    assert decision.reason == reason


def test_retry_after_is_the_delay_when_honoured():
    """A Retry-After within the cap is the wait itself."""
    decision = decide(outcome=Outcome.THROTTLED, status=429, retry_after_s=0.75)
    assert decision.delay_s == 0.75
    assert decision.honoured_retry_after


def test_full_jitter_stays_under_the_exponential_ceiling():
    """Backoff n is uniform in [0, min(max, base * 2^(n-1))]."""
    s = RetrySettings(backoff_base_s=0.1, backoff_max_s=1.0)
    rng = random.Random(7)
    for n in range(1, 10):
        for _ in range(100):
            assert 0 <= full_jitter(n, s, rng) <= min(1.0, 0.1 * 2 ** (n - 1))


def test_empty_budget_refuses_retries_until_time_refills_it():
    """Once spent, the bucket refills at budget_min_per_s."""
    budget = RetryBudget(0.0, 1.0, 0.0)
    spent = sum(budget.try_withdraw(0.0) for _ in range(100))
    assert spent == 10
    assert not budget.try_withdraw(0.5)
    assert budget.try_withdraw(1.6)


async def test_budget_bounds_retry_amplification(clock):
    """With half of all attempts failing, the budget keeps attempts per call near 1.2."""
    rng = random.Random(3)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if rng.random() < 0.5 else 200)

    settings = make_settings(
        "http://api.test",
        breaker={"fail_max": 10_000, "minimum_calls": 10_000},
        retry={"attempts": 3, "budget_ratio": 0.2, "budget_min_per_s": 1.0},
    )
    guard = Guard(settings, clock=clock)
    attempts = 0

    def count(record) -> None:
        nonlocal attempts
        attempts += record.attempts

    guard.subscribe(count)
    calls = 2_000
    async with httpx.AsyncClient(
        transport=guard.async_transport(httpx.MockTransport(handler))
    ) as c:
        for _ in range(calls):
            clock.advance(0.01)  # 100 calls per second
            await c.get("http://api.test/v1/me")
    assert attempts / calls <= 1.25
    assert attempts > calls  # some retries did happen
