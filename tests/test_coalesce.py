"""Coalescing: concurrent identical calls share one upstream call, per caller identity.

Real clients (httpx, httpx2, httpx.Client, requests) against a real loopback server that
counts the calls it gets and holds them until released, so that callers meet in flight.
"""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import make_settings
from herd_server import HerdServer, who
from otel_sdk import install_sdk, metric_total
from upstream_guard import (
    CallEvent,
    Guard,
    GuardSettings,
    RetriesExhaustedError,
    UpstreamGuardMiddleware,
    UpstreamUnavailable,
)
from upstream_guard.testing import FakeClock, serve

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": "Bearer user-a-token"}
PLAYLIST = "/v1/playlists/37i9dQZF1DXcBWIGoYBM5M?market=SE&fields=name"
Get = Callable[..., Awaitable[Any]]


@pytest.fixture(scope="module")
def _herd() -> Any:
    app = HerdServer()
    with serve(app) as url:
        yield app, url


@pytest.fixture
def herd(_herd: tuple[HerdServer, str]) -> Any:
    """The counting server, healthy, not holding, with no hits."""
    app, _ = _herd
    app.reset()
    yield app
    app.release()


@pytest.fixture
def herd_url(_herd: tuple[HerdServer, str], herd: HerdServer) -> str:
    """The counting server's base URL."""
    return _herd[1]


def client_get(kind: str, guard: Guard) -> Get:
    """``await get(url, headers=...)`` through a real client of ``kind``, guarded."""
    if kind == "httpx":
        client = httpx.AsyncClient(transport=guard.async_transport())
        return client.get
    if kind == "httpx2":
        httpx2 = pytest.importorskip("httpx2")
        client2 = httpx2.AsyncClient(transport=guard.async_transport(httpx2.AsyncHTTPTransport()))
        return client2.get  # type: ignore[no-any-return]
    if kind == "httpx_sync":
        sync = httpx.Client(transport=guard.sync_transport())
        return lambda url, **kw: anyio.to_thread.run_sync(partial(sync.get, url, **kw))
    session = guard.requests_session()
    return lambda url, **kw: anyio.to_thread.run_sync(partial(session.get, url, timeout=10, **kw))


def response_type(kind: str) -> type[Any]:
    """The response class each client hands back."""
    if kind == "requests":
        import requests

        return requests.Response
    if kind == "httpx2":
        import httpx2

        return httpx2.Response  # type: ignore[no-any-return]
    return httpx.Response


async def until(done: Callable[[], bool]) -> None:
    """Wait for real callers and a real server to get there (at most 5 s)."""
    with anyio.fail_after(5):
        while not done():  # noqa: ASYNC110 - threads and a server change it, not tasks
            await anyio.sleep(0.002)  # sleep-ok: polling real tasks, threads and sockets


def waiting(guard: Guard, upstream: str = "spotify_api") -> int:
    """Callers waiting for an identical call in flight."""
    flights = guard.upstreams[upstream].flights
    assert flights is not None
    return sum(c.flight.waiters for c in list(flights.leaders.values()) if c.flight is not None)


async def herd_of(
    n: int, call: Callable[[], Awaitable[Any]], herd: HerdServer, guard: Guard
) -> Any:
    """Start ``n`` calls while the server holds; release once one is in and the rest wait."""
    results: list[Any] = []

    async def one() -> None:
        results.append(await call())

    herd.hold()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
        await until(lambda: herd.total >= 1 and waiting(guard) == n - 1)
        herd.release()
    return results


@pytest.mark.parametrize("kind", ["httpx", "httpx2", "httpx_sync", "requests"])
async def test_twenty_identical_gets_make_one_call(herd, herd_url, clock, kind):
    """20 concurrent identical GETs by one identity: 1 upstream call, 20 own correct answers."""
    guard = Guard(make_settings(herd_url), clock=clock)
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    get = client_get(kind, guard)
    results = await herd_of(20, lambda: get(herd_url + PLAYLIST, headers=AUTH), herd, guard)
    assert herd.total == 1
    assert len(results) == 20
    assert len({id(r) for r in results}) == 20  # each caller its own response object
    for response in results:
        assert isinstance(response, response_type(kind))
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["path"] == "/v1/playlists/37i9dQZF1DXcBWIGoYBM5M"
        assert body["query"] == "market=SE&fields=name"
        assert body["who"] == who(AUTH["Authorization"])
    assert sorted(e.coalesced for e in events) == [False] + [True] * 19
    assert {e.outcome for e in events} == {"success"}
    flights = guard.upstreams["spotify_api"].flights
    assert flights is not None
    assert not flights.calls
    assert not flights.leaders


