"""The quota drill: an app with two workers sharing Redis, at 3x an upstream limit it is not told.

Everything on loopback, each server in processes of its own: the simulated Spotify with a
rolling-window rate limit (``Fault.rolling_window(N, W)``: N answered calls per rolling W
seconds, then 429 with a whole-second Retry-After until the oldest leaves the window); the
app (``benchmarks/quota_app.py``) under ``uvicorn --workers 2`` with ``redis_url`` set to a
real ``redis-server``; and in this process an open-loop load of 3 N / W requests/s (each
request a task launched on a fixed schedule, whatever the answers do).

Per copy of the app, in one run:
(a) no guard; (b) the guard with its cooldown only (``pace.adaptive`` false); (c) a configured
ceiling equal to the true limit (``pace.requests_per_s`` = N / W, adaptive false); (d) the
adaptive pace (the default). Counted at the upstream, after a learning phase of two windows:
goodput = calls the upstream answered ÷ its allowance (N / W x seconds), and the share of
upstream calls answered 429. Targets for (d): goodput >= 0.90, 429s <= 1% of upstream calls.

Then a Spotify-like 30 s window at a reduced rate, the same four copies and targets, and the
added cost per call of a configured pace, locally and through Redis.

Options: ``--quick`` (the 10 s window only), ``--window 10|30`` (that window only),
``--variants a,d`` (those copies only), ``--no-cost``. A run with any of them prints its
tables and writes no result file: the committed one is a whole run.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
from _common import instructions_per_call, table, write

from upstream_guard import Guard, GuardSettings
from upstream_guard.testing import Fault, RedisServer, SpotifySimulator, free_port, serve

HERE = Path(__file__).resolve().parent
WORKERS = 2


@dataclass(frozen=True, slots=True)
class Drill:
    name: str
    calls: int  # N per window
    window_s: float  # W
    measure_windows: int  # windows measured after two of learning

    @property
    def limit(self) -> float:
        return self.calls / self.window_s

    @property
    def learn_s(self) -> float:
        return 2 * self.window_s

    @property
    def duration_s(self) -> float:
        return self.window_s * (2 + self.measure_windows)


QUICK = Drill("10 s window, 100 calls (10/s), load 30/s", 100, 10.0, 4)
SPOTIFY = Drill("Spotify-like 30 s window, 90 calls (3/s), load 9/s", 90, 30.0, 3)

VARIANTS: dict[str, dict[str, str]] = {
    "(a) no guard": {"QUOTA_GUARD": "0"},
    "(b) cooldown only": {"UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__PACE__ADAPTIVE": "false"},
    "(c) configured ceiling = limit": {
        "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__PACE__ADAPTIVE": "false",
        "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__PACE__REQUESTS_PER_S": "{limit}",
    },
    "(d) adaptive pace": {},
}


def upstream_process(conn: Connection, calls: int, window_s: float) -> None:
    """Serve the rate-limited simulator; obey ("counts",) and ("stop",)."""
    sim = SpotifySimulator()
    sim.set_fault(Fault.rolling_window(calls, window_s))
    with serve(sim, log_level="critical", backlog=2048) as url:
        conn.send(url)
        while True:
            command = conn.recv()
            if command == "counts":
                conn.send((sim.total_hits, sim.throttled))
            else:
                break


class App:
    """``uvicorn --workers 2`` running quota_app.py with one variant's settings."""

    def __init__(self, sim_url: str, redis_url: str, extra: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        hostport = sim_url.split("://", 1)[1]
        env = {
            **os.environ,
            "SIM_URL": sim_url,
            "UPSTREAM_GUARD_REDIS_URL": redis_url,
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS": json.dumps([hostport]),
            **extra,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "quota_app:app",
                "--app-dir",
                str(HERE),
                "--port",
                str(self.port),
                "--workers",
                str(WORKERS),
                "--log-level",
                "critical",
                "--backlog",
                "2048",
            ],
            env=env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/_upstream_guard/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)  # the workers are starting

    def health(self) -> dict[str, object]:
        try:
            answer: dict[str, object] = httpx.get(
                f"{self.url}/_upstream_guard/health", timeout=5
            ).json()
        except (httpx.HTTPError, ValueError):
            return {}
        return answer

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def open_loop(url: str, rate: float, duration_s: float) -> dict[str, int]:
    """Launch ``rate`` requests/s for ``duration_s`` whatever the answers; count the answers."""
    answers: dict[str, int] = {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=15, limits=limits) as client:

        async def one(i: int) -> None:
            try:
                kind = str((await client.get(f"/track/{i}")).status_code)
            except httpx.HTTPError as exc:
                kind = type(exc).__name__
            answers[kind] = answers.get(kind, 0) + 1

        start = time.monotonic()
        tasks = []
        i = 0
        while (due := start + i / rate) < start + duration_s:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        await asyncio.gather(*tasks)
    return answers


