"""The pace: a configured ceiling, the wait for a slot, paced refusals, a pace learned from 429s."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from conftest import make_settings
from test_transport import caller, track
from upstream_guard import (
    CallEvent,
    CircuitOpenError,
    Guard,
    GuardSettings,
    PaceSettings,
    RateLimitedError,
    SettingsError,
    install,
)
from upstream_guard._pace import BETA, PLATEAU_S
from upstream_guard._pipeline import Attempt, AttemptResult, GuardedCall, Wait
from upstream_guard.testing import FakeClock, Fault, SpotifySimulator, serve

TRACK = "3n3Ppam7vgaVa1iaRUc9Lp"


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    """Both drivers: httpx.AsyncClient, and httpx.Client in a thread."""
    return str(request.param)


def events_of(guard: Guard) -> list[CallEvent]:
    """Every finished call's event, in order."""
    seen: list[CallEvent] = []
    guard.subscribe(seen.append)
    return seen


# -- settings --------------------------------------------------------------------------------


def test_pace_settings_defaults_and_export():
    """No ceiling, adaptive on, a second's wait at most, a ten-minute calm; exported."""
    pace = PaceSettings()
    assert pace.requests_per_s is None
    assert pace.burst is None
    assert pace.adaptive is True
    assert pace.max_wait_s == 1.0
    assert pace.calm_s == 600.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("requests_per_s", -1),
        ("requests_per_s", 0),
        ("requests_per_s", float("nan")),
        ("requests_per_s", float("inf")),
        ("burst", 0.5),
        ("max_wait_s", -0.1),
        ("calm_s", 0),
    ],
)
def test_bad_pace_settings_say_what_and_where(field, value):
    """A negative or zero rate, a burst under one call, a negative wait: a clear error."""
    with pytest.raises(SettingsError) as info:
        make_settings("http://127.0.0.1:1", pace={field: value})
    text = str(info.value)
    assert f"upstreams.spotify_api.pace.{field}" in text
    assert f"UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__PACE__{field.upper()}" in text


def test_pace_settings_from_the_environment(monkeypatch):
    """The pace is set per upstream through nested environment variables."""
    from upstream_guard import GuardSettings

    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__PACE__REQUESTS_PER_S", "7.5")
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__PACE__ADAPTIVE", "false")
    pace = GuardSettings().upstreams["spotify_api"].pace
    assert pace.requests_per_s == 7.5
    assert pace.adaptive is False


# -- a configured ceiling --------------------------------------------------------------------

pytestmark = pytest.mark.anyio


async def test_configured_ceiling_spaces_calls(kind, sim, sim_url, clock):
    """At 4 calls/s with a burst of 1, each call after the first waits a quarter second."""
    guard = Guard(make_settings(sim_url, pace={"requests_per_s": 4, "burst": 1}), clock=clock)
    seen = events_of(guard)
    call = caller(kind, guard)
    for i in range(5):
        assert (await call("GET", track(sim_url, i))).status_code == 200
    assert clock.slept == pytest.approx([0.25] * 4)
    assert sim.total_hits == 5
    assert [e.pace_wait_s for e in seen] == pytest.approx([0, 0.25, 0.25, 0.25, 0.25])
    assert guard.snapshot()["upstreams"]["spotify_api"]["pace"] == {
        "rate_per_s": 4.0,
        "source": "configured",
        "shared": "off",
        "refused": 0,
    }


async def test_burst_lets_calls_through_at_once(kind, sim, sim_url, clock):
    """A burst of 3 at 1 call/s: three calls go at once, the fourth waits a second."""
    guard = Guard(make_settings(sim_url, pace={"requests_per_s": 1, "burst": 3}), clock=clock)
    call = caller(kind, guard)
    for i in range(4):
        assert (await call("GET", track(sim_url, i))).status_code == 200
    assert clock.slept == pytest.approx([1.0])


