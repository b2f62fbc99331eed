"""The example FastAPI app (examples/fastapi_app) and the demo's bookkeeping."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from starlette.testclient import TestClient

from conftest import make_settings
from upstream_guard import GuardSettings
from upstream_guard.testing import Fault, SpotifySimulator

ROOT = Path(__file__).resolve().parents[1]
PLAYLIST = "37i9dQZF1DXcBWIGoYBM5M"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    """examples/fastapi_app/app.py (a folder of scripts, not a package)."""
    return _load("spotify_demo_app", ROOT / "examples" / "fastapi_app" / "app.py")


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    """examples/demo.py, imported without running it."""
    return _load("upstream_guard_demo", ROOT / "examples" / "demo.py")


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch, example):
    """The example configures the OpenTelemetry SDK only when an endpoint is set: not here."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    example.configure_telemetry.cache_clear()


def test_now_playing_is_live_then_served_by_its_route_fallback(example, sim, sim_url, clock):
    """Healthy: what is playing; Spotify down: 200 {"is_playing": false, "degraded": true}."""
    settings = make_settings(sim_url, breaker={"fail_max": 2, "reset_timeout_s": 10})
    app = example.create_app(settings, api_url=sim_url, clock=clock)
    with TestClient(app) as client:
        live = client.get("/now-playing")
        assert live.status_code == 200
        assert live.json()["is_playing"] is True
        assert live.json()["track"]
        assert live.headers["x-spotify-data"] == "live"
        sim.set_fault(Fault.no_healthy_upstream())
        for listener in ("a", "b"):
            response = client.get("/now-playing", headers={"authorization": f"Bearer {listener}"})
            assert response.status_code == 200
            assert response.json() == {"is_playing": False, "degraded": True}
            assert response.headers["x-upstream-guard"] == "fallback"
        guard = app.state.upstream_guard
        assert guard.state("spotify_api") == "open"
        hits = sim.total_hits
        refused = client.get("/now-playing")
        assert refused.json() == {"is_playing": False, "degraded": True}
        assert sim.total_hits == hits  # the open breaker answered without calling Spotify
        sim.heal()
        clock.advance(10)
        assert client.get("/now-playing").json()["is_playing"] is True
        assert guard.state("spotify_api") == "closed"


def test_search_without_a_fallback_answers_503_problem(example, sim, sim_url, clock):
    """A route with no fallback answers 503 problem+json with Retry-After, never a 500."""
    app = example.create_app(make_settings(sim_url), api_url=sim_url, clock=clock)
    with TestClient(app) as client:
        assert client.get("/search", params={"q": "abba"}).json()["tracks"]
        sim.set_fault(Fault.rate_limited(30))
        response = client.get("/search", params={"q": "robyn"})
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "30"
        assert response.json()["upstream"] == "spotify_api"


def test_playlist_page_is_served_from_a_stale_copy(example, sim, sim_url, clock):
    """With stale_if_error on, the playlist page shows its last good copy, marked stale."""
    settings = make_settings(sim_url, fallback={"stale_if_error": True})
    app = example.create_app(settings, api_url=sim_url, clock=clock)
    with TestClient(app) as client:
        fresh = client.get(f"/playlists/{PLAYLIST}")
        assert fresh.status_code == 200
        assert fresh.headers["content-type"].startswith("text/html")
        assert fresh.headers["x-spotify-data"] == "live"
        sim.set_fault(Fault.no_healthy_upstream())
        clock.advance(7)
        stale = client.get(f"/playlists/{PLAYLIST}")
        assert stale.status_code == 200
        assert stale.headers["x-spotify-data"] == "stale"
        assert stale.headers["age"] == "7"
        assert "a copy from 7 s ago" in stale.text
        assert stale.text.split("<ol>")[1] == fresh.text.split("<ol>")[1]
        assert client.get("/playlists/not-an-id!").status_code == 422


def test_spotify_client_errors_are_passed_on(example, sim, sim_url, clock):
    """A 401 from Spotify is the caller's token, not an outage: passed on, breaker closed."""
    settings = make_settings(sim_url, breaker={"fail_max": 1})
    app = example.create_app(settings, api_url=sim_url, clock=clock)
    sim.set_fault(Fault.respond(401, "The access token expired"))
    with TestClient(app) as client:
        for _ in range(2):
            response = client.get("/search", params={"q": "abba"})
            assert response.status_code == 401
            assert response.json() == {"detail": "Spotify answered 401"}
    assert app.state.upstream_guard.state("spotify_api") == "closed"


