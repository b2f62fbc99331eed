"""An aiohttp call guarded against the same call bare, to the same loopback server.

The server is aiohttp's own web server in a separate process (so it does not share this
process's interpreter lock), answering a small JSON document on any path. Three variants,
interleaved: a bare ``aiohttp.ClientSession``; one with ``guard.aiohttp_middleware()``; and a
plain session with the guard instrumenting the process (as ``install(app)`` does). Each call
reads its body. Goal: a guarded call at most 1.10x a bare one.

Run: ``python benchmarks/bench_aiohttp.py``; writes ``benchmarks/results/aiohttp.md``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
from _common import instructions_per_call, interleaved, per_call, table, write

from upstream_guard import Guard, GuardSettings

ROUNDS = 30
CALLS = 100
PATH = "/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp"

SERVER = """
import sys
from aiohttp import web

BODY = b'{"id": "3n3Ppam7vgaVa1iaRUc9Lp", "name": "a track", "popularity": 50}'

async def answer(request):
    return web.Response(body=BODY, content_type="application/json")

app = web.Application()
app.router.add_get("/{tail:.*}", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


# Counted by callgrind: N calls of one variant (the server runs outside valgrind).
_COUNTED = """
import asyncio, sys
import aiohttp
from upstream_guard import Guard, GuardSettings

port, mode, calls = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
URL = f"http://127.0.0.1:{port}/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp"

async def main():
    guard = Guard(GuardSettings(upstreams={"spotify_api": {"hosts": [f"127.0.0.1:{port}"]}}))
    async def noop(request, handler):
        return await handler(request)

    middlewares = {"explicit": [guard.aiohttp_middleware()], "noop": [noop]}.get(mode, [])
    if mode == "instrumented":
        guard.instrument()
    async with aiohttp.ClientSession(middlewares=middlewares) as session:
        for _ in range(calls):
            async with session.get(URL) as response:
                await response.read()

asyncio.run(main())
"""
MODES = {
    "bare": "bare",
    "noop": "a middleware that does nothing (what any middleware costs)",
    "explicit": "guarded: guard.aiohttp_middleware()",
    "instrumented": "guarded: instrumented (install)",
}


def callgrind_section(port: int) -> str:
    counts = {mode: instructions_per_call(_COUNTED, [str(port), mode], 20, 100) for mode in MODES}
    bare = counts["bare"]
    rows = []
    for mode, name in MODES.items():
        extra = "" if mode == "bare" else f"{(counts[mode] - bare) / 1000:+.1f}k"
        ratio = "" if mode == "bare" else f"{counts[mode] / bare:.3f}x"
        ratio_ok = "" if mode == "bare" else _ok(counts[mode] / bare <= 1.10)
        rows.append([name, f"{counts[mode] / 1000:.1f}k", ratio, extra, ratio_ok])
    return (
        "Instructions per call of the client process, counted by callgrind (the server runs "
        "outside valgrind; 100 calls less 20, so start-up cancels out):\n\n"
        + table(["variant", "instructions", "ratio to bare", "added", "<= 1.10x"], rows)
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # waiting for a real server to listen
    raise RuntimeError("the benchmark server did not start")


async def main(port: int) -> None:
    url = f"http://127.0.0.1:{port}{PATH}"
    settings = GuardSettings(upstreams={"spotify_api": {"hosts": [f"127.0.0.1:{port}"]}})
    explicit_guard = Guard(settings)
    installed_guard = Guard(settings)

    async def get(session: aiohttp.ClientSession) -> None:
        async with session.get(url) as response:
            await response.read()

    bare = aiohttp.ClientSession()
    explicit = aiohttp.ClientSession(middlewares=[explicit_guard.aiohttp_middleware()])
    plain = aiohttp.ClientSession()

    async def instrumented() -> float:
        installed_guard.instrument()
        try:
            return await per_call(lambda: get(plain), CALLS)
        finally:
            installed_guard.close()

    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "bare": lambda: per_call(lambda: get(bare), CALLS),
        "guarded: guard.aiohttp_middleware()": lambda: per_call(lambda: get(explicit), CALLS),
        "guarded: instrumented (install)": instrumented,
    }
    samples = await interleaved(variants, ROUNDS)
    for session in (bare, explicit, plain):
        await session.close()

    def paired(name: str) -> float:
        return statistics.median(g / b for g, b in zip(samples[name], samples["bare"], strict=True))

    def added(name: str) -> float:
        pairs = zip(samples[name], samples["bare"], strict=True)
        return statistics.median(g - b for g, b in pairs) * 1e6

    rows = []
    for name, runs in samples.items():
        ratio = "" if name == "bare" else f"{paired(name):.3f}x"
        extra = "" if name == "bare" else f"{added(name):+.1f}"
        rows.append([name, f"{statistics.median(runs) * 1e6:.1f}", ratio, extra])
    verdicts = []
    for name in list(variants)[1:]:
        ratio = paired(name)
        verdicts.append([f"{name} / bare", f"{ratio:.3f}x", "<= 1.10x", _ok(ratio <= 1.10)])
    body = (
        f"{ROUNDS} interleaved rounds of {CALLS} sequential GETs, body read, keep-alive, "
        "against aiohttp's web server in another process on loopback; median of per-round "
        "mean per-call time, ratios paired by round.\n\n"
        + table(["variant", "us per call", "ratio to bare", "added us"], rows)
        + "\n\n"
        + table(["target", "measured", "goal", "met"], verdicts)
    )
    if "--no-callgrind" not in sys.argv and shutil.which("valgrind"):
        body = (
            callgrind_section(port) + "\n\nWall clock (moves 20-60% between runs here):\n\n" + body
        )
    write("aiohttp", "An aiohttp call guarded vs bare", body)


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


if __name__ == "__main__":
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        wait_listening(port)
        asyncio.run(main(port))
    finally:
        server.terminate()
        server.wait(timeout=10)
