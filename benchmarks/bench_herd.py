"""Calling Spotify less: a thundering herd with and without coalescing; a slow tail with and
without hedging.

The upstream is a real HTTP server on loopback (uvicorn, in a process of its own so that it
does not share the client's GIL), and the client is ``httpx.AsyncClient`` through the
guard's async transport with httpx's default pool (100 connections): what an app has.

1. Thundering herd: N callers ask for the same playlist at the same moment (N = 10, 100,
   1000), with the app's one token (client credentials: the catalog reads that coalescing
   is for). The upstream answers each call after 50 ms. Reported: the calls that reached the
   upstream (counted by the server) and the callers' p50 and p99 latency, with coalescing on
   (the default) and off. A last row shows N different users (N tokens): never shared.
2. Slow tail: 1000 reads of distinct tracks, 10 at a time; the upstream answers in 20 ms,
   except 5% of requests (chosen at random, seeded) that take 2 s. Reported: p50, p99 and
   the upstream calls, without hedging and with ``hedge.after_s`` = 0.1 s (one hedge at most,
   paid from the retry budget). Goal: p99 cut at least 5x for at most 10% extra calls.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvicorn
from _common import table, write

from upstream_guard import Guard, GuardSettings

HERD_SIZES = (10, 100, 1000)
HERD_LATENCY_S = 0.05
TAIL_CALLS = 1000
TAIL_CONCURRENCY = 10
TAIL_FAST_S = 0.02
TAIL_SLOW_S = 2.0
TAIL_SLOW_SHARE = 0.05
HEDGE_AFTER_S = 0.1
SEED = 20261130
PLAYLIST = "/v1/playlists/37i9dQZF1DXcBWIGoYBM5M"


# -- the upstream (run in a subprocess: ``bench_herd.py --serve PORT``) ---------------------


class Upstream:
    """Answers after a delay: ``/v1/playlists`` 50 ms; ``/v1/tracks`` 20 ms, 5% 2 s."""

    def __init__(self) -> None:
        self.calls = 0
        self.rng = random.Random(SEED)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path == "/calls":  # the bench's own question: how many calls came
            body = json.dumps({"calls": self.calls}).encode()
            if scope["method"] == "DELETE":
                self.calls = 0
            await _answer(send, body)
            return
        self.calls += 1
        if path.startswith("/v1/tracks"):
            slow = self.rng.random() < TAIL_SLOW_SHARE
            await asyncio.sleep(TAIL_SLOW_S if slow else TAIL_FAST_S)
        else:
            await asyncio.sleep(HERD_LATENCY_S)
        await _answer(send, json.dumps({"path": path, "tracks": list(range(100))}).encode())


async def _answer(send: Any, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(port: int) -> None:
    uvicorn.run(Upstream(), host="127.0.0.1", port=port, log_level="warning", backlog=4096)


def start_upstream() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url + "/calls", timeout=1)
        except httpx.TransportError:
            time.sleep(0.05)  # the server process is starting
        else:
            return process, url
    process.kill()
    raise RuntimeError("the upstream did not start")


def upstream_calls(url: str) -> int:
    return int(httpx.delete(url + "/calls").json()["calls"])


# -- the client ----------------------------------------------------------------------------


def guard_for(url: str, **groups: Any) -> Guard:
    hostport = url.split("://", 1)[1]
    settings = GuardSettings(
        upstreams={
            "spotify_api": {
                "hosts": [hostport],
                "breaker": {"fail_max": 10**6, "minimum_calls": 10**6},
                **groups,
            }
        }
    )
    return Guard(settings)


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed(call: Callable[[], Awaitable[httpx.Response]]) -> float:
    start = time.perf_counter()
    response = await call()
    response.raise_for_status()
    return time.perf_counter() - start


async def herd(url: str, n: int, *, coalesce: bool, users: bool = False) -> dict[str, float]:
    guard = guard_for(url, coalesce={"gets": coalesce})
    upstream_calls(url)  # zero the count
    async with httpx.AsyncClient(transport=guard.async_transport(), timeout=30) as client:
        await client.get(url + "/v1/me")  # a warm connection, as a running app has
        upstream_calls(url)

        def call(i: int) -> Callable[[], Awaitable[httpx.Response]]:
            token = f"user-{i}" if users else "app-token"
            headers = {"Authorization": f"Bearer {token}"}
            return lambda: client.get(url + PLAYLIST + "?market=SE", headers=headers)

        latencies = await asyncio.gather(*(timed(call(i)) for i in range(n)))
    return {
        "calls": upstream_calls(url),
        "p50": statistics.median(latencies),
        "p99": quantile(list(latencies), 0.99),
    }


async def slow_tail(url: str, *, hedge: bool) -> dict[str, float]:
    groups: dict[str, Any] = {"coalesce": {"gets": False}}
    if hedge:
        groups["hedge"] = {"after_s": HEDGE_AFTER_S, "max_extra": 1}
    guard = guard_for(url, **groups)
    hedges = 0

    def count(event: Any) -> None:
        nonlocal hedges
        hedges += event.hedged

    guard.subscribe(count)
    upstream_calls(url)
    latencies: list[float] = []
    limit = asyncio.Semaphore(TAIL_CONCURRENCY)
    async with httpx.AsyncClient(transport=guard.async_transport(), timeout=30) as client:

        async def one(i: int) -> None:
            async with limit:
                latencies.append(await timed(lambda: client.get(f"{url}/v1/tracks/t{i}")))

        await asyncio.gather(*(one(i) for i in range(TAIL_CALLS)))
    return {
        "calls": upstream_calls(url),
        "hedged": hedges,
        "p50": statistics.median(latencies),
        "p99": quantile(latencies, 0.99),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


async def main(url: str) -> None:
    herd_rows = []
    for n in HERD_SIZES:
        for on in (True, False):
            got = await herd(url, n, coalesce=on)
            herd_rows.append(
                [
                    str(n),
                    "one token",
                    "on" if on else "off",
                    str(int(got["calls"])),
                    ms(got["p50"]),
                    ms(got["p99"]),
                ]
            )
            print(herd_rows[-1], flush=True)
    got = await herd(url, 100, coalesce=True, users=True)
    herd_rows.append(
        ["100", "100 tokens", "on", str(int(got["calls"])), ms(got["p50"]), ms(got["p99"])]
    )
    print(herd_rows[-1], flush=True)

    plain = await slow_tail(url, hedge=False)
    hedged = await slow_tail(url, hedge=True)
    print(plain, hedged, flush=True)
    cut = plain["p99"] / hedged["p99"]
    extra = (hedged["calls"] - TAIL_CALLS) / TAIL_CALLS
    tail_rows = [
        ["off", str(int(plain["calls"])), "0", ms(plain["p50"]), ms(plain["p99"])],
        [
            f"after {HEDGE_AFTER_S:g} s",
            str(int(hedged["calls"])),
            str(int(hedged["hedged"])),
            ms(hedged["p50"]),
            ms(hedged["p99"]),
        ],
    ]
    goal_rows = [
        ["p99 cut by hedging", f"{cut:.1f}x", ">= 5x", "yes" if cut >= 5 else "NO"],
        ["extra upstream calls", f"{extra:.1%}", "<= 10%", "yes" if extra <= 0.10 else "NO"],
    ]
    body = (
        f"Upstream on loopback (uvicorn, own process); httpx.AsyncClient, default pool.\n\n"
        f"## Thundering herd: N callers, one playlist, upstream answers in {HERD_LATENCY_S * 1000:.0f} ms\n\n"
        + table(["N", "identity", "coalescing", "upstream calls", "p50 ms", "p99 ms"], herd_rows)
        + f"\n\n## Slow tail: {TAIL_CALLS} reads, {TAIL_CONCURRENCY} at a time, "
        f"{TAIL_SLOW_SHARE:.0%} take {TAIL_SLOW_S:g} s, the rest {TAIL_FAST_S * 1000:.0f} ms\n\n"
        + table(["hedging", "upstream calls", "calls hedged", "p50 ms", "p99 ms"], tail_rows)
        + "\n\n"
        + table(["target", "measured", "goal", "met"], goal_rows)
    )
    write("herd", "Coalescing and hedging: upstream calls and tail latency", body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
        sys.exit(0)
    server, base = start_upstream()
    try:
        asyncio.run(main(base))
    finally:
        server.terminate()
        server.wait()
