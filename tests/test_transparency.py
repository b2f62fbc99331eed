"""The guard is transparent: every client keeps its own errors, answers and deadlines.

The same behaviour is pinned on each client the guard supports: ``httpx.AsyncClient``,
``httpx.Client``, ``httpx2.AsyncClient`` and ``requests``, against real servers on loopback
(``transparency_server.Upstream`` for gzipped failure answers and a dripping body,
``chaos_server.ChaosServer`` for a hang and a refused port). Async clients run on asyncio and
trio; sync clients run once, in a worker thread.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import httpx
import httpx2
import pytest
import requests
import urllib3
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from chaos_server import ChaosServer
from transparency_server import FAILURES, GZIPPED, Upstream
from upstream_guard import (
    CircuitOpenError,
    Guard,
    GuardSettings,
    RetriesExhaustedError,
    UpstreamUnavailable,
    install,
)
from upstream_guard.testing import serve

KINDS = ("httpx", "httpx-sync", "httpx2", "requests")
ASYNC_KINDS = frozenset({"httpx", "httpx2"})
every_client = pytest.mark.parametrize(
    ("anyio_backend", "kind"),
    [
        pytest.param("asyncio", "httpx", id="httpx-asyncio"),
        pytest.param("trio", "httpx", id="httpx-trio"),
        pytest.param("asyncio", "httpx2", id="httpx2-asyncio"),
        pytest.param("trio", "httpx2", id="httpx2-trio"),
        pytest.param("asyncio", "httpx-sync", id="httpx-sync"),
        pytest.param("asyncio", "requests", id="requests"),
    ],
)
"""Each client once; the async ones on both anyio backends (the sync ones in a thread)."""
# The client's own classes for: a refused connection, a read timeout, a caller's mistake.
CONNECT_ERROR = {
    "httpx": httpx.ConnectError,
    "httpx-sync": httpx.ConnectError,
    "httpx2": httpx2.ConnectError,
    "requests": requests.ConnectionError,
}
READ_TIMEOUT = {
    "httpx": httpx.ReadTimeout,
    "httpx-sync": httpx.ReadTimeout,
    "httpx2": httpx2.ReadTimeout,
    "requests": requests.ReadTimeout,
}
MISTAKE = {
    "httpx": httpx.UnsupportedProtocol,
    "httpx-sync": httpx.UnsupportedProtocol,
    "httpx2": httpx2.UnsupportedProtocol,
    "requests": ValueError,
}
TRACK = "/v1/tracks/4iV5W9uYEdYUVa79Axb7Rh"
"""A Spotify path: the guard names its endpoint ``/v1/tracks/{id}``."""


@pytest.fixture(scope="module")
def _upstream() -> Iterator[tuple[Upstream, str]]:
    upstream = Upstream()
    with serve(upstream, lifespan="off") as url:
        yield upstream, url


@pytest.fixture
def upstream(_upstream: tuple[Upstream, str]) -> Upstream:
    """The module's upstream, with no hits counted yet."""
    _upstream[0].reset()
    return _upstream[0]


@pytest.fixture
def up_url(_upstream: tuple[Upstream, str], upstream: Upstream) -> str:
    """Base URL of the upstream, e.g. http://127.0.0.1:PORT."""
    return _upstream[1]


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosServer]:
    with ChaosServer() as server:
        yield server


def settings(*urls: str, deadline_s: float | None = None, **groups: Any) -> GuardSettings:
    """spotify_api is every server at ``urls``, with group overrides."""
    hosts = [url.split("://", 1)[1] for url in urls]
    upstreams = {"spotify_api": {"hosts": hosts, **groups}}
    return GuardSettings(upstreams=upstreams, request_deadline_s=deadline_s)


class Client:
    """One of the four clients, guarded standalone, behind one async API."""

    def __init__(self, kind: str, guard: Guard) -> None:
        """Build the client the way a user would guard it without an app."""
        self.kind = kind
        self.client: Any
        if kind == "httpx":
            self.client = httpx.AsyncClient(transport=guard.async_transport())
        elif kind == "httpx2":
            transport = guard.async_transport(httpx2.AsyncHTTPTransport())
            self.client = httpx2.AsyncClient(transport=transport)
        elif kind == "httpx-sync":
            self.client = httpx.Client(transport=guard.sync_transport())
        else:
            self.client = guard.requests_session()

    async def get(self, url: str, **kwargs: Any) -> Any:
        """The client's own response to a GET (its body read), or the client's error."""
        if self.kind in ASYNC_KINDS:
            return await self.client.get(url, **kwargs)
        return await anyio.to_thread.run_sync(partial(self.client.get, url, **kwargs))

    async def raw(self, url: str) -> tuple[int, bytes]:
        """Status and body bytes as sent (not decoded), read through the client's stream API."""
        if self.kind in ASYNC_KINDS:
            async with self.client.stream("GET", url) as response:
                return response.status_code, b"".join([c async for c in response.aiter_raw()])
        return await anyio.to_thread.run_sync(self._raw_sync, url)

    def _raw_sync(self, url: str) -> tuple[int, bytes]:
        if self.kind == "requests":
            with self.client.get(url, stream=True) as response:
                return response.status_code, response.raw.read()
        with self.client.stream("GET", url) as response:
            return response.status_code, b"".join(response.iter_raw())

    async def mistake(self, base: str) -> Any:
        """A caller's own mistake: an unsupported scheme, or (requests) a timeout of "foo"."""
        if self.kind == "requests":
            return await self.get(base + TRACK, timeout="foo")
        return await self.get(base.replace("http://", "ftp://", 1) + TRACK)

    async def aclose(self) -> None:
        """Close the client and its connections."""
        if self.kind in ASYNC_KINDS:
            await self.client.aclose()
        else:
            self.client.close()


