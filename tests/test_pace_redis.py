"""One pace for the fleet through real Redis: slots, the learned rate, Redis killed.

Each test runs against a single redis-server and against a 3-node Redis Cluster.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import httpx
import pytest

from conftest import Redis, shared_settings, sync_get
from upstream_guard import Guard, GuardSettings, RateLimitedError
from upstream_guard._pace import BETA, PACE_SCRIPT, PLATEAU_S
from upstream_guard.testing import FakeClock, Fault, RedisServer


def node_clients(server: Redis) -> list[Any]:
    """A plain client per node (one for a single server): commands are counted per node."""
    import redis

    if isinstance(server, RedisServer):
        return [server.client()]
    return [redis.Redis(port=node.port, decode_responses=True) for node in server.nodes]


def evalsha_calls(clients: list[Any]) -> int:
    """EVALSHA commands the server (every node of a cluster) has run since its stats reset."""
    total = 0
    for client in clients:
        stats = client.info("commandstats")
        total += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return total


def commands(clients: list[Any]) -> list[int]:
    """Commands each node has processed."""
    return [int(client.info("stats")["total_commands_processed"]) for client in clients]


def test_a_slot_taken_by_one_guard_is_gone_for_another(sim, sim_url, redis_url):
    """Two guards (two workers) draw from one GCRA: the second finds the slot taken."""
    pace = {"requests_per_s": 0.5, "burst": 1, "max_wait_s": 0}
    a = Guard(shared_settings(sim_url, redis_url, pace=pace), clock=FakeClock())
    b = Guard(shared_settings(sim_url, redis_url, pace=pace), clock=FakeClock())
    assert sync_get(a, f"{sim_url}/v1/me").status_code == 200
    with pytest.raises(RateLimitedError) as info:
        sync_get(b, f"{sim_url}/v1/me")
    assert info.value.reason == "paced"
    assert 1.0 < info.value.retry_after_s <= 2.0  # Redis' clock: the slot is 2 s after the first
    assert sim.total_hits == 1


def test_one_round_trip_per_paced_call_and_none_without_a_pace(sim, sim_url, shared_redis):
    """No pace in force: no Redis command at all; a paced call: exactly one EVALSHA."""
    clients = node_clients(shared_redis)
    plain = Guard(shared_settings(sim_url, shared_redis.url), clock=FakeClock())
    paced = Guard(
        shared_settings(sim_url, shared_redis.url, pace={"requests_per_s": 1000}), clock=FakeClock()
    )
    sync_get(paced, f"{sim_url}/v1/me")  # loads the script once
    for client in clients:
        client.config_resetstat()
    before = commands(clients)
    for _ in range(5):
        sync_get(plain, f"{sim_url}/v1/me")
    # Only this test's own INFO reached each node.
    assert [n - b for n, b in zip(commands(clients), before, strict=True)] == [1] * len(clients)
    for _ in range(7):
        sync_get(paced, f"{sim_url}/v1/me")
    assert evalsha_calls(clients) == 7
    for client in clients:
        client.close()


def test_the_learned_pace_reaches_the_other_workers(sim, sim_url, redis_url):
    """A pace learned from a 429 in one worker holds in another after a sync."""
    settings = shared_settings(sim_url, redis_url, retry={"attempts": 1}, pace={"max_wait_s": 10})
    clock_a, clock_b = FakeClock(start=5000.0), FakeClock(start=9000.0)
    a, b = Guard(settings, clock=clock_a), Guard(settings, clock=clock_b)
    assert a.shared is not None
    assert b.shared is not None
    b.shared.sync_now()
    for i in range(10):  # a call every 3 s: slots far apart, even in Redis' real time
        sync_get(a, f"{sim_url}/v1/tracks/{i:022d}")
        clock_a.advance(3.0)
    sim.script([Fault.rate_limited(1)])
    assert sync_get(a, f"{sim_url}/v1/me").status_code == 429
    learned = a.snapshot()["upstreams"]["spotify_api"]["pace"]
    assert learned["source"] == "learned"
    a.shared.sync_now()
    b.shared.sync_now()
    seen = b.snapshot()["upstreams"]["spotify_api"]["pace"]
    assert seen["source"] == "learned"
    assert seen["rate_per_s"] == pytest.approx(learned["rate_per_s"], rel=0.02)
    assert seen["workers"] == 2
    assert seen["shared"] == "redis"
    # Both climb the one curve from the shared decrease: at 2 x PLATEAU_S, 10% past the plateau.
    clock_a.advance(2 * PLATEAU_S)
    clock_b.advance(2 * PLATEAU_S)
    plateau = learned["rate_per_s"] / BETA
    for guard in (a, b):
        rate = guard.snapshot()["upstreams"]["spotify_api"]["pace"]["rate_per_s"]
        assert rate == pytest.approx(1.1 * plateau, rel=0.02)
    # A learned pace has no burst in the shared GCRA either: the second call waits its slot.
    clock_b.slept.clear()
    assert [sync_get(b, f"{sim_url}/v1/me").status_code for _ in range(2)] == [200, 200]
    assert max(clock_b.slept, default=0.0) > 0.5 / (1.1 * plateau)


def test_redis_killed_mid_run_loses_no_call_and_paces_at_the_share(sim, sim_url, killable):
    """Redis killed: every call still goes, paced locally at rate / workers seen; then back."""
    server = killable
    pace = {"requests_per_s": 40, "max_wait_s": 1}
    clock = FakeClock()
    a = Guard(shared_settings(sim_url, server.url, pace=pace), clock=clock)
    b = Guard(shared_settings(sim_url, server.url, pace=pace), clock=FakeClock())
    assert a.shared is not None
    assert b.shared is not None
    b.shared.sync_now()
    a.shared.sync_now()
    statuses = [sync_get(a, f"{sim_url}/v1/me").status_code for _ in range(10)]
    assert a.snapshot()["upstreams"]["spotify_api"]["pace"]["shared"] == "redis"
    server.kill()
    statuses += [sync_get(a, f"{sim_url}/v1/me").status_code for _ in range(50)]
    assert statuses == [200] * 60
    assert sim.total_hits == 60
    snapshot = a.snapshot()
    view = snapshot["upstreams"]["spotify_api"]["pace"]
    assert view["shared"] == "local_share"
    assert view["workers"] == 2
    assert view["local_rate_per_s"] == 20.0
    assert snapshot["status"] == "degraded"
    # Locally at 20 calls/s with a burst of 20: 50 calls take about 1.5 s of the fake clock.
    assert sum(clock.slept) == pytest.approx(30 / 20, rel=0.1)
    server.start()
    a.shared.sync_now()
    assert a.snapshot()["upstreams"]["spotify_api"]["pace"]["shared"] == "redis"
    assert sync_get(a, f"{sim_url}/v1/me").status_code == 200


def test_the_gcra_script_takes_the_rate_as_an_argument(shared_redis):
    """The script alone: a burst goes at once, then one slot per interval, refusals untouched."""
    client = shared_redis.client()
    script = client.register_script(PACE_SCRIPT)
    key = "{upstream_guard:test}:pace"
    # Slots of 10 s: the six calls may take up to 5 s on a loaded machine without moving
    # any answer across a boundary (the script reads Redis's own clock).
    interval_us, burst, limit_us = 10_000_000, 3, 15_000_000
    answers = [script(keys=[key], args=[interval_us, burst, limit_us]) for _ in range(6)]
    granted = [int(g) for g, _ in answers]
    waits = [int(w) for _, w in answers]
    assert granted == [1, 1, 1, 1, 0, 0]  # a burst of 3, one within 15 s, then refused
    assert waits[:3] == [0, 0, 0]
    assert 5_000_000 < waits[3] <= 10_000_000
    assert 15_000_000 < waits[4] <= 20_000_000  # a refusal reserves nothing: the same slot again
    assert abs(waits[5] - waits[4]) < 5_000_000
    client.close()


def _pacing_worker(redis_url: str, kind: str, calls: int, out: Any, start: Any) -> None:
    import anyio

    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(time.time())
        return httpx.Response(200, json={"ok": True})

    settings = GuardSettings(
        redis_url=redis_url,
        upstreams={
            "spotify_api": {
                "hosts": ["api.test"],
                "pace": {"requests_per_s": 20, "burst": 1, "max_wait_s": 5},
            }
        },
    )
    guard = Guard(settings)
    guard.start()
    mock = httpx.MockTransport(handler)
    start.wait(timeout=60)
    if kind == "async":

        async def main() -> None:
            async with httpx.AsyncClient(transport=guard.async_transport(mock)) as client:
                async with anyio.create_task_group() as tg:
                    for i in range(calls):  # distinct URLs: identical GETs would coalesce
                        tg.start_soon(client.get, f"http://api.test/v1/tracks/{i}")

        anyio.run(main, backend="trio")
    else:
        from concurrent.futures import ThreadPoolExecutor

        with (
            httpx.Client(transport=guard.sync_transport(mock)) as client,
            ThreadPoolExecutor(8) as pool,
        ):
            list(pool.map(lambda i: client.get(f"http://api.test/v1/tracks/{i}"), range(calls)))
    guard.close()
    out.put(sent)


def test_two_processes_share_one_pace(redis_url):
    """Two processes (trio async and sync threads) at 20 calls/s each would take 0.5 s: shared, 1 s."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = ctx.Barrier(2)
    workers = [
        ctx.Process(target=_pacing_worker, args=(redis_url, kind, 10, out, start))
        for kind in ("async", "sync")
    ]
    for w in workers:
        w.start()
    sent = sorted(t for _ in workers for t in out.get(timeout=60))
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    assert len(sent) == 20  # no call refused
    assert sent[-1] - sent[0] >= 0.85  # 20 calls at 20/s for the pair: about 0.95 s
    # No half second holds more than its share of the pace (10, and the burst of 1).
    assert max(sum(1 for t in sent if s <= t < s + 0.5) for s in sent) <= 11


