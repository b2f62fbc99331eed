"""Shared state through real Redis: guards in one process and in several processes.

Each test runs against a single redis-server and against a 3-node Redis Cluster.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from conftest import Redis, shared_settings, sync_get
from upstream_guard import CircuitOpenError, Guard, GuardSettings, RateLimitedError
from upstream_guard.testing import FakeClock, Fault, RedisClusterServer

KEY = "{upstream_guard:spotify_api}:breaker"


def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll a condition that a background thread or another process makes true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)  # sleep-ok: waiting on a real background thread or process
    return check()


def test_a_trip_in_one_guard_refuses_in_another(sim, sim_url, redis_url):
    """After one worker trips, another refuses without touching the upstream."""
    settings = shared_settings(sim_url, redis_url, breaker={"fail_max": 2}, retry={"attempts": 1})
    a, b = Guard(settings, clock=FakeClock()), Guard(settings, clock=FakeClock())
    assert a.shared is not None
    assert b.shared is not None
    sim.set_fault(Fault.no_healthy_upstream())
    for _ in range(2):
        sync_get(a, f"{sim_url}/v1/me")
    assert a.state("spotify_api") == "open"
    a.shared.sync_now()
    b.shared.sync_now()
    assert b.state("spotify_api") == "open"
    hits = sim.total_hits
    with pytest.raises(CircuitOpenError):
        sync_get(b, f"{sim_url}/v1/me")
    assert sim.total_hits == hits


def test_failures_from_several_guards_add_up_to_a_trip(sim, sim_url, shared_redis, redis_url):
    """Failures spread over workers trip the shared breaker, though none tripped alone."""
    settings = shared_settings(sim_url, redis_url, breaker={"fail_max": 4}, retry={"attempts": 1})
    guards = [Guard(settings, clock=FakeClock()) for _ in range(4)]
    sim.set_fault(Fault.json_5xx(502))
    for guard in guards:
        sync_get(guard, f"{sim_url}/v1/me")
        assert guard.state("spotify_api") == "closed"
    for guard in guards:  # the fourth report trips the shared breaker
        assert guard.shared is not None
        guard.shared.sync_now()
    for guard in guards:  # and the next sync tells everyone
        guard.shared.sync_now()  # type: ignore[union-attr]
    assert all(g.state("spotify_api") == "open" for g in guards)
    stats = breaker_stats(shared_redis)
    assert stats["failures_total"] == "4"
    assert stats["trips"] == "1"


def breaker_stats(server: Redis) -> dict[str, str]:
    """The shared breaker hash of spotify_api, as Redis holds it."""
    client = server.client()
    try:
        return dict(client.hgetall(KEY))
    finally:
        client.close()


def test_a_429_in_one_guard_pauses_the_others(sim, sim_url, redis_url):
    """A long Retry-After seen by one worker makes the others refuse at once."""
    settings = shared_settings(sim_url, redis_url, retry={"max_retry_after_s": 0.5})
    a, b = Guard(settings, clock=FakeClock()), Guard(settings, clock=FakeClock())
    sim.set_fault(Fault.rate_limited(30))
    assert sync_get(a, f"{sim_url}/v1/me").status_code == 429
    a.shared.sync_now()  # type: ignore[union-attr]
    b.shared.sync_now()  # type: ignore[union-attr]
    hits = sim.total_hits
    with pytest.raises(RateLimitedError) as info:
        sync_get(b, f"{sim_url}/v1/me")
    assert info.value.retry_after_s == pytest.approx(30, abs=1)
    assert sim.total_hits == hits
    assert b.state("spotify_api") == "closed"


def test_half_open_probes_are_bounded_across_guards(sim, sim_url, redis_url):
    """After the reset timeout, the guards together hold at most half_open_max_calls leases."""
    settings = shared_settings(
        sim_url,
        redis_url,
        breaker={"fail_max": 1, "reset_timeout_s": 0.3, "half_open_max_calls": 1},
        retry={"attempts": 1},
    )
    guards = [Guard(settings) for _ in range(3)]  # real clocks: Redis keeps real time
    sim.set_fault(Fault.no_healthy_upstream())
    sync_get(guards[0], f"{sim_url}/v1/me")
    for guard in guards:
        guard.shared.sync_now()  # type: ignore[union-attr]
        assert guard.upstreams["spotify_api"].breakers["spotify_api"].current == "open"
    sim.heal()
    time.sleep(0.35)  # sleep-ok: Redis judges the reset timeout by its own real clock
    for guard in guards:  # each asks for a probe and is told to wait for a lease
        with pytest.raises(CircuitOpenError):
            sync_get(guard, f"{sim_url}/v1/me")
    for guard in guards:
        guard.shared.sync_now()  # type: ignore[union-attr]
    allowances = [
        g.upstreams["spotify_api"].breakers["spotify_api"].probe_allowance for g in guards
    ]
    assert sum(allowances) == 1
    holder = guards[allowances.index(1)]
    assert sync_get(holder, f"{sim_url}/v1/me").status_code == 200
    assert sim.total_hits == 1
    holder.shared.sync_now()  # type: ignore[union-attr]
    for guard in guards:
        guard.shared.sync_now()  # type: ignore[union-attr]
    assert all(g.state("spotify_api") == "closed" for g in guards)


def test_redis_down_serves_locally_then_resumes(sim, sim_url, caplog, killable):
    """Redis killed: calls go on, health says degraded, one warning; restarted: news arrives."""
    server = killable
    settings = shared_settings(
        sim_url, server.url, breaker={"fail_max": 100}, retry={"attempts": 1}
    )
    guard = Guard(settings, clock=FakeClock())
    shared = guard.shared
    assert shared is not None
    shared.sync_now()
    assert guard.snapshot()["shared_state"] == "ok"
    server.kill()
    sim.set_fault(Fault.json_5xx(500))
    with caplog.at_level(logging.WARNING, logger="upstream_guard"):
        for _ in range(3):
            assert sync_get(guard, f"{sim_url}/v1/me").status_code == 500
            started = time.monotonic()
            shared.sync_now()
            assert time.monotonic() - started < 2
    snapshot = guard.snapshot()
    assert snapshot["shared_state"] == "degraded"
    assert snapshot["status"] == "degraded"
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1
    server.start()
    shared.sync_now()
    assert guard.snapshot()["shared_state"] == "ok"
    stats = breaker_stats(server)
    assert stats["failures_total"] == "3"  # kept while Redis was away, delivered after


def test_background_thread_shares_a_trip_within_a_second(sim, sim_url, redis_url):
    """With the sync threads running, a trip reaches another guard within one second."""
    settings = shared_settings(sim_url, redis_url, breaker={"fail_max": 1}, retry={"attempts": 1})
    with Guard(settings) as a, Guard(settings) as b:
        sim.set_fault(Fault.no_healthy_upstream())
        sync_get(a, f"{sim_url}/v1/me")
        tripped = time.monotonic()
        assert eventually(lambda: b.state("spotify_api") == "open", timeout=1.0)
        assert time.monotonic() - tripped < 1.0


def _stress_worker(
    redis_url: str, fail_max: int, calls: int, out: multiprocessing.Queue, start: Any
) -> None:
    import anyio

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="no healthy upstream")

    settings = GuardSettings(
        redis_url=redis_url,
        redis_sync_interval_s=0.02,
        upstreams={
            "spotify_api": {
                "hosts": ["api.test"],
                "breaker": {"fail_max": fail_max, "minimum_calls": 100_000},
                "retry": {"attempts": 1},
            }
        },
    )
    guard = Guard(settings)
    guard.start()
    start.wait(timeout=60)  # all four processes fail at the same time

    async def main() -> None:
        transport = guard.async_transport(httpx.MockTransport(handler))
        async with httpx.AsyncClient(transport=transport) as client:

            async def one() -> None:
                with contextlib.suppress(CircuitOpenError):
                    await client.get("http://api.test/v1/me")

            async with anyio.create_task_group() as tg:
                for _ in range(calls):
                    tg.start_soon(one)

    anyio.run(main)
    guard.close()
    out.put(guard.upstreams["spotify_api"].breakers["spotify_api"].failures_total)


def test_stress_four_processes_lose_nothing_and_trip_once(shared_redis, redis_url):
    """4 processes x 200 concurrent failing calls: the shared count is exact; one trip."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = ctx.Barrier(4)
    workers = [
        ctx.Process(target=_stress_worker, args=(redis_url, 100, 200, out, start)) for _ in range(4)
    ]
    for w in workers:
        w.start()
    recorded = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    stats = breaker_stats(shared_redis)
    assert int(stats["failures_total"]) == sum(recorded)
    assert sum(recorded) >= 100  # at least one worker failed all the way to fail_max
    assert stats["trips"] == "1"


