"""The middleware's added cost on a trivial route, in-process, against no middleware.

Each variant is the same Starlette app (one route answering "ok"); requests are ASGI calls
made directly (no server, no client), so the figure is the middleware's own work. Variants run
interleaved in rounds, in a shuffled order; the ratio per variant is the median of per-round
ratios to the bare app.
Starlette's BaseHTTPMiddleware (a pass-through dispatch) is shown for scale, and two reference
middlewares show the least that per-request attribution costs: a context variable set and
reset per request (how an outbound call finds its request), and that plus a ``send`` wrapper
that knows whether the response started (without which no fallback can be sent safely).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from contextvars import ContextVar
from functools import partial
from typing import Any

from _common import interleaved, table, write
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from upstream_guard import Guard, GuardSettings, UpstreamGuardMiddleware
from upstream_guard._instrument import uninstrument

ROUNDS = 40
CALLS = 1000


async def ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


class PassThrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Any, call_next: Any) -> Any:
        return await call_next(request)


class PureASGIPassThrough:
    """The floor: a pure ASGI middleware that only forwards the call."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


_request: ContextVar[Any] = ContextVar("bench_request", default=None)


class ContextVarOnly:
    """What any middleware that lets outbound calls find their request must do at least:
    set a context variable for the request and reset it after."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        token = _request.set(scope)
        try:
            await self.app(scope, receive, send)
        finally:
            _request.reset(token)


class ContextVarAndSendWrapper:
    """``ContextVarOnly`` plus the least ``send`` wrapper that knows whether the response has
    started (without which no fallback can be sent safely)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def wrapped(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        token = _request.set(scope)
        try:
            await self.app(scope, receive, wrapped)
        finally:
            _request.reset(token)


def make_app(middleware: list[Middleware]) -> Starlette:
    return Starlette(routes=[Route("/", ok)], middleware=middleware)


def make_fastapi(middleware: list[Middleware]) -> FastAPI:
    app = FastAPI(middleware=middleware)

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"ok": "yes"}

    return app


SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"testserver")],
    "client": ("127.0.0.1", 1234),
    "server": ("testserver", 80),
}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    return None


async def seconds_per_request(app: Any) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter() - start) / CALLS


async def main() -> None:
    guard = Guard(GuardSettings())
    guard_mw = Middleware(UpstreamGuardMiddleware, guard=guard)
    apps = {
        "Starlette, no middleware": make_app([]),
        "Starlette + UpstreamGuardMiddleware": make_app([guard_mw]),
        "Starlette + pure ASGI pass-through (floor)": make_app([Middleware(PureASGIPassThrough)]),
        "Starlette + context variable only (reference)": make_app([Middleware(ContextVarOnly)]),
        "Starlette + context variable and send wrapper (reference)": make_app(
            [Middleware(ContextVarAndSendWrapper)]
        ),
        "Starlette + BaseHTTPMiddleware pass-through": make_app([Middleware(PassThrough)]),
        "FastAPI, no middleware": make_fastapi([]),
        "FastAPI + UpstreamGuardMiddleware": make_fastapi([guard_mw]),
        "FastAPI + pure ASGI pass-through (floor)": make_fastapi([Middleware(PureASGIPassThrough)]),
        "FastAPI + context variable and send wrapper (reference)": make_fastapi(
            [Middleware(ContextVarAndSendWrapper)]
        ),
    }
    # Each sample is the requests/s of one round: interleaved() takes seconds per call.
    seconds = await interleaved(
        {name: partial(seconds_per_request, app) for name, app in apps.items()}, ROUNDS
    )
    samples = {name: [1 / s for s in got] for name, got in seconds.items()}
    uninstrument(guard)
    rows = []
    cost: dict[str, float] = {}
    for name, got in samples.items():
        bare = samples[name.split(",")[0].split(" +")[0] + ", no middleware"]
        ratio = statistics.median(g / b for g, b in zip(got, bare, strict=True))
        added_us = statistics.median(1e6 / g - 1e6 / b for g, b in zip(got, bare, strict=True))
        cost[name] = (1 - ratio) * 100
        rows.append([name, f"{statistics.median(got):,.0f}", f"{ratio:.3f}", f"{added_us:+.1f}"])
    verdicts = [
        [name, f"{cost[name]:.1f}%", "<= 3%", "yes" if cost[name] <= 3 else "NO"]
        for name in ("Starlette + UpstreamGuardMiddleware", "FastAPI + UpstreamGuardMiddleware")
    ]
    body = (
        f"{ROUNDS} interleaved rounds of {CALLS} in-process ASGI requests to a trivial route.\n\n"
        + table(["variant", "requests/s (median)", "rate vs none", "added us/request"], rows)
        + "\n\n"
        + table(["middleware cost in requests/s", "measured", "goal", "met"], verdicts)
    )
    write("middleware", "Middleware cost on a trivial route", body)


if __name__ == "__main__":
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    asyncio.run(main())
