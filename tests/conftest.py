"""Shared fixtures: both anyio backends, a fake clock, and a simulated Spotify on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from upstream_guard import Guard, GuardSettings
from upstream_guard.testing import (
    FakeClock,
    RedisClusterServer,
    RedisServer,
    SpotifySimulator,
    serve,
)

# The browser tests drive Debian's chromium through playwright, which never downloads one.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(autouse=True)
def _no_guard_left_installed() -> Iterator[None]:
    """Each test starts and ends with the client libraries unpatched."""
    yield
    from upstream_guard import _instrument

    while (guard := _instrument.active_guard()) is not None:
        guard.close()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def _sim_server() -> Iterator[tuple[SpotifySimulator, str]]:
    sim = SpotifySimulator()
    with serve(sim) as url:
        yield sim, url


@pytest.fixture
def sim(_sim_server: tuple[SpotifySimulator, str]) -> Iterator[SpotifySimulator]:
    """The shared simulator, healthy and with no hits at the start of each test."""
    simulator, _ = _sim_server
    simulator.heal()
    yield simulator
    simulator.heal()


@pytest.fixture
def sim_url(_sim_server: tuple[SpotifySimulator, str], sim: SpotifySimulator) -> str:
    """Base URL of the simulator, e.g. http://127.0.0.1:PORT."""
    return _sim_server[1]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on loopback for the whole run (tests flush what they use)."""
    server = RedisServer()
    server.start()
    yield server
    server.kill()


def make_settings(url: str, **groups: Any) -> GuardSettings:
    """Settings whose spotify_api upstream is the server at ``url``, with group overrides."""
    hostport = url.split("://", 1)[1].rstrip("/")
    return GuardSettings(upstreams={"spotify_api": {"hosts": [hostport], **groups}})


def shared_settings(url: str, redis_url: str, **groups: Any) -> GuardSettings:
    """``make_settings`` shared through the Redis at ``redis_url``, syncing every 50 ms."""
    base = make_settings(url, **groups)
    return base.model_copy(update={"redis_url": redis_url, "redis_sync_interval_s": 0.05})


def sync_get(guard: Guard, url: str) -> httpx.Response:
    """One GET through the guard's sync transport."""
    with httpx.Client(transport=guard.sync_transport()) as client:
        return client.get(url)


Redis = RedisServer | RedisClusterServer


@pytest.fixture(params=["single", "cluster"])
def shared_redis(request: pytest.FixtureRequest) -> Redis:
    """The shared single server or the shared cluster, emptied (the cluster starts on demand)."""
    server: Redis = request.getfixturevalue(
        "redis_server" if request.param == "single" else "redis_cluster"
    )
    client = server.client()
    client.flushall()
    client.close()
    return server


@pytest.fixture
def redis_url(shared_redis: Redis) -> str:
    """The guard's redis_url for that Redis: redis:// or redis+cluster://."""
    return shared_redis.url


@pytest.fixture(params=["single", "cluster"])
def killable(request: pytest.FixtureRequest) -> Iterator[Redis]:
    """A Redis the test may kill: its own server, or the shared cluster (restarted after)."""
    if request.param == "single":
        server = RedisServer()
        server.start()
        yield server
        server.kill()
        return
    cluster: RedisClusterServer = request.getfixturevalue("redis_cluster")
    client = cluster.client()
    client.flushall()
    client.close()
    yield cluster
    cluster.start()  # back up for the tests after this one, whatever happened here


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A real 3-node Redis Cluster on loopback for the whole run (about 2 s to start)."""
    cluster = RedisClusterServer()
    cluster.start()
    yield cluster
    cluster.close()


@pytest.fixture
def sync_playwright() -> Any:
    """Playwright's sync API, or a skip naming what is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"browser test needs {CHROMIUM} (Debian: apt-get install chromium)")
    return pytest.importorskip(
        "playwright.sync_api", reason="browser test needs the playwright package"
    )
