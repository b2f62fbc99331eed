"""Several uvicorn worker processes of one app share breakers and cooldowns through Redis."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from upstream_guard.testing import Fault, SpotifySimulator, free_port

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


class Workers:
    """`uvicorn --workers N` running tests/apps/worker_app.py."""

    def __init__(self, n: int, sim_url: str, redis_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        hostport = sim_url.split("://", 1)[1]
        env = {
            **os.environ,
            "SIM_URL": sim_url,
            "UPSTREAM_GUARD_REDIS_URL": redis_url,
            "UPSTREAM_GUARD_REDIS_SYNC_INTERVAL_S": "0.1",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS": json.dumps([hostport]),
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__FAIL_MAX": "3",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__MINIMUM_CALLS": "1000",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__RESET_TIMEOUT_S": "4",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__HALF_OPEN_MAX_CALLS": "1",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__ATTEMPTS": "1",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__MAX_RETRY_AFTER_S": "0.5",
            # A held probe waits for the test's release: no attempt timeout meanwhile.
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__TIMEOUT__ATTEMPT_S": "30",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__TIMEOUT__TOTAL_S": "30",
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "worker_app:app",
                "--app-dir",
                str(HERE / "apps"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(n),
                "--log-level",
                "warning",
            ],
            env=env,
        )
        self.n = n
        self.client = httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))

    def get(self) -> httpx.Response:
        # A new connection each time, so the kernel spreads requests over the workers.
        return self.client.get(f"{self.url}/t", headers={"connection": "close"})

    def get_safe(self) -> httpx.Response | None:
        try:
            return self.get()
        except httpx.TransportError:
            return None

    def wait_ready(self) -> set[str]:
        """Wait until every worker has answered once; return their pids."""
        pids: set[str] = set()
        deadline = time.monotonic() + 30
        while len(pids) < self.n and time.monotonic() < deadline:
            try:
                pids.add(self.get().headers["x-pid"])
            except httpx.TransportError:
                time.sleep(0.05)  # sleep-ok: waiting for real worker processes to start
        assert len(pids) == self.n, f"only {len(pids)} of {self.n} workers answered"
        return pids

    def answers_from_all(self, at_least: int, until: float) -> list[httpx.Response]:
        """At least ``at_least`` answers, in concurrent pairs, until every worker gave one.

        One listening socket is shared by the workers, and whichever is in ``accept`` first
        wins: one at a time, a single idle worker can take every connection. Pairs in flight
        make the others accept too. Stops at ``until`` (a monotonic time) regardless.
        """
        answers: list[httpx.Response] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.n) as pool:
            while time.monotonic() < until and (
                len(answers) < at_least or len({a.headers["x-pid"] for a in answers}) < self.n
            ):
                answers += pool.map(lambda _: self.get(), range(self.n))
        return answers

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=15)


def wait_until_one_left(futures: list, timeout: float) -> set:
    """Wait until all futures but (at most) one are done; return those not done."""
    pending = set(futures)
    deadline = time.monotonic() + timeout
    while len(pending) > 1 and time.monotonic() < deadline:
        _, pending = concurrent.futures.wait(pending, timeout=0.1, return_when="FIRST_COMPLETED")
    return pending


def refused(response: httpx.Response, reason: str) -> bool:
    return response.status_code == 503 and f"({reason})" in response.json().get("detail", "")


@pytest.mark.parametrize("n", [2, 4])
def test_workers_share_trips_cooldowns_and_probes(redis_server, n):
    """One worker's trip, 429 and half-open probe limit hold for all workers within a second."""
    client = redis_server.client()
    client.flushall()
    sim = SpotifySimulator()
    from upstream_guard.testing import serve

    with serve(sim) as sim_url:
        workers = Workers(n, sim_url, redis_server.url)
        try:
            workers.wait_ready()
            # 1. A trip: fail until some worker refuses; within a second all workers refuse
            #    without touching the upstream.
            sim.set_fault(Fault.no_healthy_upstream())
            for _ in range(60):
                if refused(workers.get(), "circuit_open"):
                    break
            tripped = time.monotonic()
            agree_by = tripped + 1.0
            time.sleep(max(0.0, agree_by - time.monotonic()))  # sleep-ok: workers get 1 s to agree
            hits = sim.total_hits
            answers = workers.answers_from_all(8 * n, until=tripped + 3.0)  # before the reset
            assert all(refused(a, "circuit_open") for a in answers), [
                (a.status_code, a.headers.get("x-pid"), a.json().get("detail"))
                for a in answers
                if not refused(a, "circuit_open")
            ]
            assert len({a.headers["x-pid"] for a in answers}) >= 2
            assert sim.total_hits == hits
            assert int(client.hget("{upstream_guard:spotify_api}:breaker", "trips")) == 1

            # 2. After the reset timeout, all workers together send one probe. Only the worker
            #    holding the lease may send it, so requests come in waves (one per worker)
            #    until one reaches that worker; while the probe is held, every worker refuses.
            sim.heal()
            sim.set_fault(Fault.held())
            probe_from = tripped + 4.2
            time.sleep(max(0.0, probe_from - time.monotonic()))  # sleep-ok: real reset timeout
            with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
                sent = []
                deadline = time.monotonic() + 10
                while sim.total_hits == 0 and time.monotonic() < deadline:
                    wave = [pool.submit(workers.get_safe) for _ in range(n)]
                    sent += wave
                    concurrent.futures.wait(wave, timeout=1)  # refused at once, or the probe
                assert sim.total_hits == 1, "no worker sent the probe"
                # Past the lease's 1 s, until every worker has refused: the prober keeps its
                # lease while its probe is held, so no other worker may send a second one.
                later = []
                until = time.monotonic() + 1.5
                while time.monotonic() < until or (
                    len({r.headers["x-pid"] for r in later}) < n and time.monotonic() < deadline
                ):
                    wave = [pool.submit(workers.get_safe) for _ in range(n)]
                    done, _ = concurrent.futures.wait(wave, timeout=5)
                    later += [f.result() for f in done if f.result() is not None]
                    sent += wave
                assert all(refused(r, "circuit_open") for r in later), [
                    (r.status_code, r.headers.get("x-pid"), r.text[:200])
                    for r in later
                    if not refused(r, "circuit_open")
                ]
                assert len({r.headers["x-pid"] for r in later}) == n
                held = wait_until_one_left(sent, timeout=20)
                assert sim.total_hits == 1  # heal() zeroed the count; the probe is held
                assert len(held) == 1
                sim.release()
                batch = [f.result() for f in sent]
            assert sim.total_hits == 1
            assert [r.status_code for r in batch if r is not None].count(200) == 1

            # 3. A 429 with a long Retry-After seen by one worker pauses all of them.
            #    First every worker has adopted the probe's close (else the 429 could meet a
            #    worker still refusing, and never reach the upstream).
            sim.heal()
            deadline = time.monotonic() + 10
            answers = []
            while time.monotonic() < deadline:  # until a round from every worker is all 200
                answers = workers.answers_from_all(2 * n, until=time.monotonic() + 10)
                if all(a.status_code == 200 for a in answers):
                    break
                time.sleep(0.05)  # sleep-ok: workers adopt the close at their next sync
            assert [a.status_code for a in answers] == [200] * len(answers)
            assert len({a.headers["x-pid"] for a in answers}) == n
            sim.set_fault(Fault.rate_limited(30))
            hits = sim.total_hits
            first = workers.get()
            assert first.status_code == 503
            assert sim.total_hits == hits + 1  # the 429 itself
            time.sleep(1.0)  # sleep-ok: the one second workers have to agree
            hits = sim.total_hits
            answers = workers.answers_from_all(8 * n, until=time.monotonic() + 10)
            assert all(refused(a, "cooldown") for a in answers), [
                (a.status_code, a.headers.get("x-pid"), a.text[:200])
                for a in answers
                if not refused(a, "cooldown")
            ]
            assert len({a.headers["x-pid"] for a in answers}) >= 2
            assert sim.total_hits == hits
        finally:
            sim.heal()  # a held call left by a failed check would hold up the shutdown
            workers.stop()
            client.close()