async def test_ten_identities_make_ten_calls_and_never_see_each_other(herd, herd_url, clock):
    """Per identity one call: each caller gets its own user's answer, never another's."""
    guard = Guard(make_settings(herd_url), clock=clock)
    get = client_get("httpx", guard)
    identities = [{"Authorization": f"Bearer user-{i}-token"} for i in range(10)]
    # The same user in another language, and with a cookie, is another answer too.
    identities.append({**identities[0], "Accept-Language": "sv-SE"})
    identities.append({**identities[0], "Cookie": "sp_dc=other-session"})
    asked: list[tuple[dict[str, str], Any]] = []

    async def ask(headers: dict[str, str]) -> None:
        asked.append((headers, await get(herd_url + PLAYLIST, headers=headers)))

    herd.hold()
    async with anyio.create_task_group() as tg:
        for headers in identities * 3:
            tg.start_soon(ask, headers)
        await until(lambda: herd.total == len(identities) and waiting(guard) == 2 * len(identities))
        herd.release()
    assert herd.total == len(identities)
    assert len(asked) == 3 * len(identities)
    for headers, response in asked:
        body = response.json()
        assert body["who"] == who(headers["Authorization"])
        assert body["language"] == headers.get("Accept-Language", "")


@pytest.mark.parametrize("kind", ["httpx", "httpx_sync", "requests"])
async def test_header_names_and_order_do_not_split_a_key_but_values_do(herd, herd_url, clock, kind):
    """Same identity in other header case and order: one call; another language: its own."""
    guard = Guard(make_settings(herd_url), clock=clock)
    get = client_get(kind, guard)
    token = AUTH["Authorization"]
    same = [
        {"Authorization": token, "Accept-Language": "sv-SE", "Accept": "application/json"},
        {"accept": "application/json", "ACCEPT-LANGUAGE": "sv-SE", "authorization": token},
    ]
    other = {**same[0], "Accept-Language": "en-GB"}
    asked: list[tuple[str, Any]] = []

    async def ask(headers: dict[str, str]) -> None:
        language = next(v for k, v in headers.items() if k.lower() == "accept-language")
        asked.append((language, await get(herd_url + PLAYLIST, headers=headers)))

    herd.hold()
    async with anyio.create_task_group() as tg:
        for headers in [*same * 3, other, other]:
            tg.start_soon(ask, headers)
        await until(lambda: herd.total == 2 and waiting(guard) == 6)
        herd.release()
    assert herd.total == 2
    assert sorted(language for language, _ in asked) == ["en-GB"] * 2 + ["sv-SE"] * 6
    for language, response in asked:
        assert response.status_code == 200
        assert response.json()["language"] == language


async def test_a_follower_stops_at_its_own_deadline_and_the_leader_goes_on(herd, herd_url, clock):
    """A follower with a shorter deadline gives up at it (a 503 inbound); the leader answers."""
    hostport = herd_url.split("://", 1)[1]
    settings = GuardSettings(
        upstreams={"spotify_api": {"hosts": [hostport]}}, request_deadline_s=1.0
    )
    guard = Guard(settings, clock=clock)
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    upstream = httpx.AsyncClient(transport=guard.async_transport())

    async def playlist(request: Request) -> JSONResponse:
        answer = await upstream.get(herd_url + PLAYLIST, headers=AUTH)
        return JSONResponse(answer.json())

    app = Starlette(
        routes=[Route("/p", playlist)],
        middleware=[Middleware(UpstreamGuardMiddleware, guard=guard)],
    )
    inbound = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
    herd.hold()
    got: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:

        async def lead() -> None:
            got["leader"] = await upstream.get(herd_url + PLAYLIST, headers=AUTH)

        tg.start_soon(lead)
        await until(lambda: herd.total == 1)
        started = clock.monotonic()
        got["inbound"] = await inbound.get("/p")  # follows, then its 1 s deadline passes
        assert clock.monotonic() - started == pytest.approx(1.0)
        assert "leader" not in got  # the leader still waits for its answer
        herd.release()
    assert got["inbound"].status_code == 503
    assert got["inbound"].headers["content-type"] == "application/problem+json"
    assert got["leader"].status_code == 200
    assert herd.total == 1
    follower = next(e for e in events if e.coalesced)
    assert (follower.outcome, follower.reason) == ("failure", "deadline")
    assert guard.state("spotify_api") == "closed"


