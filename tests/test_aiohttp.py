"""aiohttp guarded: install(app), the explicit middleware, its errors, bodies and odd sessions.

aiohttp runs on asyncio only, so these tests do too (the ``anyio_backend`` fixture below
overrides conftest's asyncio-and-trio one). Every upstream is a real server on loopback: the
simulated Spotify, ``transparency_server.Upstream`` and ``chaos_server.ChaosServer``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from fastapi import FastAPI

from chaos_server import ChaosServer
from conftest import make_settings
from transparency_server import Upstream
from upstream_guard import (
    CallEvent,
    CircuitOpenError,
    Guard,
    GuardSettings,
    RetriesExhaustedError,
    UpstreamUnavailable,
    install,
)
from upstream_guard import _aiohttp as guarded_aiohttp
from upstream_guard.testing import FakeClock, Fault, serve

pytestmark = pytest.mark.anyio
TRACK = "/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp"
ORIGINAL_REQUEST = aiohttp.ClientSession._request


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp is asyncio-only."""
    return "asyncio"


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosServer]:
    with ChaosServer() as server:
        yield server


@pytest.fixture(scope="module")
def _upstream() -> Iterator[tuple[Upstream, str]]:
    upstream = Upstream(drip_s=0.3, drip_gap_s=0.03)
    with serve(upstream, lifespan="off") as url:
        yield upstream, url


@pytest.fixture
def up_url(_upstream: tuple[Upstream, str]) -> str:
    """The transparency upstream (gzipped failures, a dripping 200), its hits reset."""
    _upstream[0].reset()
    return _upstream[1]


def events_of(guard: Guard) -> list[CallEvent]:
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    return events


