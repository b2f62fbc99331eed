"""SpotifySimulator.intercept(): unmodified clients calling Spotify's real hosts meet the simulator.

Every client here keeps its own base URL (``https://api.spotify.com``, tekore's and spotipy's
module prefixes, ``https://accounts.spotify.com/api/token``); the simulator runs on loopback
and the guard, when there is one, decides as it would for the real hosts (default settings,
no ``hosts`` pointed anywhere).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import requests
import spotipy
import tekore
from fastapi import FastAPI
from starlette.testclient import TestClient

from upstream_guard import Guard, GuardSettings, UpstreamUnavailable, install
from upstream_guard.testing import FakeClock, Fault, SpotifySimulator

TRACK = "3n3Ppam7vgaVa1iaRUc9Lp"
TRACK_URL = f"https://api.spotify.com/v1/tracks/{TRACK}"
TOKEN_URL = "https://accounts.spotify.com/api/token"  # noqa: S105 - an address
ONE_TRY = {"breaker": {"fail_max": 1, "reset_timeout_s": 30}, "retry": {"attempts": 1}}


def pool_methods() -> list[Any]:
    """The connection-pool methods the interception redirects, as they are now."""
    import httpcore
    import httpcore2
    import urllib3

    return [
        httpcore.ConnectionPool.handle_request,
        httpcore.AsyncConnectionPool.handle_async_request,
        httpcore2.ConnectionPool.handle_request,
        httpcore2.AsyncConnectionPool.handle_async_request,
        urllib3.PoolManager.connection_from_host,
    ]


@pytest.fixture
def spotify():
    """A simulator answering for Spotify's hosts while the test runs."""
    with SpotifySimulator().intercept() as simulator:
        yield simulator


def guard_settings(**groups: Any) -> GuardSettings:
    """The default upstreams (Spotify's real hosts), with overrides for spotify_api."""
    return GuardSettings(upstreams={"spotify_api": groups})


# -- healthy: each client gets the simulator's documents ----------------------------------------


def test_plain_clients_reach_the_simulator_on_the_real_hosts(spotify):
    """httpx, httpx2 and requests calling https://api.spotify.com are answered by the simulator."""
    for get in (httpx.get, httpx2.get, requests.get):
        response = get(TRACK_URL, headers={"authorization": "Bearer t"})
        assert response.status_code == 200
        assert response.json()["href"] == TRACK_URL  # written for the host the client called
    assert spotify.hits[f"/v1/tracks/{TRACK}"] == 3
    assert set(spotify.base_urls) == {"api.spotify.com", "accounts.spotify.com"}
    assert all(url.startswith("http://127.0.0.1:") for url in spotify.base_urls.values())


def test_clients_made_before_the_interception_are_intercepted_too():
    """Clients built earlier (at import, in a lifespan) are redirected once it starts."""
    with httpx.Client() as early_httpx, requests.Session() as early_requests:
        with SpotifySimulator().intercept() as spotify:
            with early_httpx.stream("GET", TRACK_URL) as streamed:
                body = b"".join(streamed.iter_bytes(chunk_size=64))
            assert httpx.Response(200, content=body).json()["id"] == TRACK
            assert early_requests.get(TRACK_URL, timeout=5).json()["id"] == TRACK
        assert spotify.hits[f"/v1/tracks/{TRACK}"] == 2


@pytest.mark.anyio
async def test_async_clients_reach_the_simulator(spotify):
    """httpx.AsyncClient and httpx2.AsyncClient are answered too, on asyncio and trio."""
    for module in (httpx, httpx2):
        async with module.AsyncClient() as client:
            response = await client.get(TRACK_URL)
        assert response.status_code == 200
        assert response.json()["id"] == TRACK
    assert spotify.hits[f"/v1/tracks/{TRACK}"] == 2