async def led_again(
    call: Callable[[], Awaitable[Any]], herd: HerdServer, guard: Guard, followers: int
) -> list[Any]:
    """The leader's caller is cancelled while ``followers`` wait, and its call with it.

    Returns the followers' results, once one of them has sent the call again and the others
    wait for it (the server holds both calls until then).
    """
    results: list[Any] = []
    herd.hold()
    async with anyio.create_task_group() as tg:
        leader_scope = anyio.CancelScope()

        async def lead() -> None:
            with leader_scope:
                await call()

        tg.start_soon(lead)
        await until(lambda: herd.total == 1)

        async def follow() -> None:
            results.append(await call())

        for _ in range(followers):
            tg.start_soon(follow)
        await until(lambda: waiting(guard) == followers)
        leader_scope.cancel()
        await until(lambda: herd.total == 2 and waiting(guard) == followers - 1)
        herd.release()
    return results


async def test_a_cancelled_leader_leaves_its_followers_answered(herd, herd_url, clock):
    """A cold key (default settings): the leader's call is cancelled; a follower leads on."""
    guard = Guard(make_settings(herd_url), clock=clock)
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    get = client_get("httpx", guard)
    results = await led_again(partial(get, herd_url + PLAYLIST, headers=AUTH), herd, guard, 5)
    assert [r.status_code for r in results] == [200] * 5
    assert {r.json()["who"] for r in results} == {who(AUTH["Authorization"])}
    outcomes = sorted((e.outcome, e.coalesced) for e in events)
    assert outcomes == [("cancelled", False), ("success", False)] + [("success", True)] * 4
    assert herd.total == 2  # the cancelled attempt, and the one a follower made in its place
    assert guard.state("spotify_api") == "closed"


DETACHED = {"detach_leaders": "always"}


async def cancelled_leader(
    call: Callable[[], Awaitable[Any]],
    herd: HerdServer,
    guard: Guard,
    followers: int,
    upstream: str = "spotify_api",
) -> list[Any]:
    """The leader's caller is cancelled while ``followers`` wait: it must leave at once.

    Returns the followers' results; fails if the leader's caller still waited for the
    upstream (held by the server until after the leader's caller is gone).
    """
    results: list[Any] = []
    left = anyio.Event()
    herd.hold()
    async with anyio.create_task_group() as tg:
        leader_scope = anyio.CancelScope()

        async def lead() -> None:
            with leader_scope:
                await call()
                raise AssertionError("the leader's call cannot end while the server holds")
            left.set()

        async def follow() -> None:
            results.append(await call())

        tg.start_soon(lead)
        await until(lambda: herd.total == 1)
        for _ in range(followers):
            tg.start_soon(follow)
        await until(lambda: waiting(guard, upstream) == followers)
        leader_scope.cancel()
        with anyio.fail_after(5):
            await left.wait()  # promptly: the server still holds the shared call
        assert herd.total == 1
        assert waiting(guard, upstream) == followers
        herd.release()
    return results