def build_app(api_url: str) -> FastAPI:
    """A FastAPI app calling Spotify with a plain aiohttp.ClientSession per request."""
    app = FastAPI()

    @app.get("/tracks/{track_id}")
    async def track(track_id: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{api_url}/v1/tracks/{track_id}") as response,
        ):
            response.raise_for_status()
            return {"name": (await response.json())["name"]}

    @app.get("/drip")
    async def drip(url: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            chunks = [chunk async for chunk in response.content.iter_chunked(4)]
        return {"chunks": len(chunks), "body": b"".join(chunks).decode()}

    return app


# -- install(app): the route trips, refuses, recovers ---------------------------------------------


def test_route_trips_refuses_with_problem_and_recovers(sim, sim_url, clock):
    """A plain ClientSession route trips, answers 503 problem+json without calling, recovers."""
    app = build_app(sim_url)
    settings = make_settings(
        sim_url, breaker={"fail_max": 2, "reset_timeout_s": 20}, retry={"attempts": 1}
    )
    guard = install(app, settings, clock=clock)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.get(f"/tracks/{TRACK.rsplit('/', 1)[1]}").json()["name"]
        sim.set_fault(Fault.no_healthy_upstream())
        for _ in range(2):
            response = client.get("/tracks/x1")
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
        assert guard.state("spotify_api") == "open"
        hits = sim.total_hits
        response = client.get("/tracks/x1")
        assert response.status_code == 503
        problem = response.json()
        assert problem["upstream"] == "spotify_api"
        assert problem["status"] == 503
        assert response.headers["retry-after"] == "20"
        assert sim.total_hits == hits  # refused without calling the upstream
        sim.heal()
        clock.advance(20)
        assert client.get("/tracks/x1").status_code == 200
        assert guard.state("spotify_api") == "closed"


def test_route_fallback_answers_for_an_aiohttp_call(sim, sim_url, clock):
    """@guard.fallback(path) answers when the route's aiohttp call fails."""
    from starlette.responses import JSONResponse

    app = build_app(sim_url)
    guard = install(app, make_settings(sim_url, retry={"attempts": 1}), clock=clock)

    @guard.fallback("/tracks/{track_id}")
    async def degraded(request, error):
        return JSONResponse({"name": None, "degraded": True})

    sim.set_fault(Fault.no_healthy_upstream())
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        response = client.get("/tracks/x2")
    assert response.status_code == 200
    assert response.json() == {"name": None, "degraded": True}
    assert response.headers["x-upstream-guard"] == "fallback"


def test_streamed_body_that_breaks_is_an_upstream_failure(chaos, clock):
    """iter_chunked over a body cut short counts a failure: the route answers the 503 problem."""
    app = build_app(chaos.url)
    guard = install(app, make_settings(chaos.url), clock=clock)
    events = events_of(guard)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        response = client.get("/drip", params={"url": f"{chaos.url}/v1/chaos/truncated_200/a"})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert guard.snapshot()["upstreams"]["spotify_api"]["last_failure"] == "body_error"
    assert [e.outcome for e in events] == ["success"]  # the answer came; its body failed


def test_streamed_body_reads_in_chunks_through_the_guard(up_url, clock):
    """iter_chunked gets a dripping body chunk by chunk, whole, inside an installed app."""
    app = build_app(up_url)
    install(app, make_settings(up_url), clock=clock)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        response = client.get("/drip", params={"url": f"{up_url}{TRACK}?answer=drip"})
    assert response.status_code == 200
    body = response.json()
    assert body["body"] == "drip" * 10
    assert body["chunks"] == 10


# -- standalone: the guard's errors are aiohttp's --------------------------------------------------


async def test_refused_connection_is_a_connector_error_and_ours(chaos, clock):
    """A refused connection: ClientConnectorError, a ClientError and an UpstreamUnavailable."""
    guard = Guard(make_settings(chaos.refused_url, retry={"attempts": 2}), clock=clock)
    events = events_of(guard)
    async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
        try:
            await session.get(chaos.refused_url + TRACK)
        except aiohttp.ClientError as exc:
            caught: BaseException = exc
    assert isinstance(caught, aiohttp.ClientConnectorError)
    assert isinstance(caught, RetriesExhaustedError)
    assert caught.upstream == "spotify_api"
    assert "Cannot connect to host" in str(caught)
    assert [(e.outcome, e.reason, e.attempts) for e in events] == [("failure", "connect_error", 2)]


async def test_refusal_is_a_client_connection_error(sim, sim_url, clock):
    """An open breaker refuses with CircuitOpenError, also an aiohttp.ClientConnectionError."""
    guard = Guard(make_settings(sim_url, breaker={"fail_max": 1}), clock=clock)
    guard.instrument()
    sim.set_fault(Fault.no_healthy_upstream())
    async with aiohttp.ClientSession() as session:
        async with session.get(sim_url + TRACK) as response:
            assert response.status == 503  # the failure answer itself, intact
            assert await response.text() == "no healthy upstream"
        hits = sim.total_hits
        with pytest.raises(aiohttp.ClientConnectionError) as caught:
            await session.get(sim_url + TRACK)
    assert isinstance(caught.value, CircuitOpenError)
    assert caught.value.retry_after_s is not None
    assert sim.total_hits == hits


async def test_attempt_timeout_is_a_server_timeout_error(chaos, clock):
    """A hanging upstream: ServerTimeoutError after attempt_s, and a RetriesExhaustedError."""
    settings = make_settings(chaos.url, retry={"attempts": 1}, timeout={"attempt_s": 0.1})
    guard = Guard(settings, clock=clock)
    async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
        with pytest.raises(aiohttp.ServerTimeoutError) as caught:
            await session.get(f"{chaos.url}/v1/chaos/hang/t")
    assert isinstance(caught.value, RetriesExhaustedError)
    assert isinstance(caught.value, asyncio.TimeoutError)
    assert caught.value.reason == "timeout"


async def test_concurrent_attempts_each_time_out_at_their_own_deadline(chaos, sim, sim_url, clock):
    """Attempts of 0.1 s and 0.3 s on one loop end at their own times; a healthy one is kept."""
    loop = asyncio.get_running_loop()
    timed_out = asyncio.Event()

    async def call(attempt_s: float) -> float:
        settings = make_settings(chaos.url, retry={"attempts": 1}, timeout={"attempt_s": attempt_s})
        guard = Guard(settings, clock=clock)
        started = loop.time()
        async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
            with pytest.raises(aiohttp.ServerTimeoutError):
                await session.get(f"{chaos.url}/v1/chaos/hang/{attempt_s}")
        return loop.time() - started

    async def healthy() -> int:
        guard = Guard(make_settings(sim_url, timeout={"attempt_s": 0.2}), clock=clock)
        async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
            async with session.get(sim_url + TRACK) as response:
                await timed_out.wait()  # held past its attempt time, after the attempt ended
                return response.status

    async def both() -> list[float]:
        times = await asyncio.gather(call(0.3), call(0.1))
        timed_out.set()
        return times

    (late, early), status = await asyncio.gather(both(), healthy())
    assert 0.1 <= early < late  # each attempt ends at its own time, the shorter first
    assert 0.3 <= late < 5.0
    assert status == 200


async def test_garbled_answer_is_the_clients_error_and_a_connection_error(chaos, clock):
    """A status line that is not HTTP: aiohttp's ClientResponseError, also ClientConnectionError."""
    guard = Guard(make_settings(chaos.url, retry={"attempts": 2}), clock=clock)
    events = events_of(guard)
    async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
        with pytest.raises(aiohttp.ClientResponseError) as caught:
            await session.get(f"{chaos.url}/v1/chaos/bad_status/g")
    assert isinstance(caught.value, aiohttp.ClientConnectionError)
    assert isinstance(caught.value, UpstreamUnavailable)
    assert [(e.outcome, e.reason, e.attempts) for e in events] == [("failure", "network_error", 2)]


async def test_callers_mistake_passes_untouched(sim_url, clock):
    """An invalid URL is aiohttp's own error, never the guard's, and counts for nothing."""
    guard = Guard(make_settings(sim_url), clock=clock)
    guard.instrument()
    events = events_of(guard)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.InvalidURL) as caught:
            await session.get("http://:80/v1/tracks/x")
    assert not isinstance(caught.value, UpstreamUnavailable)
    assert events == []