def test_each_upstreams_keys_share_one_slot_on_the_cluster(sim, sim_url, redis_cluster):
    """On the cluster, every key the guard writes sits in its upstream's {prefix:name} slot."""
    from redis.cluster import key_slot

    client = redis_cluster.client()
    client.flushall()
    settings = shared_settings(
        sim_url,
        redis_cluster.url,
        breaker={"scope": "endpoint", "fail_max": 1},
        retry={"attempts": 1, "max_retry_after_s": 0.5},
    )
    guard = Guard(settings, clock=FakeClock())
    sim.set_fault(Fault.no_healthy_upstream(), "/v1/me")
    sim.set_fault(Fault.rate_limited(30), "/v1/tracks")
    sync_get(guard, f"{sim_url}/v1/me")
    sync_get(guard, f"{sim_url}/v1/tracks/4uLU6hMCjMI75M1A2tKUQC")
    guard.shared.sync_now()  # type: ignore[union-attr]
    assert guard.snapshot()["shared_state"] == "ok"
    keys = sorted(client.keys("*", target_nodes=client.PRIMARIES))
    client.close()
    tags = {name: f"{{upstream_guard:{name}}}" for name in ("spotify_api", "spotify_accounts")}
    assert {k.split(":breaker", 1)[0] for k in keys if ":breaker" in k} == set(tags.values())
    assert tags["spotify_api"] + ":cooldown" in keys
    assert sum(k.startswith(tags["spotify_api"] + ":breaker:") for k in keys) == 2  # endpoints
    for key in keys:
        name = key[len("{upstream_guard:") : key.index("}")]
        assert key_slot(key.encode()) == key_slot(tags[name].encode()), key
    assert key_slot(tags["spotify_api"].encode()) != key_slot(tags["spotify_accounts"].encode())