async def test_a_cancelled_leader_keeps_the_shared_call_with_detach_leaders(herd, herd_url, clock):
    """detach_leaders: the leader's caller leaves at once; 19 followers, 1 upstream call."""
    guard = Guard(make_settings(herd_url, coalesce=DETACHED), clock=clock)
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    get = client_get("httpx", guard)
    call = partial(get, herd_url + PLAYLIST, headers=AUTH)
    results = await cancelled_leader(call, herd, guard, followers=19)
    assert herd.total == 1
    assert herd.disconnects == 0
    assert [r.status_code for r in results] == [200] * 19
    assert {r.json()["who"] for r in results} == {who(AUTH["Authorization"])}
    await until(lambda: len(events) == 20)  # the shared call records itself once it ends
    outcomes = sorted((e.outcome, e.coalesced) for e in events)
    assert outcomes == [("success", False)] + [("success", True)] * 19
    flights = guard.upstreams["spotify_api"].flights
    assert flights is not None
    assert not flights.leaders
    assert not flights.leads


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # asyncio's own cancellation
@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout"])
async def test_asyncio_cancellation_of_a_detached_leader(herd, herd_url, clock, anyio_backend, how):
    """detach_leaders "always": task.cancel() or asyncio.timeout on the leader; 1 call for all."""
    import asyncio

    guard = Guard(make_settings(herd_url, coalesce=DETACHED), clock=clock)
    get = client_get("httpx", guard)
    call = partial(get, herd_url + PLAYLIST, headers=AUTH)
    timeout = asyncio.timeout(None)

    async def lead() -> Any:
        if how == "task.cancel":
            return await call()
        async with timeout:
            return await call()

    herd.hold()
    leader = asyncio.ensure_future(lead())
    await until(lambda: herd.total == 1)
    followers = [asyncio.ensure_future(call()) for _ in range(5)]
    await until(lambda: waiting(guard) == 5)
    if how == "task.cancel":
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(leader, 5)
    else:
        timeout.reschedule(asyncio.get_running_loop().time())  # it expires now
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(leader, 5)
    assert herd.total == 1  # the server still holds the shared call: the leader left at once
    assert waiting(guard) == 5
    herd.release()
    results = await asyncio.gather(*followers)
    assert [r.status_code for r in results] == [200] * 5
    assert herd.total == 1
    assert herd.disconnects == 0


def instrumented_get(guard: Guard) -> Get:
    """``await get(url, headers=...)`` through a plain httpx.AsyncClient, guard instrumented."""
    guard.instrument()
    return httpx.AsyncClient().get


@pytest.mark.parametrize("kind", ["httpx", "httpx2", "instrumented"])
async def test_a_hot_keys_cancelled_leader_keeps_the_shared_call_by_default(
    herd, herd_url, clock, kind
):
    """Default settings: a key shared once is hot; its next herd's leader leaves, 1 call."""
    guard = Guard(make_settings(herd_url), clock=clock)
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    get = instrumented_get(guard) if kind == "instrumented" else client_get(kind, guard)
    call = partial(get, herd_url + PLAYLIST, headers=AUTH)
    assert [r.status_code for r in await herd_of(2, call, herd, guard)] == [200] * 2
    herd.hits.clear()
    events.clear()
    results = await cancelled_leader(call, herd, guard, followers=19)
    assert herd.total == 1
    assert herd.disconnects == 0
    assert [r.status_code for r in results] == [200] * 19
    assert {r.json()["who"] for r in results} == {who(AUTH["Authorization"])}
    await until(lambda: len(events) == 20)  # the shared call records itself once it ends
    outcomes = sorted((e.outcome, e.coalesced) for e in events)
    assert outcomes == [("success", False)] + [("success", True)] * 19
    flights = guard.upstreams["spotify_api"].flights
    assert flights is not None
    assert not flights.leaders
    assert not flights.leads


async def test_hotness_expires_after_hot_s_and_the_table_keeps_the_newest(herd, herd_url, clock):
    """A key is hot for ``hot_s`` after its last follower; at most ``max_in_flight`` keys."""
    guard = Guard(make_settings(herd_url, coalesce={"hot_s": 30, "max_in_flight": 3}), clock=clock)
    get = client_get("httpx", guard)
    flights = guard.upstreams["spotify_api"].flights
    assert flights is not None

    def track(i: int, auth: dict[str, str] = AUTH) -> Awaitable[Any]:
        return get(f"{herd_url}/v1/tracks/{i}", headers=auth)

    async def shared(i: int) -> None:  # a herd of two: the key gets a follower
        herd.hits.clear()
        assert [r.status_code for r in await herd_of(2, partial(track, i), herd, guard)] == [
            200
        ] * 2

    async def kept(i: int, auth: dict[str, str] = AUTH) -> bool:  # the cancelled leader's call
        herd.hits.clear()
        herd.disconnects = 0
        if len(await led_or_kept(partial(track, i, auth), herd, guard)) != 3:
            raise AssertionError("each follower gets an answer")
        return herd.total == 1

    for i in range(5):  # five keys followed, a second apart: only the newest 3 are kept
        await shared(i)
        clock.advance(1)
    assert (len(flights.hot), len(flights.hot_urls)) == (3, 3)
    assert not await kept(0)  # dropped, the oldest first: cold again
    assert not await kept(4, {"Authorization": "Bearer user-b-token"})  # hot for user a only
    assert await kept(4)
    clock.advance(29.5)  # 29.5 s after track 4's last follower: still hot
    assert await kept(4)
    clock.advance(30)  # 30 s after it: cold
    assert not await kept(4)
    clock.advance(30)
    await shared(9)  # every other key has cooled by now, and goes when the table is looked at
    assert (len(flights.hot), len(flights.hot_urls)) == (1, 1)


