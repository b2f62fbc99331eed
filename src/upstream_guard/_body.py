"""The body of a delivered answer is part of the call: its failures are upstream failures.

A 2xx is handed back unread, so that clients can stream it. When reading it later fails (a
reset or truncated body) or drips past the call's deadline, the failure is counted against
the upstream's breaker and the request's context, and the reader gets an
``UpstreamUnavailable`` (also the client library's ``TransportError``) instead of a raw read
error: inside the middleware that becomes a fallback or a 503, never a 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from ._context import request_context
from ._errors import RetriesExhaustedError, UpstreamUnavailable

if TYPE_CHECKING:
    from ._httpx import Flavor
    from ._pipeline import CallRecord, UpstreamRuntime


class _Body:
    """What both stream wrappers share; one small object per answer (the hot path)."""

    __slots__ = ("_deadline", "_flavor", "_inner", "_record", "_request", "_rt")

    def __init__(
        self, inner: Any, rt: UpstreamRuntime, record: CallRecord, request: Any, flavor: Flavor
    ) -> None:
        """Watch ``inner``, the body of the answer to ``request``."""
        self._inner = inner
        self._rt = rt
        self._record = record
        self._request = request
        self._flavor = flavor
        self._deadline = record.started + rt.total_s

    def _late(self) -> bool:
        return self._rt.clock.monotonic() > self._deadline

    def _failed(self, exc: BaseException) -> Exception:
        """Count the failure; return the error to raise in its place."""
        rt, record = self._rt, self._record
        reason = "timeout" if isinstance(exc, TimeoutError) else "body_error"
        rt.breaker_for(record.endpoint).late_failure(reason)
        ctx = request_context.get()
        if ctx is not None:
            ctx.note(rt.name, "failure", reason, 0.0)
        error = RetriesExhaustedError(
            f"{rt.name} {record.method} {record.endpoint}: the answer's body failed "
            f"({reason}: {type(exc).__name__})",
            upstream=rt.name,
            reason=reason,
            retry_after_s=None,
        )
        mapped = self._flavor.error(error, self._request)
        mapped.__cause__ = exc
        return mapped


class AsyncBody(_Body):
    """An async byte stream that watches its inner stream (subclassed per httpx flavor)."""

    __slots__ = ()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Yield the inner chunks; a failed or late read becomes an upstream failure."""
        errors = (self._flavor.transport_error, TimeoutError)
        try:
            async for chunk in self._inner:
                if self._late():
                    raise TimeoutError("the body outlasted timeout.total_s")
                yield chunk
        except UpstreamUnavailable:
            raise
        except errors as exc:
            raise self._failed(exc) from exc

    async def aclose(self) -> None:
        """Close the inner stream."""
        await self._inner.aclose()


class SyncBody(_Body):
    """A sync byte stream that watches its inner stream (subclassed per httpx flavor)."""

    __slots__ = ()

    def __iter__(self) -> Iterator[bytes]:
        """Yield the inner chunks; a failed or late read becomes an upstream failure."""
        errors = (self._flavor.transport_error, TimeoutError)
        try:
            for chunk in self._inner:
                if self._late():
                    raise TimeoutError("the body outlasted timeout.total_s")
                yield chunk
        except UpstreamUnavailable:
            raise
        except errors as exc:
            raise self._failed(exc) from exc

    def close(self) -> None:
        """Close the inner stream."""
        self._inner.close()