@asynccontextmanager
async def guarded(kind: str, guard: Guard) -> AsyncIterator[Client]:
    client = Client(kind, guard)
    try:
        yield client
    finally:
        await client.aclose()


# -- 1. the inbound request's deadline bounds the answer's body too --------------------------


def deadline_app(upstream_url: str, guard_settings: GuardSettings) -> Starlette:
    """Routes that read a whole upstream answer with each client, guarded by ``install``."""
    url = f"{upstream_url}{TRACK}?answer=drip"

    async def via_httpx(request: Request) -> JSONResponse:
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
        return JSONResponse({"bytes": len(response.content)})

    def via_httpx_sync(request: Request) -> JSONResponse:
        with httpx.Client() as client:
            response = client.get(url)
        return JSONResponse({"bytes": len(response.content)})

    async def via_httpx2(request: Request) -> JSONResponse:
        async with httpx2.AsyncClient() as client:
            response = await client.get(url)
        return JSONResponse({"bytes": len(response.content)})

    def via_requests(request: Request) -> JSONResponse:
        response = requests.get(url, timeout=10)
        return JSONResponse({"bytes": len(response.content)})

    handlers = [via_httpx, via_httpx_sync, via_httpx2, via_requests]
    app = Starlette(routes=[Route(f"/{k}", h) for k, h in zip(KINDS, handlers, strict=True)])
    install(app, settings=guard_settings)
    return app


@pytest.mark.parametrize("kind", KINDS)
def test_request_deadline_bounds_a_dripping_body(kind, up_url):
    """A 200 whose body drips past request_deadline_s ends in a 503 problem within the deadline."""
    app = deadline_app(
        up_url, settings(up_url, deadline_s=1, timeout={"attempt_s": 10, "total_s": 10})
    )
    with serve(app) as base, httpx.Client(timeout=10) as caller:
        started = time.monotonic()
        response = caller.get(f"{base}/{kind}")
        took = time.monotonic() - started
    assert response.status_code == 503, f"{response.status_code} after {took:.1f} s"
    assert took < 1.5
    assert response.headers["content-type"].startswith("application/problem+json")
    assert int(response.headers["retry-after"]) >= 1


# -- 2. a failed call raises the client's own error class, and ours --------------------------


@every_client
@pytest.mark.anyio
async def test_refused_connection_is_the_clients_connect_error(kind, chaos):
    """A refused connection raises the client's ConnectError that is also RetriesExhaustedError."""
    guard = Guard(settings(chaos.refused_url, retry={"attempts": 1}))
    async with guarded(kind, guard) as client:
        with pytest.raises(CONNECT_ERROR[kind]) as info:
            await client.get(chaos.refused_url + TRACK)
    assert isinstance(info.value, RetriesExhaustedError)
    assert isinstance(info.value, UpstreamUnavailable)
    assert info.value.upstream == "spotify_api"
    assert info.value.reason == "connect_error"


@every_client
@pytest.mark.anyio
async def test_attempt_timeout_is_the_clients_read_timeout(kind, chaos):
    """A hanging upstream past attempt_s raises the client's ReadTimeout, also RetriesExhaustedError."""
    timeout = {"attempt_s": 0.3, "total_s": 0.3}
    guard = Guard(settings(chaos.url, retry={"attempts": 1}, timeout=timeout))
    async with guarded(kind, guard) as client:
        started = time.monotonic()
        with pytest.raises(READ_TIMEOUT[kind]) as info:
            await client.get(f"{chaos.url}/v1/chaos/hang/{kind}")
        assert time.monotonic() - started < 2.0
    assert isinstance(info.value, RetriesExhaustedError)
    assert info.value.reason == "timeout"


# -- 3. a caller's mistake passes through untouched and never counts ------------------------


@every_client
@pytest.mark.anyio
async def test_callers_mistake_passes_through_and_never_counts(kind, up_url, upstream):
    """An unsupported scheme (requests: timeout="foo") raises the client's own error, uncounted."""
    guard = Guard(settings(up_url, breaker={"fail_max": 1}, retry={"attempts": 1}))
    async with guarded(kind, guard) as client:
        with pytest.raises(MISTAKE[kind]) as info:
            await client.mistake(up_url)
    assert type(info.value) is MISTAKE[kind]
    assert not isinstance(info.value, UpstreamUnavailable)
    assert guard.state("spotify_api") == "closed"
    assert sum(upstream.hits.values()) == 0