def test_tekore_and_spotipy_unmodified_get_their_documents(spotify):
    """tekore and spotipy, as users build them, parse the simulator's track, user and playlist."""
    tk = tekore.Spotify("user-token")
    track = tk.track(TRACK)
    assert (track.id, track.name, track.href) == (TRACK, f"Track {TRACK}", TRACK_URL)
    assert tk.current_user().display_name == "Simulated User"
    playlist = tk.playlist("37i9dQZF1DXcBWIGoYBM5M")
    assert len(list(tk.all_items(playlist.tracks))) == playlist.tracks.total
    sp = spotipy.Spotify(auth="user-token", retries=0)
    assert sp.track(TRACK)["href"] == TRACK_URL
    assert sp.current_playback()["device"]["name"] == "Simulated speaker"
    assert spotify.hits[f"/v1/tracks/{TRACK}"] == 2


@pytest.mark.anyio
async def test_tekore_async_gets_its_documents(spotify):
    """tekore's asynchronous client (httpx.AsyncClient inside) is answered, on both backends."""
    tk = tekore.Spotify("user-token", asynchronous=True)
    tracks, artists = await tk.search("abba", types=("track", "artist"), limit=3)
    assert len(tracks.items) == 3
    assert artists.items[0].followers.total > 0
    await tk.close()


def test_token_grants_through_tekore_and_spotipy(spotify):
    """Client-credentials, code and refresh-token grants work as each client sends them."""
    app_token = tekore.request_client_token("client-id", "client-secret")
    assert app_token.access_token.startswith("BQ")
    assert app_token.refresh_token is None
    user_token = tekore.refresh_user_token("client-id", "client-secret", "AQ-stored-refresh")
    assert "user-read-email" in str(user_token.scope)
    code_token = tekore.Credentials("client-id", "client-secret", "http://localhost/cb")
    assert code_token.request_user_token("auth-code").refresh_token.startswith("AQ")
    memory = spotipy.MemoryCacheHandler()
    credentials = spotipy.SpotifyClientCredentials(
        "client-id", "client-secret", cache_handler=memory
    )
    assert credentials.get_access_token(as_dict=False).startswith("BQ")
    oauth = spotipy.SpotifyOAuth(
        "client-id", "client-secret", "http://localhost/cb", cache_handler=memory
    )
    assert oauth.refresh_access_token("AQ-stored-refresh")["access_token"].startswith("BQ")
    assert spotify.hits["/api/token"] == 5


def test_token_errors_are_spotifys(spotify):
    """Bad forms and bad clients get Spotify's OAuth errors; a revoked refresh token too."""
    basic = ("client-id", "client-secret")
    cases = [
        ({"data": {"grant_type": "client_credentials"}}, "invalid_client"),
        ({"data": {"grant_type": "password"}, "auth": basic}, "unsupported_grant_type"),
        ({"data": {}, "auth": basic}, "unsupported_grant_type"),
        ({"json": {"grant_type": "client_credentials"}, "auth": basic}, "unsupported_grant_type"),
        ({"data": {"grant_type": "refresh_token"}, "auth": basic}, "invalid_request"),
        (
            {"data": {"grant_type": "client_credentials", "client_id": "pkce-only"}},
            "invalid_client",
        ),
    ]
    for kwargs, error in cases:
        response = httpx.post(TOKEN_URL, **kwargs)
        assert response.status_code == 400, kwargs
        body = response.json()
        assert body["error"] == error
        assert body["error_description"]
        assert "status" not in body  # the OAuth shape, unlike the Web API's errors
    assert httpx.get(TOKEN_URL).status_code == 405
    spotify.revoke("AQ-revoked")
    with pytest.raises(tekore.BadRequest, match="Refresh token revoked"):
        tekore.refresh_user_token("client-id", "client-secret", "AQ-revoked")
    pkce = httpx.post(
        TOKEN_URL,
        data={"grant_type": "refresh_token", "refresh_token": "AQ-x", "client_id": "pkce"},
    )
    assert pkce.status_code == 200
    assert pkce.json()["refresh_token"].startswith("AQ")  # PKCE refreshes rotate the token


