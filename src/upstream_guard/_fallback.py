"""What the app answers when a handler failed because an upstream is unavailable."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._cache import GUARD_HEADER
from ._errors import UpstreamUnavailable

if TYPE_CHECKING:
    from ._context import RequestContext
    from ._guard import Guard

FallbackHandler = Callable[[Request, BaseException], Response | Awaitable[Response]]
PROBLEM_TYPE = "urn:upstream-guard:problem:upstream-unavailable"


def find_unavailable(exc: BaseException) -> UpstreamUnavailable | None:
    """The first ``UpstreamUnavailable`` in an exception's causes, contexts and groups."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UpstreamUnavailable):
            return current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


def retry_after_header(guard: Guard, upstream: str, error: UpstreamUnavailable | None) -> str:
    """Whole seconds, at least 1, for the ``Retry-After`` header.

    The error's wait, else the breaker's or cooldown's, else ``fallback_retry_after_s``.
    """
    wait = error.retry_after_s if error is not None else None
    if not wait and upstream in guard.upstreams:
        wait = guard.retry_after_s(upstream)
    if not wait:
        wait = guard.settings.fallback_retry_after_s
    # Whole seconds, rounded up, but not for float dust (30.000000000000114 is 30).
    return str(max(1, math.ceil(wait - 1e-6)))


def problem_response(
    guard: Guard, upstream: str, reason: str, error: UpstreamUnavailable | None
) -> Response:
    """503 ``application/problem+json`` with ``Retry-After``; it reveals no upstream body."""
    retry_after = retry_after_header(guard, upstream, error)
    body = {
        "type": PROBLEM_TYPE,
        "title": "Upstream unavailable",
        "status": 503,
        "detail": f"{upstream} is unavailable ({reason}); try again in {retry_after} s.",
        "upstream": upstream,
    }
    return JSONResponse(
        body,
        status_code=503,
        headers={"retry-after": retry_after, GUARD_HEADER: "unavailable"},
        media_type="application/problem+json",
    )


async def fallback_response(
    guard: Guard,
    *,
    scope: dict[str, Any],
    receive: Any,
    exc: BaseException,
    error: UpstreamUnavailable | None,
    ctx: RequestContext,
) -> Response:
    """The route's own fallback if one is registered for this path, else the 503 problem."""
    if error is not None:
        upstream, reason = error.upstream, error.reason
    else:
        upstream, reason = next(iter((ctx.failed or {"unknown": "failure"}).items()))
    handler = guard.fallbacks.get(scope.get("path", ""))
    route = scope.get("route")
    if handler is None and route is not None:
        handler = guard.fallbacks.get(getattr(route, "path", ""))
    if handler is not None:
        try:
            result = handler(Request(scope, receive), error if error is not None else exc)
            response: Response = await result if inspect.isawaitable(result) else result
        except Exception:  # noqa: BLE001 - a broken fallback must not turn into a 500
            return problem_response(guard, upstream, reason, error)
        response.headers.setdefault(GUARD_HEADER, "fallback")
        return response
    return problem_response(guard, upstream, reason, error)
