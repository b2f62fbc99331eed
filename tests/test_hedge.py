"""Hedging: a slow GET gets another attempt in parallel, paid from the retry budget.

Real clients against a real loopback server that holds the first request of each path
(``first_hangs``). The guard's clock is fake, so ``hedge.after_s`` passes at once: the hedge
goes out as soon as the first attempt is in flight.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import httpx
import pytest

from conftest import make_settings
from herd_server import HerdServer
from otel_sdk import install_sdk, metric_total
from upstream_guard import CallEvent, Guard
from upstream_guard.testing import FakeClock, serve

pytestmark = pytest.mark.anyio

HEDGE = {"after_s": 0.05}


@pytest.fixture(scope="module")
def _herd() -> Any:
    app = HerdServer()
    with serve(app) as url:
        yield app, url


@pytest.fixture
def herd(_herd: tuple[HerdServer, str]) -> Any:
    """The counting server: the first request of each path hangs until released."""
    app, _ = _herd
    app.reset(first_hangs=True)
    app.hold()  # only the first request of a path waits: ``first_hangs``
    yield app
    app.release()


@pytest.fixture
def herd_url(_herd: tuple[HerdServer, str], herd: HerdServer) -> str:
    """The counting server's base URL."""
    return _herd[1]


def hedging_guard(url: str, clock: Any, **groups: Any) -> tuple[Guard, list[CallEvent]]:
    """A guard hedging after 50 ms (on the fake clock), and the events of its calls."""
    guard = Guard(make_settings(url, hedge=HEDGE, **groups), clock=clock)
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    return guard, events


async def test_a_get_whose_first_attempt_hangs_is_answered_by_the_hedge(herd, herd_url, clock):
    """The first attempt hangs: the hedge answers; the first is cancelled, not a failure."""
    exporter, reader = install_sdk()
    sent, won = (metric_total(reader, f"upstream_guard.hedges{w}") for w in ("", ".won"))
    guard, events = hedging_guard(herd_url, clock)
    client = httpx.AsyncClient(transport=guard.async_transport())
    response = await client.get(herd_url + "/v1/tracks/1")
    assert response.status_code == 200
    assert response.json()["path"] == "/v1/tracks/1"
    assert herd.hits["/v1/tracks/1"] == 2
    (event,) = events
    assert (event.outcome, event.hedged, event.attempts) == ("success", True, 2)
    assert guard.state("spotify_api") == "closed"
    assert guard.snapshot()["upstreams"]["spotify_api"]["failures"] == 0
    span = next(
        s for s in exporter.get_finished_spans() if s.name == "spotify_api GET /v1/tracks/{id}"
    )
    attributes = dict(span.attributes or {})
    assert attributes["upstream_guard.hedged"] is True
    assert attributes["upstream_guard.hedge.winner"] == 2
    ended = sorted(
        (e.attributes["upstream_guard.attempt"], e.attributes["upstream_guard.attempt.outcome"])
        for e in span.events
        if e.name == "upstream_guard.hedge.attempt" and e.attributes is not None
    )
    assert ended == [(1, "cancelled"), (2, "won")]
    assert metric_total(reader, "upstream_guard.hedges") - sent == 1
    assert metric_total(reader, "upstream_guard.hedges.won") - won == 1


async def test_a_post_is_never_hedged(herd, herd_url, clock):
    """A POST that hangs gets no hedge: one request reaches the server."""
    guard, events = hedging_guard(herd_url, clock)
    client = httpx.AsyncClient(transport=guard.async_transport())
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(client.post, herd_url + "/v1/me/player/next", json={}))
        with anyio.fail_after(5):
            while herd.total < 1:  # noqa: ASYNC110 - the server's thread changes it
                await anyio.sleep(0.002)  # sleep-ok: polling a real server
        # A GET sent now is hedged at once: when its hedge is in, a POST's would be too.
        get = await client.get(herd_url + "/v1/tracks/2")
        assert get.status_code == 200
        herd.release()
    assert herd.hits["/v1/tracks/2"] == 2
    assert herd.hits["/v1/me/player/next"] == 1
    post = next(e for e in events if e.method == "POST")
    assert (post.hedged, post.attempts, post.outcome) == (False, 1, "success")


