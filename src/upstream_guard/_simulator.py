"""A simulated Spotify Web API (and accounts host) as an ASGI app, with switchable faults."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_SPOTIFY_HEADERS = [
    (b"server", b"envoy"),
    (b"via", b"HTTP/2 edgeproxy, 1.1 google"),
    (b"cache-control", b"private, max-age=0"),
]


@dataclass(frozen=True, slots=True)
class Fault:
    """How the simulator answers: ``healthy`` or one of the failure modes Spotify shows.

    Build one with the class methods: ``Fault.no_healthy_upstream()``, ``Fault.json_5xx(502)``,
    ``Fault.rate_limited(30)``, ``Fault.slow(2.0)``, ``Fault.hang()``, ``Fault.flapping(0.5)``.
    """

    kind: str = "healthy"
    status: int = 200
    retry_after: str | None = None
    delay_s: float = 0.0
    failure_rate: float = 0.0
    message: str = "Error"

    @classmethod
    def healthy(cls) -> Fault:
        """Answer normally."""
        return cls()

    @classmethod
    def no_healthy_upstream(cls) -> Fault:
        """Envoy's plain-text 503 when its cluster has no healthy host."""
        return cls(kind="no_healthy_upstream", status=503)

    @classmethod
    def json_5xx(cls, status: int = 500) -> Fault:
        """A JSON error body with a 5xx status."""
        return cls(kind="json_5xx", status=status)

    @classmethod
    def rate_limited(cls, retry_after: str | float | None = 1) -> Fault:
        """429 with a Retry-After (seconds, a date, garbage, or None for no header)."""
        value = None if retry_after is None else str(retry_after)
        return cls(kind="rate_limited", status=429, retry_after=value)

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        """Answer normally after ``delay_s`` seconds."""
        return cls(kind="slow", delay_s=delay_s)

    @classmethod
    def hang(cls) -> Fault:
        """Accept the request and never answer (until the simulator is released)."""
        return cls(kind="hang")

    @classmethod
    def held(cls) -> Fault:
        """Wait until the simulator is released, then answer normally."""
        return cls(kind="held")

    @classmethod
    def respond(cls, status: int, message: str = "Error") -> Fault:
        """Any status, e.g. 401 or 403, with Spotify's JSON error shape."""
        return cls(kind="status", status=status, message=message)

    @classmethod
    def flapping(cls, failure_rate: float) -> Fault:
        """Answer ``no healthy upstream`` to that fraction of requests, normally to the rest."""
        return cls(kind="flapping", status=503, failure_rate=failure_rate)