async def led_or_kept(call: Callable[[], Awaitable[Any]], herd: HerdServer, guard: Guard) -> Any:
    """A leader's caller cancelled while 3 wait: its call goes on (detached) or is made again."""
    results: list[Any] = []
    left = anyio.Event()
    herd.hold()
    async with anyio.create_task_group() as tg:
        leader_scope = anyio.CancelScope()

        async def lead() -> None:
            with leader_scope:
                await call()
            left.set()

        async def follow() -> None:
            results.append(await call())

        tg.start_soon(lead)
        await until(lambda: herd.total == 1)
        for _ in range(3):
            tg.start_soon(follow)
        await until(lambda: waiting(guard) == 3)
        leader_scope.cancel()
        with anyio.fail_after(5):
            await left.wait()  # detached or not, the caller leaves while the server holds
        # Detached, the leader's call is still the one the server holds, and 3 wait for it;
        # not, a follower sends it again and 2 wait for that one.
        await until(
            lambda: (
                (herd.total == 1 and herd.disconnects == 0 and waiting(guard) == 3)
                or (herd.total == 2 and waiting(guard) == 2)
            )
        )
        herd.release()
    return results


@pytest.mark.parametrize("detach", ["never", "hot", "always"])
async def test_a_lone_cancelled_call_is_cancelled_at_once(herd, herd_url, clock, detach):
    """No followers: a cancelled caller's call is cancelled (the server sees the client go)."""
    guard = Guard(make_settings(herd_url, coalesce={"detach_leaders": detach}), clock=clock)
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    get = client_get("httpx", guard)
    herd.hold()
    with anyio.move_on_after(5) as waited:  # never reached: the test cancels first
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def call() -> None:
                with scope:
                    await get(herd_url + PLAYLIST, headers=AUTH)

            tg.start_soon(call)
            await until(lambda: herd.total == 1)
            scope.cancel()
        # The call was over when its caller saw the cancellation: recorded, as without
        # detaching; the connection it had is closed, and the server sees it go.
        assert [(e.outcome, e.coalesced) for e in events] == [("cancelled", False)]
        await until(lambda: herd.disconnects == 1)
    assert not waited.cancelled_caught
    herd.release()
    assert herd.total == 1


async def test_a_failure_after_the_leader_left_reaches_everyone_and_counts_once(
    herd, herd_url, clock
):
    """detach_leaders: the shared call fails after its caller left; recorded once, all told."""
    guard = Guard(
        make_settings(herd_url, breaker={"fail_max": 2}, retry={"attempts": 1}, coalesce=DETACHED),
        clock=clock,
    )
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    get = client_get("httpx", guard)
    herd.mode = "fail"
    call = partial(get, herd_url + PLAYLIST, headers=AUTH)
    results = await cancelled_leader(call, herd, guard, followers=5)
    assert [(r.status_code, r.text) for r in results] == [(503, "no healthy upstream")] * 5
    await until(lambda: len(events) == 6)
    outcomes = sorted((e.outcome, e.coalesced) for e in events)
    assert outcomes == [("failure", False)] + [("failure", True)] * 5
    assert guard.state("spotify_api") == "closed"  # one failure of fail_max 2: counted once
    assert herd.total == 1


