"""Retry amplification: attempts per logical call when half the upstream's answers fail.

A steady 100 calls/s on a fake clock (``upstream_guard.testing.FakeClock``; nothing waits on
the wall clock, so the run takes a few seconds), each a GET through the guard's async
transport to an ``httpx.MockTransport`` whose handler fails (503 with Spotify's JSON error
body) at random with a fixed seed. The breaker is kept out of the way (huge ``fail_max``
and ``minimum_calls``) so that only the retry policy decides. Default retry settings
(``attempts`` 3, full-jitter backoff), with the retry budget on (defaults: ``budget_ratio``
0.2, ``budget_min_per_s`` 1) and off (``budget_ratio`` 1.0 and ``budget_min_per_s`` 1e9).

Steady arrival: the clock moves 0.01 s per call, and a retry's backoff does not move it (in a
real app the next calls arrive while one call waits out its backoff). The last rows, for
comparison, let each backoff move the clock too (calls strictly one after another, so the
arrival rate falls below 100/s and the per-second allowance weighs more).
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import httpx
from _common import table, write

from upstream_guard import Guard, GuardSettings, UpstreamUnavailable
from upstream_guard.testing import FakeClock

URL = "https://api.spotify.com/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp"
CALLS = 10_000
RATE = 100.0
SEED = 20240611
GOAL = 1.25
ERROR_BODY = b'{"error": {"status": 503, "message": "Service unavailable"}}'
BUDGETS = {
    "on (ratio 0.2, 1/s)": {"budget_ratio": 0.2, "budget_min_per_s": 1.0},
    "off (ratio 1.0, 1e9/s)": {"budget_ratio": 1.0, "budget_min_per_s": 1e9},
}


class SteadyClock(FakeClock):
    """A FakeClock whose sleeps are recorded but do not move time (arrivals keep their pace)."""

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)


async def run(budget: dict[str, float], failure_rate: float, *, steady: bool) -> dict[str, float]:
    rng = random.Random(SEED)
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        if rng.random() < failure_rate:
            return httpx.Response(
                503, content=ERROR_BODY, headers={"content-type": "application/json"}
            )
        return httpx.Response(200, content=b'{"id": "3n3Ppam7vgaVa1iaRUc9Lp"}')

    clock = SteadyClock() if steady else FakeClock()
    settings = GuardSettings(
        upstreams={
            "spotify_api": {
                "breaker": {"fail_max": 10**9, "minimum_calls": 10**9},
                "retry": budget,
            }
        }
    )
    guard = Guard(settings, clock=clock, rng=random.Random(SEED))
    failed = 0
    async with httpx.AsyncClient(
        transport=guard.async_transport(httpx.MockTransport(handler))
    ) as c:
        start = clock.monotonic()
        for i in range(CALLS):
            due = start + i / RATE
            if clock.monotonic() < due:
                clock.advance(due - clock.monotonic())
            response = None
            with contextlib.suppress(UpstreamUnavailable):
                response = await c.get(URL)
            if response is None or response.status_code >= 500:
                failed += 1
        elapsed = clock.monotonic() - start + 1 / RATE
    return {
        "attempts_per_call": attempts / CALLS,
        "retries_per_s": (attempts - CALLS) / elapsed,
        "failed": failed / CALLS,
        "rate": CALLS / elapsed,
    }


async def main() -> None:
    rows = []
    verdicts = []
    cases = [(0.5, True), (1.0, True), (0.5, False)]
    for failure_rate, steady in cases:
        for name, budget in BUDGETS.items():
            got = await run(budget, failure_rate, steady=steady)
            timing = "steady 100/s" if steady else "sequential, backoff moves the clock"
            rows.append(
                [
                    f"{failure_rate:.0%}",
                    timing,
                    name,
                    f"{got['rate']:.0f}",
                    f"{got['attempts_per_call']:.3f}",
                    f"{got['retries_per_s']:.1f}",
                    f"{got['failed']:.1%}",
                ]
            )
            if failure_rate == 0.5 and steady and name.startswith("on"):
                value = got["attempts_per_call"]
                missed = "" if value <= GOAL else f" (missed by {value - GOAL:.3f})"
                verdicts.append(
                    [
                        "attempts per call, 50% failing, budget on",
                        f"{value:.3f}",
                        f"<= {GOAL}",
                        ("yes" if value <= GOAL else "NO") + missed,
                    ]
                )
    body = (
        f"{CALLS:,} logical GETs per row through the guard's async transport to an "
        "httpx.MockTransport failing at random (seeded) with 503 + JSON error; default retry "
        "settings (3 attempts, full jitter); breaker held closed (huge fail_max and "
        "minimum_calls). Fake clock: the whole run takes no wall-clock waits. 'steady 100/s': "
        "the clock moves 0.01 s per call and backoffs do not move it (arrivals keep their pace "
        "while a call waits); 'sequential': each backoff moves the clock too, so fewer calls "
        "arrive per second. 'failed': calls whose caller got a 5xx or an UpstreamUnavailable.\n\n"
        + table(
            [
                "upstream failing",
                "timing",
                "retry budget",
                "calls/s (fake clock)",
                "attempts per call",
                "retries/s",
                "failed",
            ],
            rows,
        )
        + "\n\n"
        + table(["target", "measured", "goal", "met"], verdicts)
    )
    write("amplification", "Retry amplification with half the upstream's answers failing", body)


if __name__ == "__main__":
    asyncio.run(main())
