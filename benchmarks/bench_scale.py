"""Memory at scale: one million distinct track URLs, and the stale cache at its bound.

1. One million GETs of distinct ``/v1/tracks/{22-char id}`` URLs through a guard with
   ``breaker.scope = "endpoint"`` (a breaker per endpoint template: the templates keep their
   number bounded whatever the ids), then 50,000 GETs spread over other endpoints and over
   paths no template knows. Calls go straight to the guard's async transport
   (``handle_async_request``) over an ``httpx.MockTransport``, reusing one request whose URL
   is swapped for each call: through the full client stack, and with httpx parsing every
   URL (~100 us each here), a million calls would take several minutes, and the guard is a
   small part of that. tracemalloc slows every allocation about fivefold, so it is on for
   two stretches only: from before the guard is built through the first 10,000 calls (the
   guard's footprint), and for the last 20,000 track calls (whatever they leave behind is
   growth that a million calls would multiply). The process's RSS is read throughout.
2. The stale-if-error cache filled with distinct URLs far past its bounds, in two shapes: a
   bytes-bound one (2 KiB bodies, 1 MiB) and two entries-bound ones (small bodies: the
   default 1024 entries, and 10,000 entries; 1 MiB). Reported: entries and the bytes the cache counts, against their
   bounds; the cache's real size (keys, headers and objects included, measured by walking
   it); tracemalloc's growth over the fill; RSS growth.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import string
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
from _common import table, write

from upstream_guard import Guard, GuardSettings

TRACKS = 1_000_000
WARM = 10_000
TAIL = 20_000
MIXED = 50_000
FILL = 10_000
B62 = string.digits + string.ascii_letters
SPOTIFY_HEADERS = [
    ("content-type", "application/json; charset=utf-8"),
    ("cache-control", "private, max-age=0"),
    ("server", "envoy"),
    ("via", "HTTP/2 edgeproxy, 1.1 google"),
    ("x-robots-tag", "noindex, nofollow"),
    ("access-control-allow-origin", "*"),
    ("strict-transport-security", "max-age=31536000"),
]
OTHER_PATHS = (
    "/v1/albums/{}",
    "/v1/artists/{}",
    "/v1/artists/{}/albums",
    "/v1/playlists/{}",
    "/v1/playlists/{}/tracks",
    "/v1/users/{}/playlists",
    "/v2/unknown/{}",  # no template: all such paths share one name ("/*")
    "/v1/tracks/{}/extra/{}",  # no template either
)


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415 - the fallback, peak rather than current

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


class Requests:
    """One request whose URL is swapped for each call (a URL built from a parsed one)."""

    def __init__(self) -> None:
        base = httpx.URL("https://api.spotify.com/v1/tracks/x")
        self._ref = getattr(base, "_uri_reference", None)
        self.request = httpx.Request("GET", base)

    def get(self, path: str) -> httpx.Request:
        if self._ref is not None:  # httpx 0.28: replace the path of the parsed URL
            url = httpx.URL.__new__(httpx.URL)
            url._uri_reference = self._ref._replace(path=path)  # noqa: SLF001
            self.request.url = url
        else:  # another httpx: the slow, public way
            self.request.url = httpx.URL("https://api.spotify.com" + path)
        return self.request


def track_id(rng: random.Random) -> str:
    return "".join(rng.choices(B62, k=22))


async def breakers_at_scale() -> tuple[str, str]:
    ok = httpx.Response(200, content=b'{"id": "x"}')
    rng = random.Random(1)
    requests = Requests()
    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    settings = GuardSettings(upstreams={"spotify_api": {"breaker": {"scope": "endpoint"}}})
    guard = Guard(settings)
    transport = guard.async_transport(httpx.MockTransport(lambda _request: ok))
    rt = guard.upstreams["spotify_api"]
    started = time.perf_counter()
    for _ in range(WARM):
        await transport.handle_async_request(requests.get(f"/v1/tracks/{track_id(rng)}"))
    gc.collect()
    footprint = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rss_warm = rss_bytes()
    rss_at = [(WARM, rss_warm)]
    for i in range(WARM, TRACKS - TAIL):
        await transport.handle_async_request(requests.get(f"/v1/tracks/{track_id(rng)}"))
        if (i + 1) % 200_000 == 0:
            rss_at.append((i + 1, rss_bytes()))
    gc.collect()
    tracemalloc.start()
    for _ in range(TAIL):
        await transport.handle_async_request(requests.get(f"/v1/tracks/{track_id(rng)}"))
    gc.collect()
    tail_left = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    elapsed = time.perf_counter() - started
    rss_end = rss_bytes()
    rss_at.append((TRACKS, rss_end))
    track_breakers = len(rt.breakers)
    for i in range(MIXED):
        path = OTHER_PATHS[i % len(OTHER_PATHS)].format(track_id(rng), track_id(rng))
        await transport.handle_async_request(requests.get(path))
    names = sorted(rt.breakers)
    memo = len(getattr(rt.matcher, "_memo", ()))
    rows = [
        ["calls", f"{TRACKS:,} distinct track URLs, then {MIXED:,} over other paths"],
        ["time for the million (guard transport + mock)", f"{elapsed:.1f} s"],
        ["breakers after the million track URLs", str(track_breakers)],
        [
            f"breakers after {MIXED:,} more over {len(OTHER_PATHS)} other path shapes",
            f"{len(names)}: " + ", ".join(f"`{n}`" for n in names),
        ],
        ["template memo entries (a bounded cache of path -> template)", f"{memo:,}"],
        [
            f"guard footprint: tracemalloc, guard built + first {WARM:,} calls",
            kib(footprint),
        ],
        [
            f"left behind by the last {TAIL:,} track calls (tracemalloc)",
            f"{tail_left:,} bytes ({tail_left / TAIL:.2f} bytes per call)",
        ],
        [
            f"RSS: before the guard / after {WARM:,} / after {TRACKS:,}",
            (
                f"{mib(rss0)} / {mib(rss_warm)} / {mib(rss_end)} "
                f"(growth after warm-up {mib(rss_end - rss_warm)})"
            ),
        ],
        ["RSS along the way", ", ".join(f"{n:,}: {mib(r)}" for n, r in rss_at)],
    ]
    bounded = track_breakers <= 5 and tail_left / TAIL < 1.0
    verdict = (
        f"Breakers bounded and no per-URL growth: {'yes' if bounded else 'NO'} "
        f"({track_breakers} breaker(s) for {TRACKS:,} track URLs; "
        f"{tail_left / TAIL:.2f} bytes left per call in the traced tail)."
    )
    return table(["measure", "value"], rows), verdict


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes held by an object and everything it references (each object counted once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set | frozenset):
        size += sum(deep_size(item, seen) for item in obj)
    elif dataclasses.is_dataclass(obj):
        size += sum(deep_size(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return size


async def stale_at_bound(name: str, body_size: int, max_entries: int, max_bytes: int) -> list[str]:
    pad = "x" * max(0, body_size - 32)

    def handler(request: httpx.Request) -> httpx.Response:
        body = f'{{"id": "{request.url.path[-22:]}", "p": "{pad}"}}'.encode()  # one per answer
        return httpx.Response(200, content=body, headers=SPOTIFY_HEADERS)

    fallback = {"stale_if_error": True, "cache_max_entries": max_entries}
    fallback["cache_max_bytes"] = max_bytes
    settings = GuardSettings(upstreams={"spotify_api": {"fallback": fallback}})
    guard = Guard(settings)
    transport = guard.async_transport(httpx.MockTransport(handler))
    cache = guard.upstreams["spotify_api"].stale
    assert cache is not None
    requests = Requests()
    rng = random.Random(2)
    headers = requests.request.headers
    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    for i in range(FILL):
        headers["authorization"] = f"Bearer listener-{i % 50}"  # caller identity is in the key
        response = await transport.handle_async_request(requests.get(f"/v1/tracks/{track_id(rng)}"))
        await response.aclose()
    del headers["authorization"]
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rss1 = rss_bytes()
    real = deep_size(cache._entries)  # noqa: SLF001
    return [
        name,
        f"{len(cache):,} / {max_entries:,}",
        f"{kib(cache.bytes)} / {kib(max_bytes)}",
        f"{kib(real)} ({real / max(1, len(cache)):,.0f} B per entry)",
        f"{real / max_bytes:.2f}x",
        kib(traced),
        mib(rss1 - rss0),
    ]


async def main() -> None:
    scale, verdict = await breakers_at_scale()
    stale_rows = [
        await stale_at_bound("2 KiB bodies (bytes bound binds)", 2048, 100_000, 2**20),
        await stale_at_bound("256 B bodies, default 1024 entries", 256, 1024, 2**20),
        await stale_at_bound("32 B bodies, 10,000 entries", 32, 10_000, 2**20),
    ]
    body = (
        "## Breakers and memory after a million distinct URLs\n\n"
        + scale
        + "\n\n"
        + verdict
        + "\n\n## The stale cache at its bounds\n\n"
        + f"{FILL:,} distinct track URLs (50 callers) per row, each answer 200 with Spotify's "
        "usual headers; `fallback.stale_if_error` on. 'counted bytes' is what the cache "
        "holds against `cache_max_bytes` (response bodies); 'real size' walks the entries "
        "(key, status, header tuples and strings, body, objects); tracemalloc's figure is "
        "everything still allocated after the fill (the cache, the template memo, ...).\n\n"
        + table(
            [
                "shape",
                "entries / max",
                "counted bytes / max_bytes",
                "real size of the entries",
                "real size / max_bytes",
                "tracemalloc growth",
                "RSS growth",
            ],
            stale_rows,
        )
    )
    write("scale", "Memory at scale: breakers and the stale cache", body)


if __name__ == "__main__":
    asyncio.run(main())