# -- the guard decides as for the real hosts ---------------------------------------------------


def build_app() -> FastAPI:
    """Routes calling Spotify with unmodified tekore and spotipy."""
    app = FastAPI()

    @app.get("/tekore/track")
    async def tekore_track() -> dict[str, Any]:
        tk = tekore.Spotify("user-token", asynchronous=True)
        try:
            return {"name": (await tk.track(TRACK)).name}
        finally:
            await tk.close()

    @app.get("/spotipy/track")
    def spotipy_track() -> dict[str, Any]:
        sp = spotipy.Spotify(auth="user-token", retries=0)
        return {"name": sp.track(TRACK)["name"]}

    return app


@pytest.mark.parametrize("client_kind", ["tekore", "spotipy"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_outage_reaches_the_route_as_a_503_problem(spotify, client_kind, backend):
    """With no healthy upstream, each route answers 503 problem+json; open, Spotify is not called."""
    app = build_app()
    clock = FakeClock()
    guard = install(app, guard_settings(**ONE_TRY), clock=clock)
    path = f"/{client_kind}/track"
    with TestClient(app, backend=backend, raise_server_exceptions=False) as client:
        healthy = client.get(path)
        assert healthy.status_code == 200
        assert healthy.json() == {"name": f"Track {TRACK}"}
        spotify.set_fault(Fault.no_healthy_upstream())
        response = client.get(path)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["upstream"] == "spotify_api"
        assert guard.state("spotify_api") == "open"
        hits = spotify.total_hits
        refused = client.get(path)
        assert refused.status_code == 503
        assert refused.json()["detail"].startswith("spotify_api is unavailable")
        assert spotify.total_hits == hits  # refused by the guard, never sent
        spotify.heal()
        clock.advance(30)
        assert client.get(path).status_code == 200
        assert guard.state("spotify_api") == "closed"


def test_instrumented_guard_applies_to_every_client(spotify):
    """With guard.instrument(), a failing host trips; refusals are each client's own error too."""
    guard = Guard(guard_settings(**ONE_TRY), clock=FakeClock())
    guard.instrument()
    try:
        spotify.set_fault(Fault.no_healthy_upstream(), prefix="/v1")
        failed = httpx.get(TRACK_URL)
        assert (failed.status_code, failed.text) == (503, "no healthy upstream")  # intact
        assert guard.state("spotify_api") == "open"
        hits = spotify.total_hits
        with pytest.raises(httpx.TransportError) as from_httpx:
            httpx.get(TRACK_URL)
        with pytest.raises(httpx2.TransportError) as from_httpx2:
            httpx2.get(TRACK_URL)
        with pytest.raises(requests.ConnectionError) as from_requests:
            requests.get(TRACK_URL, timeout=5)
        for caught in (from_httpx, from_httpx2, from_requests):
            assert isinstance(caught.value, UpstreamUnavailable)
            assert caught.value.reason == "circuit_open"
        assert spotify.total_hits == hits
        assert httpx.post(TOKEN_URL, data={"grant_type": "x"}).status_code == 400  # other host
    finally:
        guard.close()


@pytest.mark.anyio
@pytest.mark.parametrize("module", [httpx, httpx2], ids=["httpx", "httpx2"])
async def test_instrumented_guard_applies_to_async_clients(spotify, module):
    """Async httpx and httpx2 on Spotify's real host: the failure is handed back, then refused."""
    guard = Guard(guard_settings(**ONE_TRY), clock=FakeClock())
    guard.instrument()
    try:
        spotify.set_fault(Fault.no_healthy_upstream())
        async with module.AsyncClient() as client:
            failed = await client.get(TRACK_URL)
            assert (failed.status_code, failed.text) == (503, "no healthy upstream")
            hits = spotify.total_hits
            with pytest.raises(module.TransportError) as refused:
                await client.get(TRACK_URL)
        assert isinstance(refused.value, UpstreamUnavailable)
        assert refused.value.reason == "circuit_open"
        assert spotify.total_hits == hits
    finally:
        guard.close()


def test_without_a_guard_faults_pass_straight_through(spotify):
    """No guard: the client sees exactly what the simulator answered."""
    spotify.set_fault(Fault.rate_limited(7), prefix="/v1/tracks")
    response = requests.get(TRACK_URL, timeout=5)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert httpx.get("https://api.spotify.com/v1/me").status_code == 200


# -- the documented examples run as written ----------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "testing.md"


def documented_tests() -> list[str]:
    """The python blocks of docs/testing.md that define a pytest test."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    return [block for block in blocks if "def test_" in block]


def now_playing_app(*, installed: bool) -> FastAPI:
    """An app whose /now-playing asks Spotify with unmodified tekore."""
    app = FastAPI()
    if installed:
        install(app, clock=FakeClock())

    @app.get("/now-playing")
    async def now_playing() -> dict[str, Any]:
        tk = tekore.Spotify("user-token", asynchronous=True)
        try:
            playing = await tk.playback_currently_playing()
        finally:
            await tk.close()
        return {"is_playing": playing.is_playing, "track": playing.item.name}

    return app


@pytest.mark.parametrize(("index", "installed"), [(0, True), (1, False)])
def test_documented_examples_pass(index, installed):
    """Each pytest example in docs/testing.md passes against a real app (no myapp import).

    The first expects the app to have called ``install(app)``; the second calls it itself.
    """
    source = documented_tests()[index].replace("from myapp import app", "")
    namespace: dict[str, Any] = {"app": now_playing_app(installed=installed)}
    exec(compile(source, str(DOCS), "exec"), namespace)  # noqa: S102 - our own documentation
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0]()


def test_readme_links_the_testing_page():
    """README, a front page now, sends readers to docs/testing.md for these examples."""
    readme = (DOCS.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "(docs/testing.md)" in readme


# -- the context: restored on exit, one at a time ---------------------------------------------


def test_leaving_restores_the_pools_even_on_error():
    """The pool methods are the originals again after the block, whether or not it raised."""
    before = pool_methods()
    simulator = SpotifySimulator()

    def fail_inside() -> None:
        with simulator.intercept():
            assert pool_methods() != before
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        fail_inside()
    assert pool_methods() == before
    assert dict(simulator.base_urls) == {}


def test_a_second_interception_is_refused_clearly(spotify):
    """Entering a second interception raises, and the first keeps working."""
    with pytest.raises(RuntimeError, match="already active"), SpotifySimulator().intercept():
        pass
    assert httpx.get(TRACK_URL).status_code == 200


# -- spotifyaio (aiohttp): needs the aiohttp adapter's interception hook ------------------------
# -- spotifyaio (aiohttp, so asyncio only) -------------------------------------------------------


def test_spotifyaio_unmodified_gets_its_documents_and_a_503_in_an_outage(spotify):
    """spotifyaio (https://api.spotify.com:443, hard-coded) is answered; an outage is a 503 problem.

    aiohttp runs on asyncio only, so this test does not run on trio.
    """
    import spotifyaio

    app = FastAPI()
    guard = install(app, guard_settings(**ONE_TRY), clock=FakeClock())

    @app.get("/spotifyaio/me")
    async def me() -> dict[str, Any]:
        client = spotifyaio.SpotifyClient()
        client.authenticate("user-token")
        try:
            user = await client.get_current_user()
            playlist = await client.get_playlist("37i9dQZF1DXcBWIGoYBM5M")
        finally:
            await client.close()
        return {"user": user.display_name, "items": len(playlist.tracks.items)}

    with TestClient(app, backend="asyncio", raise_server_exceptions=False) as client:
        healthy = client.get("/spotifyaio/me")
        assert healthy.status_code == 200
        assert healthy.json() == {"user": "Simulated User", "items": 3}
        spotify.set_fault(Fault.no_healthy_upstream())
        response = client.get("/spotifyaio/me")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert guard.state("spotify_api") == "open"
