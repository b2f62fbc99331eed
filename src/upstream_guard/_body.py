"""The body of a delivered answer is part of the call: its failures are upstream failures.

An httpx answer that is no failure is handed back unread, so that clients can stream it
(requests' adapter reads the body within the attempt instead). ``BodyWatch`` sees each chunk
as the caller reads it: a read that fails (a reset or truncated body) or comes after the
call's deadline counts against the upstream's breaker and the request being served, and
the reader gets the client's own error class, also an ``UpstreamUnavailable``. Inside the
middleware that becomes a fallback or a 503, never a 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import RetriesExhaustedError, UpstreamUnavailable, as_client_error

if TYPE_CHECKING:
    from ._call import Exchange


class BodyWatch:
    """Sees each chunk of a delivered body as the caller reads it (one per watched answer)."""

    __slots__ = ("_adapter", "_ctx", "_deadline", "_record", "_request", "_rt")

    def __init__(self, exchange: Exchange) -> None:
        """Watch the body of ``exchange``'s answer, up to the call's deadline."""
        self._adapter = exchange.adapter
        self._ctx = exchange.ctx
        self._rt = exchange.rt
        self._record = exchange
        self._request = exchange.request
        self._deadline = exchange.deadline

    def remaining(self) -> float:
        """Seconds left until the call's deadline (none left: zero or less)."""
        return self._deadline - self._rt.clock.monotonic()

    def passed(self, chunk: bytes) -> bytes:
        """The chunk, if it came before the deadline; else the client's read timeout."""
        if self._rt.clock.monotonic() > self._deadline:
            late = self._adapter.late_error(self._request)
            raise self.failed(late) from late
        return chunk

    def replacement(self, exc: Exception) -> Exception | None:
        """What to raise for a failed read; None: raise ``exc`` itself (not the upstream's)."""
        ours = isinstance(exc, UpstreamUnavailable)
        if ours or not isinstance(exc, self._adapter.attempt_errors):
            return None
        return None if self._adapter.error_kind(exc) is None else self.failed(exc)

    def failed(self, exc: BaseException) -> Exception:
        """Count a failed read; return the error to raise in its place."""
        rt, record = self._rt, self._record
        reason = "timeout" if self._adapter.error_kind(exc) == "timeout" else "body_error"
        rt.breaker_for(record.endpoint).late_failure(reason)
        if self._ctx is not None:
            self._ctx.note(rt.name, "failure", reason, 0.0)
        error = RetriesExhaustedError(
            f"{rt.name} {record.method} {record.endpoint}: the answer's body failed "
            f"({reason}: {type(exc).__name__})",
            upstream=rt.name,
            reason=reason,
            retry_after_s=None,
        )
        error.__cause__ = exc
        mapped: Exception = as_client_error(error, base=self._adapter.base_error)
        return mapped


class _Chunks:
    __slots__ = ("_inner", "_watch")

    def __init__(self, inner: Any, watch: BodyWatch) -> None:
        self._inner, self._watch = inner, watch


class AsyncChunks(_Chunks):
    """An async stream of chunks, read through a watch."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield self._watch.passed(chunk)
        except Exception as exc:
            error = self._watch.replacement(exc)
            if error is None:
                raise
            raise error from exc

    async def aclose(self) -> None:
        """Close the inner stream."""
        await self._inner.aclose()


class SyncChunks(_Chunks):
    """A stream of chunks, read through a watch."""

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from map(self._watch.passed, self._inner)
        except Exception as exc:
            error = self._watch.replacement(exc)
            if error is None:
                raise
            raise error from exc

    def close(self) -> None:
        """Close the inner stream."""
        self._inner.close()
