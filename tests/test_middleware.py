"""The middleware with real clients in real apps: install(app), fallbacks, health, passthrough."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import spotipy
import tekore
import tekore._client.base as tekore_base
from asgiref.wsgi import WsgiToAsgi
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient

from conftest import make_settings
from upstream_guard import GuardSettings, UpstreamGuardMiddleware, install
from upstream_guard.testing import Fault, serve

CLIENTS = ["httpx", "tekore", "spotipy"]
TRACK = "3n3Ppam7vgaVa1iaRUc9Lp"


@pytest.fixture
def tekore_at_sim(sim_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """tekore has its API address in a module global; point it at the simulator."""
    monkeypatch.setattr(tekore_base, "prefix", f"{sim_url}/v1/")


def build_app(api_url: str) -> FastAPI:
    """A FastAPI app calling Spotify the way users do: plain httpx, tekore, spotipy."""
    app = FastAPI()

    @app.get("/httpx/tracks/{track_id}")
    async def httpx_track(track_id: str) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{api_url}/v1/tracks/{track_id}")
        response.raise_for_status()
        return {"name": response.json()["name"]}

    @app.get("/tekore/tracks/{track_id}")
    async def tekore_track(track_id: str) -> dict[str, Any]:
        spotify = tekore.Spotify("user-token", asynchronous=True)
        track = await spotify.track(track_id)
        return {"name": track.name}

    @app.get("/spotipy/tracks/{track_id}")
    def spotipy_track(track_id: str) -> dict[str, Any]:
        spotify = spotipy.Spotify(auth="user-token", requests_session=requests.Session(), retries=0)
        spotify.prefix = f"{api_url}/v1/"
        return {"name": spotify.track(track_id)["name"]}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug, not an outage")

    return app


@contextlib.contextmanager
def running(app: Any, where: str, backend: str = "asyncio") -> Iterator[httpx.Client | TestClient]:
    """The app behind TestClient (asyncio or trio) or a uvicorn server on loopback."""
    if where == "testclient":
        with TestClient(app, backend=backend, raise_server_exceptions=False) as client:
            yield client
    else:
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            yield client


@pytest.mark.usefixtures("tekore_at_sim")
@pytest.mark.parametrize("client_kind", CLIENTS)
@pytest.mark.parametrize(
    ("where", "backend"),
    [("testclient", "asyncio"), ("testclient", "trio"), ("uvicorn", "asyncio")],
)
def test_outage_answers_503_problem_then_recovers(sim, sim_url, clock, client_kind, where, backend):
    """Each client trips after fail_max, then gets 503 problem+json without calling Spotify."""
    app = build_app(sim_url)
    settings = make_settings(
        sim_url, breaker={"fail_max": 2, "reset_timeout_s": 20}, retry={"attempts": 1}
    )
    guard = install(app, settings, clock=clock)
    assert app.state.upstream_guard is guard
    path = f"/{client_kind}/tracks/{TRACK}"
    with running(app, where, backend) as client:
        assert client.get(path).status_code == 200
        sim.set_fault(Fault.no_healthy_upstream())
        for _ in range(2):
            response = client.get(path)
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
        assert guard.state("spotify_api") == "open"
        hits = sim.total_hits
        response = client.get(path)
        assert response.status_code == 503
        problem = response.json()
        assert problem["status"] == 503
        assert problem["upstream"] == "spotify_api"
        assert {"type", "title", "detail"} <= problem.keys()
        assert response.headers["retry-after"] == "20"
        assert sim.total_hits == hits  # refused without calling the upstream
        sim.heal()
        clock.advance(20)
        assert client.get(path).status_code == 200
        assert guard.state("spotify_api") == "closed"


@pytest.mark.usefixtures("tekore_at_sim")
@pytest.mark.parametrize("client_kind", CLIENTS)
def test_json_500_and_429_never_become_500(sim, sim_url, clock, client_kind):
    """A JSON 500 and a 429 from Spotify reach the app's caller as 503 with Retry-After."""
    app = build_app(sim_url)
    install(
        app, make_settings(sim_url, retry={"attempts": 1, "max_retry_after_s": 0.5}), clock=clock
    )
    with running(app, "testclient") as client:
        sim.set_fault(Fault.json_5xx(500))
        assert client.get(f"/{client_kind}/tracks/{TRACK}").status_code == 503
        sim.set_fault(Fault.rate_limited(30))
        response = client.get(f"/{client_kind}/tracks/{TRACK}")
        assert response.status_code == 503
        assert 29 <= int(response.headers["retry-after"]) <= 30
        response = client.get(f"/{client_kind}/tracks/{TRACK}")  # refused by the cooldown
        assert response.status_code == 503
        assert response.json()["detail"].startswith("spotify_api is unavailable (cooldown)")


