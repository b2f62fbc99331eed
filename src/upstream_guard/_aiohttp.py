"""aiohttp: the adapter of the one guarded call, and the client middleware that runs it.

The guard is an aiohttp client middleware (aiohttp 3.12+): ``guard.aiohttp_middleware()``
for a session of one's own, and, once a guard instruments the process (``install(app)``),
the last middleware of every session's every call, so that each attempt, each redirect hop,
goes through it below the session's own middlewares. An attempt is bounded by its event
loop's watchdog (one timer per loop): aiohttp is asyncio-only, and so is this module.
aiohttp has no public hook for sessions already made, so instrumenting wraps
``ClientSession._request`` and reads a session's ``_middlewares``; a stale copy is a
``ClientResponse`` whose fields are filled here. A failure answer's body is read to classify
it and put back as the response's stream; a delivered body is watched as the caller reads it
(``read()``, ``json()``, ``text()``, ``content.iter_chunked()``...).
``intercepting(targets)`` sends calls for some hosts to a loopback server instead, below
the guard. Imported only when aiohttp is used: ``import upstream_guard`` never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import inspect
import math
import threading
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._call import run_async
from ._classify import FAILURE_BODY
from ._coalesce import detachable
from ._instrument import active_guard

if TYPE_CHECKING:
    from ._body import BodyWatch
    from ._cache import CachedResponse
    from ._guard import Guard

Request = aiohttp.ClientRequest
Response = aiohttp.ClientResponse
Handler = aiohttp.ClientHandlerType


class _Watchdog:
    """The attempt timeouts of one event loop, on one timer.

    ``asyncio.timeout()`` arms and cancels a timer per attempt, which came to a third of the
    guard's work on a healthy call. Here the loop's one timer is armed for the earliest
    deadline; when it fires it cancels the attempts past theirs and re-arms for the next.
    A healthy attempt only enters and leaves a dict.
    """

    __slots__ = ("armed_for", "deadlines", "expired", "timer")

    def __init__(self) -> None:
        # No reference to the loop: the loop is the key of its watchdog in a weak mapping.
        self.deadlines: dict[asyncio.Task[Any], float] = {}  # a task runs one attempt at a time
        self.expired: set[asyncio.Task[Any]] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.armed_for = math.inf

    def watch(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], seconds: float
    ) -> float | None:
        """Cancel ``task`` if its attempt is not done within ``seconds``.

        Returns what ``done`` needs: the deadline of an attempt the task was already in.
        """
        deadline = loop.time() + seconds
        outer = self.deadlines.get(task)
        self.deadlines[task] = deadline
        if deadline < self.armed_for:
            self._arm(loop, deadline)
        return outer

    def done(self, task: asyncio.Task[Any], outer: float | None) -> bool:
        """The attempt is over; whether the watchdog cancelled it."""
        if outer is None:
            del self.deadlines[task]
        else:
            self.deadlines[task] = outer
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed_for = deadline
        self.timer = loop.call_at(deadline, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer, self.armed_for = None, math.inf
        now = loop.time()
        earliest = math.inf
        for task, deadline in self.deadlines.items():
            if deadline <= now:
                if task not in self.expired:
                    self.expired.add(task)
                    task.cancel()
            elif deadline < earliest:
                earliest = deadline
        if earliest < math.inf:
            self._arm(loop, earliest)


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = (
    weakref.WeakKeyDictionary()
)
_last: tuple[Callable[[], Any], _Watchdog | None] = (lambda: None, None)


def _watchdog(loop: asyncio.AbstractEventLoop) -> _Watchdog:
    global _last  # noqa: PLW0603 - the last loop's, found without a lookup
    last_loop, found = _last
    if last_loop() is loop and found is not None:
        return found
    found = _watchdogs.get(loop)
    if found is None:
        found = _watchdogs[loop] = _Watchdog()
    _last = (weakref.ref(loop), found)
    return found


def _replay(body: bytes) -> aiohttp.StreamReader:
    """A finished stream that gives ``body`` to whoever reads it next."""
    loop = asyncio.get_running_loop()
    # Above the high-water mark a stream pauses its protocol; this one never gets there.
    stream = aiohttp.StreamReader(BaseProtocol(loop), max(len(body), 2**16), loop=loop)
    if body:
        stream.feed_data(body)
    stream.feed_eof()
    return stream


# aiohttp 3.14 gives a response the request's stream writer; 3.12 and 3.13 do not.
_WRITER_ARG = "stream_writer" in inspect.signature(Response.__init__).parameters


# A dropped or garbled answer; ClientResponseError: a status line aiohttp could not parse
_NETWORK_ERRORS = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,
    OSError,
)


_closed_by_caller: set[int] = set()
"""The attempt errors (by id, while they are handled) of sessions closed during the call."""


class Adapter:
    """aiohttp's side of the one guarded call; one for the process, it keeps no call's state."""

    __slots__ = ()
    base_error: type[Exception] = aiohttp.ClientConnectionError
    # ValueError: an argument aiohttp refuses (a bad Content-Length), the caller's mistake
    attempt_errors: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, ValueError)
    # OpenTelemetry's aiohttp instrumentation makes one span per logical call, not per attempt.
    instrumentation: str | None = None

    location = staticmethod(lambda request: request.url)
    method = staticmethod(lambda request: request.method)
    path = staticmethod(lambda request: request.url.raw_path)
    header = staticmethod(lambda message, name: message.headers.get(name))
    headers = staticmethod(lambda request: request.headers)
    all_headers = staticmethod(lambda response: list(response.headers.items()))
    status = staticmethod(lambda response: response.status)

    @staticmethod
    def replayable(request: Request, replay_methods: frozenset[str]) -> bool | None:
        body = request.body
        if isinstance(body, bytes | aiohttp.BytesPayload) or request.method not in replay_methods:
            return True  # bytes go again as they are; a body never retried needs no copy
        return None

    @staticmethod
    async def buffer(request: Request) -> None:
        body = request.body
        assert not isinstance(body, bytes)  # noqa: S101 - replayable said it is a payload
        await request.update_body(await body.as_bytes())

    @staticmethod
    def error_kind(exc: BaseException) -> str | None:
        if id(exc) in _closed_by_caller:
            _closed_by_caller.discard(id(exc))
            return None  # the caller closed the session: the error is theirs, passed on
        if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError and the rest
            return "timeout"
        if isinstance(exc, aiohttp.ClientConnectorError):
            return "connect_error"
        if isinstance(exc, ValueError):  # InvalidURL too: the caller's mistake
            return None
        if isinstance(exc, _NETWORK_ERRORS):
            return "network_error"
        return None

    async def send(self, request: Request, timeout_s: float, sender: Handler) -> Response:
        session = request.session
        if session.closed:  # closed by the caller while the guard waited to retry
            closed = aiohttp.ClientConnectionError("Session is closed")
            _closed_by_caller.add(id(closed))
            raise closed
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - aiohttp runs in a task
        loop = task.get_loop()
        watchdog = _watchdog(loop)
        outer = watchdog.watch(loop, task, timeout_s)
        try:
            response = await sender(request)
            if response.status in FAILURE_BODY:  # its body too, within the time
                await self.read_failure(response)
        except BaseException as exc:
            if watchdog.done(task, outer):
                task.uncancel()
                message = f"the attempt timed out after {timeout_s:g} s"
                raise aiohttp.ServerTimeoutError(message) from exc
            if session.closed and isinstance(exc, self.attempt_errors):
                _closed_by_caller.add(id(exc))  # error_kind() takes it out next
            raise  # aiohttp's own error, as it is
        watchdog.done(task, outer)
        return response

    @staticmethod
    async def read_failure(response: Response) -> bytes:
        body = await response.read()  # kept by the response: read() gives it again
        response.content = _replay(body)  # and a stream reader reads it from the start
        return body

    read_copy = read_failure  # aiohttp decodes as it reads: the copy is the decoded body

    @staticmethod
    async def read_shared(response: Response, limit: int) -> bytes | None:
        # Shared only when its length is known and within the cap: aiohttp has no public way
        # to put back part of a stream, so a longer or unsized body is left to its caller
        # (its followers then make their own calls).
        length = response.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > limit:
            return None
        return await Adapter.read_failure(response)

    @staticmethod
    def content(request: Request) -> bytes | None:
        body = request.body
        if isinstance(body, aiohttp.BytesPayload):  # a form or bytes: known before it is sent
            return body.decode("latin-1").encode("latin-1")
        return None

    @staticmethod
    async def close(response: Response) -> None:
        response.release()

    @staticmethod
    def watch(response: Response, watch: BodyWatch) -> None:
        response.content = WatchedStream(response.content, watch)  # type: ignore[assignment]

    @staticmethod
    def late_error(request: Request) -> Exception:  # noqa: ARG004 - the protocol's
        return aiohttp.SocketTimeoutError("the body outlasted the deadline")

    @staticmethod
    def stale(request: Request, entry: CachedResponse, headers: list[tuple[str, str]]) -> Any:
        # aiohttp makes responses only from a connection: this fills one's fields itself,
        # as ClientResponse.start() does from a parsed message.
        extra: dict[str, Any] = {}
        if _WRITER_ARG:
            extra["stream_writer"] = types.SimpleNamespace(output_size=0)
        response = request.response_class(
            request.method,
            request.original_url,
            writer=None,
            continue100=None,
            timer=None,  # type: ignore[arg-type]
            request_info=request.request_info,
            traces=[],
            loop=asyncio.get_running_loop(),
            session=request.session,
            **extra,
        )
        response.version = aiohttp.HttpVersion11
        response.status = entry.status
        response.reason = http.HTTPStatus(entry.status).phrase
        response._headers = CIMultiDictProxy(CIMultiDict(headers))  # noqa: SLF001
        response._raw_headers = tuple((k.encode(), v.encode()) for k, v in headers)  # noqa: SLF001
        response.content = _replay(entry.body)
        return response


ADAPTER = Adapter()


class WatchedStream:
    """A response's stream whose reads go through a ``BodyWatch``, bounded by the deadline."""

    __slots__ = ("_inner", "_watch")

    def __init__(self, inner: aiohttp.StreamReader, watch: BodyWatch) -> None:
        """Watch reads of ``inner``."""
        self._inner, self._watch = inner, watch

    def __getattr__(self, name: str) -> Any:
        """What is not a read (``exception()``, ``at_eof()``...) is the stream's own."""
        return getattr(self._inner, name)

    async def _read(self, read: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        watch = self._watch
        scope = asyncio.timeout(max(watch.remaining(), 0.0))
        try:
            async with scope:
                data = await read(*args, **kwargs)
        except Exception as exc:
            if scope.expired():
                late = ADAPTER.late_error(None)  # type: ignore[arg-type]
                raise watch.failed(late) from late
            error = watch.replacement(exc)
            if error is None:
                raise
            raise error from exc
        watch.passed(b"")  # past the deadline: the client's read timeout
        return data

    async def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all of them by default)."""
        data: bytes = await self._read(self._inner.read, n)
        return data

    async def readany(self) -> bytes:
        """Read what has arrived."""
        data: bytes = await self._read(self._inner.readany)
        return data

    async def readchunk(self) -> tuple[bytes, bool]:
        """Read an HTTP chunk: (data, whether it ends one)."""
        data: tuple[bytes, bool] = await self._read(self._inner.readchunk)
        return data

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes."""
        data: bytes = await self._read(self._inner.readexactly, n)
        return data

    async def readline(self, **kwargs: Any) -> bytes:
        """Read a line."""
        data: bytes = await self._read(self._inner.readline, **kwargs)
        return data

    async def readuntil(self, separator: bytes = b"\n", **kwargs: Any) -> bytes:
        """Read up to and including ``separator``."""
        data: bytes = await self._read(self._inner.readuntil, separator, **kwargs)
        return data

    async def _chunks(self, read: Callable[[], Awaitable[bytes]]) -> AsyncIterator[bytes]:
        while chunk := await read():
            yield chunk

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        """Chunks of up to ``n`` bytes."""
        return self._chunks(functools.partial(self.read, n))

    def iter_any(self) -> AsyncIterator[bytes]:
        """Whatever has arrived, each time."""
        return self._chunks(self.readany)

    def __aiter__(self) -> AsyncIterator[bytes]:
        """Lines."""
        return self._chunks(self.readline)

    async def iter_chunks(self) -> AsyncIterator[tuple[bytes, bool]]:
        """HTTP chunks, as (data, whether it ends one)."""
        while (chunk := await self.readchunk()) != (b"", False):
            yield chunk


