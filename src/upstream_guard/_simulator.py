"""A simulated Spotify Web API (and accounts host) as an ASGI app, with switchable faults."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter, deque
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
    window_calls: int = 0
    window_s: float = 0.0

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
    def rolling_window(cls, calls: int, window_s: float) -> Fault:
        """A rate limit: ``calls`` answered per rolling ``window_s``, then 429s.

        As Spotify's: the 429 carries a Retry-After in whole seconds (at least 1) until the
        oldest counted call leaves the window; throttled calls are not counted.
        """
        if calls < 1 or window_s <= 0:
            raise ValueError(
                f"rolling_window needs calls >= 1 and window_s > 0, got {calls}, {window_s}"
            )
        return cls(kind="rolling_window", window_calls=calls, window_s=window_s)

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

    def __init__(self, *, seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        """Start healthy; ``clock`` times rolling windows (tests pass a fake one)."""
        self._faults: dict[str, Fault] = {}
        self._scripts: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._rng = random.Random(seed)  # noqa: S311 - fault injection, not crypto
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self._clock = clock
        self._windows: dict[Fault, deque[float]] = {}
        self.throttled = 0
        """Requests a rolling window answered with 429."""

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
            self._windows.clear()
            self.throttled = 0
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
        if fault.kind == "rolling_window":
            fault = self._windowed(fault)
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

    def _windowed(self, fault: Fault) -> Fault:
        """A rolling window's answer: healthy if the call fits (it is counted), else a 429."""
        wait = self._window_wait(fault)
        if wait is None:
            return Fault()
        return Fault.rate_limited(max(1, math.ceil(wait)))

    def _window_wait(self, fault: Fault) -> float | None:
        """Count a call in the fault's window; None if it fits, else the wait until one does."""
        now = self._clock()
        with self._lock:
            log = self._windows.setdefault(fault, deque())
            while log and log[0] <= now - fault.window_s:
                log.popleft()
            if len(log) < fault.window_calls:
                log.append(now)
                return None
            self.throttled += 1
            return log[0] + fault.window_s - now


def _json_headers() -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json; charset=utf-8"), *_SPOTIFY_HEADERS]


_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ARTIST = ("0OdUWJ0sBjDrqHygGUXeCF", "Band of Horses")
_ALBUM = ("6akEvsycLGftJxYudPjmqK", "Everything All the Time")
_PLAYLIST = "37i9dQZF1DXcBWIGoYBM5M"
_NOW_PLAYING = "11dFghVXANMlKmJXsNCbNl"
_MARKETS = ["CA", "DE", "GB", "SE", "US"]
_SEARCHABLE = ("album", "artist", "playlist", "track")
_SCOPES = "playlist-read-private user-read-email user-read-playback-state user-read-private"

Body = dict[str, Any]


def _sid(seed: str) -> str:
    """A stable 22-character base62 Spotify ID derived from ``seed``."""
    rng = random.Random(seed)  # noqa: S311 - ids, not crypto
    return "".join(rng.choices(_B62, k=22))


def _api(scope: Scope) -> str:
    """The simulator's own ``scheme://host/v1``, so hrefs lead back to it."""
    host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
    if not host and scope.get("server"):
        name, port = scope["server"]
        name = f"[{name}]" if ":" in name else name
        host = f"{name}:{port}" if port else name
    return f"{scope.get('scheme', 'http')}://{host or 'api.spotify.com'}/v1"


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl  # noqa: PLC0415 - only response bodies need it

    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


def _now_ms() -> int:
    import time  # noqa: PLC0415 - only response bodies need it

    return int(time.time() * 1000)


def _images(seed: str) -> list[Body]:
    return [
        {"url": f"https://i.scdn.co/image/{_sid(f'{seed}:{px}')}", "height": px, "width": px}
        for px in (640, 300, 64)
    ]


def _item(api: str, kind: str, item_id: str, **fields: Any) -> Body:
    """The fields every Spotify object shares, plus its own."""
    return {
        "external_urls": {"spotify": f"https://open.spotify.com/{kind}/{item_id}"},
        "href": f"{api}/{kind}s/{item_id}",
        "id": item_id,
        "type": kind,
        "uri": f"spotify:{kind}:{item_id}",
        **fields,
    }