async def test_gzipped_failure_answer_reaches_the_caller_intact(up_url, clock):
    """A gzipped 500 is retried, then handed back decoded once, readable and streamable."""
    guard = Guard(make_settings(up_url, retry={"attempts": 2}), clock=clock)
    events = events_of(guard)
    async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
        async with session.get(f"{up_url}{TRACK}?answer=500") as response:
            assert response.status == 500
            assert (await response.json())["error"]["status"] == 500
        async with session.get(f"{up_url}{TRACK}?answer=503") as response:
            chunks = [chunk async for chunk in response.content.iter_chunked(5)]
            assert b"".join(chunks) == b"no healthy upstream"
    assert [(e.status, e.attempts) for e in events] == [(500, 2), (503, 2)]
    assert events[0].endpoint == "/v1/tracks/{id}"


async def test_stale_copy_stands_in_when_the_upstream_fails(sim, sim_url, clock):
    """A failed GET gets the last good copy, with Age and x-upstream-guard: stale."""
    settings = make_settings(sim_url, fallback={"stale_if_error": True}, retry={"attempts": 1})
    guard = Guard(settings, clock=clock)
    async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
        async with session.get(sim_url + TRACK) as response:
            fresh = await response.json()
        sim.set_fault(Fault.no_healthy_upstream())
        clock.advance(3)
        async with session.get(sim_url + TRACK) as response:
            assert response.status == 200
            assert response.headers["x-upstream-guard"] == "stale"
            assert response.headers["age"] == "3"
            assert await response.json() == fresh
            assert response.url == aiohttp.client.URL(sim_url + TRACK)
        async with session.get(sim_url + TRACK) as response:  # streamed, it is the same copy
            streamed = b"".join([c async for c in response.content.iter_chunked(64)])
    assert json.loads(streamed) == fresh


# -- install: every session, and back to aiohttp as it was ---------------------------------------


