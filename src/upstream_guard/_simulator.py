"""A simulated Spotify Web API (and accounts host) as an ASGI app, with switchable faults."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Self
from urllib.parse import parse_qs

import anyio
import anyio.to_thread

from ._simulated_accounts import TokenEndpoint
from ._simulated_api import body_for

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
    def parse(cls, spec: str) -> Fault:
        """A fault from its name and optional argument: ``rate_limited:30``, ``slow:2``.

        Names (argument in brackets): ``healthy``, ``no_healthy_upstream``,
        ``json_5xx[:status]``, ``rate_limited[:retry_after]``, ``slow:seconds``, ``hang``,
        ``flapping:rate``, ``status:code``, ``rolling_window:calls/seconds``. Raises
        ``ValueError`` naming them otherwise.
        """
        name, _, arg = spec.strip().partition(":")
        make = _PARSERS.get(name)
        if make is None:
            raise ValueError(f"unknown fault {name!r}; one of: {', '.join(FAULT_NAMES)}")
        try:
            return make(arg)
        except ValueError as exc:
            raise ValueError(f"bad argument for fault {name!r}: {arg!r} ({exc})") from None

    def spec(self) -> str:
        """The name ``parse`` reads back (``rate_limited:30``)."""
        arg = {
            "json_5xx": str(self.status),
            "rate_limited": self.retry_after or "",
            "slow": f"{self.delay_s:g}",
            "flapping": f"{self.failure_rate:g}",
            "status": str(self.status),
            "rolling_window": f"{self.window_calls}/{self.window_s:g}",
        }.get(self.kind, "")
        return f"{self.kind}:{arg}" if arg else self.kind

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


def _required(arg: str) -> str:
    if not arg:
        raise ValueError("an argument is required")
    return arg


def _rate(arg: str) -> float:
    rate = float(_required(arg))
    if not 0 <= rate <= 1:
        raise ValueError("a rate between 0 and 1")
    return rate


def _status(arg: str, low: int, high: int) -> int:
    status = int(arg)
    if not low <= status <= high:
        raise ValueError(f"a status from {low} to {high}")
    return status


def _window(arg: str) -> Fault:
    calls, sep, seconds = arg.partition("/")
    if not sep:
        raise ValueError("give it as CALLS/SECONDS, e.g. 90/30")
    return Fault.rolling_window(int(calls), float(seconds))


_PARSERS: dict[str, Callable[[str], Fault]] = {
    "healthy": lambda _: Fault.healthy(),
    "no_healthy_upstream": lambda _: Fault.no_healthy_upstream(),
    "json_5xx": lambda a: Fault.json_5xx(_status(a, 500, 599) if a else 500),
    "rate_limited": lambda a: Fault.rate_limited(a or 1),
    "slow": lambda a: Fault.slow(max(0.0, float(_required(a)))),
    "hang": lambda _: Fault.hang(),
    "flapping": lambda a: Fault.flapping(_rate(a)),
    "status": lambda a: Fault.respond(_status(_required(a), 100, 599)),
    "rolling_window": lambda a: _window(_required(a)),
}
FAULT_NAMES = tuple(_PARSERS)
"""The fault names ``Fault.parse`` (and ``upstream-guard simulate --fault``) knows."""


class SpotifySimulator:
    """An ASGI app speaking enough of Spotify's Web API and accounts host for tests and demos.

    Faults are set per path prefix (``"/v1/tracks"``, ``"/api/token"``, or ``""`` for
    everything) with ``set_fault``; the longest matching prefix wins. ``hits`` counts the
    requests that reached it by path.

    With ``control_path`` (``upstream-guard simulate`` uses ``/_simulator``), a person can
    switch faults of the running simulator over HTTP: ``GET {control_path}/fault`` lists
    them, ``PUT {control_path}/fault`` with a body such as ``rate_limited:30`` sets one
    (``?prefix=/v1/tracks`` for one path prefix only), ``DELETE`` heals everything.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        control_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start healthy.

        ``control_path`` (e.g. ``/_simulator``) enables fault switching; ``clock`` times
        rolling windows (tests pass a fake one).
        """
        self.control_path = None if control_path is None else control_path.rstrip("/")
        self._faults: dict[str, Fault] = {}
        self._scripts: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._rng = random.Random(seed)  # noqa: S311 - fault injection, not crypto
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self._base_urls: dict[str, str] = {}
        self._accounts = TokenEndpoint()
        self._clock = clock
        self._windows: dict[Fault, deque[float]] = {}
        self.throttled = 0
        """Requests a rolling window answered with 429."""

    @contextmanager
    def intercept(self) -> Iterator[Self]:
        """Answer every call to ``api.spotify.com`` and ``accounts.spotify.com`` while active.

        Calls made with httpx, httpx2, requests (so tekore and spotipy) and aiohttp (when
        its adapter is installed) keep their ``https://`` URLs: their connections go to
        this simulator on loopback instead. A guard, installed or not, decides as it would
        for the real hosts. Yields the simulator. Only one interception can be active at a
        time; leaving the block restores everything, also on error.

            with SpotifySimulator().intercept() as spotify:
                spotify.set_fault(Fault.no_healthy_upstream())
                ...  # your app's calls to Spotify now meet an outage
        """
        from ._intercept import intercepting  # noqa: PLC0415 - needs uvicorn: tests only

        with intercepting(self, release=self.release) as base_urls:
            self._base_urls = base_urls
            try:
                yield self
            finally:
                self._base_urls = {}

    @property
    def base_urls(self) -> Mapping[str, str]:
        """While intercepting: each host's loopback base URL (``http://127.0.0.1:PORT``)."""
        return MappingProxyType(self._base_urls)

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
            self._accounts.forget()
            self._windows.clear()
            self.throttled = 0
            released, self._release = self._release, threading.Event()
        released.set()

    def revoke(self, refresh_token: str) -> None:
        """Answer ``POST /api/token`` with this refresh token as Spotify does once it is revoked.

        (400 ``invalid_grant``, ``Refresh token revoked``; ``heal()`` forgets revocations.)
        """
        self._accounts.revoke(refresh_token)

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
        if self.control_path is not None and path == f"{self.control_path}/fault":
            await self._control(scope, receive, send)
            return
        self.hits[path] += 1
        self.requests.append((scope["method"], path))
        fault = self._fault_for(path)
        if fault.kind == "rolling_window":
            fault = self._windowed(fault)
        status, headers, body = await self._answer(fault, scope, receive)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def faults(self) -> dict[str, str]:
        """The faults set, by path prefix (``""``: every path), as ``Fault.parse`` reads them."""
        with self._lock:
            return {prefix: fault.spec() for prefix, fault in self._faults.items()}

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        body = await _read_body(receive)
        status = 200
        answer: dict[str, Any]
        if method == "PUT":
            try:
                fault = Fault.parse(body.decode("utf-8", "replace"))
            except ValueError as exc:
                status, answer = 400, {"error": str(exc)}
            else:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                self.set_fault(fault, query.get("prefix", [""])[0])
                answer = {"faults": self.faults()}
        elif method == "DELETE":
            self.heal()
            answer = {"faults": self.faults()}
        elif method == "GET":
            answer = {"faults": self.faults(), "known": list(FAULT_NAMES)}
        else:
            status, answer = 405, {"error": "GET, PUT or DELETE"}
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        if status == 405:
            headers.append((b"allow", b"GET, PUT, DELETE"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    async def _answer(
        self, fault: Fault, scope: Scope, receive: Receive
    ) -> tuple[int, list[Any], bytes]:
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
        return await self._healthy(scope, receive)

    async def _healthy(self, scope: Scope, receive: Receive) -> tuple[int, list[Any], bytes]:
        if scope["path"].rstrip("/") == "/api/token":
            status, token = self._accounts.answer(
                scope["method"], dict(scope.get("headers") or []), await _read_body(receive)
            )
            return status, _json_headers(), json.dumps(token).encode()
        return _status_for(scope), _json_headers(), json.dumps(body_for(scope)).encode()

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


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _status_for(scope: Scope) -> int:
    """201 for what Spotify creates (playlist items, a playlist); 200 otherwise."""
    parts = [p for p in scope["path"].split("/") if p]
    created = (
        scope["method"] == "POST"
        and len(parts) == 4
        and parts[0] == "v1"
        and (parts[1], parts[3]) in {("playlists", "tracks"), ("playlists", "items")}
    )
    return 201 if created else 200


def _json_headers() -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json; charset=utf-8"), *_SPOTIFY_HEADERS]
