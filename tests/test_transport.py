"""The guarded call through httpx: async and sync drivers, against a real server on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from conftest import make_settings
from upstream_guard import (
    CircuitOpenError,
    Guard,
    GuardSettings,
    RateLimitedError,
    RetriesExhaustedError,
    UpstreamUnavailable,
)
from upstream_guard._guard import Guard as _Guard
from upstream_guard.testing import Fault

pytestmark = pytest.mark.anyio

Call = Callable[..., Awaitable[httpx.Response]]


def caller(kind: str, guard: _Guard, inner: Any = None) -> Call:
    """One way to send a request for both drivers: async client, or sync client in a thread."""
    if kind == "async":
        client = httpx.AsyncClient(transport=guard.async_transport(inner))

        async def call_async(method: str, url: str, **kw: Any) -> httpx.Response:
            return await client.request(method, url, **kw)

        return call_async
    sync_client = httpx.Client(transport=guard.sync_transport(inner))
    threads = anyio.CapacityLimiter(64)

    async def call_sync(method: str, url: str, **kw: Any) -> httpx.Response:
        return await anyio.to_thread.run_sync(
            lambda: sync_client.request(method, url, **kw), limiter=threads
        )

    return call_sync


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    """Both drivers."""
    return str(request.param)


def track(url: str, n: int = 0) -> str:
    return f"{url}/v1/tracks/{n:022d}"


async def test_no_healthy_upstream_trips_after_fail_max_then_refuses(kind, sim, sim_url, clock):
    """fail_max 503s open the breaker; the next call is refused without touching the network."""
    guard = Guard(
        make_settings(sim_url, breaker={"fail_max": 3}, retry={"attempts": 1}), clock=clock
    )
    call = caller(kind, guard)
    sim.set_fault(Fault.no_healthy_upstream())
    for i in range(3):
        response = await call("GET", track(sim_url, i))
        assert response.status_code == 503
        assert response.text == "no healthy upstream"
    assert guard.state("spotify_api") == "open"
    with pytest.raises(CircuitOpenError) as info:
        await call("GET", track(sim_url, 9))
    assert isinstance(info.value, httpx.TransportError)
    assert info.value.upstream == "spotify_api"
    assert info.value.retry_after_s == pytest.approx(30.0)
    assert sim.total_hits == 3


async def test_half_open_admits_exactly_max_probes_and_good_probe_closes(kind, sim, sim_url, clock):
    """After reset_timeout_s, 50 concurrent calls let half_open_max_calls probes through."""
    settings = make_settings(
        sim_url,
        breaker={"fail_max": 2, "reset_timeout_s": 10, "half_open_max_calls": 2},
        retry={"attempts": 1},
    )
    guard = Guard(settings, clock=clock)
    call = caller(kind, guard)
    sim.set_fault(Fault.json_5xx(500))
    for i in range(2):
        await call("GET", track(sim_url, i))
    assert guard.state("spotify_api") == "open"
    clock.advance(10)
    sim.heal()
    sim.set_fault(Fault.held())  # probes wait at the server until released
    refused: list[BaseException] = []
    statuses: list[int] = []
    all_refused = anyio.Event()
    lock = threading.Lock()

    async def one(i: int) -> None:
        try:
            statuses.append((await call("GET", track(sim_url, i))).status_code)
        except CircuitOpenError as exc:
            with lock:
                refused.append(exc)
                if len(refused) == 48:
                    all_refused.set()

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)
        await all_refused.wait()
        sim.release()
    assert len(refused) == 48
    assert statuses == [200, 200]
    assert sim.total_hits == 2
    assert guard.state("spotify_api") == "closed"


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_client_errors_never_trip(kind, sim, sim_url, clock, status):
    """A user's 401/403/404 is not ill health: never retried, never trips."""
    guard = Guard(make_settings(sim_url, breaker={"fail_max": 2}), clock=clock)
    call = caller(kind, guard)
    sim.set_fault(Fault.respond(status, "Missing/invalid/expired access token"))
    for i in range(6):
        assert (await call("GET", track(sim_url, i))).status_code == status
    assert guard.state("spotify_api") == "closed"
    assert sim.total_hits == 6


