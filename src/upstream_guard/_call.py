"""One guarded call, written once for every client library.

A client library is an adapter (``SyncAdapter`` or ``AsyncAdapter``): it sends one attempt
with a timeout, reads a failure answer's body without taking it from the caller, closes a
response, watches a body, builds a stale response and names its errors. Everything else is
here, once: the record, the deadline, the decisions (``GuardedCall``), the stale copy, the
mapping of errors to the client's own classes, telemetry and events. ``run_sync`` and
``run_async`` are twins that differ only in ``await`` (a test keeps them so).

Every entry point (explicit transports, instrumented clients, sessions) goes the same way:
find the guard, ask it for the upstream (``Guard._route``: none while a guard already drives
this call, none for a host no upstream names), then run.
"""

from __future__ import annotations

from collections.abc import Awaitable
from contextvars import Token
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from . import _coalesce as coalesce
from . import _hedge as hedge
from . import _telemetry as telemetry
from ._body import BodyWatch
from ._cache import cache_key, stale_headers, storable, wants_no_copy
from ._classify import FAILURE_BODY, Outcome, readable
from ._context import guarding, request_context, state
from ._errors import UpstreamUnavailable, as_client_error, is_client_error
from ._pipeline import HEALTHY, Attempt, AttemptResult, GuardedCall, Wait

if TYPE_CHECKING:
    from ._cache import CachedResponse
    from ._coalesce import Flight
    from ._guard import Guard
    from ._pipeline import UpstreamRuntime


_SUCCESS = Outcome.SUCCESS
# Bound once. A method called on an imported name (``HEALTHY.get(status)``) is looked up
# by CPython 3.11 without specialization, a new method object on every call.
_healthy = HEALTHY.get
"""The shared result of a healthy status (None for any other)."""
_current_context = request_context.get
"""The inbound request being served, if any."""
_guarding_set, _guarding_reset = guarding.set, guarding.reset


class _Adapter(Protocol):
    """What sync and async adapters share: everything but I/O."""

    base_error: type[Exception]
    """The client's family of transport errors; our errors are instances of it too."""
    attempt_errors: tuple[type[BaseException], ...]
    """What an attempt may raise: upstream trouble, or a caller's mistake (``error_kind``)."""
    instrumentation: str | None
    """The OpenTelemetry instrumentation that makes this client's attempt spans, if any."""

    def location(self, request: Any) -> Any:
        """The URL: ``host``, ``port`` and ``scheme`` to match; ``str()``, the whole URL."""

    def method(self, request: Any) -> str:
        """The request's method."""

    def path(self, request: Any) -> str:
        """The request's path, still percent-encoded, without the query."""

    def replayable(self, request: Any, replay_methods: frozenset[str]) -> bool | None:
        """Whether the body can be sent again; None: after ``buffer``, which it needs first.

        Only a method in ``replay_methods`` (those a retry may repeat) is worth buffering.
        """

    def header(self, message: Any, name: str) -> str | None:
        """A header of a request or response."""

    def headers(self, request: Any) -> Any:
        """The request's headers, writable (trace context goes in)."""

    def all_headers(self, response: Any) -> list[tuple[str, str]]:
        """Every header of a response, as (name, value) text pairs."""

    def status(self, response: Any) -> int:
        """The response's status code."""

    def error_kind(self, exc: BaseException) -> str | None:
        """``timeout``, ``connect_error`` or ``network_error``; None: the caller's mistake."""

    def watch(self, response: Any, watch: BodyWatch) -> None:
        """Have reads of the response's body go through ``watch``."""

    def late_error(self, request: Any) -> Exception:
        """The client's own read-timeout error, for a body that outlasts the deadline."""

    def stale(self, request: Any, entry: CachedResponse, headers: list[tuple[str, str]]) -> Any:
        """A response built from a stored copy (or another caller's shared answer).

        ``entry.body`` is the raw body as it came (encoded as ``headers`` say) for a shared
        answer, and decoded (no Content-Encoding in ``headers``) for a stale copy.
        """

    def content(self, request: Any) -> bytes | None:
        """The request's body if it is in memory (None: streamed), for a token request's key."""


