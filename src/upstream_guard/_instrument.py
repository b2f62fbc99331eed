"""Client instrumentation: httpx, httpx2 and requests go through the active guard.

``install(app)`` patches the real transports' send methods (``HTTPTransport.handle_request``,
``AsyncHTTPTransport.handle_async_request``, and ``HTTPAdapter.send`` for requests), so
clients created anywhere (inside tekore, spotipy, a route) are guarded without changes.
Hosts that no upstream names pass straight through. The guard that applies is the one the
middleware set for the request being served, else the most recently installed one.
"""

from __future__ import annotations

import functools
import importlib
import threading
from typing import TYPE_CHECKING, Any

from ._context import guarding, request_context, state
from ._httpx import HTTPX, Flavor, drive_async, drive_sync

if TYPE_CHECKING:
    from ._guard import Guard

_lock = threading.Lock()
_installed: list[Guard] = []
_originals: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) to restore
_flavors: dict[str, Flavor] = {"httpx": HTTPX}
_SEND_ARGS = ("stream", "timeout", "verify", "cert", "proxies")  # HTTPAdapter.send, in order


def active_guard() -> Guard | None:
    """The guard for the current request, else the most recently installed one."""
    ctx = request_context.get()
    if ctx is not None:
        return ctx.guard
    return _installed[-1] if _installed else None


def flavor_for(module_name: str) -> Flavor | None:
    """The Flavor of an httpx-like module, if it is installed."""
    found = _flavors.get(module_name)
    if found is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        found = _flavors[module_name] = Flavor(module)
    return found


def instrument(guard: Guard) -> None:
    """Make ``guard`` one of the installed guards; patch the clients on the first one."""
    with _lock:
        if guard in _installed:
            _installed.remove(guard)  # most recent last
        _installed.append(guard)
        if not _originals:
            _patch_all()
            state.patched = True


def uninstrument(guard: Guard) -> None:
    """Remove ``guard``; restore the clients when no guard is left. Safe to call twice."""
    with _lock:
        if guard in _installed:
            _installed.remove(guard)
        if not _installed:
            for owner, name, original in reversed(_originals):
                setattr(owner, name, original)
            _originals.clear()
            state.patched = False


def is_instrumented() -> bool:
    """Whether the client libraries are currently patched."""
    return bool(_originals)


def _patch(owner: Any, name: str, make: Any) -> None:
    original = getattr(owner, name)
    patched = make(original)
    functools.update_wrapper(patched, original)
    patched.__upstream_guard__ = True
    setattr(owner, name, patched)
    _originals.append((owner, name, original))


def _patch_all() -> None:
    for module_name in ("httpx", "httpx2"):
        flavor = flavor_for(module_name)
        if flavor is not None:
            _patch(flavor.async_http_transport, "handle_async_request", _async_patch(flavor))
            _patch(flavor.sync_http_transport, "handle_request", _sync_patch(flavor))
    try:
        import requests.adapters  # noqa: PLC0415 - optional: only when requests is installed
    except ImportError:
        return
    _patch(requests.adapters.HTTPAdapter, "send", _requests_patch)


def _async_patch(flavor: Flavor) -> Any:
    def make(original: Any) -> Any:
        async def handle_async_request(self: Any, request: Any) -> Any:
            guard = active_guard()
            if guard is None or guarding.get():
                return await original(self, request)
            rt = guard.match(flavor.parsed(request.url))
            if rt is None:
                return await original(self, request)
            send = functools.partial(original, self)
            return await drive_async(guard, rt, request, send, cancel_scope=False, flavor=flavor)

        return handle_async_request

    return make


def _sync_patch(flavor: Flavor) -> Any:
    def make(original: Any) -> Any:
        def handle_request(self: Any, request: Any) -> Any:
            guard = active_guard()
            if guard is None or guarding.get():
                return original(self, request)
            rt = guard.match(flavor.parsed(request.url))
            if rt is None:
                return original(self, request)
            return drive_sync(guard, rt, request, functools.partial(original, self), flavor=flavor)

        return handle_request

    return make


def _requests_patch(original: Any) -> Any:
    from ._requests import drive_requests, url_parts  # noqa: PLC0415 - requests is optional

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(zip(_SEND_ARGS, args, strict=False))
        guard = active_guard()
        if guard is None or guarding.get():
            return original(self, request, **kwargs)
        parts = url_parts(request.url or "")
        rt = guard.match(parts) if parts is not None else None
        if rt is None:
            return original(self, request, **kwargs)
        return drive_requests(guard, rt, request, functools.partial(original, self), kwargs)

    return send