async def test_sessions_before_and_after_install_are_guarded_and_close_restores(
    sim, sim_url, clock
):
    """Sessions made before and after instrument() are guarded; close() restores aiohttp."""
    guard = Guard(make_settings(sim_url, breaker={"fail_max": 1}), clock=clock)
    events = events_of(guard)
    async with aiohttp.ClientSession() as before:
        guard.instrument()
        assert aiohttp.ClientSession._request is not ORIGINAL_REQUEST
        async with aiohttp.ClientSession() as after:
            for session in (before, after):
                async with session.get(sim_url + TRACK) as response:
                    assert response.status == 200
            assert len(events) == 2
            sim.set_fault(Fault.no_healthy_upstream())
            await (await after.get(sim_url + TRACK)).read()
            for session in (before, after):
                with pytest.raises(CircuitOpenError):
                    await session.get(sim_url + TRACK)
            guard.close()
            assert aiohttp.ClientSession._request is ORIGINAL_REQUEST
            async with before.get(sim_url + TRACK) as response:  # no guard: straight through
                assert response.status == 503
    assert len(events) == 5


async def test_unguarded_hosts_pass_straight_through(sim, sim_url, up_url, clock):
    """A host no upstream names is called as it is: no event, its answer untouched."""
    guard = Guard(make_settings(sim_url), clock=clock)
    guard.instrument()
    events = events_of(guard)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{up_url}{TRACK}?answer=500") as response:
            assert response.status == 500
    assert events == []


async def test_session_and_call_middlewares_run_above_the_guard(sim, sim_url, clock):
    """The session's own and a call's own middlewares see one call; the guard retries below."""
    guard = Guard(make_settings(sim_url, retry={"attempts": 2}), clock=clock)
    guard.instrument()
    events = events_of(guard)
    seen: list[str] = []

    def named(name: str) -> Any:
        async def mw(request, handler):
            seen.append(name)
            return await handler(request)

        return mw

    sim.set_fault(Fault.json_5xx(502))
    async with aiohttp.ClientSession(middlewares=[named("session")]) as session:
        async with session.get(sim_url + TRACK) as response:
            assert response.status == 502
        async with session.get(sim_url + TRACK, middlewares=[named("call")]) as response:
            assert response.status == 502
    assert seen == ["session", "call"]
    assert [e.attempts for e in events] == [2, 2]


async def test_explicit_middleware_needs_no_install(sim, sim_url, clock):
    """guard.aiohttp_middleware() guards one session; aiohttp itself stays unpatched."""
    guard = Guard(make_settings(sim_url, breaker={"fail_max": 1}), clock=clock)
    events = events_of(guard)
    sim.set_fault(Fault.no_healthy_upstream())
    async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
        await (await session.get(sim_url + TRACK)).read()
        with pytest.raises(CircuitOpenError):
            await session.get(sim_url + TRACK)
    assert aiohttp.ClientSession._request is ORIGINAL_REQUEST
    assert [e.outcome for e in events] == ["failure", "refused"]


async def test_explicit_and_installed_guards_never_guard_twice(sim, sim_url, clock):
    """A session with the explicit middleware under install makes one guarded call, not two."""
    guard = Guard(make_settings(sim_url, retry={"attempts": 2}), clock=clock)
    guard.instrument()
    events = events_of(guard)
    sim.set_fault(Fault.json_5xx(500))
    async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
        await (await session.get(sim_url + TRACK)).read()
    assert [e.attempts for e in events] == [2]
    assert sim.total_hits == 2


async def test_one_shot_aiohttp_request_is_guarded(sim, sim_url, clock):
    """aiohttp.request(), which makes a session of its own, is guarded too."""
    guard = Guard(make_settings(sim_url, breaker={"fail_max": 1}), clock=clock)
    guard.instrument()
    sim.set_fault(Fault.no_healthy_upstream())
    async with aiohttp.request("GET", sim_url + TRACK) as response:
        assert response.status == 503
    with pytest.raises(CircuitOpenError):
        async with aiohttp.request("GET", sim_url + TRACK):
            pass