class SpotifySimulator:
    """An ASGI app speaking enough of Spotify's Web API and accounts host for tests and demos.

    Faults are set per path prefix (``"/v1/tracks"``, ``"/api/token"``, or ``""`` for
    everything) with ``set_fault``; the longest matching prefix wins. ``hits`` counts the
    requests that reached it by path.
    """

    def __init__(self, *, seed: int = 0) -> None:
        """Start healthy."""
        self._faults: dict[str, Fault] = {}
        self._scripts: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._rng = random.Random(seed)  # noqa: S311 - fault injection, not crypto
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []

    def set_fault(self, fault: Fault, prefix: str = "") -> None:
        """Answer requests whose path starts with ``prefix`` according to ``fault``."""
        with self._lock:
            self._faults[prefix] = fault

    def script(self, faults: list[Fault], prefix: str = "") -> None:
        """Answer the next requests under ``prefix`` with these faults in turn, then as before."""
        with self._lock:
            self._scripts[prefix] = list(faults)

    def heal(self) -> None:
        """Clear every fault and script, forget the hits, and release waiting requests."""
        with self._lock:
            self._faults.clear()
            self._scripts.clear()
            self.hits.clear()
            self.requests.clear()
            released, self._release = self._release, threading.Event()
        released.set()

    def release(self) -> None:
        """Let hanging requests go (they answer 504) and held ones answer normally."""
        self._release.set()

    @property
    def total_hits(self) -> int:
        """Requests received so far."""
        return sum(self.hits.values())

    def _fault_for(self, path: str) -> Fault:
        with self._lock:
            scripted = [p for p, queue in self._scripts.items() if queue and path.startswith(p)]
            if scripted:
                return self._scripts[max(scripted, key=len)].pop(0)
            matching = [p for p in self._faults if path.startswith(p)]
            return self._faults[max(matching, key=len)] if matching else Fault()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request."""
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        self.hits[path] += 1
        self.requests.append((scope["method"], path))
        fault = self._fault_for(path)
        status, headers, body = await self._answer(fault, scope)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, fault: Fault, scope: Scope) -> tuple[int, list[Any], bytes]:
        kind = fault.kind
        if kind == "flapping":
            kind = "no_healthy_upstream" if self._rng.random() < fault.failure_rate else "healthy"
        if kind == "no_healthy_upstream":
            return 503, [(b"content-type", b"text/plain")], b"no healthy upstream"
        if kind == "json_5xx":
            err = {"error": {"status": fault.status, "message": "Server error"}}
            return fault.status, _json_headers(), json.dumps(err).encode()
        if kind == "rate_limited":
            headers = _json_headers()
            if fault.retry_after is not None:
                headers.append((b"retry-after", fault.retry_after.encode("latin-1")))
            err = {"error": {"status": 429, "message": "API rate limit exceeded"}}
            return 429, headers, json.dumps(err).encode()
        if kind == "status":
            err = {"error": {"status": fault.status, "message": fault.message}}
            return fault.status, _json_headers(), json.dumps(err).encode()
        if kind in ("hang", "held"):
            await anyio.to_thread.run_sync(self._release.wait, abandon_on_cancel=True)
            if kind == "hang":
                return 504, [(b"content-type", b"text/plain")], b"upstream request timeout"
        if kind == "slow":
            await anyio.sleep(fault.delay_s)
        return 200, _json_headers(), json.dumps(_body_for(scope)).encode()


def _json_headers() -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json; charset=utf-8"), *_SPOTIFY_HEADERS]


def _track(track_id: str) -> dict[str, Any]:
    return {
        "id": track_id,
        "type": "track",
        "name": f"Track {track_id}",
        "uri": f"spotify:track:{track_id}",
        "duration_ms": 215_000,
        "explicit": False,
        "popularity": 61,
        "artists": [{"id": "0OdUWJ0sBjDrqHygGUXeCF", "name": "Band of Horses", "type": "artist"}],
        "album": {"id": "6akEvsycLGftJxYudPjmqK", "name": "Everything All the Time"},
    }


def _body_for(scope: Scope) -> dict[str, Any]:  # noqa: PLR0911 - one answer per endpoint
    path: str = scope["path"].rstrip("/")
    parts = [p for p in path.split("/") if p]
    if path == "/api/token":
        return {"access_token": "sim-access-token", "token_type": "Bearer", "expires_in": 3600}
    if len(parts) == 3 and parts[:2] == ["v1", "tracks"]:
        return _track(parts[2])
    if path == "/v1/search":
        return {"tracks": {"items": [_track("3n3Ppam7vgaVa1iaRUc9Lp")], "total": 1, "limit": 20}}
    if path == "/v1/me":
        return {"id": "sim-user", "display_name": "Simulated User", "type": "user"}
    if path.startswith("/v1/me/player/currently-playing") or path == "/v1/me/player":
        return {"is_playing": True, "progress_ms": 42_000, "item": _track("11dFghVXANMlKmJXsNCbNl")}
    if len(parts) >= 3 and parts[:2] == ["v1", "playlists"]:
        return {
            "id": parts[2],
            "type": "playlist",
            "name": "Simulated playlist",
            "tracks": {"items": [{"track": _track("7ouMYWpwJ422jRcDASZB7P")}], "total": 1},
        }
    return {"ok": True, "path": path}