async def test_wait_beyond_max_wait_is_refused_as_paced(kind, sim, sim_url, clock):
    """A slot further off than max_wait_s: refused at once, reason paced, with a Retry-After."""
    pace = {"requests_per_s": 1, "burst": 1, "max_wait_s": 0.5}
    guard = Guard(make_settings(sim_url, pace=pace), clock=clock)
    seen = events_of(guard)
    call = caller(kind, guard)
    assert (await call("GET", track(sim_url, 0))).status_code == 200
    with pytest.raises(RateLimitedError) as info:
        await call("GET", track(sim_url, 1))
    assert isinstance(info.value, httpx.TransportError)  # the client's own family too
    assert info.value.reason == "paced"
    assert info.value.retry_after_s == pytest.approx(1.0)
    assert sim.total_hits == 1
    assert (seen[-1].outcome, seen[-1].reason) == ("refused", "paced")
    clock.advance(0.6)  # the slot is 0.4 s away now: within max_wait_s
    assert (await call("GET", track(sim_url, 2))).status_code == 200
    assert clock.slept == pytest.approx([0.4])
    assert guard.snapshot()["upstreams"]["spotify_api"]["pace"]["refused"] == 1


async def test_an_open_breaker_refuses_before_the_pace(kind, sim, sim_url, clock):
    """Refused calls neither wait for a slot nor use one up: the probe goes at its own slot."""
    settings = make_settings(
        sim_url,
        pace={"requests_per_s": 1, "burst": 1, "max_wait_s": 5},
        breaker={"fail_max": 1, "reset_timeout_s": 10},
        retry={"attempts": 1},
    )
    guard = Guard(settings, clock=clock)
    call = caller(kind, guard)
    sim.set_fault(Fault.no_healthy_upstream())
    assert (await call("GET", track(sim_url, 0))).status_code == 503
    assert guard.state("spotify_api") == "open"
    for i in range(5):
        with pytest.raises(CircuitOpenError):
            await call("GET", track(sim_url, i))
    assert clock.slept == []  # refused at once, no slot waited for
    sim.set_fault(Fault.healthy())
    clock.advance(10)  # past the reset timeout: the next call probes
    assert (await call("GET", track(sim_url, 9))).status_code == 200
    assert clock.slept == []  # its slot was free: the refusals took none
    assert sim.total_hits == 2


async def test_the_deadline_bounds_the_wait(kind, sim, sim_url, clock):
    """A call whose deadline comes before its slot is refused, though max_wait_s would allow."""
    settings = make_settings(
        sim_url,
        pace={"requests_per_s": 1, "burst": 1, "max_wait_s": 5},
        timeout={"attempt_s": 0.5, "total_s": 0.5},
    )
    guard = Guard(settings, clock=clock)
    call = caller(kind, guard)
    assert (await call("GET", track(sim_url, 0))).status_code == 200
    with pytest.raises(RateLimitedError, match="paced"):
        await call("GET", track(sim_url, 1))
    assert sim.total_hits == 1


def test_requests_calls_are_paced(sim, sim_url, clock):
    """A requests session (spotipy's client) waits for its slot like httpx."""
    guard = Guard(make_settings(sim_url, pace={"requests_per_s": 2, "burst": 1}), clock=clock)
    session = guard.requests_session()
    for i in range(3):
        assert session.get(track(sim_url, i), timeout=5).status_code == 200
    assert clock.slept == pytest.approx([0.5, 0.5])


def test_requests_refusal_is_a_connection_error(sim, sim_url, clock):
    """A paced refusal from requests is a requests.ConnectionError and a RateLimitedError."""
    pace = {"requests_per_s": 1, "burst": 1, "max_wait_s": 0}
    session = Guard(make_settings(sim_url, pace=pace), clock=clock).requests_session()
    assert session.get(track(sim_url, 0), timeout=5).status_code == 200
    with pytest.raises(requests.ConnectionError) as info:
        session.get(track(sim_url, 1), timeout=5)
    assert isinstance(info.value, RateLimitedError)
    assert info.value.reason == "paced"


# -- what the app answers --------------------------------------------------------------------


def app_calling(url: str, *, stale: bool = False) -> FastAPI:
    """An app with one route that fetches a track through httpx."""
    app = FastAPI()

    @app.get("/track")
    async def one_track(authorization: str = "") -> Any:
        async with httpx.AsyncClient() as client:
            got = await client.get(
                f"{url}/v1/tracks/{TRACK}", headers={"authorization": authorization}
            )
        got.raise_for_status()
        return JSONResponse(got.json(), headers={"x-from": got.headers.get("x-upstream-guard", "")})

    return app


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_paced_refusal_answers_503_with_time_to_next_slot(sim, sim_url, clock, backend):
    """With no fallback, a paced call gets the 503 problem whose Retry-After is the slot's wait."""
    app = app_calling(sim_url)
    pace = {"requests_per_s": 0.4, "burst": 1, "max_wait_s": 0}
    install(app, make_settings(sim_url, pace=pace), clock=clock)
    with TestClient(app, backend=backend) as client:
        assert client.get("/track").status_code == 200
        clock.advance(0.2)
        refused = client.get("/track")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "3"  # 2.3 s to the next slot, rounded up
    assert "paced" in refused.json()["detail"]
    assert sim.total_hits == 1


