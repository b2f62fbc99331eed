"""Guarded httpx and httpx2 transports, and the one entry every httpx call goes through.

``guard.async_transport(inner)`` wraps ``inner`` and follows its module: an
``httpx2.AsyncHTTPTransport`` gives an httpx2 transport. The instrumented ``HTTPTransport``
classes (``install(app)``) enter through the same ``send_async`` and ``send_sync``.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self

from ._call import route, run_async, run_sync
from ._httpx import adapters

if TYPE_CHECKING:
    from ._guard import Guard


class Flavor:
    """One httpx-like module (``httpx`` or ``httpx2``): its adapters and transports."""

    def __init__(self, module: types.ModuleType) -> None:
        """Make the module's adapter and transport classes."""
        self.module = module
        self.async_adapter, self.sync_adapter = adapters(module)
        names = {"flavor": self, "__module__": "upstream_guard"}
        self.async_transport: type[Any] = type(
            "AsyncGuardedTransport", (AsyncGuardedTransport, module.AsyncBaseTransport), names
        )
        self.sync_transport: type[Any] = type(
            "SyncGuardedTransport", (SyncGuardedTransport, module.BaseTransport), names
        )


_FLAVORS: dict[str, Flavor] = {}


def flavor(module_name: str) -> Flavor | None:
    """The flavour of an httpx-like module, if it is installed."""
    found = _FLAVORS.get(module_name)
    if found is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        found = _FLAVORS.setdefault(module_name, Flavor(module))
    return found


def flavor_of(inner: object | None) -> Flavor:
    """The flavour an inner transport belongs to (httpx when there is none)."""
    name = "httpx" if inner is None else type(inner).__module__.partition(".")[0]
    found = flavor(name) if name in ("httpx", "httpx2") else None
    if found is None:
        found = flavor("httpx")
        assert found is not None  # noqa: S101 - httpx is a dependency
    return found


async def send_async(
    guard: Guard | None,
    flavor: Flavor,
    send: Callable[[Any], Awaitable[Any]],
    request: Any,
    *,
    cancel_scope: bool,
) -> Any:
    """Send ``request`` with ``send``: guarded when its host belongs to an upstream."""
    rt = route(guard, request.url)
    if rt is None:
        return await send(request)
    assert guard is not None  # noqa: S101 - route found it
    return await run_async(guard, rt, flavor.async_adapter(send, request, cancel_scope), request)


def send_sync(guard: Guard | None, flavor: Flavor, send: Callable[[Any], Any], request: Any) -> Any:
    """Send ``request`` with ``send``: guarded when its host belongs to an upstream."""
    rt = route(guard, request.url)
    if rt is None:
        return send(request)
    assert guard is not None  # noqa: S101 - route found it
    return run_sync(guard, rt, flavor.sync_adapter(send, request), request)


def _needs_cancel_scope(inner: Any, module: types.ModuleType) -> bool:
    # httpx's own transport enforces request timeouts; a mock with a plain function handler
    # cannot be interrupted anyway. Anything else gets a cancel scope (~15-25 us per attempt).
    if isinstance(inner, module.AsyncHTTPTransport):
        return False
    if isinstance(inner, module.MockTransport):
        return inspect.iscoroutinefunction(inner.handler)
    return True


class AsyncGuardedTransport:
    """An async transport that guards calls to configured hosts and passes others through."""

    flavor: Flavor

    def __init__(self, guard: Guard, inner: Any = None) -> None:
        """Wrap ``inner`` (default: the module's ``AsyncHTTPTransport``)."""
        self._guard = guard
        self._inner = inner if inner is not None else self.flavor.module.AsyncHTTPTransport()
        self._cancel_scope = _needs_cancel_scope(self._inner, self.flavor.module)

    async def handle_async_request(self, request: Any) -> Any:
        """Send ``request``, guarded when its host belongs to an upstream."""
        send = self._inner.handle_async_request
        return await send_async(
            self._guard, self.flavor, send, request, cancel_scope=self._cancel_scope
        )

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        """Enter the inner transport's context."""
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Leave the inner transport's context."""
        await self._inner.__aexit__(*exc_info)


class SyncGuardedTransport:
    """A sync transport that guards calls to configured hosts and passes others through."""

    flavor: Flavor

    def __init__(self, guard: Guard, inner: Any = None) -> None:
        """Wrap ``inner`` (default: the module's ``HTTPTransport``)."""
        self._guard = guard
        self._inner = inner if inner is not None else self.flavor.module.HTTPTransport()

    def handle_request(self, request: Any) -> Any:
        """Send ``request``, guarded when its host belongs to an upstream."""
        return send_sync(self._guard, self.flavor, self._inner.handle_request, request)

    def close(self) -> None:
        """Close the inner transport."""
        self._inner.close()

    def __enter__(self) -> Self:
        """Enter the inner transport's context."""
        self._inner.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Leave the inner transport's context."""
        self._inner.__exit__(*exc_info)
