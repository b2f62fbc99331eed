"""httpx (and httpx2) drivers of the guarded call: one async (anyio), one sync.

The drivers only do I/O: the decisions are ``guarded_call``'s. Errors are mapped in one
place (``Flavor.error``) to classes that are both our ``UpstreamUnavailable`` and the client
library's ``TransportError``, so an app's existing ``except httpx.TransportError`` still works.
The same drivers serve the explicit transports (``guard.async_transport()``) and the
instrumented ``HTTPTransport`` classes (``install(app)``).
"""

from __future__ import annotations

import inspect
import operator
import types
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Self

import anyio
import httpx

from . import _context as context
from . import _telemetry as telemetry
from ._body import AsyncBody, SyncBody
from ._cache import cache_key, stale_headers, storable, wants_no_copy
from ._classify import needs_body
from ._context import guarding, request_context
from ._errors import UpstreamUnavailable
from ._pipeline import Attempt, AttemptResult, CallRecord, run_in_task, run_in_thread

if TYPE_CHECKING:
    from ._guard import Guard
    from ._pipeline import UpstreamRuntime


class Flavor:
    """One httpx-like module (``httpx`` or ``httpx2``): its classes and our errors for it."""

    def __init__(self, module: types.ModuleType) -> None:
        """Read the module's transport and exception classes."""
        self.module = module
        self.transport_error: type[Exception] = module.TransportError
        self.timeout_error: type[Exception] = module.TimeoutException
        self.connect_error: type[Exception] = module.ConnectError
        self.response: type[Any] = module.Response
        self.byte_stream: type[Any] = module.ByteStream
        # httpx keeps a URL parsed (``URL._uri_reference``: host lowercased and in ASCII,
        # default port dropped, path still percent-encoded). Reading host and path there
        # saves two property calls and an unquote on every call; the public properties stand
        # in if a version lacks it. ``parsed(url)`` has both (an attrgetter: no Python frame).
        self.parsed: Callable[[Any], Any] = (
            operator.attrgetter("_uri_reference")
            if hasattr(module.URL("http://x/"), "_uri_reference")
            else _itself
        )
        self.async_http_transport: type[Any] = module.AsyncHTTPTransport
        self.sync_http_transport: type[Any] = module.HTTPTransport
        self._errors: dict[type[UpstreamUnavailable], type[Exception]] = {}
        self.async_body: type[Any] = type("AsyncBody", (AsyncBody, module.AsyncByteStream), {})
        self.sync_body: type[Any] = type("SyncBody", (SyncBody, module.SyncByteStream), {})

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


def _itself(url: Any) -> Any:
    return url


HTTPX = Flavor(httpx)


def _cap_timeouts(request: Any, original: dict[str, float | None] | None, seconds: float) -> None:
    # httpx enforces these per phase; capping them bounds the attempt without a cancel scope.
    base = original or {"connect": None, "read": None, "write": None, "pool": None}
    request.extensions = {
        **request.extensions,
        "timeout": {k: seconds if v is None or v > seconds else v for k, v in base.items()},
    }


def _record(rt: UpstreamRuntime, request: Any, flavor: Flavor) -> CallRecord:
    url = request.url
    path = flavor.parsed(url).path
    record = CallRecord(rt.name, rt.matcher.match(path), request.method, rt.clock.monotonic())
    if telemetry.TRACE_API["_TRACER_PROVIDER"] is not None and telemetry.tracing_on():
        own_spans = flavor is not HTTPX or not telemetry.official_instrumentation("httpx")
        record.span = telemetry.CallSpan(record, url.host, url.port, attempt_spans=own_spans)
    return record


def _attempt_span(record: CallRecord, action: Attempt, request: Any) -> Any:
    url = request.url
    span = record.span.attempt(action.number, str(url), url.host, url.port)
    if span is not None:
        telemetry.inject(span, request.headers)
    return span


# Healthy answers share their results (results are never mutated): no allocation, no call.
_HEALTHY = {status: AttemptResult(status=status) for status in range(100, 400)}


def _result(status: int, headers: Any, body: bytes) -> AttemptResult:
    """The result of an answer not in ``_HEALTHY`` (callers look there first)."""
    return AttemptResult(status=status, retry_after=headers.get("retry-after"), body=body)


def _rebuild(flavor: Flavor, response: Any, body: bytes) -> Any:
    return flavor.response(
        response.status_code, headers=response.headers, content=body, extensions=response.extensions
    )


def _stale_key(rt: UpstreamRuntime, request: Any) -> str | None:
    if rt.stale is None or request.method != "GET":
        return None
    if wants_no_copy(request.headers.get("cache-control")):
        return None
    return cache_key(rt.name, str(request.url), request.headers.get)


def _stale_response(
    flavor: Flavor, rt: UpstreamRuntime, key: str | None, record: CallRecord
) -> Any | None:
    if key is None or rt.stale is None:
        return None
    found = rt.stale.get(key)
    if found is None:
        return None
    entry, age = found
    record.outcome = "stale"
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stale_headers(entry, age)]
    return flavor.response(entry.status, headers=headers, content=entry.body)


