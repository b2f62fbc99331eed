"""httpx (and httpx2) transports that run the guarded call: an async driver and a sync driver.

The drivers only do I/O: the decisions are ``guarded_call``'s. Errors are mapped in one
place (``Flavor.error``) to classes that are both our ``UpstreamUnavailable`` and the client
library's ``TransportError``, so an app's existing ``except httpx.TransportError`` still works.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Self

import anyio
import httpx

from ._classify import needs_body
from ._errors import UpstreamUnavailable
from ._pipeline import Attempt, AttemptResult, CallRecord, Wait, guarded_call

if TYPE_CHECKING:
    from ._guard import Guard
    from ._pipeline import UpstreamRuntime

_Call = Generator[Attempt | Wait, AttemptResult | None, None]


class Flavor:
    """One httpx-like module (``httpx`` or ``httpx2``): its classes and our errors for it."""

    def __init__(self, module: types.ModuleType) -> None:
        """Read the module's transport and exception classes."""
        self.module = module
        self.transport_error: type[Exception] = module.TransportError
        self.timeout_error: type[Exception] = module.TimeoutException
        self.connect_error: type[Exception] = module.ConnectError
        self.response: type[Any] = module.Response
        self.async_http_transport: type[Any] = module.AsyncHTTPTransport
        self.sync_http_transport: type[Any] = module.HTTPTransport
        self._errors: dict[type[UpstreamUnavailable], type[Exception]] = {}

    def error(self, exc: UpstreamUnavailable, request: Any) -> Exception:
        """The same error as an instance of both our class and this module's TransportError."""
        cls = self._errors.get(type(exc))
        if cls is None:
            cls = type(type(exc).__name__, (type(exc), self.transport_error), {})
            cls.__module__ = "upstream_guard"
            self._errors[type(exc)] = cls
        make: Any = cls
        mapped: Any = make(
            str(exc), upstream=exc.upstream, reason=exc.reason, retry_after_s=exc.retry_after_s
        )
        mapped.request = request
        return mapped  # type: ignore[no-any-return]

    def error_kind(self, exc: BaseException) -> str:
        """``timeout``, ``connect_error`` or ``network_error``."""
        if isinstance(exc, self.timeout_error | TimeoutError):
            return "timeout"
        if isinstance(exc, self.connect_error):
            return "connect_error"
        return "network_error"


HTTPX = Flavor(httpx)


def _cap_timeouts(request: Any, original: dict[str, float | None] | None, seconds: float) -> None:
    # httpx enforces these per phase; capping them bounds the attempt without a cancel scope.
    if original:
        values = original.values()
        if None not in values and max(values) <= seconds:  # type: ignore[type-var,operator]
            return  # the client's own timeouts are already within the attempt's
    base = original or {"connect": None, "read": None, "write": None, "pool": None}
    request.extensions = {
        **request.extensions,
        "timeout": {k: seconds if v is None or v > seconds else v for k, v in base.items()},
    }


def _start(guard: Guard, rt: UpstreamRuntime, request: Any) -> tuple[CallRecord, _Call]:
    record = CallRecord(
        rt.name, rt.matcher.match(request.url.path), request.method, rt.clock.monotonic()
    )
    call = guarded_call(
        rt, record, retryable_body=True, deadline_s=guard.deadline_left(), rng=guard.rng
    )
    return record, call


_HEALTHY = {status: AttemptResult(status=status) for status in range(100, 400)}


def _result(status: int, headers: Any, body: bytes) -> AttemptResult:
    if status < 400:  # a healthy answer: nothing to look up (results are never mutated)
        return _HEALTHY.get(status) or AttemptResult(status=status)
    return AttemptResult(status=status, retry_after=headers.get("retry-after"), body=body)


def _needs_cancel_scope(inner: Any, flavor: Flavor) -> bool:
    # httpx's own transport enforces request timeouts; a mock with a plain function handler
    # cannot be interrupted anyway. Anything else gets a cancel scope (~15-25 us per attempt).
    if isinstance(inner, flavor.async_http_transport):
        return False
    if isinstance(inner, flavor.module.MockTransport):
        return inspect.iscoroutinefunction(inner.handler)
    return True


