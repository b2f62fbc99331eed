"""The Guard: the upstreams' live state, and the transports that apply it."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar, cast

from . import _instrument
from . import _telemetry as telemetry
from ._breaker import CLOSED, HALF_OPEN, ISOLATED, OPEN
from ._clock import Clock, SystemClock
from ._context import guarding, state
from ._events import CallEvent, Subscribers
from ._pipeline import UpstreamRuntime
from ._settings import GuardSettings, ascii_host
from ._transports import flavor_of

if TYPE_CHECKING:
    import aiohttp
    import httpx
    import requests

    from ._redis import SharedState

F = TypeVar("F", bound=Callable[..., Any])
BreakerState = Literal["closed", "open", "half-open", "isolated"]
_STATE_RANK = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2, ISOLATED: 3}
_guarding = guarding.get  # bound once: 3.11 would look ``guarding.get`` up on every call


class Guard:
    """Circuit breakers, retries, the 429 cooldown and fallbacks for configured upstreams.

    Works standalone (``guard.async_transport()`` in any httpx client) or installed in an
    ASGI app with ``install(app)``.
    """

    def __init__(
        self,
        settings: GuardSettings | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Build the upstreams' state from ``settings`` (default: read from the environment)."""
        self.settings = settings if settings is not None else GuardSettings()
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not crypto
        self._subscribers = Subscribers()
        self._telemetry = telemetry.Telemetry()
        self.fallbacks: dict[str, Any] = {}
        self.state_hooks: list[Any] = []
        self.upstreams: dict[str, UpstreamRuntime] = {}
        # host -> (runtime for any port, {port: runtime})
        self._hosts: dict[str, tuple[UpstreamRuntime | None, dict[int, UpstreamRuntime]]] = {}
        telemetry.register(self)
        for name, upstream in self.settings.upstreams.items():
            if not upstream.enabled:
                continue
            rt = UpstreamRuntime(name, upstream, self.clock, self.state_hooks, self.rng)
            self.upstreams[name] = rt
            for entry in upstream.hosts:
                host, port = _split_host(entry)
                # Clients send an internationalised host in ASCII (punycode): both forms match.
                for form in dict.fromkeys((host, ascii_host(host))):
                    any_port, ports = self._hosts.get(form, (None, {}))
                    if port is None:
                        any_port = rt
                    else:
                        ports[port] = rt
                    self._hosts[form] = (any_port, ports)
        self.shared: SharedState | None = None
        if self.settings.redis_url:
            from ._redis import SharedState  # noqa: PLC0415 - redis is optional

            self.shared = SharedState(
                self,
                self.settings.redis_url,
                prefix=self.settings.redis_prefix,
                interval_s=self.settings.redis_sync_interval_s,
            )

    def _route(self, url: Any) -> UpstreamRuntime | None:
        """The upstream a call to ``url`` is guarded as; None passes it straight through.

        The one way in for every client (``url`` has ``host``, ``port`` and ``scheme``):
        a call made while a guard already drives one (an instrumented transport under a
        guarded one), or to a host no upstream names, passes.
        """
        if state.patched and _guarding():  # only patched clients set it
            return None
        found = self._hosts.get(url.host)
        if found is None:
            return None
        any_port, ports = found
        if ports:
            port = url.port or (443 if url.scheme == "https" else 80)
            return ports.get(port, any_port)
        return any_port

    # -- public API ----------------------------------------------------------------------

    def async_transport(self, inner: Any = None) -> httpx.AsyncBaseTransport:
        """An async transport that guards calls through ``inner``; others pass through.

        ``inner`` defaults to ``httpx.AsyncHTTPTransport()``. The transport is of
        ``inner``'s library: wrap an ``httpx2.AsyncHTTPTransport`` for an httpx2 client.
        """
        transport: httpx.AsyncBaseTransport = flavor_of(inner).async_transport(self, inner)
        return transport

    def sync_transport(self, inner: Any = None) -> httpx.BaseTransport:
        """A sync transport that guards calls through ``inner`` (as ``async_transport``)."""
        transport: httpx.BaseTransport = flavor_of(inner).sync_transport(self, inner)
        return transport

    def requests_session(self) -> requests.Session:
        """A ``requests.Session`` whose calls to guarded hosts go through this guard."""
        from ._sessions import guarded_session  # noqa: PLC0415 - requests is optional

        return guarded_session(self)

    def aiohttp_middleware(self) -> aiohttp.ClientMiddlewareType:
        """An aiohttp client middleware whose calls to guarded hosts go through this guard.

        ``aiohttp.ClientSession(middlewares=[guard.aiohttp_middleware()])``, without
        ``install``; put it last, below the session's other middlewares. asyncio only.
        """
        from ._aiohttp import middleware  # noqa: PLC0415 - aiohttp is optional

        return middleware(self)

    def subscribe(self, fn: Callable[[CallEvent], None]) -> Callable[[], None]:
        """Call ``fn(event)`` after every guarded call; returns a function that stops it.

        ``fn`` runs in the caller's thread or task, right after the call: keep it quick
        (count, log, hand over to a queue). If it raises, the error is logged and the call
        goes on.
        """
        return self._subscribers.add(fn)

    def instrument(self) -> None:
        """Guard httpx, httpx2, requests and aiohttp calls made anywhere in this process.

        ``install(app)`` does it for an app. Clients keep working as they are; calls to
        hosts no upstream names pass straight through. The guard is held until ``close()``,
        which undoes it.
        """
        _instrument.instrument(self, weak=False)

    def fallback(self, path: str) -> Callable[[F], F]:
        """Register a route's own fallback: ``(request, error) -> Response``, sync or async.

        ``path`` is the request path or the route's template (``/tracks/{id}``).
        """

        def register(handler: F) -> F:
            self.fallbacks[path] = handler
            return handler

        return register

    def isolate(self, upstream: str) -> None:
        """Refuse every call to ``upstream`` with ``CircuitOpenError`` (reason ``isolated``).

        An operator's switch, for an upstream known to be down or misbehaving: it holds
        until ``reset``. With ``redis_url`` it holds for every worker within one sync
        interval, and is kept in Redis so that a restarted worker is isolated too.
        Unknown names raise ``KeyError``.
        """
        rt = self._runtime(upstream)
        rt.isolate()
        if self.shared is not None:
            self.shared.wake()

    def reset(self, upstream: str) -> None:
        """Put ``upstream`` back to closed: isolation lifted, breaker counters cleared.

        With ``redis_url``, every worker does the same within one sync interval. A 429
        cooldown still runs out: the upstream asked for it. Unknown names raise ``KeyError``.
        """
        rt = self._runtime(upstream)
        rt.reset()
        if self.shared is not None:
            rt.reset_requested = True
            self.shared.wake()

    def state(self, upstream: str) -> BreakerState:
        """``closed``, ``open``, ``half-open`` or ``isolated``: the worst of its breakers."""
        rt = self._runtime(upstream)
        if rt.isolated:
            return "isolated"
        worst = CLOSED
        for breaker in rt.breakers.values():
            if _STATE_RANK[breaker.state] > _STATE_RANK[worst]:
                worst = breaker.state
        return cast("BreakerState", worst)

    def retry_after_s(self, upstream: str) -> float:
        """Seconds until ``upstream`` may be called again (open breaker or 429 cooldown)."""
        return self._runtime(upstream).retry_after_s()

    def snapshot(self) -> dict[str, Any]:
        """The health document: overall status and each upstream's state (no secrets)."""
        upstreams: dict[str, Any] = {}
        for name, rt in self.upstreams.items():
            state = self.state(name)
            upstreams[name] = {
                "state": state,
                "isolated": rt.isolated,
                "failures": sum(b.failures_total for b in rt.breakers.values()),
                "consecutive_failures": max(
                    (b.fail_counter for b in rt.breakers.values()), default=0
                ),
                "retry_after_s": round(rt.retry_after_s(), 3),
                "cooldown_s": round(rt.cooldown.remaining(self.clock.monotonic()), 3),
                "last_failure": next(
                    (b.last_failure for b in rt.breakers.values() if b.last_failure), None
                ),
                "breakers": {key: b.state for key, b in rt.breakers.items()},
                "pace": rt.pace.view(),
            }
        states = {u["state"] for u in upstreams.values()}
        status = "ok"
        shared = "off" if self.shared is None else self.shared.status
        if OPEN in states or ISOLATED in states:
            status = "unavailable"
        elif (
            HALF_OPEN in states
            or any(u["cooldown_s"] > 0 for u in upstreams.values())
            or shared == "degraded"
            or any(u["pace"]["shared"] == "local_share" for u in upstreams.values())
        ):
            status = "degraded"
        return {"status": status, "shared_state": shared, "upstreams": upstreams}

    def start(self) -> None:
        """Start background work: syncing shared state with Redis when ``redis_url`` is set.

        The middleware calls it on lifespan startup; standalone users call it (or use the
        guard as a context manager: ``with Guard(settings) as guard: ...``).
        """
        if self.shared is not None:
            self.shared.start()

    def close(self) -> None:
        """Stop background work (a last sync first, so no news is lost); undo ``instrument``.

        The clients are unpatched once no instrumented guard is left.
        """
        _instrument.uninstrument(self)
        if self.shared is not None:
            self.shared.stop()

    def __enter__(self) -> Self:
        """Start background work."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop background work."""
        self.close()

    def _runtime(self, upstream: str) -> UpstreamRuntime:
        try:
            return self.upstreams[upstream]
        except KeyError:
            known = ", ".join(sorted(self.upstreams)) or "none"
            raise KeyError(f"no upstream named {upstream!r} (known: {known})") from None


def _split_host(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        end = entry.index("]")
        host, rest = entry[1:end], entry[end + 1 :]
        return host, int(rest[1:]) if rest else None
    host, sep, port = entry.rpartition(":")
    return (host, int(port)) if sep else (entry, None)