def test_other_exceptions_pass_through(sim, sim_url, clock):
    """A bug in a route is not an outage: the app's own 500 handling applies."""
    app = build_app(sim_url)
    install(app, make_settings(sim_url), clock=clock)
    with running(app, "testclient") as client:
        assert client.get("/boom").status_code == 500


def test_route_fallback_is_served(sim, sim_url, clock):
    """@guard.fallback(path) answers instead of the 503 problem."""
    app = build_app(sim_url)
    guard = install(app, make_settings(sim_url, retry={"attempts": 1}), clock=clock)

    @guard.fallback("/httpx/tracks/{track_id}")
    async def track_fallback(request, error):
        return JSONResponse({"name": None, "degraded": True, "why": type(error).__name__})

    with running(app, "testclient") as client:
        sim.set_fault(Fault.json_5xx(502))
        response = client.get(f"/httpx/tracks/{TRACK}")
    assert response.status_code == 200
    assert response.json() == {"name": None, "degraded": True, "why": "HTTPStatusError"}
    assert response.headers["x-upstream-guard"] == "fallback"


def test_broken_route_fallback_still_answers_503(sim, sim_url, clock):
    """A fallback that itself raises falls back to the problem response, never a 500."""
    app = build_app(sim_url)
    guard = install(app, make_settings(sim_url, retry={"attempts": 1}), clock=clock)

    @guard.fallback("/httpx/tracks/{track_id}")
    def broken(request, error):
        raise KeyError("oops")

    with running(app, "testclient") as client:
        sim.set_fault(Fault.json_5xx(502))
        assert client.get(f"/httpx/tracks/{TRACK}").status_code == 503


@pytest.mark.parametrize("client_kind", ["httpx", "spotipy"])
def test_stale_copies_served_to_same_user_only(sim, sim_url, clock, client_kind):
    """With stale_if_error, the last good copy answers its own user, never another."""
    app = FastAPI()

    @app.get("/me/track")
    def my_track(authorization: str = "") -> Any:
        url = f"{sim_url}/v1/tracks/{TRACK}"
        headers = {"Authorization": authorization}
        if client_kind == "httpx":
            response = httpx.get(url, headers=headers)
            response.raise_for_status()
            return JSONResponse(
                response.json(), headers={"x-from": response.headers.get("x-upstream-guard", "")}
            )
        got = requests.get(url, headers=headers, timeout=5)
        got.raise_for_status()
        return JSONResponse(got.json(), headers={"x-from": got.headers.get("x-upstream-guard", "")})

    settings = make_settings(sim_url, retry={"attempts": 1}, fallback={"stale_if_error": True})
    guard = install(app, settings, clock=clock)
    with running(app, "testclient") as client:
        alice = client.get("/me/track", params={"authorization": "Bearer alice"})
        assert alice.status_code == 200
        sim.set_fault(Fault.no_healthy_upstream())
        clock.advance(12)
        again = client.get("/me/track", params={"authorization": "Bearer alice"})
        assert again.status_code == 200
        assert again.json() == alice.json()
        assert again.headers["x-from"] == "stale"
        bob = client.get("/me/track", params={"authorization": "Bearer bob"})
        assert bob.status_code == 503
    cache = guard.upstreams["spotify_api"].stale
    assert cache is not None
    assert len(cache) == 1


def test_no_store_responses_are_not_kept(clock):
    """A response marked Cache-Control: no-store is never served stale."""
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(200, json={"ok": 1}, headers={"cache-control": "no-store"})
        return httpx.Response(503, text="no healthy upstream")

    from upstream_guard import Guard

    guard = Guard(
        make_settings("http://api.test", retry={"attempts": 1}, fallback={"stale_if_error": True}),
        clock=clock,
    )
    client = httpx.Client(transport=guard.sync_transport(httpx.MockTransport(handler)))
    assert client.get("http://api.test/v1/me").status_code == 200
    assert client.get("http://api.test/v1/me").status_code == 503


