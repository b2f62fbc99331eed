"""A small FastAPI app that calls the Spotify Web API (plain httpx, and spotifyaio for /me).

Guarded by one line: ``install(app)``.

Run it (from the repository root):

    uvicorn app:create_app --factory --app-dir examples/fastapi_app

Environment: ``SPOTIFY_API_URL`` (default https://api.spotify.com), ``SPOTIFY_TOKEN`` (a bearer
token; a placeholder by default), ``UPSTREAM_GUARD_*`` for the guard, ``OTEL_*`` for telemetry.
"""

from __future__ import annotations

import functools
import html
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import aiohttp
import httpx
from fastapi import APIRouter, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from spotifyaio import SpotifyClient

from upstream_guard import GuardSettings, install

DEFAULT_API_URL = "https://api.spotify.com"
PLACEHOLDER_TOKEN = "replace-me-with-a-spotify-access-token"  # noqa: S105 - not a secret
GUARD_HEADER = "x-upstream-guard"  # the guard marks its stale copies "x-upstream-guard: stale"

router = APIRouter()


def create_app(
    settings: GuardSettings | None = None,
    *,
    guarded: bool = True,
    api_url: str | None = None,
    token: str | None = None,
    clock: Any = None,
) -> FastAPI:
    """Build the app; ``guarded=False`` builds the same app without upstream_guard.

    ``settings`` default to ``GuardSettings()`` (read from ``UPSTREAM_GUARD_*`` variables);
    ``api_url`` and ``token`` to ``SPOTIFY_API_URL`` and ``SPOTIFY_TOKEN``; ``clock`` is for
    tests (``upstream_guard.testing.FakeClock``).
    """
    base_url = (api_url or os.environ.get("SPOTIFY_API_URL") or DEFAULT_API_URL).rstrip("/")
    app_token = token or os.environ.get("SPOTIFY_TOKEN") or PLACEHOLDER_TOKEN

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One plain httpx client for the app's life: nothing in it knows about the guard.
        headers = {"authorization": f"Bearer {app_token}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
            app.state.spotify = client
            app.state.token = app_token
            yield

    app = FastAPI(title="Spotify demo", lifespan=lifespan)
    app.include_router(router)

    if guarded:
        guard = install(app, settings, clock=clock)

        @guard.fallback("/now-playing")
        async def now_playing_fallback(_request: Request, _error: BaseException) -> Response:
            """While Spotify is unavailable, say nothing is playing rather than fail."""
            return JSONResponse({"is_playing": False, "degraded": True})

    if configure_telemetry():
        _instrument_fastapi(app)
    return app


@router.get("/now-playing")
async def now_playing(request: Request, response: Response) -> dict[str, Any]:
    """What the listener is playing (their token if they send one, else the app's)."""
    headers = {}
    if "authorization" in request.headers:  # playback state belongs to a listener
        headers["authorization"] = request.headers["authorization"]
    upstream = await _spotify(request).get("/v1/me/player/currently-playing", headers=headers)
    _raise_for_status(upstream)
    _mark_copy(upstream, response)
    if upstream.status_code == 204:  # Spotify's answer when nothing is playing
        return {"is_playing": False}
    body = upstream.json()
    item = body.get("item") or {}
    return {
        "is_playing": bool(body.get("is_playing")),
        "track": item.get("name"),
        "artists": _artists(item),
    }


@router.get("/me")
async def me(request: Request) -> dict[str, Any]:
    """The listener's profile, through spotifyaio (aiohttp; it always calls api.spotify.com).

    spotifyaio builds ``https://api.spotify.com:443`` itself and checks no status but 204 and
    404: an outage reaches this route as a parse error. The guard sees the failed call and
    answers 503 for it (with the aiohttp adapter installed by ``install(app)``).
    """
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    # A session per request keeps the rest of the app free of aiohttp's asyncio-only loop.
    async with aiohttp.ClientSession() as session:
        spotify = SpotifyClient(session=session)
        spotify.authenticate(token or request.app.state.token)
        user = await spotify.get_current_user()
    return {"id": user.user_id, "name": user.display_name, "product": str(user.product)}


@router.get("/search")
async def search(
    request: Request,
    response: Response,
    q: Annotated[str, Query(min_length=1, max_length=200)],
) -> dict[str, Any]:
    """Tracks matching ``q``."""
    params = {"q": q, "type": "track", "limit": "5"}
    upstream = await _spotify(request).get("/v1/search", params=params)
    _raise_for_status(upstream)
    _mark_copy(upstream, response)
    tracks = (upstream.json().get("tracks") or {}).get("items", [])
    return {
        "q": q,
        "tracks": [
            {"id": t.get("id"), "name": t.get("name"), "artists": _artists(t)} for t in tracks
        ],
    }


@router.get("/playlists/{playlist_id}", response_class=HTMLResponse)
async def playlist_page(
    request: Request,
    playlist_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9]{1,64}$")],
) -> HTMLResponse:
    """A small HTML page listing a playlist's tracks."""
    upstream = await _spotify(request).get(f"/v1/playlists/{playlist_id}")
    _raise_for_status(upstream)
    playlist = upstream.json()
    tracks = [entry.get("track") or {} for entry in (playlist.get("tracks") or {}).get("items", [])]
    rows = "".join(
        f"<li>{html.escape(str(t.get('name')))} by {html.escape(', '.join(_artists(t)))}</li>"
        for t in tracks
    )
    note = ""
    if upstream.headers.get(GUARD_HEADER) == "stale":
        age = html.escape(upstream.headers.get("age", "?"))
        note = f"<p><em>Spotify is unavailable: showing a copy from {age} s ago.</em></p>"
    name = html.escape(str(playlist.get("name")))
    page = (
        f"<!doctype html><html><head><title>{name}</title></head>"
        f"<body><h1>{name}</h1>{note}<ol>{rows}</ol></body></html>"
    )
    response = HTMLResponse(page)
    _mark_copy(upstream, response)
    return response