async def test_throttling_never_trips(kind, sim, sim_url, clock):
    """429s pause calls but never open the breaker."""
    guard = Guard(make_settings(sim_url, breaker={"fail_max": 2}), clock=clock)
    call = caller(kind, guard)
    sim.set_fault(Fault.rate_limited(0))
    for i in range(6):
        assert (await call("GET", track(sim_url, i))).status_code == 429
    assert guard.state("spotify_api") == "closed"


async def test_get_retried_on_503_succeeds_on_third_attempt(kind, sim, sim_url, clock):
    """A GET is retried with backoff on the fake clock and succeeds on the third attempt."""
    guard = Guard(make_settings(sim_url, retry={"attempts": 3}), clock=clock)
    call = caller(kind, guard)
    sim.script([Fault.no_healthy_upstream(), Fault.json_5xx(503), Fault.healthy()])
    response = await call("GET", track(sim_url))
    assert response.status_code == 200
    assert response.json()["type"] == "track"
    assert sim.total_hits == 3
    assert len(clock.slept) == 2
    assert all(0 <= s <= 2.0 for s in clock.slept)


async def test_no_healthy_upstream_is_retried_at_most_once(kind, sim, sim_url, clock):
    """Two 'no healthy upstream' in a row end the call: the edge has nothing to route to."""
    guard = Guard(make_settings(sim_url, retry={"attempts": 5}), clock=clock)
    call = caller(kind, guard)
    sim.set_fault(Fault.no_healthy_upstream())
    response = await call("GET", track(sim_url))
    assert response.status_code == 503
    assert sim.total_hits == 2


async def test_post_is_sent_once(kind, sim, sim_url, clock):
    """POST is never retried: the upstream may have acted on it."""
    guard = Guard(make_settings(sim_url, retry={"attempts": 3}), clock=clock)
    call = caller(kind, guard)
    sim.set_fault(Fault.json_5xx(503))
    response = await call("POST", f"{sim_url}/v1/me/player/next")
    assert response.status_code == 503
    assert sim.total_hits == 1


async def test_long_retry_after_ends_call_and_cools_down(kind, sim, sim_url):
    """Retry-After: 30 over a 0.5 s cap returns at once; the next call is refused locally."""
    guard = Guard(make_settings(sim_url, retry={"max_retry_after_s": 0.5}))
    call = caller(kind, guard)
    sim.set_fault(Fault.rate_limited(30))
    started = time.monotonic()
    response = await call("GET", track(sim_url))
    assert time.monotonic() - started < 1.0
    assert response.status_code == 429
    with pytest.raises(RateLimitedError) as info:
        await call("GET", track(sim_url, 1))
    assert info.value.retry_after_s == pytest.approx(30, abs=1)
    assert isinstance(info.value, httpx.TransportError)
    assert sim.total_hits == 1


async def test_short_retry_after_is_honoured(kind, sim, sim_url, clock):
    """A Retry-After within the cap is waited for (on the fake clock) and the retry succeeds."""
    guard = Guard(make_settings(sim_url, retry={"max_retry_after_s": 2}), clock=clock)
    call = caller(kind, guard)
    sim.script([Fault.rate_limited(1), Fault.healthy()])
    assert (await call("GET", track(sim_url))).status_code == 200
    assert clock.slept == [1.0]
    assert sim.total_hits == 2


@pytest.mark.parametrize(
    "value", ["garbage", "-3", "", "99999999999", "Thu, 01 Jan 1970 00:00:00 GMT"]
)
async def test_bad_retry_after_never_sleeps_past_cap(kind, sim, sim_url, clock, value):
    """Garbage, negative, empty, huge or past Retry-After values never sleep beyond the cap."""
    guard = Guard(make_settings(sim_url, retry={"max_retry_after_s": 1}), clock=clock)
    call = caller(kind, guard)
    sim.script([Fault.rate_limited(value), Fault.healthy()])
    response = await call("GET", track(sim_url))
    assert response.status_code in (200, 429)
    assert all(s <= 1.0 for s in clock.slept)