async def test_hedging_stops_once_the_budget_is_spent(herd, herd_url, clock):
    """With the retry budget spent, a hanging GET gets no hedge and times out alone."""
    guard, events = hedging_guard(
        herd_url,
        clock,
        retry={"budget_ratio": 0, "budget_min_per_s": 0},
        timeout={"attempt_s": 0.3, "total_s": 1},
    )
    client = httpx.AsyncClient(transport=guard.async_transport())
    for i in range(10):  # the budget holds 10 retries; each hedge takes one
        assert (await client.get(f"{herd_url}/v1/tracks/{i}")).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        await client.get(herd_url + "/v1/tracks/last")
    assert [e.hedged for e in events] == [True] * 10 + [False]
    assert herd.hits["/v1/tracks/last"] == 1


async def test_no_hedge_with_a_half_open_breaker(herd, herd_url, clock):
    """A half-open probe is one call: the slow probe is not hedged."""
    guard, events = hedging_guard(
        herd_url, clock, retry={"attempts": 1}, timeout={"attempt_s": 0.3, "total_s": 1}
    )
    client = httpx.AsyncClient(transport=guard.async_transport())
    guard.upstreams["spotify_api"].breakers["spotify_api"].force_open()
    clock.advance(guard.settings.upstreams["spotify_api"].breaker.reset_timeout_s)
    with pytest.raises(httpx.ReadTimeout):  # the probe hangs, alone
        await client.get(herd_url + "/v1/tracks/probe")
    assert herd.hits["/v1/tracks/probe"] == 1
    assert [(e.hedged, e.breaker_state) for e in events] == [(False, "half-open")]


async def test_no_hedge_while_a_pace_is_in_force(herd, herd_url, clock):
    """A paced upstream's slots are for first attempts: a slow GET is not hedged."""
    guard, events = hedging_guard(
        herd_url,
        clock,
        retry={"attempts": 1},
        timeout={"attempt_s": 0.3, "total_s": 1},
        pace={"requests_per_s": 100.0},
    )
    client = httpx.AsyncClient(transport=guard.async_transport())
    with pytest.raises(httpx.ReadTimeout):  # the first attempt hangs, alone
        await client.get(herd_url + "/v1/tracks/paced")
    assert herd.hits["/v1/tracks/paced"] == 1
    assert [e.hedged for e in events] == [False]


class SteppedClock(FakeClock):
    """A fake clock whose async sleeps wait until the test lets them end (time then moves)."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = 0
        self._step: anyio.Event | None = None

    async def sleep(self, seconds: float) -> None:
        """Wait for ``step()``, then move time forward."""
        self.slept.append(seconds)
        if self._step is None:
            self._step = anyio.Event()
        step = self._step
        self.sleeping += 1
        await step.wait()
        self.sleeping -= 1
        self.advance(seconds)

    def step(self) -> None:
        """End every sleep in progress."""
        if self._step is not None:
            self._step.set()
            self._step = None


async def test_no_hedge_once_a_cooldown_has_begun(herd, herd_url):
    """A 429 elsewhere starts a cooldown while the GET waits: its hedge is not sent."""
    clock = SteppedClock()
    guard, events = hedging_guard(
        herd_url, clock, retry={"attempts": 1}, timeout={"attempt_s": 0.3, "total_s": 1}
    )
    client = httpx.AsyncClient(transport=guard.async_transport())
    path = "/v1/tracks/cooling"
    failed: list[BaseException] = []

    async def call() -> None:
        try:
            await client.get(herd_url + path)
        except httpx.TransportError as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(5):
            while not (herd.hits[path] == 1 and clock.sleeping == 1):  # noqa: ASYNC110
                await anyio.sleep(0.002)  # sleep-ok: polling a real server
        guard.upstreams["spotify_api"].cooldown.throttle(clock.monotonic(), 30)
        clock.step()  # the hedge is due now, in the cooldown
    assert len(failed) == 1
    assert isinstance(failed[0], httpx.ReadTimeout)
    assert herd.hits[path] == 1
    assert [e.hedged for e in events] == [False]


async def test_sync_clients_are_never_hedged(herd, herd_url, clock):
    """httpx.Client: no hedge (a blocked thread cannot be cancelled); one request."""
    herd.release()
    herd.first_hangs = False
    guard, events = hedging_guard(herd_url, clock)
    client = httpx.Client(transport=guard.sync_transport())
    response = await anyio.to_thread.run_sync(client.get, herd_url + "/v1/tracks/sync")
    assert response.status_code == 200
    assert herd.hits["/v1/tracks/sync"] == 1
    assert [e.hedged for e in events] == [False]
