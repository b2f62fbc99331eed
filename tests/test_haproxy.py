"""A real HAProxy in front of two simulated Spotify backends: its own 503 trips the guard.

SPOTIFY.md lists HAProxy's local reply (``No server is available to handle this request.``)
among the 503s seen in the wild. Here a real ``haproxy`` process (Debian package) balances
two ``SpotifySimulator`` servers with active health checks; the test stops both, so the 503
the guard sees is HAProxy's own, then starts one again on the same port and watches the
guard recover once HAProxy's check marks it up and the breaker's reset timeout has passed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from conftest import make_settings
from upstream_guard import install
from upstream_guard.testing import FakeClock, SpotifySimulator, free_port, serve

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
pytestmark = pytest.mark.skipif(
    HAPROXY is None,
    reason="haproxy is not installed (Debian: apt-get install haproxy; .ci/run tries it)",
)

TRACK = "3n3Ppam7vgaVa1iaRUc9Lp"
RESET_S = 15
HAPROXY_503 = "No server is available to handle this request."


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)  # sleep-ok: polling a real haproxy process and its health checks


class HAProxy:
    """A foreground ``haproxy -db`` with one frontend, one backend of two checked servers."""

    def __init__(self, workdir: Path, backend_ports: list[int]) -> None:
        self.port = free_port()
        self.stats_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "haproxy.log"
        self.config = workdir / "haproxy.cfg"
        servers = "\n".join(
            f"    server s{i} 127.0.0.1:{port} check inter 100ms fall 2 rise 1"
            for i, port in enumerate(backend_ports, 1)
        )
        self.config.write_text(
            f"""\
global
    maxconn 256

defaults
    mode http
    retries 1
    timeout connect 200ms
    timeout client 5s
    timeout server 5s
    timeout check 200ms

frontend spotify
    bind 127.0.0.1:{self.port}
    default_backend api

backend api
    balance roundrobin
    option httpchk GET /v1/me
{servers}

listen stats
    bind 127.0.0.1:{self.stats_port}
    stats enable
    stats uri /stats
"""
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert HAPROXY is not None
        check = subprocess.run(
            [HAPROXY, "-c", "-f", str(self.config)], capture_output=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [HAPROXY, "-f", str(self.config), "-db"], stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def server_states(self) -> dict[str, str]:
        """Each backend server's status as HAProxy's stats page reports it (UP, DOWN, ...)."""
        assert self._process is not None
        if self._process.poll() is not None:
            pytest.fail(f"haproxy exited ({self._process.returncode}): {self.log.read_text()}")
        try:
            # Another port than the frontend's: the guard leaves these requests alone.
            response = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=1)
        except httpx.TransportError:
            return {}
        rows = csv.DictReader(io.StringIO(response.text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "api" and row["svname"] not in ("FRONTEND", "BACKEND")
        }


@pytest.fixture
def haproxy_pair(tmp_path: Path) -> Iterator[tuple[HAProxy, list[int]]]:
    """A started HAProxy and the two (not yet served) backend ports it balances."""
    ports = [free_port(), free_port()]
    proxy = HAProxy(tmp_path, ports)
    proxy.start()
    try:
        yield proxy, ports
    finally:
        proxy.stop()


def test_haproxy_own_503_trips_the_guard_and_a_restarted_backend_recovers(haproxy_pair):
    """Both backends stop: HAProxy's own 503 trips the breaker; one restart brings back 200."""
    proxy, ports = haproxy_pair
    upstream_bodies: list[str] = []
    app = FastAPI()

    @app.get("/tracks/{track_id}")
    async def track(track_id: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{proxy.url}/v1/tracks/{track_id}")
        upstream_bodies.append(response.text)
        response.raise_for_status()
        return {"name": response.json()["name"]}

    clock = FakeClock()
    settings = make_settings(
        proxy.url, breaker={"fail_max": 2, "reset_timeout_s": RESET_S}, retry={"attempts": 1}
    )
    guard = install(app, settings, clock=clock)
    path = f"/tracks/{TRACK}"

    with contextlib.ExitStack() as backends, TestClient(app, raise_server_exceptions=False) as c:
        for port in ports:
            backends.enter_context(serve(SpotifySimulator(), port=port, lifespan="off"))
        wait_until(lambda: proxy.server_states() == {"s1": "UP", "s2": "UP"}, "both backends UP")
        assert c.get(path).status_code == 200
        assert guard.state("spotify_api") == "closed"

        backends.close()  # both backends really stop: their ports refuse connections
        wait_until(
            lambda: proxy.server_states() == {"s1": "DOWN", "s2": "DOWN"},
            "HAProxy's health checks to mark both backends DOWN",
        )
        for _ in range(2):
            response = c.get(path)
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
            assert HAPROXY_503 in upstream_bodies[-1]  # HAProxy's own local reply
        assert guard.state("spotify_api") == "open"
        health = guard.snapshot()["upstreams"]["spotify_api"]
        assert health["last_failure"] == "no_server_available"
        assert health["consecutive_failures"] == 2

        calls = len(upstream_bodies)
        response = c.get(path)  # refused by the open breaker: HAProxy is not called
        assert response.status_code == 503
        assert response.json()["upstream"] == "spotify_api"
        assert "circuit_open" in response.json()["detail"]
        assert response.headers["retry-after"] == str(RESET_S)
        assert len(upstream_bodies) == calls

        revived = SpotifySimulator()
        with serve(revived, port=ports[0], lifespan="off"):
            wait_until(
                lambda: proxy.server_states().get("s1") == "UP",
                "HAProxy's health check to mark the restarted backend UP",
            )
            assert c.get(path).status_code == 503  # still open: the reset timeout runs
            assert len(upstream_bodies) == calls
            clock.advance(RESET_S)
            response = c.get(path)
            assert response.status_code == 200
            assert response.json()["name"]
            assert guard.state("spotify_api") == "closed"
            assert revived.hits[f"/v1/tracks/{TRACK}"] == 1
            assert revived.hits["/v1/me"] >= 1  # HAProxy's health checks reached it
            assert c.get(path).status_code == 200