async def test_attempt_timeouts_count_as_failures(kind, sim, sim_url, clock):
    """A hanging upstream times out per attempt (httpx's own timeouts) and trips the breaker."""
    settings = make_settings(
        sim_url,
        breaker={"fail_max": 2},
        retry={"attempts": 1},
        timeout={"attempt_s": 0.2, "total_s": 1},
    )
    guard = Guard(settings, clock=clock)
    call = caller(kind, guard)
    sim.set_fault(Fault.hang())
    for i in range(2):
        with pytest.raises(RetriesExhaustedError) as info:
            await call("GET", track(sim_url, i))
        assert info.value.reason == "timeout"
        assert isinstance(info.value.__cause__, httpx.TimeoutException)
    assert guard.state("spotify_api") == "open"


async def test_timeout_through_cancel_scope_for_other_transports(clock):
    """An inner transport that ignores httpx timeouts is bounded by a cancel scope instead."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError

    settings = make_settings(
        "http://api.test",
        breaker={"fail_max": 1},
        retry={"attempts": 1},
        timeout={"attempt_s": 0.1},
    )
    guard = Guard(settings, clock=clock)
    call = caller("async", guard, httpx.MockTransport(handler))
    with pytest.raises(RetriesExhaustedError, match="timeout"):
        await call("GET", "http://api.test/v1/me")
    assert guard.state("spotify_api") == "open"


async def test_cancelled_calls_leave_the_breaker_closed(clock):
    """Five calls cancelled mid-flight count as neither success nor failure."""
    entered = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError

    guard = Guard(make_settings("http://api.test", breaker={"fail_max": 1}), clock=clock)
    call = caller("async", guard, httpx.MockTransport(handler))
    for _ in range(5):
        entered = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "GET", "http://api.test/v1/me")
            await entered.wait()
            tg.cancel_scope.cancel()
    assert guard.state("spotify_api") == "closed"
    assert guard.snapshot()["upstreams"]["spotify_api"]["failures"] == 0


async def test_cancelled_probe_frees_its_slot(clock):
    """A half-open probe that is cancelled gives its slot back: half-open never sticks."""
    entered = anyio.Event()
    mode = {"hang": True}

    async def handler(request: httpx.Request) -> httpx.Response:
        if mode["hang"]:
            entered.set()
            await anyio.sleep_forever()
        return httpx.Response(200, json={})

    guard = Guard(make_settings("http://api.test", breaker={"reset_timeout_s": 5}), clock=clock)
    guard.upstreams["spotify_api"].breakers["spotify_api"].force_open()
    clock.advance(5)
    call = caller("async", guard, httpx.MockTransport(handler))
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "GET", "http://api.test/v1/me")
        await entered.wait()
        with pytest.raises(CircuitOpenError):  # the only probe slot is taken
            await call("GET", "http://api.test/v1/me")
        tg.cancel_scope.cancel()
    mode["hang"] = False
    assert (await call("GET", "http://api.test/v1/me")).status_code == 200
    assert guard.state("spotify_api") == "closed"


async def test_unguarded_hosts_pass_straight_through(kind, clock):
    """Hosts outside every upstream are not retried, counted or refused."""
    hits: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(str(request.url))
        return httpx.Response(503, text="no healthy upstream")

    guard = Guard(make_settings("http://api.test", breaker={"fail_max": 1}), clock=clock)
    call = caller(kind, guard, httpx.MockTransport(handler))
    for _ in range(5):
        assert (await call("GET", "http://i.scdn.co/image/abc")).status_code == 503
    assert len(hits) == 5
    assert guard.snapshot()["status"] == "ok"


async def test_sync_and_async_share_breakers(sim, sim_url, clock):
    """A breaker tripped through the sync transport refuses async calls too."""
    guard = Guard(
        make_settings(sim_url, breaker={"fail_max": 2}, retry={"attempts": 1}), clock=clock
    )
    sync_call, async_call = caller("sync", guard), caller("async", guard)
    sim.set_fault(Fault.json_5xx(502))
    for i in range(2):
        await sync_call("GET", track(sim_url, i))
    with pytest.raises(CircuitOpenError):
        await async_call("GET", track(sim_url))


async def test_streamed_request_body_is_replayed_on_retry(clock):
    """A PUT with a streamed body sends the whole body again on its retry."""
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(503 if len(bodies) == 1 else 200)

    async def stream():
        yield b'{"uris": '
        yield b'["spotify:track:abc"]}'

    guard = Guard(make_settings("http://api.test"), clock=clock)
    call = caller("async", guard, httpx.MockTransport(handler))
    response = await call("PUT", "http://api.test/v1/me/player/play", content=stream())
    assert response.status_code == 200
    assert bodies == [b'{"uris": ["spotify:track:abc"]}'] * 2


async def test_exhausted_connect_errors_raise_transport_error(kind, clock):
    """With no response at all, exhausted retries raise an error httpx callers already catch."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    guard = Guard(make_settings("http://api.test", retry={"attempts": 2}), clock=clock)
    call = caller(kind, guard, httpx.MockTransport(handler))
    with pytest.raises(httpx.TransportError) as info:
        await call("GET", "http://api.test/v1/me")
    assert isinstance(info.value, RetriesExhaustedError)
    assert isinstance(info.value, UpstreamUnavailable)
    assert info.value.reason == "connect_error"
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_deadline_bounds_all_retries(kind, clock):
    """Backoffs never carry a call past timeout.total_s."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500)

    settings = make_settings(
        "http://api.test",
        breaker={"fail_max": 100},
        retry={"attempts": 10, "backoff_base_s": 0.5, "backoff_max_s": 5},
        timeout={"attempt_s": 1, "total_s": 2},
    )
    guard = Guard(settings, clock=clock)
    call = caller(kind, guard, httpx.MockTransport(handler))
    start = clock.monotonic()
    assert (await call("GET", "http://api.test/v1/me")).status_code == 500
    assert clock.monotonic() - start <= 2.0


async def test_slow_calls_count_as_failures(clock):
    """With slow_call_s set, successes slower than it trip the breaker."""

    def handler(request: httpx.Request) -> httpx.Response:
        clock.advance(3)
        return httpx.Response(200, json={})

    settings = make_settings("http://api.test", breaker={"fail_max": 2, "slow_call_s": 2})
    guard = Guard(settings, clock=clock)
    call = caller("async", guard, httpx.MockTransport(handler))
    for _ in range(2):
        assert (await call("GET", "http://api.test/v1/me")).status_code == 200
    assert guard.state("spotify_api") == "open"


async def test_failure_ratio_trips_without_consecutive_failures(clock):
    """Alternating failures reach failure_ratio over the window and open the breaker."""
    n = {"i": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        n["i"] += 1
        return httpx.Response(500 if n["i"] % 2 else 200, json={})

    settings = make_settings(
        "http://api.test",
        breaker={"fail_max": 50, "failure_ratio": 0.5, "minimum_calls": 10, "window_s": 30},
        retry={"attempts": 1},
    )
    guard = Guard(settings, clock=clock)
    call = caller("async", guard, httpx.MockTransport(handler))
    for _ in range(9):
        await call("GET", "http://api.test/v1/me")
    assert guard.state("spotify_api") == "closed"
    await call("GET", "http://api.test/v1/me")
    await call("GET", "http://api.test/v1/me")
    assert guard.state("spotify_api") == "open"


async def test_endpoint_scope_isolates_endpoints(clock):
    """With scope=endpoint, a failing endpoint does not refuse calls to a healthy one."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if request.url.path.startswith("/v1/search") else 200, json={})

    settings = make_settings(
        "http://api.test", breaker={"fail_max": 2, "scope": "endpoint"}, retry={"attempts": 1}
    )
    guard = Guard(settings, clock=clock)
    call = caller("async", guard, httpx.MockTransport(handler))
    for q in ("a", "b"):
        await call("GET", f"http://api.test/v1/search?q={q}")
    with pytest.raises(CircuitOpenError):
        await call("GET", "http://api.test/v1/search?q=c")
    assert (await call("GET", "http://api.test/v1/tracks/abc")).status_code == 200
    assert guard.state("spotify_api") == "open"
    breakers = guard.snapshot()["upstreams"]["spotify_api"]["breakers"]
    assert breakers == {"spotify_api /v1/search": "open", "spotify_api /v1/tracks/{id}": "closed"}