def test_a_cluster_node_down_stops_sharing_only_for_its_upstreams(sim, sim_url, redis_cluster):
    """One node killed: its upstreams go local, a trip of an upstream elsewhere is still shared."""
    from redis.cluster import key_slot

    def node_of(prefix: str, name: str) -> int:
        return key_slot(f"{{{prefix}:{name}}}".encode()) * 3 // RedisClusterServer.SLOTS

    # A prefix that puts spotify_accounts on another node than spotify_api and the seed node.
    prefix = next(
        p
        for p in (f"t{i}" for i in range(1000))
        if node_of(p, "spotify_accounts") not in (0, node_of(p, "spotify_api"))
    )
    client = redis_cluster.client()
    client.flushall()
    client.close()
    settings = shared_settings(
        sim_url, redis_cluster.url, breaker={"fail_max": 1}, retry={"attempts": 1}
    ).model_copy(update={"redis_prefix": prefix})
    a, b = Guard(settings, clock=FakeClock()), Guard(settings, clock=FakeClock())
    a.shared.sync_now()  # type: ignore[union-attr]
    assert a.snapshot()["shared_state"] == "ok"
    victim = redis_cluster.nodes[node_of(prefix, "spotify_accounts")]
    try:
        victim.kill()
        sim.set_fault(Fault.no_healthy_upstream())
        sync_get(a, f"{sim_url}/v1/me")
        a.shared.sync_now()  # type: ignore[union-attr]
        b.shared.sync_now()  # type: ignore[union-attr]
        assert b.state("spotify_api") == "open"  # shared through the node still up
        assert b.snapshot()["shared_state"] == "degraded"  # spotify_accounts: local only
    finally:
        redis_cluster.start()
    b.shared.sync_now()  # type: ignore[union-attr]
    assert b.snapshot()["shared_state"] == "ok"


class _ReplyDropper:
    """A loopback TCP proxy to Redis that, while ``drop`` is set, forwards a script call and
    closes the connection instead of passing its reply back: Redis applied it, the client
    never heard. (Connection set-up commands pass, so the client gets as far as the script.)"""

    def __init__(self, target_port: int) -> None:
        self.drop = False
        self._target = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            script_sent = threading.Event()
            for source, sink, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pipe, args=(source, sink, replies, script_sent), daemon=True
                ).start()

    def _pipe(
        self, source: socket.socket, sink: socket.socket, replies: bool, script: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not replies and self.drop and b"EVALSHA" in data.upper():
                    script.set()
                if replies and script.is_set():
                    break
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._server.close()


def test_a_report_resent_after_a_lost_reply_counts_once(sim, sim_url, redis_server):
    """Redis applied a sync whose reply was lost: the resent failures are not counted twice."""
    proxy = _ReplyDropper(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    try:
        settings = shared_settings(
            sim_url, f"redis://127.0.0.1:{proxy.port}/0", breaker={"fail_max": 50}
        )
        guard = Guard(settings, clock=FakeClock())
        assert guard.shared is not None
        client = redis_server.client()
        client.flushall()
        guard.shared.sync_now()  # loads the script: a lost NOSCRIPT reply would prove nothing
        sim.set_fault(Fault.json_5xx(502))
        for _ in range(3):
            sync_get(guard, f"{sim_url}/v1/me")
        recorded = guard.upstreams["spotify_api"].breaker.failures_total
        proxy.drop = True
        guard.shared.sync_now()  # Redis adds the failures; the answer never arrives
        assert guard.shared.status == "degraded"
        assert client.hget(KEY, "failures_total") == str(recorded)
        proxy.drop = False
        sync_get(guard, f"{sim_url}/v1/me")  # more failures join the resent ones
        more = guard.upstreams["spotify_api"].breaker.failures_total - recorded
        assert more > 0
        guard.shared.sync_now()
        assert guard.shared.status == "ok"
        assert client.hget(KEY, "failures_total") == str(recorded + more)
        client.close()
    finally:
        proxy.close()
