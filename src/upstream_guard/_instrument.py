"""Client instrumentation: httpx, httpx2, requests and aiohttp calls go through the active guard.

``guard.instrument()`` (which ``install(app)`` calls) patches the real transports' send
methods (``HTTPTransport.handle_request``, ``AsyncHTTPTransport.handle_async_request``,
``HTTPAdapter.send`` for requests) and adds the guard's middleware to every aiohttp call
(``_aiohttp.hook``), so clients created anywhere (inside tekore, spotipy, a
route) are guarded without changes. Hosts that no upstream names pass straight through. The
guard that applies is the one the middleware set for the request being served, else the
most recently instrumented one still alive.

An app's guard is held weakly: an app built and dropped without running its lifespan leaves
no guard behind, and the clients are unpatched once no instrumented guard is left. A guard
instrumented by ``guard.instrument()`` is held until ``guard.close()``.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._call import run_async, run_sync
from ._coalesce import detachable
from ._context import request_context, state
from ._transports import Flavor, flavor

if TYPE_CHECKING:
    from ._guard import Guard

# Reentrant: a guard collected while the lock is held (a GC pass) calls back into it.
_lock = threading.RLock()
_installed: list[Callable[[], Guard | None]] = []  # weak references, or holders of a guard
_originals: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) to restore
_undo: list[Callable[[], None]] = []  # what else restores a client (aiohttp's unhook)


def active_guard() -> Guard | None:
    """The guard for the current request, else the most recently instrumented one."""
    ctx = request_context.get()
    if ctx is not None:
        return ctx.guard
    for ref in reversed(_installed):
        guard = ref()
        if guard is not None:
            return guard
    return None


def instrument(guard: Guard, *, weak: bool) -> None:
    """Make ``guard`` the most recent instrumented guard; patch the clients on the first.

    ``weak``: held only while something else holds it (an app's guard).
    """
    with _lock:
        _forget(guard)
        _installed.append(weakref.ref(guard, _collected) if weak else _Held(guard))
        if not state.patched:
            _patch_all()
            state.patched = True


def uninstrument(guard: Guard) -> None:
    """Forget ``guard``; restore the clients when no guard is left. Safe to call twice."""
    with _lock:
        _forget(guard)
        _restore_if_unused()


def _forget(guard: Guard) -> None:
    _installed[:] = [ref for ref in _installed if ref() not in (guard, None)]


class _Held:
    """A strong reference that reads like a weak one."""

    __slots__ = ("_guard",)

    def __init__(self, guard: Guard) -> None:
        self._guard = guard

    def __call__(self) -> Guard:
        return self._guard


def _collected(ref: weakref.ref[Guard]) -> None:
    with _lock:
        if ref in _installed:
            _installed.remove(ref)
        _restore_if_unused()


def _restore_if_unused() -> None:
    if any(ref() is not None for ref in _installed):
        return
    _installed.clear()
    for owner, name, original in reversed(_originals):
        setattr(owner, name, original)
    _originals.clear()
    while _undo:
        _undo.pop()()
    state.patched = False


def _patch(owner: Any, name: str, make: Any) -> None:
    original = getattr(owner, name)
    patched = make(original)
    functools.update_wrapper(patched, original)
    patched.__upstream_guard__ = True
    setattr(owner, name, patched)
    _originals.append((owner, name, original))


def _patch_all() -> None:
    for module_name in ("httpx", "httpx2"):
        found = flavor(module_name)
        if found is not None:
            module = found.module
            _patch(module.AsyncHTTPTransport, "handle_async_request", _async_patch(found))
            _patch(module.HTTPTransport, "handle_request", _sync_patch(found))
    try:
        from . import _aiohttp  # noqa: PLC0415 - optional: only when aiohttp is installed
    except ImportError:
        pass
    else:
        _aiohttp.hook()
        _undo.append(_aiohttp.unhook)
    try:
        import requests.adapters  # noqa: PLC0415 - optional: only when requests is installed
    except ImportError:
        return
    _patch(requests.adapters.HTTPAdapter, "send", _requests_patch)


def _async_patch(found: Flavor) -> Any:
    def make(original: Any) -> Any:
        async def handle_async_request(self: Any, request: Any) -> Any:
            guard = active_guard()
            rt = None if guard is None else guard._route(request.url)  # noqa: SLF001 - the package's own
            if rt is None:
                return await original(self, request)
            sender = functools.partial(original, self)
            adapter = found.adapters[False]
            run = run_async(guard, rt, adapter, request, sender)  # type: ignore[arg-type]
            return await detachable(run, rt, adapter, request)

        return handle_async_request

    return make


def _sync_patch(found: Flavor) -> Any:
    def make(original: Any) -> Any:
        def handle_request(self: Any, request: Any) -> Any:
            guard = active_guard()
            rt = None if guard is None else guard._route(request.url)  # noqa: SLF001 - the package's own
            if rt is None:
                return original(self, request)
            sender = functools.partial(original, self)
            return run_sync(guard, rt, found.sync_adapter, request, sender)  # type: ignore[arg-type]

        return handle_request

    return make


def _requests_patch(original: Any) -> Any:
    from ._sessions import SEND_ARGS, send_guarded  # noqa: PLC0415 - requests is optional

    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(zip(SEND_ARGS, args, strict=False))
        return send_guarded(
            active_guard(), self, functools.partial(original, self), request, kwargs
        )

    return send