async def test_bulkhead_refuses_past_max_concurrency(clock):
    """max_concurrency calls in flight: the next is refused at once, not queued."""
    entered = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError

    settings = GuardSettings(
        upstreams={"spotify_api": {"hosts": ["api.test"], "max_concurrency": 1}}
    )
    guard = Guard(settings, clock=clock)
    call = caller("async", guard, httpx.MockTransport(handler))
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "GET", "http://api.test/v1/me")
        await entered.wait()
        with pytest.raises(UpstreamUnavailable, match="in flight"):  # (an identical GET follows)
            await call("GET", "http://api.test/v1/me/playlists")
        tg.cancel_scope.cancel()
    assert guard.upstreams["spotify_api"].bulkhead is not None
    assert guard.upstreams["spotify_api"].bulkhead.in_flight == 0


async def test_internationalised_hosts_and_encoded_paths_are_guarded(kind, clock):
    """A host configured in Unicode matches the punycode clients send; encoded paths match."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.raw_host.decode())
        return httpx.Response(503, text="no healthy upstream")

    shop = {
        "hosts": ["Bücher.test", "straße.test"],  # IDNA 2008 keeps the ß (xn--strae-oqa)
        "templates": ["/v1/users/{user_id}/playlists"],
        "breaker": {"fail_max": 2},
        "retry": {"attempts": 1},
    }
    guard = Guard(GuardSettings(upstreams={"shop": shop}), clock=clock)
    records: list[Any] = []
    guard.subscribe(records.append)
    call = caller(kind, guard, httpx.MockTransport(handler))
    for _ in range(2):
        await call("GET", "https://bücher.test/v1/users/some%20user/playlists?limit=5")
    assert sent == ["xn--bcher-kva.test"] * 2
    assert [(r.upstream, r.endpoint) for r in records] == [
        ("shop", "/v1/users/{user_id}/playlists")
    ] * 2
    assert guard.state("shop") == "open"
    with pytest.raises(CircuitOpenError):
        await call("GET", "https://xn--bcher-kva.test/v1/users/x/playlists")
    with pytest.raises(CircuitOpenError):
        await call("GET", "https://straße.test/v1/users/x/playlists")


async def test_encoded_paths_match_their_template(kind, clock):
    """A percent-encoded path matches its template; other hosts are not guarded."""
    guard = Guard(make_settings("http://api.test"), clock=clock)
    records: list[Any] = []
    guard.subscribe(records.append)
    call = caller(kind, guard, httpx.MockTransport(lambda _: httpx.Response(200)))
    assert (await call("GET", "http://api.test/v1/tracks/a%20b")).status_code == 200
    assert (await call("GET", "http://other.test/v1/tracks/x")).status_code == 200
    assert [(r.upstream, r.endpoint) for r in records] == [("spotify_api", "/v1/tracks/{id}")]


async def test_a_streamed_body_is_buffered_before_the_call_starts(kind, clock):
    """Time spent reading a streamed upload is not an attempt's: no slow call, full timeout."""
    timeouts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        return httpx.Response(200)

    upload = {
        "hosts": ["upload.test"],
        "breaker": {"slow_call_s": 2.0},
        "timeout": {"total_s": 5.0, "attempt_s": 4.0},
    }
    guard = Guard(GuardSettings(upstreams={"upload": upload}), clock=clock)
    call = caller(kind, guard, httpx.MockTransport(handler))

    def trickle() -> Any:
        clock.advance(3.0)  # the upload trickles in for 3 s before the guard can send it
        yield b"x"

    async def trickle_async() -> Any:
        for chunk in trickle():
            yield chunk

    body = trickle_async() if kind == "async" else trickle()
    assert (await call("PUT", "http://upload.test/a", content=body)).status_code == 200
    assert timeouts == [4.0]
    assert guard.upstreams["upload"].breakers["upload"].failures_total == 0