def test_two_workers_learning_from_one_overload_share_the_mean(sim, sim_url, redis_url):
    """Two workers each measure one overload from their share: the fleet takes their mean."""
    settings = shared_settings(sim_url, redis_url, retry={"attempts": 1})
    rates = []
    guards = []
    for calls in (30, 10):
        clock = FakeClock(start=5000.0)
        guard = Guard(settings, clock=clock)
        for i in range(calls):
            sync_get(guard, f"{sim_url}/v1/tracks/{i:022d}")
            clock.advance(3 / calls)
        sim.script([Fault.rate_limited(1)])
        assert sync_get(guard, f"{sim_url}/v1/me").status_code == 429
        rates.append(guard.snapshot()["upstreams"]["spotify_api"]["pace"]["rate_per_s"])
        guards.append(guard)
    assert rates[0] > 2 * rates[1]  # each saw its own share of the load
    for guard in (*guards, *guards):
        assert guard.shared is not None
        guard.shared.sync_now()
    for guard in guards:
        view = guard.snapshot()["upstreams"]["spotify_api"]["pace"]
        assert view["rate_per_s"] == pytest.approx(sum(rates) / 2, rel=0.02)


def test_workers_with_an_uneven_split_measure_the_fleets_rate(sim, sim_url, redis_url):
    """40 and 10 calls in 3 s, then 429 with Retry-After 7: both learn 0.9 x 50 / 10 s."""
    settings = shared_settings(sim_url, redis_url, retry={"attempts": 1})
    clocks = [FakeClock(start=5000.0), FakeClock(start=5000.0)]
    a, b = (Guard(settings, clock=clock) for clock in clocks)
    for guard, clock, calls in ((a, clocks[0], 40), (b, clocks[1], 10)):
        for i in range(calls):
            assert sync_get(guard, f"{sim_url}/v1/tracks/{i:022d}").status_code == 200
            clock.advance(3 / calls)
    for guard in (a, b, a):  # each has published its accepted calls and seen the other's
        assert guard.shared is not None
        guard.shared.sync_now()
    learned = []
    for guard in (a, b):
        sim.script([Fault.rate_limited(7)])
        assert sync_get(guard, f"{sim_url}/v1/me").status_code == 429
        view = guard.snapshot()["upstreams"]["spotify_api"]["pace"]
        assert view["source"] == "learned"
        learned.append(view["rate_per_s"])
    # The even-split guess would have given 0.9 x 80 / 10 = 7.2 and 0.9 x 20 / 10 = 1.8.
    assert learned == [pytest.approx(4.5, rel=0.03)] * 2