def _keep(rt: UpstreamRuntime, key: str, response: Any) -> None:
    assert rt.stale is not None  # noqa: S101 - only called with a cache
    # Raw bytes, kept as latin-1 text: any header byte survives the round trip.
    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
    rt.stale.put(key, response.status_code, raw, response.content)


def _watch_body(
    flavor: Flavor,
    rt: UpstreamRuntime,
    record: CallRecord,
    request: Any,
    response: Any,
    *,
    sync: bool,
) -> None:
    """While serving a request (the caller checks), a body not read yet counts its failures.

    Outside a request (a standalone transport), a broken body raises httpx's own read error
    (a ``TransportError`` too) and the stream is left as it is: no cost on that path.
    """
    status = response.status_code
    if status < 500 and status != 429:
        wrapper = flavor.sync_body if sync else flavor.async_body
        response.stream = wrapper(response.stream, rt, record, request, flavor)


def _delivered(
    flavor: Flavor, rt: UpstreamRuntime, key: str, record: CallRecord, response: Any
) -> tuple[Any, bool]:
    """What to hand back for a delivered response, and whether to read and keep its body."""
    if storable(response.status_code, response.headers.get("cache-control")):
        return response, True
    if response.status_code >= 500 or response.status_code == 429:
        return _stale_response(flavor, rt, key, record) or response, False
    return response, False


def _stale_or_raise(
    flavor: Flavor,
    *,
    rt: UpstreamRuntime,
    key: str | None,
    record: CallRecord,
    exc: UpstreamUnavailable,
    request: Any,
) -> Any:
    stale = _stale_response(flavor, rt, key, record)
    if stale is None:
        raise flavor.error(exc, request) from exc.__cause__
    return stale


async def _attempt_async(  # noqa: PLR0917 - bound by partial on the hot path
    record: CallRecord,
    request: Any,
    original: dict[str, float | None] | None,
    send: Callable[[Any], Awaitable[Any]],
    cancel_scope: bool,
    flavor: Flavor,
    action: Attempt,
) -> tuple[Any, AttemptResult]:
    seconds = action.timeout_s
    # Inline, a loop (cheaper than ``max``): the check runs on every attempt, and the client's
    # own timeouts are seldom longer than the attempt's.
    for limit in original.values() if original else (None,):
        if limit is None or limit > seconds:
            _cap_timeouts(request, original, seconds)
            break
    span = _attempt_span(record, action, request) if record.span is not None else None
    try:
        if cancel_scope:
            with anyio.fail_after(action.timeout_s):
                response = await send(request)
                status = response.status_code
                body = await response.aread() if status >= 400 and needs_body(status) else b""
        else:
            response = await send(request)
            status = response.status_code
            body = await response.aread() if status >= 400 and needs_body(status) else b""
    except (flavor.transport_error, TimeoutError) as exc:
        response = None
        result = AttemptResult(error_kind=flavor.error_kind(exc), error=exc)
    else:
        if body:
            response = _rebuild(flavor, response, body)
        result = _HEALTHY.get(status) or _result(status, response.headers, body)
    if span is not None:
        telemetry.CallSpan.attempt_done(span, result.status, result.error)
    return response, result


def _attempt_sync(  # noqa: PLR0917 - bound by partial on the hot path
    record: CallRecord,
    request: Any,
    original: dict[str, float | None] | None,
    send: Callable[[Any], Any],
    flavor: Flavor,
    action: Attempt,
) -> tuple[Any, AttemptResult]:
    seconds = action.timeout_s
    # Inline, a loop (cheaper than ``max``): the check runs on every attempt, and the client's
    # own timeouts are seldom longer than the attempt's.
    for limit in original.values() if original else (None,):
        if limit is None or limit > seconds:
            _cap_timeouts(request, original, seconds)
            break
    span = _attempt_span(record, action, request) if record.span is not None else None
    try:
        response = send(request)
        status = response.status_code
        body = response.read() if status >= 400 and needs_body(status) else b""
    except flavor.transport_error as exc:
        response = None
        result = AttemptResult(error_kind=flavor.error_kind(exc), error=exc)
    else:
        if body:
            response = _rebuild(flavor, response, body)
        result = _HEALTHY.get(status) or _result(status, response.headers, body)
    if span is not None:
        telemetry.CallSpan.attempt_done(span, result.status, result.error)
    return response, result