async def test_a_failure_answer_reaches_everyone_and_counts_once(herd, herd_url, clock):
    """A 503 answer: every caller gets its own copy of it; the breaker counts one failure."""
    guard = Guard(
        make_settings(herd_url, breaker={"fail_max": 2}, retry={"attempts": 1}), clock=clock
    )
    get = client_get("httpx", guard)
    herd.mode = "fail"
    results = await herd_of(10, lambda: get(herd_url + PLAYLIST, headers=AUTH), herd, guard)
    assert herd.total == 1
    assert [(r.status_code, r.text) for r in results] == [(503, "no healthy upstream")] * 10
    assert guard.state("spotify_api") == "closed"  # 10 failures would have opened it
    herd.mode = "ok"
    assert (await get(herd_url + PLAYLIST, headers=AUTH)).status_code == 200


async def test_an_error_reaches_everyone_as_their_own_and_counts_once(herd, herd_url, clock):
    """An attempt that times out: each caller raises its own error of its client's class."""
    guard = Guard(
        make_settings(
            herd_url,
            breaker={"fail_max": 2},
            retry={"attempts": 1},
            timeout={"attempt_s": 1.0, "total_s": 2},  # real time: all 6 join before it
        ),
        clock=clock,
    )
    get = client_get("httpx", guard)

    async def call() -> BaseException:
        try:
            await get(herd_url + PLAYLIST, headers=AUTH)
        except httpx.TransportError as exc:
            return exc
        raise AssertionError("the call should have failed")

    herd.hold()  # never released in time: the attempt times out
    errors = []
    async with anyio.create_task_group() as tg:

        async def one() -> None:
            errors.append(await call())

        for _ in range(6):
            tg.start_soon(one)
        await until(lambda: herd.total == 1 and waiting(guard) == 5)
    herd.release()
    assert len({id(e) for e in errors}) == 6
    for error in errors:
        assert isinstance(error, httpx.ReadTimeout)
        assert isinstance(error, RetriesExhaustedError)
        assert isinstance(error, UpstreamUnavailable)
        assert error.reason == "timeout"
    assert herd.total == 1
    assert guard.state("spotify_api") == "closed"


async def test_sync_and_async_callers_share_one_call(herd, herd_url, clock):
    """httpx.AsyncClient, httpx.Client and requests callers at once: one upstream call."""
    guard = Guard(make_settings(herd_url), clock=clock)
    getters = [client_get(k, guard) for k in ("httpx", "httpx_sync", "requests")]
    results: list[Any] = []

    async def ask(get: Get) -> None:
        results.append(await get(herd_url + PLAYLIST, headers=AUTH))

    herd.hold()
    async with anyio.create_task_group() as tg:
        for get in getters * 3:
            tg.start_soon(ask, get)
        await until(lambda: herd.total == 1 and waiting(guard) == 8)
        herd.release()
    assert herd.total == 1
    assert [r.json()["who"] for r in results] == [who(AUTH["Authorization"])] * 9


@pytest.mark.parametrize(
    ("kind", "mode"),
    [("httpx", "big"), ("httpx", "chunked"), ("httpx_sync", "chunked"), ("requests", "chunked")],
)
async def test_an_answer_over_the_cap_is_not_shared(herd, herd_url, clock, kind, mode):
    """Over ``coalesce.max_body_bytes``: followers make their own calls, all bodies whole."""
    guard = Guard(make_settings(herd_url, coalesce={"max_body_bytes": 1000}), clock=clock)
    get = client_get(kind, guard)
    herd.mode, herd.big_bytes = mode, 5000
    results = await herd_of(5, lambda: get(herd_url + PLAYLIST, headers=AUTH), herd, guard)
    assert herd.total == 5
    assert [len(r.json()["padding"]) for r in results] == [5000] * 5


async def test_concurrent_token_refreshes_mint_once_per_refresh_token(herd, herd_url, clock):
    """10 identical refreshes: 1 mint; another refresh token: its own mint and its own answer."""
    hostport = herd_url.split("://", 1)[1]
    settings = GuardSettings(
        upstreams={
            "spotify_api": {"hosts": ["api.example"]},
            "spotify_accounts": {"hosts": [hostport]},
        }
    )
    guard = Guard(settings, clock=clock)
    client = httpx.AsyncClient(transport=guard.async_transport())
    basic = {"Authorization": "Basic Y2xpZW50OnNlY3JldA=="}
    minted: list[tuple[str, Any]] = []

    async def refresh(token: str) -> None:
        form = {"grant_type": "refresh_token", "refresh_token": token}
        minted.append((token, await client.post(herd_url + "/api/token", data=form, headers=basic)))

    herd.hold()
    async with anyio.create_task_group() as tg:
        for token in ["refresh-a"] * 10 + ["refresh-b"] * 3:
            tg.start_soon(refresh, token)
        await until(lambda: herd.total == 2 and waiting(guard, "spotify_accounts") == 11)
        herd.release()
    assert herd.hits["/api/token"] == 2
    for token, response in minted:
        assert response.json()["refresh_token"] == token