# -- the middleware --------------------------------------------------------------------------

_targets: dict[str, URL] = {}
"""Host -> the loopback base URL its calls go to instead (``intercepting``)."""
_lock = threading.Lock()
_hooks = 0
"""How many users (an instrumented guard, active intercepts) need sessions hooked."""
_original: Any = None


async def _redirected(handler: Handler, request: Request) -> Response:
    """Send ``request`` to its host's intercepting server, if it has one."""
    real = request.url
    base = _targets.get(real.host or "")
    if base is None:
        return await handler(request)
    request.url = base.with_path(
        base.raw_path.rstrip("/") + real.raw_path, encoded=True
    ).with_query(real.raw_query_string)
    try:
        return await handler(request)
    finally:
        request.url = real  # the guard, the response and any retry see the real URL


def middleware(guard: Guard | None) -> aiohttp.ClientMiddlewareType:
    """A client middleware guarding calls with ``guard`` (None: the active one, and intercepts)."""

    async def upstream_guard(request: Request, handler: Handler) -> Response:
        g = active_guard() if guard is None else guard
        rt = None if g is None else g._route(request.url)  # noqa: SLF001 - the package's own
        if guard is None and _targets:
            handler = functools.partial(_redirected, handler)
        if rt is None:
            return await handler(request)
        assert g is not None  # noqa: S101 - route found it
        run = run_async(g, rt, ADAPTER, request, handler)
        response: Response = await detachable(run, rt, ADAPTER, request)
        return response

    return upstream_guard


