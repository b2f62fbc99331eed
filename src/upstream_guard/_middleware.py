"""The ASGI middleware: request context, fallbacks, health and dashboard, and ``install``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from ._cache import GUARD_HEADER
from ._clock import Clock
from ._context import RequestContext, request_context
from ._dashboard import Dashboard
from ._fallback import fallback_response, find_unavailable
from ._guard import Guard
from ._instrument import instrument
from ._settings import GuardSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class UpstreamGuardMiddleware:
    """Pure ASGI middleware guarding the upstream calls an app makes while serving requests.

    ``app.add_middleware(UpstreamGuardMiddleware)`` reads ``GuardSettings()`` from the
    environment; ``install(app)`` passes its own guard. Any other ASGI app can be wrapped:
    ``app = UpstreamGuardMiddleware(app)``.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: GuardSettings | None = None,
        *,
        guard: Guard | None = None,
    ) -> None:
        """Wrap ``app``; build a Guard from ``settings`` unless one is given."""
        self.app = app
        self.guard = guard if guard is not None else Guard(settings)
        self._health_path = self.guard.settings.health_path
        self._deadline_s = self.guard.settings.request_deadline_s
        # None unless dashboard_path is set: then it also keeps recent calls (a guard hook).
        self._dashboard = Dashboard(self.guard) if self.guard.settings.dashboard_path else None
        # The paths answered here rather than by the app: one set lookup per request.
        self._own_paths = frozenset(
            {self._health_path, *(self._dashboard.paths if self._dashboard else ())}
        )
        instrument(self.guard, weak=True)  # a dropped app leaves nothing behind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guard an http request; health, dashboard, lifespan and the rest are dispatched."""
        if scope["type"] != "http" or scope["path"] in self._own_paths:
            await self._dispatch(scope, receive, send)
            return
        # A request to the app, handled here rather than in a method of its own: one
        # coroutine less on every request.
        guard = self.guard
        ctx = RequestContext()
        ctx.guard = guard
        ctx.server_send = send
        if self._deadline_s is not None:
            ctx.deadline = guard.clock.monotonic() + self._deadline_s
        token = request_context.set(ctx)
        try:
            await self.app(scope, receive, ctx.send)
        except Exception as exc:
            if ctx.started:
                raise  # too late for another answer: let the server deal with it
            error = find_unavailable(exc)
            if error is None and not ctx.failed:
                raise
            response = await fallback_response(
                guard, scope=dict(scope), receive=receive, exc=exc, error=error, ctx=ctx
            )
            ctx.answered_by = response.headers.get(GUARD_HEADER, "fallback")
            if self._dashboard is not None:
                for name in ctx.failed or ([error.upstream] if error is not None else ()):
                    self._dashboard.timeline.count(name, "fallback")
            await response(scope, receive, ctx.send)
        finally:
            request_context.reset(token)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"] == self._health_path:
                await self._health(scope, receive, send)
            else:
                assert self._dashboard is not None  # noqa: S101 - __call__ checked
                await self._dashboard(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        snapshot = self.guard.snapshot()
        status = 503 if snapshot["status"] == "unavailable" else 200
        response = JSONResponse(snapshot, status_code=status, headers={"cache-control": "no-store"})
        await response(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app")
        state = getattr(app, "state", None)
        if state is not None and getattr(state, "upstream_guard", None) is None:
            state.upstream_guard = self.guard

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                instrument(self.guard, weak=True)
                self.guard.start()
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self.guard.close()
            await send(message)

        await self.app(scope, receive, lifespan_send)


def install(
    app: Any, settings: GuardSettings | None = None, *, clock: Clock | None = None
) -> Guard:
    """Guard every upstream call ``app`` makes: the one line for FastAPI and Starlette.

    Adds ``UpstreamGuardMiddleware``, instruments httpx, httpx2 and requests, and keeps the
    Guard on ``app.state.upstream_guard``. Calling it again returns the same Guard.
    ``clock`` is for tests (``upstream_guard.testing.FakeClock``).
    """
    state = getattr(app, "state", None)
    existing = getattr(state, "upstream_guard", None)
    if isinstance(existing, Guard):
        return existing
    guard = Guard(settings, clock=clock)
    app.add_middleware(UpstreamGuardMiddleware, guard=guard)
    if state is not None:
        state.upstream_guard = guard
    instrument(guard, weak=True)
    return guard