def run_variant(drill: Drill, redis: RedisServer, name: str) -> list[str]:
    client = redis.client()
    client.flushall()
    client.close()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    upstream = ctx.Process(target=upstream_process, args=(child, drill.calls, drill.window_s))
    upstream.start()
    sim_url = parent.recv()
    extra = {k: v.format(limit=drill.limit) for k, v in VARIANTS[name].items()}
    app = App(sim_url, redis.url, extra)
    try:
        parent.send("counts")
        hits0, throttled0 = parent.recv()
        loop = asyncio.new_event_loop()
        load = loop.create_task(open_loop(app.url, 3 * drill.limit, drill.duration_s))
        loop.run_until_complete(asyncio.sleep(drill.learn_s))
        parent.send("counts")
        hits1, throttled1 = parent.recv()
        answers = loop.run_until_complete(load)
        loop.close()
        parent.send("counts")
        hits2, throttled2 = parent.recv()
        health = app.health()
    finally:
        app.stop()
        parent.send("stop")
        upstream.join(timeout=30)
    measured_s = drill.duration_s - drill.learn_s
    ok = (hits2 - throttled2) - (hits1 - throttled1)
    throttled = throttled2 - throttled1
    goodput = ok / (drill.limit * measured_s)
    share = throttled / max(1, ok + throttled)
    pace = "-"
    upstreams = health.get("upstreams") if isinstance(health, dict) else None
    if isinstance(upstreams, dict):
        view = upstreams.get("spotify_api", {}).get("pace", {})
        if view.get("rate_per_s") is not None:
            pace = f"{view['rate_per_s']:.2f}/s {view['source']}"
    learning = (throttled1 - throttled0, hits1 - hits0)
    app_answers = ", ".join(f"{k}: {v}" for k, v in sorted(answers.items()))
    return [
        name,
        f"{goodput:.3f}",
        f"{100 * share:.2f}%",
        f"{ok + throttled}",
        f"{learning[0]} of {learning[1]}",
        pace,
        app_answers,
    ]


HEADERS = [
    "copy",
    "goodput",
    "429 share",
    "upstream calls (measured)",
    "429s while learning",
    "pace at the end",
    "app answers",
    "1-min load after",
]


def drill_table(
    drill: Drill, redis: RedisServer, names: list[str]
) -> tuple[str, dict[str, list[str]]]:
    rows = {}
    for name in names:
        print(f"{drill.name}: {name} ...", flush=True)
        rows[name] = [*run_variant(drill, redis, name), f"{os.getloadavg()[0]:.2f}"]
        print("  ", rows[name], flush=True)
    return table(HEADERS, list(rows.values())), rows


# -- the cost per call -----------------------------------------------------------------------


_CALLGRIND_CLIENT = """
import sys, httpx
from upstream_guard import Guard, GuardSettings
inner = httpx.MockTransport(lambda r: httpx.Response(200, content=b'{"id": "x"}'))
pace = {"requests_per_s": 1e6, "burst": 1e6} if sys.argv[1] == "paced" else {}
guard = Guard(GuardSettings(upstreams={"spotify_api": {"pace": pace}}))
client = httpx.Client(transport=guard.sync_transport(inner))
for _ in range(int(sys.argv[2])):
    client.get("https://api.spotify.com/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp")
"""
URL = "https://api.spotify.com/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp"
PACE = {"requests_per_s": 1e6, "burst": 1e6}  # far above the load: never a wait