class Echo:
    """An ASGI upstream that keeps each request body; every other answer is a 503."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[bytes, bytes]] = []

    async def __call__(self, scope, receive, send):
        assert scope["type"] == "http"  # served with lifespan="off"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        self.headers.append(dict(scope["headers"]))
        status = 503 if len(self.bodies) % 2 else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def test_streamed_upload_is_sent_whole_again_on_retry(clock):
    """A PUT whose body is an async generator is buffered, so the retry sends it whole."""
    echo = Echo()

    async def upload():
        for part in (b"play", b"list"):
            yield part

    with serve(echo, lifespan="off") as url:
        guard = Guard(make_settings(url, retry={"attempts": 2}), clock=clock)
        async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
            async with session.put(f"{url}/v1/playlists/p1/tracks", data=upload()) as response:
                assert response.status == 200
                assert await response.read() == b"playlist"
    assert echo.bodies == [b"playlist", b"playlist"]


async def test_attempts_are_spans_and_carry_the_trace_context(clock):
    """With an SDK: one logical span by template, a CLIENT span per attempt, traceparent sent."""
    from opentelemetry.trace import SpanKind

    from otel_sdk import install_sdk

    exporter, _ = install_sdk()
    echo = Echo()
    with serve(echo, lifespan="off") as url:
        guard = Guard(make_settings(url, retry={"attempts": 2}), clock=clock)
        async with aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()]) as session:
            async with session.get(f"{url}{TRACK}") as response:
                assert response.status == 200
    spans = exporter.get_finished_spans()
    exporter.clear()
    (logical,) = [s for s in spans if s.name == "spotify_api GET /v1/tracks/{id}"]
    attempts = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert len(attempts) == 2
    assert all(
        a.parent is not None and a.parent.span_id == logical.context.span_id for a in attempts
    )
    sent = [h[b"traceparent"].decode().split("-")[2] for h in echo.headers]
    assert sent == [format(a.context.span_id, "016x") for a in attempts]


# -- awkward sessions ----------------------------------------------------------------------------


async def test_raise_for_status_session_gets_the_answer_and_refusals(sim, sim_url, clock):
    """raise_for_status=True: aiohttp raises for the final answer after retries; refusals are ours."""
    guard = Guard(
        make_settings(sim_url, retry={"attempts": 2}, breaker={"fail_max": 2}), clock=clock
    )
    guard.instrument()
    sim.set_fault(Fault.no_healthy_upstream())
    async with aiohttp.ClientSession(raise_for_status=True) as session:
        with pytest.raises(aiohttp.ClientResponseError) as answered:
            await session.get(sim_url + TRACK)
        assert answered.value.status == 503
        assert not isinstance(answered.value, UpstreamUnavailable)
        assert sim.total_hits == 2
        with pytest.raises(CircuitOpenError):
            await session.get(sim_url + TRACK)
        sim.heal()
        clock.advance(60)
        async with session.get(sim_url + TRACK) as response:
            assert response.status == 200


async def test_users_trace_configs_see_one_call_with_its_attempts(sim, sim_url, clock):
    """A session's own TraceConfig sees one request start and end, and each attempt's connection."""
    settings = make_settings(sim_url, retry={"attempts": 2}, breaker={"fail_max": 3})
    guard = Guard(settings, clock=clock)
    guard.instrument()
    seen: list[str] = []
    trace = aiohttp.TraceConfig()

    async def note(session, ctx, params, name=None):
        seen.append(name)

    for name in ("request_start", "request_end", "request_exception", "connection_reuseconn"):
        signal = getattr(trace, f"on_{name}")
        signal.append(lambda s, c, p, name=name: note(s, c, p, name))
    sim.script([Fault.json_5xx(500), Fault.healthy()])
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        async with session.get(sim_url + TRACK) as response:
            assert response.status == 200
        assert seen == ["request_start", "connection_reuseconn", "request_end"]
        sim.set_fault(Fault.no_healthy_upstream())
        for _ in range(2):
            async with session.get(sim_url + TRACK) as response:
                assert response.status == 503
        assert guard.state("spotify_api") == "open"
        seen.clear()
        with pytest.raises(CircuitOpenError):
            await session.get(sim_url + TRACK)
    assert seen == ["request_start", "request_exception"]


async def test_session_closed_mid_call_passes_through_uncounted(chaos, clock):
    """Closing the session during a call: aiohttp's connection error, never the upstream's fault."""
    guard = Guard(make_settings(chaos.url, timeout={"attempt_s": 5}), clock=clock)
    guard.instrument()
    events = events_of(guard)
    session = aiohttp.ClientSession()

    async def close_when_held() -> None:
        await asyncio.to_thread(chaos.hanging.acquire, timeout=5)
        await session.close()

    closer = asyncio.create_task(close_when_held())
    with pytest.raises(aiohttp.ClientConnectionError) as caught:
        await session.get(f"{chaos.url}/v1/chaos/hang/closed")
    await closer
    assert not isinstance(caught.value, UpstreamUnavailable)
    assert {e.outcome for e in events} == {"client_error"}
    assert guard.snapshot()["upstreams"]["spotify_api"]["failures"] == 0


async def test_body_read_past_the_deadline_is_a_timeout(up_url):
    """A watched body still arriving after the call's deadline: SocketTimeoutError, counted."""
    clock = FakeClock()
    guard = Guard(make_settings(up_url, timeout={"total_s": 5}), clock=clock)
    guard.instrument()
    from upstream_guard._context import RequestContext, request_context

    ctx = RequestContext()
    ctx.guard = guard
    token = request_context.set(ctx)  # as the middleware sets it for a request being served
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{up_url}{TRACK}?answer=drip") as response:
                assert await response.content.readany()
                clock.advance(10)
                with pytest.raises(aiohttp.SocketTimeoutError) as caught:
                    await response.content.read(4)
    finally:
        request_context.reset(token)
    assert isinstance(caught.value, UpstreamUnavailable)
    assert ctx.failed == {"spotify_api": "timeout"}


