"""Guarded httpx and httpx2 transports.

``guard.async_transport(inner)`` wraps ``inner`` and follows its module: an
``httpx2.AsyncHTTPTransport`` gives an httpx2 transport. Like the instrumented
``HTTPTransport`` classes (``install(app)``), they enter the one call flow by ``route``.
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import TYPE_CHECKING, Any, Self

from ._call import run_async, run_sync
from ._coalesce import detachable
from ._httpx import adapters

if TYPE_CHECKING:
    from ._guard import Guard


class Flavor:
    """One httpx-like module (``httpx`` or ``httpx2``): its adapters and transports."""

    def __init__(self, module: types.ModuleType) -> None:
        """Make the module's adapter and transport classes."""
        self.module = module
        async_adapter, sync_adapter = adapters(module)
        self.adapters = (async_adapter(cancel_scope=False), async_adapter(cancel_scope=True))
        """The async adapters: for transports that enforce httpx's timeouts, and for others."""
        self.sync_adapter = sync_adapter()
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
    """The flavour an inner transport belongs to: the library whose base transport it is.

    httpx when there is no inner transport, or when it is neither library's.
    """
    httpx = flavor("httpx")
    assert httpx is not None  # noqa: S101 - httpx is a dependency
    other = flavor("httpx2") if inner is not None else None
    if other is not None:
        bases = (other.module.AsyncBaseTransport, other.module.BaseTransport)
        if isinstance(inner, bases):
            return other
    return httpx


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
        self._adapter = self.flavor.adapters[_needs_cancel_scope(self._inner, self.flavor.module)]

    async def handle_async_request(self, request: Any) -> Any:
        """Send ``request``, guarded when its host belongs to an upstream."""
        rt = self._guard._route(request.url)  # noqa: SLF001 - the package's own
        if rt is None:
            return await self._inner.handle_async_request(request)
        sender = self._inner.handle_async_request
        run = run_async(self._guard, rt, self._adapter, request, sender)
        return await detachable(run, rt, self._adapter, request)

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
        self._adapter = self.flavor.sync_adapter

    def handle_request(self, request: Any) -> Any:
        """Send ``request``, guarded when its host belongs to an upstream."""
        rt = self._guard._route(request.url)  # noqa: SLF001 - the package's own
        if rt is None:
            return self._inner.handle_request(request)
        return run_sync(self._guard, rt, self._adapter, request, self._inner.handle_request)

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