def test_paced_refusal_serves_the_stale_copy(sim, sim_url, clock):
    """With stale_if_error, a paced call gets the last good copy instead of a refusal."""
    app = app_calling(sim_url)
    settings = make_settings(
        sim_url,
        pace={"requests_per_s": 0.5, "burst": 1, "max_wait_s": 0},
        fallback={"stale_if_error": True},
    )
    install(app, settings, clock=clock)
    with TestClient(app) as client:
        first = client.get("/track", params={"authorization": "Bearer a"})
        again = client.get("/track", params={"authorization": "Bearer a"})
    assert first.status_code == again.status_code == 200
    assert again.headers["x-from"] == "stale"
    assert again.json() == first.json()
    assert sim.total_hits == 1


def test_paced_refusal_uses_the_route_fallback(sim, sim_url, clock):
    """A route's own fallback answers a paced refusal."""
    app = app_calling(sim_url)
    pace = {"requests_per_s": 0.5, "burst": 1, "max_wait_s": 0}
    guard = install(app, make_settings(sim_url, pace=pace), clock=clock)

    @guard.fallback("/track")
    async def fallback(request, error):
        return JSONResponse({"paced": error.reason == "paced", "in": error.retry_after_s})

    with TestClient(app) as client:
        client.get("/track")
        answer = client.get("/track")
    assert answer.json() == {"paced": True, "in": pytest.approx(2.0)}


# -- the learned pace ------------------------------------------------------------------------


async def drive(call: Any, url: str, clock: FakeClock, n: int, every_s: float) -> None:
    """``n`` calls, ``every_s`` apart on the fake clock."""
    for i in range(n):
        await call("GET", track(url, i))
        clock.advance(every_s)


async def test_learned_pace_falls_after_a_429_recovers_and_lapses(kind, sim, sim_url):
    """A 429 sets a pace below the rate that drew it; it rises while calm, lapses after calm_s."""
    clock = FakeClock(start=1000.0)
    settings = make_settings(sim_url, retry={"attempts": 1}, pace={"calm_s": 120})
    guard = Guard(settings, clock=clock)
    call = caller(kind, guard)
    await drive(call, sim_url, clock, 40, 0.1)  # 40 calls over 4 s: 10 calls/s accepted
    assert guard.snapshot()["upstreams"]["spotify_api"]["pace"]["source"] == "none"
    sim.script([Fault.rate_limited(1)])
    assert (await call("GET", track(sim_url, 99))).status_code == 429
    pace = guard.snapshot()["upstreams"]["spotify_api"]["pace"]
    assert pace["source"] == "learned"
    # 40 accepted over the 4 s they took plus the 1 s Retry-After: 8 calls/s; BETA of it.
    assert pace["rate_per_s"] == pytest.approx(BETA * 40 / 5.0, rel=0.05)
    learned = pace["rate_per_s"]
    clock.advance(50)
    risen = guard.snapshot()["upstreams"]["spotify_api"]["pace"]["rate_per_s"]
    assert risen == pytest.approx(learned / BETA * (1 + (1 - BETA) * (20 / 30) ** 3), rel=0.05)
    clock.advance(71)  # 121 s without a 429
    assert guard.snapshot()["upstreams"]["spotify_api"]["pace"] == {
        "rate_per_s": None,
        "source": "none",
        "shared": "off",
        "refused": 0,
    }


async def test_learned_pace_then_spaces_calls(kind, sim, sim_url):
    """Once learned, the pace holds calls apart; a second 429 lowers it again."""
    clock = FakeClock(start=1000.0)
    guard = Guard(make_settings(sim_url, retry={"attempts": 1}), clock=clock)
    call = caller(kind, guard)
    await drive(call, sim_url, clock, 20, 0.1)
    sim.script([Fault.rate_limited(1)])
    await call("GET", track(sim_url, 99))
    first = guard.upstreams["spotify_api"].pace.rate(clock.monotonic())[0]
    assert first is not None
    clock.advance(2)  # past the cooldown
    clock.slept.clear()
    n = 3 * round(first)
    for i in range(n):
        assert (await call("GET", track(sim_url, i))).status_code == 200
    # A learned pace lets no burst through: after the first, one call every 1/pace s.
    assert sum(clock.slept) == pytest.approx((n - 1) / first, rel=0.15)
    sim.script([Fault.rate_limited(1)])
    await call("GET", track(sim_url, 98))
    second = guard.upstreams["spotify_api"].pace.rate(clock.monotonic())[0]
    assert second is not None
    assert second < first