class SyncAdapter(_Adapter, Protocol):
    """A client whose calls block a thread (httpx.Client, requests)."""

    def buffer(self, request: Any) -> None:
        """Read a streamed body into memory, so that a retry can send it again."""

    def send(self, request: Any, timeout_s: float, sender: Any) -> Any:
        """Send one attempt with ``sender``, bounded by ``timeout_s``."""

    def read_failure(self, response: Any) -> bytes:
        """The body of a failure answer, read so that the caller can read it again."""

    def read_copy(self, response: Any) -> bytes | None:
        """The decoded body of an answer to keep, read so that the caller can read it again."""

    def close(self, response: Any) -> None:
        """Close a response a retry replaces."""

    def read_shared(self, response: Any, limit: int) -> bytes | None:
        """The raw body to share with waiting callers, put back for the caller to read.

        None: it is over ``limit`` bytes (the caller still reads all of it), or the caller
        streams it (the client says so) and it is left alone.
        """


class AsyncAdapter(_Adapter, Protocol):
    """A client whose calls are awaited (httpx.AsyncClient, aiohttp)."""

    async def buffer(self, request: Any) -> None:
        """Read a streamed body into memory, so that a retry can send it again."""

    def send(self, request: Any, timeout_s: float, sender: Any) -> Awaitable[Any]:
        """Send one attempt with ``sender``, bounded by ``timeout_s`` (await what it returns)."""

    async def read_failure(self, response: Any) -> bytes:
        """The body of a failure answer, read so that the caller can read it again."""

    async def read_copy(self, response: Any) -> bytes | None:
        """The decoded body of an answer to keep, read so that the caller can read it again."""

    async def close(self, response: Any) -> None:
        """Close a response a retry replaces."""

    async def read_shared(self, response: Any, limit: int) -> bytes | None:
        """The raw body to share with waiting callers (as ``SyncAdapter.read_shared``)."""