async def drive_async(
    guard: Guard,
    rt: UpstreamRuntime,
    request: Any,
    send: Callable[[Any], Awaitable[Any]],
    *,
    cancel_scope: bool,
    flavor: Flavor,
) -> Any:
    """Run one guarded call, sending each attempt with ``send``."""
    ctx = request_context.get()  # once per call: deadline, body watch, the request's record
    if request.method in rt.replay_methods and type(request.stream) is not flavor.byte_stream:
        await request.aread()  # a retry must be able to send the body again (bytes can)
    record = _record(rt, request, flavor)  # after the body: the call's time starts at the send
    original = request.extensions.get("timeout")
    key = None if rt.stale is None else _stale_key(rt, request)
    token = guarding.set(True) if context.state.patched else None

    attempt = partial(_attempt_async, record, request, original, send, cancel_scope, flavor)
    try:
        response = await run_in_task(
            rt,
            record,
            attempt,
            retryable_body=True,
            deadline_s=None if ctx is None else guard.deadline_left(ctx),
            rng=guard.rng,
        )
    except UpstreamUnavailable as exc:
        return _stale_or_raise(flavor, rt=rt, key=key, record=record, exc=exc, request=request)
    else:
        if ctx is not None:
            _watch_body(flavor, rt, record, request, response, sync=False)
        if key is None:
            return response
        out, keep = _delivered(flavor, rt, key, record, response)
        if keep:
            try:
                await out.aread()
            except UpstreamUnavailable as exc:  # the body broke: a stale copy may still do
                return _stale_or_raise(
                    flavor, rt=rt, key=key, record=record, exc=exc, request=request
                )
            _keep(rt, key, out)
        return out
    finally:
        if token is not None:
            guarding.reset(token)
        guard.finish(record, ctx)


def drive_sync(
    guard: Guard,
    rt: UpstreamRuntime,
    request: Any,
    send: Callable[[Any], Any],
    *,
    flavor: Flavor,
) -> Any:
    """Run one guarded call in this thread, sending each attempt with ``send``."""
    ctx = request_context.get()  # once per call: deadline, body watch, the request's record
    if request.method in rt.replay_methods and type(request.stream) is not flavor.byte_stream:
        request.read()  # a retry must be able to send the body again (bytes can)
    record = _record(rt, request, flavor)  # after the body: the call's time starts at the send
    original = request.extensions.get("timeout")
    key = None if rt.stale is None else _stale_key(rt, request)
    token = guarding.set(True) if context.state.patched else None

    attempt = partial(_attempt_sync, record, request, original, send, flavor)
    try:
        response = run_in_thread(
            rt,
            record,
            attempt,
            retryable_body=True,
            deadline_s=None if ctx is None else guard.deadline_left(ctx),
            rng=guard.rng,
        )
    except UpstreamUnavailable as exc:
        return _stale_or_raise(flavor, rt=rt, key=key, record=record, exc=exc, request=request)
    else:
        if ctx is not None:
            _watch_body(flavor, rt, record, request, response, sync=True)
        if key is None:
            return response
        out, keep = _delivered(flavor, rt, key, record, response)
        if keep:
            try:
                out.read()
            except UpstreamUnavailable as exc:  # the body broke: a stale copy may still do
                return _stale_or_raise(
                    flavor, rt=rt, key=key, record=record, exc=exc, request=request
                )
            _keep(rt, key, out)
        return out
    finally:
        if token is not None:
            guarding.reset(token)
        guard.finish(record, ctx)


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
        rt = self._guard.match(self.flavor.parsed(request.url))
        if rt is None:
            return await self._inner.handle_async_request(request)
        return await drive_async(
            self._guard,
            rt,
            request,
            self._inner.handle_async_request,
            cancel_scope=self._cancel_scope,
            flavor=self.flavor,
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

    flavor: Flavor = HTTPX

    def __init__(self, guard: Guard, inner: Any = None) -> None:
        """Wrap ``inner`` (default: the module's ``HTTPTransport``)."""
        self._guard = guard
        self._inner = inner if inner is not None else self.flavor.sync_http_transport()

    def handle_request(self, request: Any) -> Any:
        """Send ``request``, guarded when its host belongs to an upstream."""
        rt = self._guard.match(self.flavor.parsed(request.url))
        if rt is None:
            return self._inner.handle_request(request)
        return drive_sync(self._guard, rt, request, self._inner.handle_request, flavor=self.flavor)

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


_CLASSES: dict[int, tuple[type[Any], type[Any]]] = {}


def transport_classes(flavor: Flavor) -> tuple[type[Any], type[Any]]:
    """The (async, sync) guarded transport classes for one httpx-like module."""
    if flavor is HTTPX:
        return _HttpxAsync, _HttpxSync
    found = _CLASSES.get(id(flavor))
    if found is None:
        mod = flavor.module
        ns = {"flavor": flavor}
        found = (
            type("AsyncGuardedTransport", (AsyncGuardedTransport, mod.AsyncBaseTransport), ns),
            type("SyncGuardedTransport", (SyncGuardedTransport, mod.BaseTransport), ns),
        )
        _CLASSES[id(flavor)] = found
    return found


class _HttpxAsync(AsyncGuardedTransport, httpx.AsyncBaseTransport):
    """``AsyncGuardedTransport`` for httpx."""


class _HttpxSync(SyncGuardedTransport, httpx.BaseTransport):
    """``SyncGuardedTransport`` for httpx."""