async def test_learned_pace_climbs_back_to_the_rate_that_drew_the_429_then_probes(sim, sim_url):
    """Back under the 429's rate for PLATEAU_S, within 1.25% of it for a window, then beyond."""
    clock = FakeClock(start=1000.0)
    guard = Guard(make_settings(sim_url, retry={"attempts": 1}), clock=clock)
    pace = guard.upstreams["spotify_api"].pace
    await drive(caller("async", guard), sim_url, clock, 20, 0.1)
    sim.script([Fault.rate_limited(1)])
    await caller("async", guard)("GET", track(sim_url, 99))
    decreased_at = clock.monotonic()
    first = pace.rate(decreased_at)[0]
    assert first is not None
    plateau = first / BETA  # the measured rate that drew the 429
    rates = []
    for t in range(0, 3 * round(PLATEAU_S) + 1, 5):
        rate = pace.rate(decreased_at + t)[0]
        assert rate is not None
        rates.append(rate)
    assert rates == sorted(rates)  # it only rises while no 429 comes
    within = [r for t, r in zip(range(0, 91, 5), rates, strict=False) if t <= PLATEAU_S]
    assert max(within) == pytest.approx(plateau)  # never past the 429's rate before PLATEAU_S
    for t in (PLATEAU_S / 2, PLATEAU_S * 3 / 2):  # the plateau: flat for half a 30 s window
        assert pace.rate(decreased_at + t)[0] == pytest.approx(plateau, rel=0.0126)
    assert pace.rate(decreased_at + 2 * PLATEAU_S)[0] == pytest.approx(plateau * 1.1)
    assert pace.rate(decreased_at + 3 * PLATEAU_S)[0] == pytest.approx(plateau * 1.8)


async def test_a_raised_limit_is_found_and_the_next_429_sets_a_higher_plateau(sim, sim_url):
    """No 429 for a while: the pace probes past the old plateau; the next 429 learns more."""
    clock = FakeClock(start=1000.0)
    guard = Guard(make_settings(sim_url, retry={"attempts": 1}), clock=clock)
    pace = guard.upstreams["spotify_api"].pace
    call = caller("async", guard)
    await drive(call, sim_url, clock, 20, 0.1)  # 10 calls/s accepted
    sim.script([Fault.rate_limited(1)])
    await call("GET", track(sim_url, 99))
    old_plateau = pace.learned / BETA
    clock.advance(3 * PLATEAU_S)  # the limit was raised: no 429 comes
    probing = pace.rate(clock.monotonic())[0]
    assert probing == pytest.approx(1.8 * old_plateau)
    clock.slept.clear()
    await drive(call, sim_url, clock, 50, 0.05)  # 20 calls/s offered, all accepted
    assert sum(clock.slept) < 50 / probing  # they went at the higher pace (no burst)
    sim.script([Fault.rate_limited(1)])
    await call("GET", track(sim_url, 98))
    assert pace.learned / BETA > 1.3 * old_plateau  # the new plateau: the rate that drew it


def held_call(guard: Guard, clock: FakeClock) -> GuardedCall:
    """A call's decisions alone (no I/O), started now, as ``Exchange`` sets them up."""
    call = GuardedCall()
    call.rt = rt = guard.upstreams["spotify_api"]
    call.upstream, call.endpoint, call.method = rt.name, "/v1/me", "GET"
    call.started = clock.monotonic()
    call.deadline = call.started + 60
    call.breaker = rt.breaker_for(call.endpoint)
    return call