class AsyncGuardedTransport:
    """An async transport that guards calls to configured hosts and passes others through."""

    flavor: Flavor = HTTPX

    def __init__(self, guard: Guard, inner: Any = None) -> None:
        """Wrap ``inner`` (default: the module's ``AsyncHTTPTransport``)."""
        self._guard = guard
        self._inner = inner if inner is not None else self.flavor.async_http_transport()
        self._cancel_scope = _needs_cancel_scope(self._inner, self.flavor)

    async def handle_async_request(self, request: Any) -> Any:
        """Send ``request``, guarded when its host belongs to an upstream."""
        rt = self._guard.match(request.url)
        if rt is None:
            return await self._inner.handle_async_request(request)
        record, call = _start(self._guard, rt, request)
        if request.method in rt.replay_methods:
            await request.aread()  # a retry must be able to send the body again
        original = request.extensions.get("timeout")
        response: Any = None
        try:
            action = next(call)
            while True:
                if type(action) is Wait:
                    await rt.clock.sleep(action.seconds)
                    action = call.send(None)
                    continue
                assert isinstance(action, Attempt)  # noqa: S101 - narrowed for the type checker
                if response is not None:
                    await response.aclose()
                response, result = await self._attempt(request, original, action.timeout_s)
                action = call.send(result)
        except StopIteration:
            return response
        except UpstreamUnavailable as exc:
            raise self.flavor.error(exc, request) from exc.__cause__
        finally:
            call.close()
            if self._guard.hooks:
                self._guard.finish(record)

    async def _attempt(
        self, request: Any, original: Any, timeout_s: float
    ) -> tuple[Any, AttemptResult]:
        _cap_timeouts(request, original, timeout_s)
        try:
            if self._cancel_scope:
                with anyio.fail_after(timeout_s):
                    response = await self._inner.handle_async_request(request)
                    body = await response.aread() if needs_body(response.status_code) else b""
            else:
                response = await self._inner.handle_async_request(request)
                body = await response.aread() if needs_body(response.status_code) else b""
        except (self.flavor.transport_error, TimeoutError) as exc:
            return None, AttemptResult(error_kind=self.flavor.error_kind(exc), error=exc)
        if body:
            response = self.flavor.response(
                response.status_code,
                headers=response.headers,
                content=body,
                extensions=response.extensions,
            )
        return response, _result(response.status_code, response.headers, body)

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

    flavor: Flavor = HTTPX

    def __init__(self, guard: Guard, inner: Any = None) -> None:
        """Wrap ``inner`` (default: the module's ``HTTPTransport``)."""
        self._guard = guard
        self._inner = inner if inner is not None else self.flavor.sync_http_transport()

    def handle_request(self, request: Any) -> Any:
        """Send ``request``, guarded when its host belongs to an upstream."""
        rt = self._guard.match(request.url)
        if rt is None:
            return self._inner.handle_request(request)
        record, call = _start(self._guard, rt, request)
        if request.method in rt.replay_methods:
            request.read()
        original = request.extensions.get("timeout")
        response: Any = None
        try:
            action = next(call)
            while True:
                if type(action) is Wait:
                    rt.clock.sleep_sync(action.seconds)
                    action = call.send(None)
                    continue
                assert isinstance(action, Attempt)  # noqa: S101 - narrowed for the type checker
                if response is not None:
                    response.close()
                response, result = self._attempt(request, original, action.timeout_s)
                action = call.send(result)
        except StopIteration:
            return response
        except UpstreamUnavailable as exc:
            raise self.flavor.error(exc, request) from exc.__cause__
        finally:
            call.close()
            if self._guard.hooks:
                self._guard.finish(record)

    def _attempt(self, request: Any, original: Any, timeout_s: float) -> tuple[Any, AttemptResult]:
        _cap_timeouts(request, original, timeout_s)
        try:
            response = self._inner.handle_request(request)
            body = response.read() if needs_body(response.status_code) else b""
        except self.flavor.transport_error as exc:
            return None, AttemptResult(error_kind=self.flavor.error_kind(exc), error=exc)
        if body:
            response = self.flavor.response(
                response.status_code,
                headers=response.headers,
                content=body,
                extensions=response.extensions,
            )
        return response, _result(response.status_code, response.headers, body)

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


def transport_classes(flavor: Flavor) -> tuple[type[Any], type[Any]]:
    """The (async, sync) guarded transport classes for one httpx-like module."""
    mod = flavor.module
    if flavor is HTTPX:
        return _HttpxAsync, _HttpxSync
    namespace = {"flavor": flavor}
    async_cls = type(
        "AsyncGuardedTransport", (AsyncGuardedTransport, mod.AsyncBaseTransport), namespace
    )
    sync_cls = type("SyncGuardedTransport", (SyncGuardedTransport, mod.BaseTransport), namespace)
    return async_cls, sync_cls


class _HttpxAsync(AsyncGuardedTransport, httpx.AsyncBaseTransport):
    """``AsyncGuardedTransport`` for httpx."""


class _HttpxSync(SyncGuardedTransport, httpx.BaseTransport):
    """``SyncGuardedTransport`` for httpx."""
