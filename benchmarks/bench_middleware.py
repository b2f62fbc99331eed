"""The middleware's added cost on a trivial route, in-process, against no middleware.

Each variant is the same app (one route answering "ok", on Starlette and on FastAPI) with one
middleware or none, measured in one run with no server and no network, two ways:

- bare ASGI calls: the app called directly, no client, so the figure is the middleware's own
  work against the framework's alone. This is the goal as written (at most 3% fewer
  requests/s). On a trivial Starlette route even a middleware that only forwards the call
  costs 2-4% measured this way (2.4% by instructions).
- requests through an in-process client, an ``httpx.AsyncClient`` over
  ``httpx.ASGITransport``: requests/s as a caller sees them. The client does most of the work
  here (about nine tenths of the instructions), so this reading is far easier to meet. Each
  sample builds its app and client afresh, so that no variant keeps a lucky or unlucky memory
  layout for the whole run.

Wall-clock ratios on this shared VM move by about 3% between runs, as much as the goal, so
where valgrind is installed callgrind also counts instructions per request for both (a
count moves by up to 1k between runs; the collector is off while counting). Pass
--no-callgrind to skip.

Variants run interleaved in rounds, in a shuffled order; the ratio per variant is the median
of per-round ratios to the bare app. Starlette's BaseHTTPMiddleware (a pass-through dispatch)
is shown for scale, and two reference middlewares show the least that per-request attribution
costs: a context variable set and reset per request (how an outbound call finds its request),
and that plus a ``send`` wrapper that knows whether the response started (without which no
fallback can be sent safely).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from functools import partial
from typing import Any

import httpx
from _common import MARK, instructions_between_marks, interleaved, table, write
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from upstream_guard import Guard, GuardSettings, UpstreamGuardMiddleware

ROUNDS = 40
CALLS = 1000
REQUESTS = 300
GOAL_PERCENT = 3
NONE = "no middleware"
OURS = "UpstreamGuardMiddleware"
REFERENCE = "context variable and send wrapper (reference)"
FLOOR = "pure ASGI pass-through (floor)"


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
    started (without which no fallback can be sent safely). The wrapper is a plain function
    returning the server's awaitable, as the guard's is: no coroutine per message."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        def wrapped(message: Any) -> Any:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            return send(message)

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


FRAMEWORKS: dict[str, Callable[[list[Middleware]], Any]] = {
    "Starlette": make_app,
    "FastAPI": make_fastapi,
}


def middlewares(guard: Guard) -> dict[str, list[Middleware]]:
    """Each variant's middleware list, by name."""
    return {
        NONE: [],
        OURS: [Middleware(UpstreamGuardMiddleware, guard=guard)],
        FLOOR: [Middleware(PureASGIPassThrough)],
        "context variable only (reference)": [Middleware(ContextVarOnly)],
        REFERENCE: [Middleware(ContextVarAndSendWrapper)],
        "BaseHTTPMiddleware pass-through": [Middleware(PassThrough)],
    }


def label(framework: str, variant: str) -> str:
    return f"{framework}, {variant}" if variant == NONE else f"{framework} + {variant}"


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


async def seconds_per_call(app: Any) -> float:
    """One bare-call sample: the app awaited directly, no client."""
    start = time.perf_counter()
    for _ in range(CALLS):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter() - start) / CALLS


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver")


async def seconds_per_request(make: Callable[[], Any]) -> float:
    """One request sample: a fresh app and client, then GETs, each answer checked."""
    async with client_for(make()) as client:
        await client.get("/")  # builds the app's middleware stack
        gc.collect()
        start = time.perf_counter()
        for _ in range(REQUESTS):
            response = await client.get("/")
            if response.status_code != 200:
                raise RuntimeError(f"the trivial route answered {response.status_code}")
        return (time.perf_counter() - start) / REQUESTS


def summarise(seconds: dict[str, list[float]]) -> tuple[list[list[str]], dict[str, float]]:
    """Table rows, and each variant's cost in percent of the bare app's requests/s."""
    rows = []
    cost: dict[str, float] = {}
    for name, got in seconds.items():
        bare = seconds[label(name.split(",")[0].split(" +")[0], NONE)]
        ratio = statistics.median(b / g for g, b in zip(got, bare, strict=True))
        added_us = statistics.median((g - b) * 1e6 for g, b in zip(got, bare, strict=True))
        cost[name] = (1 - ratio) * 100
        rows.append(
            [name, f"{1 / statistics.median(got):,.0f}", f"{ratio:.3f}", f"{added_us:+.1f}"]
        )
    return rows, cost


HEADERS = ["variant", "requests/s (median)", "rate vs none", "added us/request"]