def test_requests_honours_a_urllib3_timeout_object(chaos):
    """requests' timeout=urllib3.Timeout(read=0.3) bounds the attempt, not the guard's attempt_s."""
    timeout = {"attempt_s": 3, "total_s": 3}
    guard = Guard(settings(chaos.url, retry={"attempts": 1}, timeout=timeout))
    with guard.requests_session() as session:
        started = time.monotonic()
        with pytest.raises(requests.ReadTimeout):
            session.get(
                f"{chaos.url}/v1/chaos/hang/urllib3",
                timeout=urllib3.util.Timeout(connect=1, read=0.3),
            )
        took = time.monotonic() - started
    assert 0.25 <= took < 1.5


# -- 4. failure answers arrive intact -------------------------------------------------------


@every_client
@pytest.mark.parametrize("status", sorted(FAILURES))
@pytest.mark.anyio
async def test_gzipped_failure_answer_arrives_intact(kind, status, up_url):
    """A gzipped 429/500/503 reaches the caller decoded as the original, with elapsed set."""
    guard = Guard(
        settings(up_url, breaker={"fail_max": 1}, retry={"attempts": 1, "max_retry_after_s": 1})
    )
    body, _ = FAILURES[status]
    async with guarded(kind, guard) as client:
        started = time.monotonic()
        response = await client.get(f"{up_url}{TRACK}?answer={status}")
        assert time.monotonic() - started < 1.0  # Retry-After: 30 is handed back, not waited
    assert response.status_code == status
    assert response.text == body.decode()
    if status != 503:
        assert response.json() == json.loads(body)
    assert response.elapsed.total_seconds() >= 0
    if status == 429:
        assert response.headers["retry-after"] == "30"
    # A 500 and Envoy's "no healthy upstream" (found inside the gzipped body) are failures.
    assert guard.state("spotify_api") == ("closed" if status == 429 else "open")


@every_client
@pytest.mark.parametrize("status", sorted(FAILURES))
@pytest.mark.anyio
async def test_streamed_failure_answer_keeps_its_bytes_as_sent(kind, status, up_url):
    """Streamed raw (requests: stream=True, r.raw.read()), a failure answer is the gzip as sent."""
    guard = Guard(settings(up_url, retry={"attempts": 1, "max_retry_after_s": 1}))
    async with guarded(kind, guard) as client:
        got_status, raw = await client.raw(f"{up_url}{TRACK}?answer={status}")
    assert got_status == status
    assert raw == GZIPPED[status]


@every_client
@pytest.mark.anyio
async def test_gzipped_no_healthy_upstream_is_recognised(kind, up_url, upstream):
    """Envoy's marker is found inside a gzipped body: the 503 is retried once, not to attempts."""
    retry = {"attempts": 4, "backoff_base_s": 0, "backoff_max_s": 0}
    guard = Guard(settings(up_url, breaker={"fail_max": 10}, retry=retry))
    async with guarded(kind, guard) as client:
        response = await client.get(f"{up_url}{TRACK}?answer=503")
    assert response.status_code == 503
    assert response.text == "no healthy upstream"
    assert upstream.hits["503"] == 2


# -- 5. every guarded call is an event for subscribers ---------------------------------------


@every_client
@pytest.mark.anyio
async def test_subscribers_see_one_event_per_call(kind, up_url):
    """subscribe() reports success, client_error, failure and refused calls; unsubscribe() stops."""
    from upstream_guard import CallEvent  # the new public API: missing until it lands

    guard = Guard(settings(up_url, breaker={"fail_max": 1}, retry={"attempts": 1}))
    events: list[Any] = []
    unsubscribe = guard.subscribe(events.append)
    async with guarded(kind, guard) as client:
        assert (await client.get(up_url + TRACK)).status_code == 200
        [ok] = events
        assert isinstance(ok, CallEvent)
        assert (ok.upstream, ok.endpoint, ok.method) == ("spotify_api", "/v1/tracks/{id}", "GET")
        assert (ok.outcome, ok.status, ok.attempts) == ("success", 200, 1)
        assert (ok.coalesced, ok.hedged) == (False, False)
        assert ok.duration_s >= 0
        with pytest.raises(dataclasses.FrozenInstanceError):
            ok.outcome = "failure"  # type: ignore[misc]

        with pytest.raises(MISTAKE[kind]):
            await client.mistake(up_url)
        assert events[-1].outcome == "client_error"

        assert (await client.get(f"{up_url}{TRACK}?answer=500")).status_code == 500
        assert (events[-1].outcome, events[-1].status) == ("failure", 500)
        assert guard.state("spotify_api") == "open"

        with pytest.raises(CircuitOpenError):
            await client.get(up_url + TRACK)
        refused = events[-1]
        assert (refused.outcome, refused.reason, refused.attempts) == ("refused", "circuit_open", 0)
        assert len(events) == 4

        unsubscribe()
        with pytest.raises(CircuitOpenError):
            await client.get(up_url + TRACK)
    assert len(events) == 4
