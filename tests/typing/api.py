"""The public API as users write it: type-checked with ``mypy --strict``, never run."""

from __future__ import annotations

from typing import Any, Literal, assert_type

import aiohttp
import httpx
import requests
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from upstream_guard import (
    CallEvent,
    CircuitOpenError,
    CoalesceSettings,
    Guard,
    GuardSettings,
    HedgeSettings,
    PaceSettings,
    RateLimitedError,
    RetriesExhaustedError,
    UpstreamGuardMiddleware,
    UpstreamSettings,
    UpstreamUnavailable,
    install,
)
from upstream_guard.testing import FakeClock, Fault, SpotifySimulator


def one_line_install() -> None:
    """``install(app)``, its settings, and the Guard it returns."""
    app = FastAPI()
    guard = install(app, settings=GuardSettings(request_deadline_s=2.0), clock=FakeClock())
    assert_type(guard, Guard)
    assert_type(guard.state("spotify_api"), Literal["closed", "open", "half-open", "isolated"])
    assert_type(guard.isolate("spotify_api"), None)
    assert_type(guard.reset("spotify_api"), None)
    snapshot: dict[str, Any] = guard.snapshot()
    assert_type(snapshot["status"], Any)
    app.add_middleware(UpstreamGuardMiddleware)
    wrapped = UpstreamGuardMiddleware(app, settings=None)
    assert_type(wrapped.guard, Guard)

    @guard.fallback("/now-playing")
    async def now_playing(request: Request, error: BaseException) -> Response:
        return JSONResponse({"playing": None, "path": request.url.path, "error": str(error)})


def clients(guard: Guard) -> None:
    """Transports and sessions have their libraries' types."""
    assert_type(guard.async_transport(), httpx.AsyncBaseTransport)
    assert_type(guard.sync_transport(httpx.HTTPTransport()), httpx.BaseTransport)
    assert_type(guard.requests_session(), requests.Session)
    httpx.AsyncClient(transport=guard.async_transport())
    httpx.Client(transport=guard.sync_transport())
    assert_type(guard.aiohttp_middleware(), aiohttp.ClientMiddlewareType)
    aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()])
    guard.instrument()
    guard.close()


def events(guard: Guard) -> None:
    """Subscribers get a CallEvent; subscribe returns the function that stops them."""

    def on_call(event: CallEvent) -> None:
        status: int | None = event.status
        outcome: str = event.outcome
        flags: tuple[bool, bool] = (event.coalesced, event.hedged)
        described: tuple[str, str, str, int | None, str, tuple[bool, bool]] = (
            event.upstream,
            event.endpoint,
            event.method,
            status,
            outcome,
            flags,
        )
        assert described

    unsubscribe = guard.subscribe(on_call)
    assert_type(unsubscribe(), None)


def errors() -> None:
    """Every guard error is an UpstreamUnavailable with upstream, reason and a wait."""
    for error in (
        CircuitOpenError("open", upstream="spotify_api", reason="circuit_open"),
        RetriesExhaustedError("gone", upstream="spotify_api", reason="timeout"),
        RateLimitedError("slow down", upstream="spotify_api", reason="cooldown"),
    ):
        base: UpstreamUnavailable = error
        wait: float | None = base.retry_after_s
        described: tuple[str, str, float | None] = (base.upstream, base.reason, wait)
        assert described


def settings() -> None:
    """Settings built in code."""
    upstream = UpstreamSettings(hosts=("127.0.0.1:8000",), retry={"attempts": 2})
    GuardSettings(upstreams={"spotify_api": upstream}, redis_url=None)
    UpstreamSettings(
        hosts=("api.spotify.com",),
        coalesce=CoalesceSettings(gets=True, token_requests=True, max_body_bytes=1 << 20),
        hedge=HedgeSettings(after_s=0.25, max_extra=1),
    )
    pace = PaceSettings(requests_per_s=5.0, burst=2, adaptive=True, max_wait_s=0.5, calm_s=60)
    UpstreamSettings(hosts=("api.spotify.com",), pace=pace)
    event_wait: float = CallEvent("a", "/", "GET", "refused", "paced", None, 0, 0.0).pace_wait_s
    assert event_wait == 0.0


def simulator() -> None:
    """The simulator and its faults."""
    sim = SpotifySimulator()
    sim.set_fault(Fault.no_healthy_upstream(), "/v1/tracks")
    sim.set_fault(Fault.rate_limited(30))
    sim.set_fault(Fault.rolling_window(90, 30.0))
    throttled: int = SpotifySimulator(clock=FakeClock().monotonic).throttled
    assert throttled == 0
    sim.heal()
    with SpotifySimulator().intercept() as spotify:
        spotify.set_fault(Fault.no_healthy_upstream())
        spotify.revoke("AQ-refresh-token")
        api_url: str = spotify.base_urls["api.spotify.com"]
        assert api_url