def test_health_endpoint_follows_the_breaker(sim, sim_url, clock):
    """The health endpoint flips 200 -> 503 -> 200 with the breaker, and holds no secrets."""
    app = build_app(sim_url)
    settings = make_settings(
        sim_url, breaker={"fail_max": 1, "reset_timeout_s": 5}, retry={"attempts": 1}
    )
    install(app, settings, clock=clock)
    with running(app, "testclient") as client:
        health = client.get("/_upstream_guard/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        sim.set_fault(Fault.no_healthy_upstream())
        client.get(f"/httpx/tracks/{TRACK}", headers={"authorization": "Bearer secret-token"})
        health = client.get("/_upstream_guard/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "unavailable"
        api = body["upstreams"]["spotify_api"]
        assert api["state"] == "open"
        assert api["failures"] == 1
        assert api["last_failure"] == "no_healthy_upstream"
        assert 0 < api["retry_after_s"] <= 5
        assert "secret-token" not in health.text
        assert "no healthy upstream" not in health.text
        sim.heal()
        clock.advance(5)
        assert client.get("/_upstream_guard/health").status_code == 200
        client.get(f"/httpx/tracks/{TRACK}")
        assert client.get("/_upstream_guard/health").json()["status"] == "ok"


def test_server_timing_header(sim, sim_url, clock):
    """Responses carry Server-Timing with each upstream's time."""
    app = build_app(sim_url)
    install(app, make_settings(sim_url), clock=clock)
    with running(app, "testclient") as client:
        response = client.get(f"/httpx/tracks/{TRACK}")
    assert response.headers["server-timing"].startswith("spotify_api;dur=")


@pytest.mark.filterwarnings("error")
def test_wsgi_app_behind_asgiref_sees_an_async_send(sim, sim_url, clock):
    """asgiref's WsgiToAsgi takes the guard's send as a coroutine function: no warning."""

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with requests.Session() as session:
            status = session.get(f"{sim_url}/v1/tracks/{TRACK}", timeout=5).status_code
        start_response("200 OK", [("content-type", "text/plain")])
        return [f"upstream {status}".encode()]

    # No lifespan (WsgiToAsgi refuses it): the autouse fixture undoes the instrumentation.
    app = UpstreamGuardMiddleware(WsgiToAsgi(wsgi_app), settings=make_settings(sim_url))
    response = TestClient(app).get("/")
    assert response.text == "upstream 200"
    assert response.headers["server-timing"].startswith("spotify_api;dur=")


async def echo(websocket):
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


@pytest.mark.parametrize("guard_first", [True, False])
def test_websocket_and_lifespan_pass_through(sim_url, guard_first):
    """Websockets and the app's own lifespan work under the middleware, in either order."""
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        events.append("startup")
        yield
        events.append("shutdown")

    class Tag:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            await self.app(scope, receive, send)

    guard_mw = Middleware(UpstreamGuardMiddleware, settings=make_settings(sim_url))
    middleware = [guard_mw, Middleware(Tag)] if guard_first else [Middleware(Tag), guard_mw]
    app = Starlette(
        routes=[Route("/", lambda r: PlainTextResponse("hi")), WebSocketRoute("/ws", echo)],
        middleware=middleware,
        lifespan=lifespan,
    )
    with TestClient(app) as client:
        assert client.get("/").text == "hi"
        with client.websocket_connect("/ws") as ws:
            ws.send_text("ping")
            assert ws.receive_text() == "ping"
        assert app.state.upstream_guard.state("spotify_api") == "closed"
    assert events == ["startup", "shutdown"]


def test_add_middleware_configured_by_env(sim, sim_url, monkeypatch):
    """app.add_middleware(UpstreamGuardMiddleware) reads its settings from the environment."""
    hostport = sim_url.split("://", 1)[1]
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS", f'["{hostport}"]')
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__FAIL_MAX", "1")
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__ATTEMPTS", "1")
    app = build_app(sim_url)
    app.add_middleware(UpstreamGuardMiddleware)
    sim.set_fault(Fault.json_5xx(503))
    with running(app, "testclient") as client:
        assert client.get(f"/httpx/tracks/{TRACK}").status_code == 503
        hits = sim.total_hits
        response = client.get(f"/httpx/tracks/{TRACK}")
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert sim.total_hits == hits
        assert app.state.upstream_guard.state("spotify_api") == "open"


def test_two_apps_each_apply_their_own_guard(sim, sim_url, clock):
    """Two apps in one process: calls made while serving a request use that app's guard."""
    strict, lenient = build_app(sim_url), build_app(sim_url)
    install(
        strict, make_settings(sim_url, breaker={"fail_max": 1}, retry={"attempts": 1}), clock=clock
    )
    install(
        lenient,
        make_settings(sim_url, breaker={"fail_max": 50}, retry={"attempts": 1}),
        clock=clock,
    )
    sim.set_fault(Fault.json_5xx(500))
    with running(strict, "testclient") as a, running(lenient, "testclient") as b:
        for _ in range(3):
            a.get(f"/httpx/tracks/{TRACK}")
            b.get(f"/httpx/tracks/{TRACK}")
        assert strict.state.upstream_guard.state("spotify_api") == "open"
        assert lenient.state.upstream_guard.state("spotify_api") == "closed"


def test_instrumentation_is_undone_on_shutdown(sim_url):
    """Lifespan shutdown restores httpx and requests; install is idempotent."""
    app = build_app(sim_url)
    guard = install(app, make_settings(sim_url))
    assert install(app) is guard
    assert hasattr(httpx.HTTPTransport.handle_request, "__upstream_guard__")
    assert hasattr(requests.adapters.HTTPAdapter.send, "__upstream_guard__")
    with TestClient(app):
        pass
    assert not hasattr(httpx.HTTPTransport.handle_request, "__upstream_guard__")
    assert not hasattr(requests.adapters.HTTPAdapter.send, "__upstream_guard__")


def test_guard_close_undoes_instrument_once_no_guard_is_left(sim_url):
    """guard.instrument() patches the clients; closing the last instrumented guard unpatches."""
    from upstream_guard import Guard

    first, second = Guard(make_settings(sim_url)), Guard(make_settings(sim_url))
    first.instrument()
    second.instrument()
    first.close()
    assert hasattr(httpx.AsyncHTTPTransport.handle_async_request, "__upstream_guard__")
    second.close()
    assert not hasattr(httpx.AsyncHTTPTransport.handle_async_request, "__upstream_guard__")
    second.close()  # twice is fine


def test_requests_session_is_guarded_explicitly(sim, sim_url, clock):
    """guard.requests_session() guards without install; its errors are requests errors."""
    from upstream_guard import CircuitOpenError, Guard

    guard = Guard(
        make_settings(sim_url, breaker={"fail_max": 1}, retry={"attempts": 1}), clock=clock
    )
    session = guard.requests_session()
    sim.set_fault(Fault.no_healthy_upstream())
    assert session.get(f"{sim_url}/v1/me", timeout=5).status_code == 503
    with pytest.raises(requests.ConnectionError) as info:
        session.get(f"{sim_url}/v1/me", timeout=5)
    assert isinstance(info.value, CircuitOpenError)
    assert sim.total_hits == 1


def test_httpx2_is_guarded_beside_httpx(sim, sim_url, clock):
    """httpx2 clients are instrumented too, with httpx2's own exception bases."""
    import httpx2

    from upstream_guard import CircuitOpenError, Guard

    app = FastAPI()

    @app.get("/h2")
    async def h2() -> Any:
        async with httpx2.AsyncClient() as client:
            response = await client.get(f"{sim_url}/v1/tracks/{TRACK}")
        response.raise_for_status()
        return response.json()["id"]

    install(
        app, make_settings(sim_url, breaker={"fail_max": 1}, retry={"attempts": 1}), clock=clock
    )
    with running(app, "testclient") as client:
        assert client.get("/h2").status_code == 200
        sim.set_fault(Fault.json_5xx(503))
        assert client.get("/h2").status_code == 503
        hits = sim.total_hits
        assert client.get("/h2").status_code == 503
        assert sim.total_hits == hits
    guard = Guard(make_settings(sim_url), clock=clock)
    guard.upstreams["spotify_api"].breakers["spotify_api"].force_open()
    with httpx2.Client(transport=guard.sync_transport(httpx2.HTTPTransport())) as plain:
        with pytest.raises(httpx2.TransportError) as info:
            plain.get(f"{sim_url}/v1/me")
    assert isinstance(info.value, CircuitOpenError)


def build_starlette_app(api_url: str) -> Starlette:
    """The same httpx and spotipy routes, in a plain Starlette app."""

    async def httpx_track(request):
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{api_url}/v1/tracks/{request.path_params['track_id']}")
        response.raise_for_status()
        return JSONResponse({"name": response.json()["name"]})

    def spotipy_track(request):
        spotify = spotipy.Spotify(auth="user-token", requests_session=requests.Session(), retries=0)
        spotify.prefix = f"{api_url}/v1/"
        return JSONResponse({"name": spotify.track(request.path_params["track_id"])["name"]})

    return Starlette(
        routes=[
            Route("/httpx/tracks/{track_id}", httpx_track),
            Route("/spotipy/tracks/{track_id}", spotipy_track),
        ]
    )


@pytest.mark.parametrize("client_kind", ["httpx", "spotipy"])
@pytest.mark.parametrize("where", ["testclient", "uvicorn"])
def test_starlette_app_outage_and_recovery(sim, sim_url, clock, client_kind, where):
    """A plain Starlette app gets the same 503 problem, then recovers."""
    app = build_starlette_app(sim_url)
    settings = make_settings(
        sim_url, breaker={"fail_max": 1, "reset_timeout_s": 3}, retry={"attempts": 1}
    )
    guard = install(app, settings, clock=clock)
    path = f"/{client_kind}/tracks/{TRACK}"
    with running(app, where) as client:
        sim.set_fault(Fault.json_5xx(502))
        assert client.get(path).status_code == 503
        hits = sim.total_hits
        response = client.get(path)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"
        assert sim.total_hits == hits
        sim.heal()
        clock.advance(3)
        assert client.get(path).status_code == 200
    assert guard.state("spotify_api") == "closed"


def test_request_deadline_bounds_outbound_retries(clock):
    """request_deadline_s caps the retries an inbound request can wait for."""
    from upstream_guard import GuardSettings

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500)

    app = FastAPI()
    seen: list[float] = []

    @app.get("/slow")
    async def slow() -> Any:
        guard = app.state.upstream_guard
        start = clock.monotonic()
        async with httpx.AsyncClient(
            transport=guard.async_transport(httpx.MockTransport(handler))
        ) as c:
            response = await c.get("http://api.test/v1/me")
        seen.append(clock.monotonic() - start)
        return response.status_code

    settings = GuardSettings(
        request_deadline_s=0.5,
        upstreams={
            "spotify_api": {
                "hosts": ["api.test"],
                "breaker": {"fail_max": 100},
                "retry": {"attempts": 10, "backoff_base_s": 0.2, "backoff_max_s": 0.4},
            }
        },
    )
    install(app, settings, clock=clock)
    with TestClient(app) as client:
        assert client.get("/slow").json() == 500  # retries gave up at the deadline
    assert seen
    assert 0 < seen[0] <= 0.5


def test_request_deadline_counts_from_the_request_not_from_the_call(clock):
    """Reading a streamed upload uses the request's deadline up, once: each attempt gets the rest."""
    timeouts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        return httpx.Response(503 if len(timeouts) == 1 else 200)

    def trickle() -> Any:
        clock.advance(3.0)
        yield b"x"

    app = FastAPI()

    @app.put("/upload")
    def upload() -> Any:
        guard = app.state.upstream_guard
        transport = guard.sync_transport(httpx.MockTransport(handler))
        with httpx.Client(transport=transport, timeout=60) as c:
            return c.put("http://api.test/v1/me", content=trickle()).status_code

    settings = GuardSettings(
        request_deadline_s=10,
        upstreams={
            "spotify_api": {
                "hosts": ["api.test"],
                "retry": {"backoff_base_s": 0, "backoff_max_s": 0},
                "timeout": {"total_s": 20.0, "attempt_s": 10.0},
            }
        },
    )
    install(app, settings, clock=clock)
    with TestClient(app) as client:
        assert client.put("/upload").json() == 200
    assert timeouts == [7.0, 7.0]


def test_retry_after_header_is_whole_seconds_at_least_one(sim, sim_url, clock):
    """A sub-second cooldown still answers Retry-After: 1."""
    app = build_app(sim_url)
    install(
        app, make_settings(sim_url, retry={"attempts": 1, "max_retry_after_s": 0.1}), clock=clock
    )
    with running(app, "testclient") as client:
        sim.set_fault(Fault.rate_limited("0.4"))
        response = client.get(f"/httpx/tracks/{TRACK}")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


def test_request_no_store_gets_no_stale_copy(clock):
    """A caller sending Cache-Control: no-store neither stores nor receives a stale copy."""
    from upstream_guard import Guard

    responses = iter([httpx.Response(200, json={"v": 1}), httpx.Response(503), httpx.Response(503)])
    guard = Guard(
        make_settings("http://api.test", retry={"attempts": 1}, fallback={"stale_if_error": True}),
        clock=clock,
    )
    client = httpx.Client(
        transport=guard.sync_transport(httpx.MockTransport(lambda r: next(responses)))
    )
    assert client.get("http://api.test/v1/me/player").status_code == 200
    assert (
        client.get(
            "http://api.test/v1/me/player", headers={"cache-control": "no-store"}
        ).status_code
        == 503
    )
    assert client.get("http://api.test/v1/me/player").headers["x-upstream-guard"] == "stale"