class Exchange(GuardedCall):
    """One call: its decisions and record (``GuardedCall``), and what the twins share of it.

    One object per call. Defaults that a healthy call never reads live on the class; what
    every call reads (``key``, ``traced``, ``crowded``, ``keyed``, ``flight``, ``token``,
    ``span``, ``_placed``) is set in ``__init__``: CPython 3.11 reads an instance's own
    attribute in a few instructions, a class default through a generic lookup (~200 more).
    """

    key: str | None
    """The stale cache's key for this call, when a copy may be kept or served."""
    copying = False
    """Whether the delivered answer's body is read to keep a copy."""
    token: Token[bool] | None
    traced: bool
    """Whether the call records spans (an OpenTelemetry SDK is installed)."""
    mistake = False
    """Whether an attempt raised the caller's own mistake (passed on untouched)."""
    # Coalescing (``_coalesce``).
    crowded: bool
    """Other calls to the upstream were in flight when this one began."""
    keyed: bool
    """The call's coalescing key was worked out (it may lead identical calls)."""
    ckey: bytes | None = None
    thread = 0
    """The thread that runs the call (read when it leads)."""
    flight: Flight | None
    """This call's answer is awaited by identical calls (it leads them)."""

    def __init__(
        self,
        guard: Guard,
        rt: UpstreamRuntime,
        adapter: _Adapter,
        request: Any,
        replayable: bool,
    ) -> None:
        """Start the call now: its record, its deadline, its span."""
        self.guard = guard
        self.adapter = adapter
        self.request = request
        self.ctx = ctx = _current_context()
        read = rt.monotonic
        started = read()
        deadline = started + rt.total_s
        if ctx is not None and ctx.deadline is not None and ctx.deadline < deadline:
            deadline = ctx.deadline
        self.upstream = rt.name
        self.started = started
        self.rt = rt
        self.deadline = deadline
        self.breaker = rt.breaker or rt.breaker_for(self.endpoint)
        self._placed = False
        if not replayable:
            self._retryable = False
        self.key = self._stale_key() if rt.stale is not None else None
        observer = guard._telemetry  # noqa: SLF001 - the package's own
        if started >= observer.until:
            observer.refresh(started)
        self.traced = observer.tracing
        self.span = None
        if self.traced:
            url = adapter.location(request)
            own = not telemetry.official_instrumentation(adapter.instrumentation)
            self.span = telemetry.CallSpan(self, url.host, url.port, attempt_spans=own)
        # Before the call is registered: from then on, another thread may key it.
        self.keyed = False
        self.flight = None
        self.crowded = False
        flights = rt.flights
        if flights is not None:  # alone, it only says it is in flight: no key, no lock
            calls = flights.calls
            if calls or flights.leaders:
                self.crowded = True
            else:
                calls[self] = coalesce.get_ident()
        # Last: nothing after it may raise and leave it set.
        self.token = _guarding_set(True) if state.patched else None

    # CallRecord's fields, worked out when first read: a plain call never needs them.
    @cached_property
    def endpoint(self) -> str:  # type: ignore[override]
        """The path's template: worked out only if a breaker, span, event or log reads it."""
        return self.rt.matcher.match(self.adapter.path(self.request))

    @cached_property
    def method(self) -> str:  # type: ignore[override]
        """The request's method (CallRecord's field, read when something needs it)."""
        return self.adapter.method(self.request)

    def _stale_key(self) -> str | None:
        if self.method != "GET":
            return None
        header, request = self.adapter.header, self.request
        if wants_no_copy(header(request, "cache-control")):
            return None
        url = str(self.adapter.location(request))
        return cache_key(self.upstream, url, lambda name: header(request, name))

    # -- attempts ------------------------------------------------------------------------------

    def attempt_started(self, action: Attempt) -> Any:
        """The attempt's span (its context goes out with the request), if one is made."""
        url = self.adapter.location(self.request)
        span = self.span.attempt(action.number, str(url), url.host, url.port)
        if span is not None:
            telemetry.inject(span, self.adapter.headers(self.request))
        return span

    def failed(self, exc: BaseException) -> AttemptResult:
        """An attempt's error: upstream trouble, or (raised again) the caller's mistake."""
        kind = self.adapter.error_kind(exc)
        if kind is None:
            self.mistake = True
            raise exc
        return AttemptResult(error_kind=kind, error=exc)

    def answered(self, response: Any, status: int, body: bytes | None) -> AttemptResult:
        """An answer's result (healthy ones come from ``HEALTHY`` without this call)."""
        header = self.adapter.header
        retry_after = header(response, "retry-after")
        text = readable(body or b"", header(response, "content-encoding"))
        return AttemptResult(status=status, retry_after=retry_after, body=text)

    # -- the answer ----------------------------------------------------------------------------

    def delivered(self, response: Any, status: int) -> Any:
        """What the caller gets: the answer (its body watched), or a stale copy of it."""
        if self.key is not None:
            if status >= 500 or status == 429:
                return self._stale() or response
            self.copying = storable(status, self.adapter.header(response, "cache-control"))
        if (self.ctx is not None or self.copying) and status not in FAILURE_BODY:
            self.adapter.watch(response, BodyWatch(self))  # a failure's body is read already
        return response

    def keep(self, response: Any, body: bytes | None) -> None:
        """Keep the copy read by ``read_copy`` (None: it could not be decoded)."""
        stale = self.rt.stale
        if body is not None and stale is not None and self.key is not None:
            headers = self.adapter.all_headers(response)
            stale.put(self.key, self.adapter.status(response), headers, body)

    def _stale(self) -> Any:
        stale = self.rt.stale
        found = None if self.key is None or stale is None else stale.get(self.key)
        if found is None:
            return None
        entry, age = found
        self.outcome = "stale"
        return self.adapter.stale(self.request, entry, stale_headers(entry, age))

    def stale_or_raise(self, exc: UpstreamUnavailable) -> Any:
        """A stale copy if one may stand in; else the error, as the client's own class."""
        if self.flight is not None:  # identical calls wait: each gets an error of its own
            coalesce.fail(self, exc)
        stale = self._stale()
        if stale is not None:
            return stale
        if is_client_error(exc):  # a watched body's error: mapped already
            raise exc
        raise as_client_error(
            exc, base=self.adapter.base_error, request=self.request
        ) from exc.__cause__

    def finish(self) -> None:  # noqa: C901 - every step is one line of what a call gives back
        """The call is over, however it ended: what it holds goes back; record, events.

        A permit still held (the attempt raised) counts for nothing; the bulkhead place is
        freed; the duration is taken, unless a success took it as it came.
        """
        if self.permit is not None:
            self.permit.breaker.release(self.permit)
            self.permit = None
        if self.outcome is not _SUCCESS:
            self.duration_s = self.rt.clock.monotonic() - self.started
        if self._placed:
            self._placed = False
            self.rt.bulkhead.release()  # type: ignore[union-attr]
        flights = self.rt.flights
        if flights is not None:
            flights.calls.pop(self, None)
            if self.keyed:  # read after the pop: see ``Flights._key_unkeyed``
                flights.leave(self)
        if self.token is not None:
            _guarding_reset(self.token)
        if self.span is not None:
            self.span.end()
        if self.ctx is not None:
            self.ctx.note(self.upstream, self.outcome, self.reason, self.duration_s)
        guard = self.guard
        if guard._telemetry.metrics:  # noqa: SLF001 - the package's own
            telemetry.record_metrics(self)
        if guard._subscribers.listeners:  # noqa: SLF001
            guard._subscribers.publish(self)  # noqa: SLF001