HOOK = middleware(None)
"""The middleware every session's calls end with while hooked."""


def _request_patch(original: Any) -> Any:
    # Every call of a session (request(), get()..., and aiohttp.request()) goes through
    # ClientSession._request, which takes the call's middlewares or else the session's own
    # (kept on ``_middlewares``; aiohttp has no public accessor). HOOK goes last, below them.
    def _request(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> Any:
        chosen = kwargs.get("middlewares")
        if chosen is None:
            chosen = self._middlewares
        if HOOK not in chosen:
            kwargs["middlewares"] = (*chosen, HOOK)
        return original(self, *args, **kwargs)

    patched = functools.update_wrapper(_request, original)
    patched.__upstream_guard__ = True  # type: ignore[attr-defined]
    return patched


def hook() -> None:
    """Have every session's calls end with ``HOOK``, until as many ``unhook()`` calls."""
    global _hooks, _original  # noqa: PLW0603 - the process's one patch
    with _lock:
        _hooks += 1
        if _hooks == 1:
            _original = aiohttp.ClientSession._request  # noqa: SLF001
            aiohttp.ClientSession._request = _request_patch(_original)  # type: ignore[method-assign] # noqa: SLF001


def unhook() -> None:
    """Undo one ``hook()``; the last one restores aiohttp."""
    global _hooks, _original  # noqa: PLW0603
    with _lock:
        _hooks -= 1
        if _hooks == 0:
            aiohttp.ClientSession._request = _original  # type: ignore[method-assign] # noqa: SLF001
            _original = None


@contextlib.contextmanager
def intercepting(targets: Mapping[str, str]) -> Iterator[None]:
    """While active, aiohttp calls to each host in ``targets`` go to its base URL instead.

    ``targets`` maps a host (``api.spotify.com``) to a base URL (``http://127.0.0.1:8123``);
    https calls to the host are sent there too. The guard, if any, sees the real host.
    """
    bases = {}
    for host, base in targets.items():
        url = URL(base)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"intercepting {host!r}: {base!r} is not an http(s) base URL")
        bases[host] = url
    with _lock:
        before = dict(_targets)
        _targets.update(bases)
    hook()
    try:
        yield
    finally:
        unhook()
        with _lock:
            _targets.clear()
            _targets.update(before)