_CALLGRIND_APP = f"""
import asyncio, gc, os, sys
import bench_middleware as bench
from upstream_guard import Guard, GuardSettings
framework, requests, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kinds = bench.middlewares(Guard(GuardSettings()))
apps = {{variant: bench.FRAMEWORKS[framework](kinds[variant]) for variant in bench.COUNTED}}
clients = {{variant: bench.client_for(app) for variant, app in apps.items()}}
async def main():
    for variant in bench.COUNTED:  # warm every variant up before the first count
        for _ in range(50):
            await clients[variant].get("/")
            await apps[variant](dict(bench.SCOPE), bench.receive, bench.send)
    # A collection falling in one count and not another would swamp the difference.
    gc.collect()
    gc.disable()
    {MARK}
    for variant in bench.COUNTED:
        for _ in range(requests):
            await clients[variant].get("/")
        {MARK}
        for _ in range(calls):
            await apps[variant](dict(bench.SCOPE), bench.receive, bench.send)
        {MARK}
asyncio.run(main())
"""
COUNTED = (NONE, OURS, FLOOR, REFERENCE)
COUNT_REQUESTS = 200
COUNT_CALLS = 1000


def callgrind_section() -> tuple[str, dict[str, float]]:
    """Instructions per request of the counted variants, through the client and as bare
    calls; and our cost by instructions in percent, keyed "framework level"."""
    args = [str(COUNT_REQUESTS), str(COUNT_CALLS)]
    with ThreadPoolExecutor(max_workers=len(FRAMEWORKS)) as pool:
        runs = {
            framework: pool.submit(instructions_between_marks, _CALLGRIND_APP, [framework, *args])
            for framework in FRAMEWORKS
        }
        counts = {framework: run.result() for framework, run in runs.items()}
    rows = []
    cost: dict[str, float] = {}
    for framework, got in counts.items():
        if len(got) != 2 * len(COUNTED):
            raise RuntimeError(f"expected {2 * len(COUNTED)} counts, got {len(got)}")
        per_request = {
            (variant, level): got[2 * i + j] / (COUNT_REQUESTS, COUNT_CALLS)[j]
            for i, variant in enumerate(COUNTED)
            for j, level in enumerate(("requests", "calls"))
        }
        for level in ("requests", "calls"):
            bare = per_request[NONE, level]
            for variant in COUNTED:
                value = per_request[variant, level]
                share = (value - bare) / bare * 100
                if variant == OURS:
                    cost[f"{framework} {level}"] = share
                rows.append(
                    [
                        label(framework, variant),
                        level,
                        f"{value:,.0f}",
                        f"{value - bare:+,.0f}",
                        f"{share:+.1f}%",
                    ]
                )
    text = (
        "Instructions per request (callgrind; a count moves by up to 1k between runs):\n\n"
        + table(["variant", "measured as", "instructions", "added", "added share"], rows)
    )
    return text, cost


LEVELS = {"calls": "bare ASGI calls (as written)", "requests": "through an in-process client"}


async def main(callgrind: tuple[str, dict[str, float]] | None) -> None:
    """Time every variant both ways and write the results, with ``callgrind``'s if given."""
    guard = Guard(GuardSettings())
    by_kind = middlewares(guard)
    by_call = await interleaved(
        {
            label(framework, variant): partial(seconds_per_call, make(by_kind[variant]))
            for framework, make in FRAMEWORKS.items()
            for variant in by_kind
        },
        ROUNDS,
    )
    by_request = await interleaved(
        {
            label(framework, variant): partial(seconds_per_request, partial(make, by_kind[variant]))
            for framework, make in FRAMEWORKS.items()
            for variant in by_kind
            if variant != "context variable only (reference)"
        },
        ROUNDS,
    )
    guard.close()
    call_rows, call_cost = summarise(by_call)
    request_rows, request_cost = summarise(by_request)
    wall = {"calls": call_cost, "requests": request_cost}
    counted = callgrind[1] if callgrind is not None else {}
    verdicts = []
    for framework in FRAMEWORKS:
        for level, how in LEVELS.items():
            by_wall = wall[level][label(framework, OURS)]
            by_count = counted.get(f"{framework} {level}")
            # Instructions decide where counted: the wall clock moves by as much as the goal.
            cost = by_count if by_count is not None else by_wall
            verdicts.append(
                [
                    label(framework, OURS),
                    how,
                    f"{by_wall:.1f}%",
                    "-" if by_count is None else f"{by_count:.1f}%",
                    f"<= {GOAL_PERCENT}%",
                    "yes" if cost <= GOAL_PERCENT else "NO",
                ]
            )
    body = (
        f"Bare ASGI calls: {ROUNDS} interleaved rounds of {CALLS} calls of the app itself, "
        "no client: the middleware's own work against the framework's alone.\n\n"
        + table(HEADERS, call_rows)
        + f"\n\nRequests: {ROUNDS} interleaved rounds of {REQUESTS} GETs through an in-process "
        "client (httpx.AsyncClient over httpx.ASGITransport), no server, no network.\n\n"
        + table(HEADERS, request_rows)
        + ("\n\n" + callgrind[0] if callgrind is not None else "")
        + "\n\nThe goal: at most 3% fewer requests/s than no middleware ('met' goes by "
        "instructions where they were counted).\n\n"
        + table(
            ["middleware", "measured as", "wall clock", "instructions", "goal", "met"],
            verdicts,
        )
    )
    write("middleware", "Middleware cost on a trivial route", body)


if __name__ == "__main__":
    # Instructions first, on every core (valgrind is slow); the timed part is pinned to one.
    counted = (
        callgrind_section()
        if "--no-callgrind" not in sys.argv and shutil.which("valgrind")
        else None
    )
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    asyncio.run(main(counted))