async def test_a_cancelled_refresh_still_mints_once_for_the_others(herd, herd_url, clock):
    """Default settings: 10 identical refreshes, the leader's caller cancelled; 1 mint, 9 tokens."""
    hostport = herd_url.split("://", 1)[1]
    settings = GuardSettings(
        upstreams={
            "spotify_api": {"hosts": ["api.example"]},
            "spotify_accounts": {"hosts": [hostport]},
        }
    )
    guard = Guard(settings, clock=clock)
    client = httpx.AsyncClient(transport=guard.async_transport())
    basic = {"Authorization": "Basic Y2xpZW50OnNlY3JldA=="}
    form = {"grant_type": "refresh_token", "refresh_token": "refresh-a"}
    call = partial(client.post, herd_url + "/api/token", data=form, headers=basic)
    results = await cancelled_leader(call, herd, guard, followers=9, upstream="spotify_accounts")
    assert herd.hits["/api/token"] == 1
    assert herd.disconnects == 0
    assert [r.json()["refresh_token"] for r in results] == ["refresh-a"] * 9


async def test_no_other_post_is_ever_coalesced(herd, herd_url, clock):
    """Identical POSTs anywhere but /api/token each make their own call."""
    guard = Guard(make_settings(herd_url), clock=clock)
    client = httpx.AsyncClient(transport=guard.async_transport())
    herd.hold()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(partial(client.post, herd_url + "/v1/me/player/next", headers=AUTH))
        await until(lambda: herd.total == 5)
        assert waiting(guard) == 0
        herd.release()
    assert herd.hits["/v1/me/player/next"] == 5


async def test_the_table_is_bounded_and_empties_once_calls_finish(herd, herd_url):
    """Distinct URLs in flight: at most ``max_in_flight`` leaders; none left afterwards."""
    guard = Guard(make_settings(herd_url, coalesce={"max_in_flight": 3}), clock=FakeClock())
    get = client_get("httpx", guard)
    flights = guard.upstreams["spotify_api"].flights
    assert flights is not None
    herd.hold()
    seen: list[int] = []
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(partial(get, f"{herd_url}/v1/tracks/{i}", headers=AUTH))
        await until(lambda: herd.total == 20)
        seen.append(len(flights.leaders) + len(flights.calls))
        herd.release()
    assert seen[0] <= 3 + 1  # the bound, and the one call that came alone
    assert not flights.calls
    assert not flights.leaders
    gc.collect()


async def test_coalescing_can_be_switched_off(herd, herd_url, clock):
    """``coalesce.gets = false``: identical GETs each make their own call."""
    guard = Guard(make_settings(herd_url, coalesce={"gets": False}), clock=clock)
    get = client_get("httpx", guard)
    herd.hold()
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(partial(get, herd_url + PLAYLIST, headers=AUTH))
        await until(lambda: herd.total == 4)
        herd.release()
    assert herd.total == 4


async def test_followers_spans_and_metrics_say_coalesced(herd, herd_url, clock):
    """Followers' spans carry coalesced=true; the metric counts the upstream calls saved."""
    exporter, reader = install_sdk()
    guard = Guard(make_settings(herd_url), clock=clock)
    get = client_get("httpx", guard)

    def saved() -> float:
        return metric_total(reader, "upstream_guard.coalesced")

    before = saved()
    await herd_of(6, lambda: get(herd_url + PLAYLIST, headers=AUTH), herd, guard)
    logical = [
        s
        for s in exporter.get_finished_spans()
        if s.name == "spotify_api GET /v1/playlists/{playlist_id}"
    ]
    flags = sorted(bool((s.attributes or {}).get("upstream_guard.coalesced")) for s in logical)
    assert flags == [False] + [True] * 5
    assert saved() - before == 5