def _page(href: str, query: dict[str, str], total: int, make: Callable[[int], Body]) -> Body:
    """An offset paging object over ``make(0) .. make(total - 1)``, honouring limit/offset."""
    from urllib.parse import quote, urlencode  # noqa: PLC0415 - only response bodies need it

    limit = max(1, int(query["limit"])) if query.get("limit", "").isdigit() else 20
    offset = int(query["offset"]) if query.get("offset", "").isdigit() else 0

    def link(at: int) -> str:
        params = urlencode({**query, "offset": at, "limit": limit})
        return f"{quote(href, safe=':/[]@')}?{params}"

    return {
        "href": link(offset),
        "items": [make(i) for i in range(offset, min(offset + limit, total))],
        "limit": limit,
        "next": link(offset + limit) if offset + limit < total else None,
        "offset": offset,
        "previous": link(max(0, offset - limit)) if offset else None,
        "total": total,
    }


def _user(api: str, private: bool = False) -> Body:
    user = _item(api, "user", _sid("simulated-user"), display_name="Simulated User")
    if private:
        user |= {
            "account_id": user["id"],
            "country": "SE",
            "email": "simulated.user@example.com",
            "explicit_content": {"filter_enabled": False, "filter_locked": False},
            "followers": {"href": None, "total": 42},
            "images": _images(user["id"]),
            "product": "premium",
        }
    return user


def _artist(api: str, artist_id: str = _ARTIST[0], full: bool = False) -> Body:
    name = _ARTIST[1] if artist_id == _ARTIST[0] else f"Artist {artist_id}"
    artist = _item(api, "artist", artist_id, name=name)
    if full:
        artist |= {
            "followers": {"href": None, "total": 1_234_567},
            "genres": ["indie rock"],
            "images": _images(artist_id),
            "popularity": 68,
        }
    return artist


def _album(api: str, album_id: str = _ALBUM[0]) -> Body:
    name = _ALBUM[1] if album_id == _ALBUM[0] else f"Album {album_id}"
    return _item(
        api,
        "album",
        album_id,
        album_type="album",
        artists=[_artist(api)],
        available_markets=_MARKETS,
        images=_images(album_id),
        name=name,
        release_date="2006-03-21",
        release_date_precision="day",
        total_tracks=10,
    )


def _track(api: str, track_id: str, **extra: Any) -> Body:
    """A full track object, plus the ``extra`` fields."""
    number = sum(map(ord, track_id))
    return _item(
        api,
        "track",
        track_id,
        album=_album(api),
        artists=[_artist(api)],
        available_markets=_MARKETS,
        disc_number=1,
        duration_ms=180_000 + number * 97 % 120_000,
        explicit=False,
        external_ids={"isrc": f"USSUB06{number % 100_000:05d}"},
        is_local=False,
        is_playable=True,
        name=f"Track {track_id}",
        popularity=61,
        preview_url=None,
        track_number=number % 10 + 1,
        **extra,
    )


def _playlist(api: str, playlist_id: str, full: bool = False) -> Body:
    """A full playlist (with its first page of items) or a simplified one."""
    total = 3
    playlist = _item(
        api,
        "playlist",
        playlist_id,
        collaborative=False,
        description="A playlist served by the simulator",
        images=_images(playlist_id),
        name=f"Playlist {playlist_id}",
        owner=_user(api),
        primary_color=None,
        public=True,
        snapshot_id=f"AAAA{_sid(f'snapshot:{playlist_id}')}",
    )
    if full:
        items = _playlist_items(api, playlist_id, {"limit": "100"}, total)
        return playlist | {
            "followers": {"href": None, "total": 1_000},
            "tracks": items,
            "items": items,
        }
    refs = {
        key: {"href": f"{api}/playlists/{playlist_id}/{key}", "total": total}
        for key in ("tracks", "items")
    }
    return playlist | refs


