"""The requests driver (spotipy's client): the same guarded call, on a ``requests`` adapter.

Imported only when requests is used: ``import upstream_guard`` never imports requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import requests
import requests.adapters
import requests.structures
import urllib3.exceptions

from . import _context as context
from . import _telemetry as telemetry
from ._cache import cache_key, stale_headers, storable, wants_no_copy
from ._classify import needs_body
from ._context import guarding, request_context
from ._errors import UpstreamUnavailable
from ._pipeline import Attempt, AttemptResult, CallRecord, run_in_thread

if TYPE_CHECKING:
    from ._guard import Guard
    from ._pipeline import UpstreamRuntime

# What a failed attempt on requests looks like: network trouble, not a bad URL or argument.
_NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
_ERRORS: dict[type[UpstreamUnavailable], type[Exception]] = {}


class UrlParts(NamedTuple):
    """The parts of a URL that ``Guard.match`` reads."""

    host: str
    port: int | None
    scheme: str


def url_parts(url: str) -> UrlParts | None:
    """Host, port and scheme of a URL string, or None when it cannot be parsed."""
    try:
        parts = urlsplit(url)
        return UrlParts(parts.hostname or "", parts.port, parts.scheme)
    except ValueError:
        return None


def requests_error(exc: UpstreamUnavailable, request: Any) -> Exception:
    """The same error as an instance of both our class and ``requests.ConnectionError``."""
    cls = _ERRORS.get(type(exc))
    if cls is None:
        cls = type(type(exc).__name__, (type(exc), requests.ConnectionError), {})
        cls.__module__ = "upstream_guard"
        _ERRORS[type(exc)] = cls
    make: Any = cls
    mapped: Any = make(
        str(exc), upstream=exc.upstream, reason=exc.reason, retry_after_s=exc.retry_after_s
    )
    mapped.request = request
    return mapped  # type: ignore[no-any-return]


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, requests.ConnectionError):
        return "connect_error"
    return "network_error"


def _cap_timeout(user: Any, seconds: float) -> Any:
    if user is None:
        return seconds
    if isinstance(user, tuple):
        return tuple(seconds if t is None or t > seconds else t for t in user)
    try:
        return min(float(user), seconds)
    except (TypeError, ValueError):
        return seconds


def _stale(
    rt: UpstreamRuntime, key: str | None, record: CallRecord, request: Any
) -> requests.Response | None:
    if key is None or rt.stale is None:
        return None
    found = rt.stale.get(key)
    if found is None:
        return None
    entry, age = found
    record.outcome = "stale"
    response = requests.Response()
    response.status_code = entry.status
    response.headers = requests.structures.CaseInsensitiveDict(stale_headers(entry, age))
    response._content = entry.body  # noqa: SLF001 - how requests builds a read response
    response.url = request.url
    response.request = request
    response.reason = "OK"
    return response


def _read_by(response: Any, deadline: float, clock: Any) -> bytes:
    """The whole body, as ``response.content`` would read it, but not past ``deadline``.

    urllib3's ``read1`` returns what has arrived, so a dripping body is checked against the
    deadline as it comes, not once it is whole.
    """
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 1.x: no partial reads
        return bytes(response.content)
    chunks = []
    try:
        while chunk := read1(64 * 1024, decode_content=True):
            chunks.append(chunk)
            if clock.monotonic() > deadline:
                response.close()
                raise requests.Timeout("the body outlasted timeout.total_s")
    except urllib3.exceptions.HTTPError as exc:  # what requests would wrap in iter_content
        raise requests.ConnectionError(exc) from exc
    body = b"".join(chunks)
    response._content = body  # noqa: SLF001 - what response.content caches, read by our rules
    response._content_consumed = True  # noqa: SLF001
    return body


def _attempt(
    record: CallRecord,
    action: Attempt,
    *,
    deadline: float,
    clock: Any,
    request: Any,
    parts: Any,
    send: Callable[..., Any],
    kwargs: dict[str, Any],
) -> tuple[Any, AttemptResult]:
    span = None
    if record.span is not None:
        span = record.span.attempt(action.number, request.url, parts.hostname, parts.port)
        if span is not None:
            telemetry.inject(span, request.headers)
    try:
        timeout = _cap_timeout(kwargs.get("timeout"), action.timeout_s)
        response = send(request, **{**kwargs, "timeout": timeout})
        if not kwargs.get("stream"):
            # The session reads the whole body right after this anyway: read it here, so a
            # body that breaks (or drips past the deadline) is this attempt's failure.
            body = _read_by(response, deadline, clock)
        else:
            body = response.content if needs_body(response.status_code) else b""
    except _NETWORK_ERRORS as exc:
        response = None
        result = AttemptResult(error_kind=_error_kind(exc), error=exc)
    else:
        result = AttemptResult(
            status=response.status_code,
            retry_after=response.headers.get("retry-after"),
            body=body,
        )
    if span is not None:
        telemetry.CallSpan.attempt_done(span, result.status, result.error)
    return response, result


def _delivered(
    rt: UpstreamRuntime, key: str | None, record: CallRecord, request: Any, response: Any
) -> Any:
    """Keep a good copy, or answer a failure with a stale one, when stale-if-error is on."""
    if key is None or rt.stale is None:
        return response
    status = response.status_code
    if storable(status, response.headers.get("cache-control")):
        rt.stale.put(key, status, list(response.headers.items()), response.content)
    elif status >= 500 or status == 429:
        return _stale(rt, key, record, request) or response
    return response


def drive_requests(
    guard: Guard,
    rt: UpstreamRuntime,
    request: Any,
    send: Callable[..., Any],
    kwargs: dict[str, Any],
) -> Any:
    """Run one guarded call for a prepared request, sending each attempt with ``send``."""
    ctx = request_context.get()  # once per call: the deadline and the request's record
    parts = urlsplit(request.url)
    record = CallRecord(rt.name, rt.matcher.match(parts.path), request.method, rt.clock.monotonic())
    if telemetry.TRACE_API["_TRACER_PROVIDER"] is not None and telemetry.tracing_on():
        own_spans = not telemetry.official_instrumentation("requests")
        record.span = telemetry.CallSpan(
            record, parts.hostname or "", parts.port, attempt_spans=own_spans
        )
    replayable = request.body is None or isinstance(request.body, bytes | str)
    key = None
    if (
        rt.stale is not None
        and request.method == "GET"
        and not wants_no_copy(request.headers.get("cache-control"))
    ):
        key = cache_key(rt.name, request.url, request.headers.get)
    token = guarding.set(True) if context.state.patched else None

    def attempt(action: Attempt) -> tuple[Any, AttemptResult]:
        return _attempt(
            record,
            action,
            deadline=record.started + rt.total_s,
            clock=rt.clock,
            request=request,
            parts=parts,
            send=send,
            kwargs=kwargs,
        )

    try:
        response = run_in_thread(
            rt,
            record,
            attempt,
            retryable_body=replayable,
            deadline_s=guard.deadline_left(ctx),
            rng=guard.rng,
        )
        return _delivered(rt, key, record, request, response)
    except UpstreamUnavailable as exc:
        stale = _stale(rt, key, record, request)
        if stale is not None:
            return stale
        raise requests_error(exc, request) from exc.__cause__
    finally:
        if token is not None:
            guarding.reset(token)
        guard.finish(record, ctx)


class GuardedAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose calls to guarded hosts go through a guard."""

    def __init__(self, guard: Guard, **kwargs: Any) -> None:
        """Mount it on a session: ``session.mount("https://", GuardedAdapter(guard))``."""
        super().__init__(**kwargs)
        self._guard = guard

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        """Send ``request``, guarded when its host belongs to an upstream."""
        parts = url_parts(request.url or "")
        rt = self._guard.match(parts) if parts is not None else None
        if rt is None:
            return super().send(request, **kwargs)
        result: requests.Response = drive_requests(self._guard, rt, request, super().send, kwargs)
        return result


def guarded_session(guard: Guard) -> requests.Session:
    """A ``requests.Session`` whose calls to guarded hosts go through ``guard``."""
    session = requests.Session()
    adapter = GuardedAdapter(guard)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session