async def test_streaming_callers_get_whole_bodies(herd, herd_url, clock):
    """httpx ``stream()`` callers coalesce too: each reads the whole body from its own stream."""
    guard = Guard(make_settings(herd_url), clock=clock)
    client = httpx.AsyncClient(transport=guard.async_transport())

    async def streamed() -> bytes:
        async with client.stream("GET", herd_url + PLAYLIST, headers=AUTH) as response:
            return b"".join([chunk async for chunk in response.aiter_bytes()])

    bodies = await herd_of(5, streamed, herd, guard)
    assert herd.total == 1
    assert len(set(bodies)) == 1
    assert b'"who"' in bodies[0]


async def test_a_requests_leader_that_streams_is_never_read_for_others(herd, herd_url, clock):
    """requests with ``stream=True`` leads: its body is left to it; followers call themselves."""
    guard = Guard(make_settings(herd_url), clock=clock)
    session = guard.requests_session()
    streaming = partial(session.get, herd_url + PLAYLIST, headers=AUTH, stream=True, timeout=10)
    herd.hold()
    leader = None
    results: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def lead() -> None:
            nonlocal leader
            leader = await anyio.to_thread.run_sync(streaming)

        async def follow() -> None:
            results.append(await client_get("httpx", guard)(herd_url + PLAYLIST, headers=AUTH))

        tg.start_soon(lead)
        await until(lambda: herd.total == 1)
        for _ in range(3):
            tg.start_soon(follow)
        await until(lambda: waiting(guard) == 3)
        herd.release()
    assert leader is not None
    assert leader.raw.read()  # the leader's stream is whole and unread
    assert herd.total == 4
    assert [r.status_code for r in results] == [200] * 3


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiohttp runs on asyncio only
async def test_twenty_identical_aiohttp_gets_make_one_call(herd, herd_url, clock, anyio_backend):
    """aiohttp joins the same flight: 20 identical GETs, 1 upstream call, 20 own responses.

    Only answers with a Content-Length are shared on aiohttp (it cannot put part of a read
    stream back); an unsized one is its caller's alone and its followers call for themselves.
    """
    import aiohttp

    herd.mode = "sized"
    guard = Guard(make_settings(herd_url), clock=clock)
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    async with aiohttp.ClientSession(middlewares=(guard.aiohttp_middleware(),)) as session:

        async def get() -> tuple[int, Any, Any]:
            async with session.get(herd_url + PLAYLIST, headers=AUTH) as response:
                return response.status, await response.json(), response

        results = await herd_of(20, get, herd, guard)
    assert herd.total == 1
    assert len({id(r[2]) for r in results}) == 20  # each caller its own response object
    for status, body, _ in results:
        assert status == 200
        assert body["query"] == "market=SE&fields=name"
        assert body["who"] == who(AUTH["Authorization"])
    assert sorted(e.coalesced for e in events) == [False] + [True] * 19
    herd.mode = "ok"  # unsized: not shared, each follower calls for itself and is answered
    herd.hits.clear()
    events.clear()
    async with aiohttp.ClientSession(middlewares=(guard.aiohttp_middleware(),)) as session:
        results = await herd_of(5, get, herd, guard)
    assert [r[0] for r in results] == [200] * 5
    assert herd.total == 5


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiohttp runs on asyncio only
async def test_a_cancelled_aiohttp_leader_keeps_the_shared_call(
    herd, herd_url, clock, anyio_backend
):
    """aiohttp, detach_leaders: the leader's caller leaves at once; 1 upstream call."""
    import aiohttp

    herd.mode = "sized"
    guard = Guard(make_settings(herd_url, coalesce=DETACHED), clock=clock)
    async with aiohttp.ClientSession(middlewares=(guard.aiohttp_middleware(),)) as session:

        async def get() -> tuple[int, Any]:
            async with session.get(herd_url + PLAYLIST, headers=AUTH) as response:
                return response.status, await response.json()

        results = await cancelled_leader(get, herd, guard, followers=5)
    assert herd.total == 1
    assert [status for status, _ in results] == [200] * 5
    assert {body["who"] for _, body in results} == {who(AUTH["Authorization"])}