def run_sync(  # noqa: C901, PLR0912, PLR0915 - one call's steps read best in one place
    guard: Guard, rt: UpstreamRuntime, adapter: SyncAdapter, request: Any, sender: Any
) -> Any:
    """Run one guarded call for a sync client: the response, or the client's error."""
    replayable = adapter.replayable(request, rt.replay_methods)
    if replayable is None:
        adapter.buffer(request)
        replayable = True
    x = Exchange(guard, rt, adapter, request, replayable)
    response = None
    status = 0
    try:
        if x.crowded:  # other calls in flight: one of them may be getting this very answer
            response = coalesce.follow_sync(x)
            if response is not None:
                return response
        if rt.hedge_after_s is not None:
            sender = hedge.sync_sender(x, sender)
        step: Attempt | Wait | None = x.begin()
        while step is not None:
            if type(step) is Wait:  # not isinstance: an Attempt would cost it a lookup
                if step.reserve_within_s is not None:
                    step = x.reserved(*rt.pace.reserve_sync(step.reserve_within_s))
                rt.clock.sleep_sync(step.seconds)
                step = x.after_wait()
                continue
            if response is not None:
                adapter.close(response)
            span = x.attempt_started(step) if x.traced else None
            try:
                response = adapter.send(request, step.timeout_s, sender)
                status = adapter.status(response)
                body = adapter.read_failure(response) if status in FAILURE_BODY else None
            except adapter.attempt_errors as exc:
                response, result = None, x.failed(exc)
            else:
                result = _healthy(status) or x.answered(response, status, body)
            if span is not None:
                telemetry.CallSpan.attempt_done(span, result.status, result.error)
            step = x.after(result)
        if x.key is not None or x.ctx is not None:  # else: nothing to watch, keep or swap
            response = x.delivered(response, status)
            if x.copying:
                x.keep(response, adapter.read_copy(response))
        if x.flight is not None and coalesce.closing(x):  # identical calls wait: share
            coalesce.share(x, response, adapter.read_shared(response, rt.share_limit))
    except UpstreamUnavailable as exc:
        return x.stale_or_raise(exc)
    except BaseException as exc:
        x.abandon(exc, mistake=x.mistake)
        raise
    else:
        return response
    finally:
        x.finish()


async def run_async(  # noqa: C901, PLR0912, PLR0915 - one call's steps read best in one place
    guard: Guard, rt: UpstreamRuntime, adapter: AsyncAdapter, request: Any, sender: Any
) -> Any:
    """Run one guarded call for an async client: the response, or the client's error."""
    replayable = adapter.replayable(request, rt.replay_methods)
    if replayable is None:
        await adapter.buffer(request)
        replayable = True
    x = Exchange(guard, rt, adapter, request, replayable)
    response = None
    status = 0
    try:
        if x.crowded:  # other calls in flight: one of them may be getting this very answer
            response = await coalesce.follow_async(x)
            if response is not None:
                return response
        if rt.hedge_after_s is not None:
            sender = hedge.async_sender(x, sender)
        step: Attempt | Wait | None = x.begin()
        while step is not None:
            if type(step) is Wait:  # not isinstance: an Attempt would cost it a lookup
                if step.reserve_within_s is not None:
                    step = x.reserved(*await rt.pace.reserve(step.reserve_within_s))
                await rt.clock.sleep(step.seconds)
                step = x.after_wait()
                continue
            if response is not None:
                await adapter.close(response)
            span = x.attempt_started(step) if x.traced else None
            try:
                response = await adapter.send(request, step.timeout_s, sender)
                status = adapter.status(response)
                body = await adapter.read_failure(response) if status in FAILURE_BODY else None
            except adapter.attempt_errors as exc:
                response, result = None, x.failed(exc)
            else:
                result = _healthy(status) or x.answered(response, status, body)
            if span is not None:
                telemetry.CallSpan.attempt_done(span, result.status, result.error)
            step = x.after(result)
        if x.key is not None or x.ctx is not None:  # else: nothing to watch, keep or swap
            response = x.delivered(response, status)
            if x.copying:
                x.keep(response, await adapter.read_copy(response))
        if x.flight is not None and coalesce.closing(x):  # identical calls wait: share
            coalesce.share(x, response, await adapter.read_shared(response, rt.share_limit))
    except UpstreamUnavailable as exc:
        return x.stale_or_raise(exc)
    except BaseException as exc:
        x.abandon(exc, mistake=x.mistake)
        raise
    else:
        return response
    finally:
        x.finish()