# -- intercepting: Spotify's real hosts answered by a loopback server ------------------------------


async def test_intercepting_answers_real_hosts_from_loopback_without_a_guard(sim, sim_url):
    """https://api.spotify.com is answered by the loopback server; aiohttp is restored after."""
    with guarded_aiohttp.intercepting({"api.spotify.com": sim_url}):
        async with aiohttp.ClientSession() as session:
            async with session.get("https://api.spotify.com" + TRACK) as response:
                assert response.status == 200
                assert (await response.json())["id"] == TRACK.rsplit("/", 1)[1]
                assert response.url.host == "api.spotify.com"
    assert aiohttp.ClientSession._request is ORIGINAL_REQUEST
    assert sim.total_hits == 1


async def test_intercepting_keeps_the_guards_decisions_for_the_real_host(sim, sim_url, clock):
    """With a guard for api.spotify.com, intercepted calls trip it and are refused unsent."""
    settings = GuardSettings(upstreams={"spotify_api": {"breaker": {"fail_max": 1}}})
    guard = Guard(settings, clock=clock)
    guard.instrument()
    events = events_of(guard)
    sim.set_fault(Fault.no_healthy_upstream())
    with guarded_aiohttp.intercepting({"api.spotify.com": sim_url}):
        async with aiohttp.ClientSession() as session:
            async with session.get("https://api.spotify.com" + TRACK) as response:
                assert response.status == 503
            with pytest.raises(CircuitOpenError):
                await session.get("https://api.spotify.com" + TRACK)
    assert sim.total_hits == 1
    assert [(e.upstream, e.endpoint, e.outcome) for e in events] == [
        ("spotify_api", "/v1/tracks/{id}", "failure"),
        ("spotify_api", "/v1/tracks/{id}", "refused"),
    ]
    assert aiohttp.ClientSession._request is not ORIGINAL_REQUEST  # the guard still needs it
    guard.close()
    assert aiohttp.ClientSession._request is ORIGINAL_REQUEST


def test_intercepting_refuses_a_base_that_is_no_url():
    """A target that is not an http(s) base URL is a clear ValueError, and nothing is hooked."""
    with pytest.raises(ValueError, match="not an http"):
        with guarded_aiohttp.intercepting({"api.spotify.com": "127.0.0.1:80"}):
            pass
    assert aiohttp.ClientSession._request is ORIGINAL_REQUEST


# -- packaging ----------------------------------------------------------------------------------


def test_import_does_not_import_aiohttp():
    """import upstream_guard (and building a Guard) leaves aiohttp unimported."""
    code = "import sys, upstream_guard; upstream_guard.Guard(); assert 'aiohttp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