def _raise_for_status(upstream: httpx.Response) -> None:
    """Pass Spotify's 4xx on (a bad token, an unknown id); raise for the rest.

    A 5xx or a 429 raises ``httpx.HTTPStatusError``; the guard saw that call fail, so it
    answers for the route (its fallback, or a 503). Without the guard it becomes a 500.
    """
    if 400 <= upstream.status_code < 500 and upstream.status_code != 429:
        raise HTTPException(upstream.status_code, f"Spotify answered {upstream.status_code}")
    upstream.raise_for_status()


def _spotify(request: Request) -> httpx.AsyncClient:
    client: httpx.AsyncClient = request.app.state.spotify
    return client


def _artists(item: dict[str, Any]) -> list[str]:
    return [str(a.get("name")) for a in item.get("artists", [])]


def _mark_copy(upstream: httpx.Response, response: Response) -> None:
    """Tell our caller whether the data is live or the guard's stale copy (and its age)."""
    if upstream.headers.get(GUARD_HEADER) == "stale":
        response.headers["x-spotify-data"] = "stale"
        response.headers["age"] = upstream.headers.get("age", "0")
    else:
        response.headers["x-spotify-data"] = "live"


@functools.cache
def configure_telemetry() -> bool:
    """Set up the OpenTelemetry SDK once, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

    Spans (and metrics, unless ``OTEL_METRICS_EXPORTER=none``) go out over OTLP/HTTP; the
    exporters read the standard ``OTEL_EXPORTER_OTLP_*`` variables. The service name is
    ``OTEL_SERVICE_NAME``, default ``spotify-demo``.
    """
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    # Imported here: the SDK and exporters are the demo extra, not the library's dependencies.
    from opentelemetry import metrics, trace  # noqa: PLC0415
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
        OTLPMetricExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "spotify-demo")}
    )
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp") != "none":
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(tracer_provider)
    if os.environ.get("OTEL_METRICS_EXPORTER", "otlp") != "none":
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    return True


def _instrument_fastapi(app: FastAPI) -> None:
    """A server span per request, if opentelemetry-instrumentation-fastapi is installed."""
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415
    except ImportError:
        return
    # One server span per request; the ASGI send/receive spans add noise, not insight.
    FastAPIInstrumentor.instrument_app(app, exclude_spans=["receive", "send"])
