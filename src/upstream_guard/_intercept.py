"""Spotify's real hosts answered by an ASGI app on loopback: ``SpotifySimulator.intercept()``.

The app is served by uvicorn on one loopback socket per host. While the interception is
active, connections that httpx (httpcore), httpx2 (httpcore2), requests (urllib3) and, when
its adapter is present, aiohttp open to those hosts go to that socket over plain HTTP
instead. The redirection sits at the connection pools, below the guard's patches (which wrap
the transports' send methods): the guard, and the client, still see ``https://api.spotify.com``
and decide as they would for the real host. The app sees the real host too (``Host`` header,
``https`` scheme), so the links it writes into its answers lead back to it.

One interception at a time in a process; leaving it restores the pools' methods, also on
error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

from ._loopback import listening_socket, serving

SPOTIFY_HOSTS = ("api.spotify.com", "accounts.spotify.com")

_lock = threading.Lock()
_active = False


@contextmanager
def intercepting(
    app: Any,
    hosts: tuple[str, ...] = SPOTIFY_HOSTS,
    *,
    release: Callable[[], None] | None = None,
) -> Iterator[dict[str, str]]:
    """Answer every call to ``hosts`` with ``app``; yield host -> its loopback base URL."""
    global _active  # noqa: PLW0603 - one interception per process, like the patches it makes
    with _lock:
        if _active:
            raise RuntimeError(
                "SpotifySimulator.intercept() is already active: one simulator answers "
                "Spotify's hosts at a time; leave the first `with` block before entering another"
            )
        _active = True
    try:
        sockets = {host: listening_socket() for host in hosts}
        ports = {host: int(sock.getsockname()[1]) for host, sock in sockets.items()}
        targets = {host: f"http://127.0.0.1:{port}" for host, port in ports.items()}
        as_real_host = _AsRealHost(app, {port: host for host, port in ports.items()})
        with ExitStack() as stack:
            stack.enter_context(serving(as_real_host, list(sockets.values()), release=release))
            stack.enter_context(_redirected(ports))
            aiohttp_intercepting = _aiohttp_intercepting()
            if aiohttp_intercepting is not None:
                stack.enter_context(aiohttp_intercepting(targets))
            yield targets
    finally:
        with _lock:
            _active = False


class _AsRealHost:
    """The app as the real host: ``Host`` and scheme as the client meant them."""

    def __init__(self, app: Any, ports: Mapping[int, str]) -> None:
        self._app = app
        self._ports = ports

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        host = self._ports.get((scope.get("server") or ("", 0))[1])
        if scope["type"] in ("http", "websocket") and host is not None:
            headers = [(k, v) for k, v in scope.get("headers", []) if k != b"host"]
            scope = {
                **scope,
                "scheme": "https" if scope["type"] == "http" else "wss",
                "server": (host, 443),
                "headers": [(b"host", host.encode("ascii")), *headers],
            }
        await self._app(scope, receive, send)


def _aiohttp_intercepting() -> Callable[[Mapping[str, str]], AbstractContextManager[None]] | None:
    """The aiohttp adapter's hook, when aiohttp is installed (imported only then)."""
    if importlib.util.find_spec("aiohttp") is None:
        return None
    from ._aiohttp import intercepting  # noqa: PLC0415 - aiohttp is optional

    return intercepting


@contextmanager
def _redirected(ports: Mapping[str, int]) -> Iterator[None]:
    """Patch the connection pools so that connections to ``ports``' hosts go to loopback."""
    originals: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        patched = functools.update_wrapper(make(original), original)
        setattr(owner, name, patched)
        originals.append((owner, name, original))

    try:
        for module_name in ("httpcore", "httpcore2"):
            if importlib.util.find_spec(module_name) is not None:
                core = importlib.import_module(module_name)
                patch(core.ConnectionPool, "handle_request", _httpcore_sync(core, ports))
                patch(
                    core.AsyncConnectionPool, "handle_async_request", _httpcore_async(core, ports)
                )
        if importlib.util.find_spec("urllib3") is not None:
            import urllib3  # noqa: PLC0415 - optional: requests' transport

            patch(urllib3.PoolManager, "connection_from_host", _urllib3(ports))
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


def _to_loopback(core: Any, ports: Mapping[str, int], request: Any) -> Any:
    """``request`` (an httpcore Request) sent to loopback if its host is intercepted."""
    port = ports.get(request.url.host.decode("ascii").lower())
    if port is None:
        return request
    url = core.URL(scheme=b"http", host=b"127.0.0.1", port=port, target=request.url.target)
    return core.Request(
        request.method,
        url,
        headers=request.headers,
        content=request.stream,
        extensions=request.extensions,
    )


def _httpcore_sync(core: Any, ports: Mapping[str, int]) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def handle_request(self: Any, request: Any) -> Any:
            return original(self, _to_loopback(core, ports, request))

        return handle_request

    return make


def _httpcore_async(core: Any, ports: Mapping[str, int]) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        async def handle_async_request(self: Any, request: Any) -> Any:
            return await original(self, _to_loopback(core, ports, request))

        return handle_async_request

    return make


def _urllib3(ports: Mapping[str, int]) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def connection_from_host(
            self: Any,
            host: str | None,
            port: int | None = None,
            scheme: str | None = "http",
            pool_kwargs: dict[str, Any] | None = None,
        ) -> Any:
            loopback = ports.get((host or "").lower())
            if loopback is not None:
                # Plain HTTP: urllib3 drops the TLS settings for an http pool by itself.
                host, port, scheme = "127.0.0.1", loopback, "http"
            return original(self, host, port, scheme, pool_kwargs)

        return connection_from_host

    return make