def test_calls_held_by_a_cooldown_take_new_slots_after_it():
    """Slots taken before a 429 are stale: held calls leave one per slot, not all at once."""
    clock = FakeClock(start=1000.0)
    pace = {"requests_per_s": 1, "burst": 1, "max_wait_s": 10}
    retry = {"attempts": 1, "max_retry_after_s": 10}
    guard = Guard(
        GuardSettings(upstreams={"spotify_api": {"pace": pace, "retry": retry}}), clock=clock
    )
    first, second, third = (held_call(guard, clock) for _ in range(3))
    assert isinstance(first.begin(), Attempt)
    assert second.begin() == Wait(1.0)
    assert third.begin() == Wait(2.0)
    assert first.after(AttemptResult(status=429, retry_after="3")) is None  # cooldown to 1003
    clock.advance(1)
    assert second.after_wait() == Wait(2.0)  # held by the cooldown
    clock.advance(1)
    assert third.after_wait() == Wait(1.0)
    clock.advance(1)  # the cooldown is over: one goes, the other takes the next slot
    assert isinstance(second.after_wait(), Attempt)
    assert third.after_wait() == Wait(1.0)
    clock.advance(1)
    assert isinstance(third.after_wait(), Attempt)


async def test_a_429_for_a_call_sent_before_the_decrease_is_old_news(sim, sim_url):
    """Only calls sent after the last decrease teach anything: a burst of 429s is one lesson."""
    clock = FakeClock(start=1000.0)
    guard = Guard(make_settings(sim_url, retry={"attempts": 1}), clock=clock)
    pace = guard.upstreams["spotify_api"].pace
    call = caller("async", guard)
    await drive(call, sim_url, clock, 30, 0.1)
    started = clock.monotonic()
    pace.throttled(started + 0.01, started + 0.005, 1.0)
    learned = pace.learned
    pace.throttled(started + 0.02, started, 1.0)  # sent before the decrease
    assert pace.learned == learned


async def test_adaptive_off_learns_nothing(kind, sim, sim_url, clock):
    """With adaptive false a 429 starts the cooldown only; no pace is set."""
    settings = make_settings(sim_url, retry={"attempts": 1}, pace={"adaptive": False})
    guard = Guard(settings, clock=clock)
    call = caller(kind, guard)
    await drive(call, sim_url, clock, 10, 0.1)
    sim.script([Fault.rate_limited(1)])
    assert (await call("GET", track(sim_url, 9))).status_code == 429
    assert guard.snapshot()["upstreams"]["spotify_api"]["pace"]["source"] == "none"
    assert guard.snapshot()["upstreams"]["spotify_api"]["cooldown_s"] > 0


async def test_configured_ceiling_and_learned_pace_take_the_lower(sim, sim_url):
    """A learned pace below the ceiling holds, and says it is learned."""
    clock = FakeClock(start=1000.0)
    settings = make_settings(sim_url, retry={"attempts": 1}, pace={"requests_per_s": 50})
    guard = Guard(settings, clock=clock)
    call = caller("async", guard)
    await drive(call, sim_url, clock, 20, 0.1)
    assert guard.snapshot()["upstreams"]["spotify_api"]["pace"]["source"] == "configured"
    sim.script([Fault.rate_limited(1)])
    await call("GET", track(sim_url, 9))
    pace = guard.snapshot()["upstreams"]["spotify_api"]["pace"]
    assert pace["source"] == "learned"
    assert pace["rate_per_s"] < 50


# -- against a rolling-window limit ----------------------------------------------------------


@pytest.fixture
def windowed(clock: FakeClock) -> Any:
    """A simulator on loopback whose rolling windows run on the test's fake clock."""
    simulator = SpotifySimulator(clock=clock.monotonic)
    with serve(simulator) as url:
        yield simulator, url


def test_rolling_window_fault_throttles_until_the_oldest_call_leaves(windowed, clock):
    """N calls per W seconds, then 429 with Retry-After until a counted call leaves."""
    simulator, url = windowed
    simulator.set_fault(Fault.rolling_window(3, 10))
    with httpx.Client(base_url=url) as client:
        for _ in range(3):  # at 0, 1 and 2 s
            assert client.get("/v1/me").status_code == 200
            clock.advance(1)
        clock.advance(1)
        throttled = client.get("/v1/me")  # at 4 s: the first leaves at 10 s
        assert throttled.status_code == 429
        assert throttled.headers["retry-after"] == "6"
        clock.advance(6)
        assert client.get("/v1/me").status_code == 200
        again = client.get("/v1/me")
        assert again.status_code == 429
        assert again.headers["retry-after"] == "1"
    assert simulator.throttled == 2


def test_rolling_window_fault_rejects_nonsense():
    """A window of no calls or no time is a clear error."""
    with pytest.raises(ValueError, match="calls >= 1"):
        Fault.rolling_window(0, 30)
    with pytest.raises(ValueError, match="window_s > 0"):
        Fault.rolling_window(10, 0)