def test_unguarded_copy_fails_with_500(example, sim, sim_url):
    """guarded=False builds the same app without the guard: an outage is its 500."""
    app = example.create_app(guarded=False, api_url=sim_url)
    assert getattr(app.state, "upstream_guard", None) is None
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/now-playing").status_code == 200
        sim.set_fault(Fault.no_healthy_upstream())
        assert client.get("/now-playing").status_code == 500


def test_env_settings_guard_the_app(example, sim, sim_url, clock, monkeypatch):
    """With no settings given, create_app reads SPOTIFY_API_URL and UPSTREAM_GUARD_* variables."""
    hostport = sim_url.split("://", 1)[1]
    monkeypatch.setenv("SPOTIFY_API_URL", sim_url)
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS", f'["{hostport}"]')
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__ATTEMPTS", "1")
    app = example.create_app(clock=clock)
    sim.set_fault(Fault.json_5xx(502))
    with TestClient(app) as client:
        assert client.get("/now-playing").json() == {"is_playing": False, "degraded": True}
        assert client.get("/_upstream_guard/health").status_code == 200


def test_demo_sends_each_route_and_reads_the_guard_headers(demo):
    """The demo's load spreads over three routes, and answers are sorted by guard headers."""
    routes = [demo.request_for(i)[0] for i in range(6)]
    assert routes[:3] == ["/now-playing", "/search", f"/playlists/{demo.PLAYLISTS[0]}"]
    assert demo.request_for(1)[1] != demo.request_for(4)[1]  # every search is new
    assert demo.request_for(0)[2] != demo.request_for(3)[2]  # every listener is new
    guard = "x-upstream-guard"
    cases = [
        (httpx.Response(200, headers={"x-spotify-data": "live"}), "live"),
        (httpx.Response(200, headers={"x-spotify-data": "stale"}), "stale"),
        (httpx.Response(200, headers={guard: "fallback"}), "fallback"),
        (httpx.Response(503, headers={guard: "unavailable"}), "refused"),
        (httpx.Response(500), "error"),
        (httpx.Response(422), "other"),
    ]
    assert [demo.classify(response) for response, _ in cases] == [kind for _, kind in cases]
    assert demo.percentile([], 50) is None
    assert demo.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert demo.percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0
    assert [demo.fmt_s(s) for s in (0.000_012, 0.0123, 0.5, 3.0)] == [
        "12 us",
        "12.3 ms",
        "500 ms",
        "3.00 s",
    ]


def test_me_route_through_spotifyaio_is_guarded(example, clock):
    """/me (spotifyaio, https://api.spotify.com hard-coded) answers, then 503 problem in an outage.

    aiohttp runs on asyncio only, so this route is not tested on trio.
    """
    settings = GuardSettings(upstreams={"spotify_api": {"retry": {"attempts": 1}}})
    app = example.create_app(settings, clock=clock)
    with SpotifySimulator().intercept() as spotify, TestClient(app, backend="asyncio") as client:
        me = client.get("/me", headers={"authorization": "Bearer listener-token"})
        assert me.status_code == 200
        assert me.json()["name"] == "Simulated User"
        spotify.set_fault(Fault.no_healthy_upstream())
        outage = client.get("/me")
    assert outage.status_code == 503
    assert outage.headers["content-type"] == "application/problem+json"
    assert outage.json()["upstream"] == "spotify_api"


def test_demo_spotifyaio_check_passes_with_the_adapter(demo, example):
    """The demo's spotifyaio check sees 200 then a 503 problem, and says so."""
    lines, checks = demo.check_spotifyaio_route(example.create_app)
    assert checks == [(demo.SPOTIFYAIO_CHECK, True)]
    assert "healthy 200, no healthy upstream 503 application/problem+json" in lines[0]


def test_demo_spotifyaio_check_is_missing_without_the_adapter(demo, example, monkeypatch):
    """Without the aiohttp adapter the check is reported missing and spotifyaio is not called."""
    monkeypatch.setattr(demo, "aiohttp_adapter_present", lambda: False)

    def no_app(*args, **kwargs):
        raise AssertionError("no app is built, so spotifyaio never calls the real Spotify")

    lines, checks = demo.check_spotifyaio_route(no_app)
    assert checks == [(demo.SPOTIFYAIO_CHECK, False)]
    assert "not run" in lines[0]