def _playlist_items(
    api: str, playlist_id: str, query: dict[str, str], total: int = 3, key: str = "items"
) -> Body:
    def entry(i: int) -> Body:
        track = _track(api, _sid(f"{playlist_id}:{i}"), episode=False, track=True)
        return {
            "added_at": "2024-05-03T10:15:30Z",
            "added_by": _user(api),
            "is_local": False,
            "item": track,
            "primary_color": None,
            "track": track,
            "video_thumbnail": {"url": None},
        }

    return _page(f"{api}/playlists/{playlist_id}/{key}", query, total, entry)


def _playback(api: str, with_device: bool = False) -> Body:
    context = _item(api, "playlist", _PLAYLIST)
    body = {
        "actions": {"disallows": {"resuming": True}},
        "context": {key: context[key] for key in ("external_urls", "href", "type", "uri")},
        "currently_playing_type": "track",
        "is_playing": True,
        "item": _track(api, _NOW_PLAYING),
        "progress_ms": 42_000,
        "timestamp": _now_ms(),
    }
    if with_device:
        body["device"] = {
            "id": "0d1841b0976bae2a3a310dd74c0f3df354899bc8",
            "is_active": True,
            "is_private_session": False,
            "is_restricted": False,
            "name": "Simulated speaker",
            "supports_volume": True,
            "type": "Computer",
            "volume_percent": 64,
        }
        body |= {"repeat_state": "off", "shuffle_state": False, "smart_shuffle": False}
    return body


def _catalog(api: str, kind: str, seed: str) -> Callable[[int], Body]:
    """Makes the ``i``-th made-up ``kind`` object of a listing named ``seed``."""

    def make(i: int) -> Body:
        item_id = _sid(f"{kind}:{seed}:{i}")
        if kind == "artist":
            return _artist(api, item_id, full=True)
        if kind == "album":
            return _album(api, item_id)
        if kind == "playlist":
            return _playlist(api, item_id)
        return _track(api, item_id)

    return make


def _search(api: str, query: dict[str, str]) -> Body:
    q = query.get("q", "")
    kinds = [k for k in query.get("type", "track").split(",") if k in _SEARCHABLE]
    return {
        f"{k}s": _page(f"{api}/search", query | {"type": k}, 5, _catalog(api, k, q)) for k in kinds
    }


def _body_for(scope: Scope) -> Body:  # noqa: C901, PLR0911 - one case per endpoint
    path: str = scope["path"].rstrip("/")
    api, query = _api(scope), _query(scope)
    match [p for p in path.split("/") if p]:
        case ["api", "token"]:
            return {
                "access_token": "sim-access-token",
                "token_type": "Bearer",
                "expires_in": 3600,
                "scope": _SCOPES,
            }
        case ["v1", "tracks", track_id]:
            return _track(api, track_id)
        case ["v1", "tracks"]:
            ids = [i for i in query.get("ids", "").split(",") if i]
            return {"tracks": [_track(api, i) for i in ids]}
        case ["v1", "search"]:
            return _search(api, query)
        case ["v1", "me"]:
            return _user(api, private=True)
        case ["v1", "me", "player", *rest] if rest in ([], ["currently-playing"]):
            return _playback(api, with_device=not rest)
        case ["v1", "me", "top", "tracks" | "artists" as kinds]:
            return _page(f"{api}/me/top/{kinds}", query, 10, _catalog(api, kinds[:-1], "top"))
        case ["v1", "me", "playlists"] | ["v1", "users", _, "playlists"]:
            mine = _catalog(api, "playlist", path)
            return _page(f"{api}{path.removeprefix('/v1')}", query, 2, mine)
        case ["v1", "playlists", playlist_id]:
            return _playlist(api, playlist_id, full=True)
        case ["v1", "playlists", playlist_id, "tracks" | "items" as key]:
            if scope["method"] != "GET":
                return {"snapshot_id": f"AAAB{_sid(f'snapshot:{playlist_id}:{_now_ms()}')}"}
            return _playlist_items(api, playlist_id, query, key=key)
    return {"ok": True, "path": path}