async def test_adaptive_pace_learns_an_unknown_rolling_window(clock):
    """At 3x a 50-per-10-s limit the guard learns it: few 429s and most of the allowance used.

    In process (the simulator behind httpx's ASGI transport) to keep 600 calls quick.
    """
    simulator = SpotifySimulator(clock=clock.monotonic)
    simulator.set_fault(Fault.rolling_window(50, 10.0))
    guard = Guard(GuardSettings(upstreams={"spotify_api": {"retry": {"attempts": 1}}}), clock=clock)
    transport = guard.async_transport(httpx.ASGITransport(simulator))
    start = clock.monotonic()
    statuses: list[tuple[float, int]] = []
    async with httpx.AsyncClient(transport=transport) as client:
        for i in range(15 * 40):  # 15 calls/s offered for 40 s
            due = start + i / 15
            if clock.monotonic() < due:
                clock.advance(due - clock.monotonic())
            try:
                status = (await client.get(track("https://api.spotify.com", i))).status_code
            except RateLimitedError:
                status = 0  # refused by the guard: never sent
            statuses.append((clock.monotonic(), status))
    late = [s for t, s in statuses if t >= start + 20]  # after two windows of learning
    sent = [s for s in late if s]
    goodput = sent.count(200) / (20 * 5)
    assert sent.count(429) <= 0.02 * len(sent)
    assert goodput >= 0.85
    assert guard.snapshot()["upstreams"]["spotify_api"]["pace"]["source"] == "learned"


# -- telemetry and views ---------------------------------------------------------------------


def test_span_gauge_and_refusal_count_show_the_pace(sim, sim_url, clock):
    """The logical span carries pace_wait_s; a gauge reports the pace; paced refusals count."""
    from opentelemetry.trace import SpanKind

    from otel_sdk import install_sdk
    from test_telemetry import by_kind

    exporter, reader = install_sdk()
    exporter.clear()
    pace = {"requests_per_s": 2, "burst": 1, "max_wait_s": 0.6}
    # An upstream of its own: the gauge reports the lowest pace of each name in the process.
    hostport = sim_url.split("://", 1)[1]
    settings = GuardSettings(upstreams={"gauged": {"hosts": [hostport], "pace": pace}})
    guard = Guard(settings, clock=clock)
    with httpx.Client(transport=guard.sync_transport()) as client:
        client.get(track(sim_url, 0))
        client.get(track(sim_url, 1))  # waits half a second
        client.get(track(sim_url, 2))  # waits half a second
        # A call elsewhere (another thread) takes the next slot: the one after is 1 s off.
        guard.upstreams["gauged"].pace.take(clock.monotonic(), 1.0)
        with pytest.raises(RateLimitedError):
            client.get(track(sim_url, 3))
    spans = by_kind(exporter.get_finished_spans(), SpanKind.INTERNAL)
    waits = [(s.attributes or {}).get("upstream_guard.pace_wait_s") for s in spans]
    assert waits == [None, pytest.approx(0.5), pytest.approx(0.5), None]
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    gauges = [
        p.value
        for p in points["upstream_guard.pace"]
        if p.attributes == {"upstream_guard.upstream": "gauged"}
    ]
    assert gauges == [2.0]
    paced = [
        p.value
        for p in points["upstream_guard.refused"]
        if (p.attributes or {}).get("upstream_guard.reason") == "paced"
        and (p.attributes or {}).get("upstream_guard.upstream") == "gauged"
    ]
    assert paced == [1]
    exporter.clear()


def test_health_and_dashboard_show_the_pace(sim, sim_url, clock):
    """GET health and the dashboard's data carry each upstream's pace and its source."""
    app = app_calling(sim_url)
    settings = make_settings(sim_url, pace={"requests_per_s": 3}).model_copy(
        update={"dashboard_path": "/dash", "dashboard_allow_anonymous": True}
    )
    install(app, settings, clock=clock)
    with TestClient(app) as client:
        health = client.get("/_upstream_guard/health").json()
        data = client.get("/dash/data").json()
        page = client.get("/dash").text
    expected = {"rate_per_s": 3.0, "source": "configured", "shared": "off", "refused": 0}
    assert health["upstreams"]["spotify_api"]["pace"] == expected
    assert data["upstreams"]["spotify_api"]["pace"] == expected
    assert health["upstreams"]["spotify_accounts"]["pace"]["source"] == "none"
    assert '<th class="num">pace</th>' in page
    assert 'setField(row, "pace"' in page
