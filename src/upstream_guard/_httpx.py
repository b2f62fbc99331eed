"""httpx and httpx2: the adapter of the one guarded call (``_call``).

An attempt is bounded by httpx's own per-phase timeouts (request extensions) where the
transport honours them, else by a cancel scope. A failure answer's raw body is read to
classify it and put back as the response's stream: the client decodes it once, as it would
have, and sets ``elapsed``. A 2xx body is watched as the caller reads it.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import anyio

from ._body import AsyncChunks, SyncChunks
from ._classify import FAILURE_BODY

if TYPE_CHECKING:
    from ._body import BodyWatch
    from ._cache import CachedResponse

_PHASES = ("connect", "read", "write", "pool")


def _bound(request: Any, seconds: float) -> None:
    """Cap the request's timeouts at ``seconds``, where a phase may take longer (or has none).

    A retry's cap is never longer than the attempt's before it, so capping what an earlier
    attempt capped comes to the same. Both adapters' ``send`` first check, inline (a frame
    less per attempt), for the usual case: no phase longer than the attempt.
    """
    base = request.extensions.get("timeout") or dict.fromkeys(_PHASES)
    capped = {k: seconds if v is None or v > seconds else v for k, v in base.items()}
    request.extensions = {**request.extensions, "timeout": capped}


class _Adapter:
    # One per transport (or per module, for instrumented ones): it keeps no call's state.
    __slots__ = ("byte_stream",)
    module: Any  # httpx or httpx2, set per flavour
    byte_stream: type[Any]  # its ByteStream: a body that can be sent again as it is
    base_error: type[Exception]
    attempt_errors: tuple[type[BaseException], ...]
    instrumentation: str | None
    body: Callable[[Any, BodyWatch], Any]  # the watched stream's class
    resumed: Callable[[list[bytes], Any, Any], Any]  # read chunks, then the rest of a stream

    def __init__(self) -> None:
        # Read on every call: a slot (a class attribute is a generic lookup on CPython 3.11).
        self.byte_stream = self.module.ByteStream

    # attrgetters: read without a Python frame of their own (not descriptors: never bound)
    location = attrgetter("url")
    headers = attrgetter("headers")
    status = attrgetter("status_code")
    method = attrgetter("method")
    header = staticmethod(lambda message, name: message.headers.get(name))

    def replayable(self, request: Any, replay_methods: frozenset[str]) -> bool | None:
        if type(request.stream) is self.byte_stream or request.method not in replay_methods:
            return True  # bytes go again as they are; a body never retried needs no copy
        return None

    @staticmethod
    def path(request: Any) -> str:
        return request.url.raw_path.decode("ascii").partition("?")[0]  # type: ignore[no-any-return]

    @staticmethod
    def all_headers(response: Any) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]

    def error_kind(self, exc: BaseException) -> str | None:
        m = self.module
        if isinstance(exc, m.UnsupportedProtocol | m.LocalProtocolError):
            return None  # the caller's mistake
        if isinstance(exc, m.TimeoutException):
            return "timeout"
        return "connect_error" if isinstance(exc, m.ConnectError) else "network_error"

    def late_error(self, request: Any) -> Exception:
        error: Exception = self.module.ReadTimeout(
            "the body outlasted the deadline", request=request
        )
        return error

    def stale(self, request: Any, entry: CachedResponse, headers: list[tuple[str, str]]) -> Any:  # noqa: ARG002 - the protocol's
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return self.module.Response(
            entry.status, headers=raw, stream=self.module.ByteStream(entry.body)
        )

    def watch(self, response: Any, watch: BodyWatch) -> None:
        response.stream = self.body(response.stream, watch)

    def content(self, request: Any) -> bytes | None:
        try:
            return request.content  # type: ignore[no-any-return]
        except self.module.RequestNotRead:  # a streamed body
            return None

    @staticmethod
    def _too_long(response: Any, limit: int) -> bool:
        length = response.headers.get("content-length", "")
        return length.isdigit() and int(length) > limit

    def _decoded(self, response: Any, raw: bytes) -> bytes | None:
        """The body as the client decodes it (None: it does not decode)."""
        try:
            decoded: bytes = self.module.Response(
                200, headers=response.headers, content=raw
            ).content
        except self.module.DecodingError:
            return None
        return decoded


class _Async(_Adapter):
    # ``cancel_scope``: for inner transports that may ignore httpx's timeouts.
    __slots__ = ("_cancel_scope",)

    def __init__(self, *, cancel_scope: bool) -> None:
        super().__init__()
        self._cancel_scope = cancel_scope

    async def buffer(self, request: Any) -> None:
        await request.aread()

    def send(self, request: Any, timeout_s: float, sender: Any) -> Awaitable[Any]:
        try:
            within = max(request.extensions["timeout"].values()) <= timeout_s
        except (KeyError, TypeError, ValueError):  # none set, or a phase without a limit
            within = False
        if not within:
            _bound(request, timeout_s)
        return self._scoped(request, timeout_s, sender) if self._cancel_scope else sender(request)

    async def _scoped(self, request: Any, timeout_s: float, sender: Any) -> Any:
        try:
            with anyio.fail_after(timeout_s):
                response = await sender(request)
                if response.status_code in FAILURE_BODY:  # its body too, within the time
                    await self.read_failure(response)
                return response
        except TimeoutError as exc:
            raise self.module.TimeoutException("the attempt timed out", request=request) from exc

    async def read_failure(self, response: Any) -> bytes:
        try:
            raw = b"".join([chunk async for chunk in response.stream])
        finally:
            await response.stream.aclose()
        response.stream = self.module.ByteStream(raw)  # the caller reads the same bytes
        return raw

    async def read_copy(self, response: Any) -> bytes | None:
        return self._decoded(response, await self.read_failure(response))

    async def close(self, response: Any) -> None:
        await response.aclose()

    async def read_shared(self, response: Any, limit: int) -> bytes | None:
        if self._too_long(response, limit):
            return None
        stream = response.stream
        rest = stream.__aiter__()
        chunks: list[bytes] = []
        size = 0
        async for chunk in rest:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # the caller gets what was read, then the rest as it comes
                response.stream = self.resumed(chunks, rest, stream)
                return None
        await stream.aclose()
        raw = b"".join(chunks)
        response.stream = self.module.ByteStream(raw)
        return raw


class _Sync(_Adapter):
    __slots__ = ()

    def buffer(self, request: Any) -> None:
        request.read()

    def send(self, request: Any, timeout_s: float, sender: Any) -> Any:
        try:
            within = max(request.extensions["timeout"].values()) <= timeout_s
        except (KeyError, TypeError, ValueError):  # none set, or a phase without a limit
            within = False
        if not within:
            _bound(request, timeout_s)
        return sender(request)

    def read_failure(self, response: Any) -> bytes:
        try:
            raw = b"".join(response.stream)
        finally:
            response.stream.close()
        response.stream = self.module.ByteStream(raw)  # the caller reads the same bytes
        return raw

    def read_copy(self, response: Any) -> bytes | None:
        return self._decoded(response, self.read_failure(response))

    def close(self, response: Any) -> None:
        response.close()

    def read_shared(self, response: Any, limit: int) -> bytes | None:
        if self._too_long(response, limit):
            return None
        stream = response.stream
        rest = iter(stream)
        chunks: list[bytes] = []
        size = 0
        for chunk in rest:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # the caller gets what was read, then the rest as it comes
                response.stream = self.resumed(chunks, rest, stream)
                return None
        stream.close()
        raw = b"".join(chunks)
        response.stream = self.module.ByteStream(raw)
        return raw


class _AsyncResumed:
    """Chunks already read, then the rest of the stream they came from."""

    __slots__ = ("_chunks", "_inner", "_rest")

    def __init__(self, chunks: list[bytes], rest: Any, inner: Any) -> None:
        self._chunks, self._rest, self._inner = chunks, rest, inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class _SyncResumed:
    """Chunks already read, then the rest of the stream they came from."""

    __slots__ = ("_chunks", "_inner", "_rest")

    def __init__(self, chunks: list[bytes], rest: Any, inner: Any) -> None:
        self._chunks, self._rest, self._inner = chunks, rest, inner

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks
        yield from self._rest

    def close(self) -> None:
        self._inner.close()


def adapters(module: types.ModuleType) -> tuple[type[Any], type[Any]]:
    """The (async, sync) adapter classes of one httpx-like module."""
    names = {
        "module": module,
        "base_error": module.TransportError,
    }
    names["__slots__"] = ()
    names |= {"attempt_errors": (module.TransportError,), "instrumentation": module.__name__}
    async_body = type("WatchedBody", (AsyncChunks, module.AsyncByteStream), {"__slots__": ()})
    sync_body = type("WatchedBody", (SyncChunks, module.SyncByteStream), {"__slots__": ()})
    async_resumed = type("ResumedBody", (_AsyncResumed, module.AsyncByteStream), {"__slots__": ()})
    sync_resumed = type("ResumedBody", (_SyncResumed, module.SyncByteStream), {"__slots__": ()})
    return (
        type(
            f"{module.__name__}AsyncAdapter",
            (_Async,),
            {**names, "body": async_body, "resumed": async_resumed},
        ),
        type(
            f"{module.__name__}SyncAdapter",
            (_Sync,),
            {**names, "body": sync_body, "resumed": sync_resumed},
        ),
    )