def cost_per_call(redis_url: str) -> str:
    """What a pace that never makes a call wait adds to a healthy guarded call."""
    rows = []
    if shutil.which("valgrind"):
        plain = instructions_per_call(_CALLGRIND_CLIENT, ["plain"], 200, 1200)
        paced = instructions_per_call(_CALLGRIND_CLIENT, ["paced"], 200, 1200)
        rows.append(
            [
                "sync, configured pace (local), instructions by callgrind",
                f"{plain:,.0f}",
                f"{paced:,.0f}",
                f"+{paced - plain:,.0f} ({paced / plain - 1:+.1%})",
            ]
        )
    inner = httpx.MockTransport(lambda _: httpx.Response(200, content=b'{"id": "x"}'))
    plain_guard = Guard(GuardSettings())
    redis_guard = Guard(
        GuardSettings(redis_url=redis_url, upstreams={"spotify_api": {"pace": PACE}})
    )
    sync = {
        "plain": httpx.Client(transport=plain_guard.sync_transport(inner)),
        "redis": httpx.Client(transport=redis_guard.sync_transport(inner)),
    }
    samples: dict[str, list[float]] = {"plain": [], "redis": []}
    for _ in range(20):  # interleaved rounds: drift on the machine hits both alike
        for name, client in sync.items():
            start = time.perf_counter()
            for _ in range(100):
                client.get(URL)
            samples[name].append((time.perf_counter() - start) / 100)
    plain_us, redis_us = (statistics.median(samples[k]) * 1e6 for k in ("plain", "redis"))
    rows.append(
        [
            "sync, configured pace + Redis, us per call (wall)",
            f"{plain_us:.1f}",
            f"{redis_us:.1f}",
            f"+{redis_us - plain_us:.1f} us",
        ]
    )

    async def async_rounds() -> tuple[float, float]:
        clients = {
            "plain": httpx.AsyncClient(transport=plain_guard.async_transport(inner)),
            "redis": httpx.AsyncClient(transport=redis_guard.async_transport(inner)),
        }
        times: dict[str, list[float]] = {"plain": [], "redis": []}
        for _ in range(20):
            for name, client in clients.items():
                start = time.perf_counter()
                for _ in range(100):
                    await client.get(URL)
                times[name].append((time.perf_counter() - start) / 100)
        return statistics.median(times["plain"]) * 1e6, statistics.median(times["redis"]) * 1e6

    a_plain, a_redis = asyncio.run(async_rounds())
    rows.append(
        [
            "async, configured pace + Redis (a worker thread), us per call (wall)",
            f"{a_plain:.1f}",
            f"{a_redis:.1f}",
            f"+{a_redis - a_plain:.1f} us",
        ]
    )
    return table(["healthy guarded call", "no pace", "with the pace", "added"], rows)


def option(name: str) -> str | None:
    """The value after ``name`` on the command line, if given."""
    args = sys.argv[1:]
    return args[args.index(name) + 1] if name in args[:-1] else None


def verdicts(drill: Drill, rows: dict[str, list[str]]) -> str:
    """The targets for (d) on one window: goodput >= 0.90 and 429s <= 1%."""
    d = rows["(d) adaptive pace"]
    goodput, share = float(d[1]), float(d[2].rstrip("%")) / 100
    window = f"{drill.window_s:.0f} s"
    return table(
        ["target", "measured", "goal", "met"],
        [
            [
                f"(d) goodput, {window}",
                f"{goodput:.3f}",
                ">= 0.90",
                "yes" if goodput >= 0.9 else "NO",
            ],
            [
                f"(d) 429 share, {window}",
                f"{100 * share:.2f}%",
                "<= 1%",
                "yes" if share <= 0.01 else "NO",
            ],
        ],
    )


def main() -> None:
    window = option("--window")
    drills = [QUICK] if "--quick" in sys.argv else [QUICK, SPOTIFY]
    if window is not None:
        drills = [d for d in drills if f"{d.window_s:.0f}" == window]
    picked = option("--variants")
    names = [n for n in VARIANTS if picked is None or n[1] in picked.split(",")]
    cost = "--no-cost" not in sys.argv
    whole = window is None and picked is None and cost and len(drills) == 2
    redis = RedisServer()
    redis.start()
    body = (
        f"Open loop at 3x the limit; {WORKERS} uvicorn workers sharing a real redis-server; "
        "the simulator's rolling-window limit is not given to the guard. Counted at the "
        "upstream after a learning phase of two windows. 1-min load average at the start: "
        f"{os.getloadavg()[0]:.2f}."
    )
    try:
        for drill in drills:
            text, rows = drill_table(drill, redis, names)
            body += (
                f"\n\n## {drill.name}\n\nLearning {drill.learn_s:.0f} s, measured "
                f"{drill.duration_s - drill.learn_s:.0f} s.\n\n{text}"
            )
            if "(d) adaptive pace" in rows:
                body += "\n\n" + verdicts(drill, rows)
        if cost:
            body += (
                "\n\n## Added cost per call of a pace (no wait: a pace far above the load)\n\n"
                + cost_per_call(redis.url)
                + "\n\nWith no pace in force nothing is added (see overhead.md). With Redis the "
                "slot is one EVALSHA round trip to a local redis-server; an async call also "
                "pays a hop to a worker thread to make it (the event loop never blocks on Redis)."
            )
    finally:
        redis.kill()
    if whole:
        write("quota", "Quota drill: a pace learned from 429s, shared by two workers", body)
    else:
        print(body)


if __name__ == "__main__":
    main()
