"""Manual control: guard.isolate / guard.reset in one process and across guards through Redis."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from conftest import make_settings, shared_settings, sync_get
from otel_sdk import install_sdk
from upstream_guard import CallEvent, CircuitOpenError, Guard, GuardSettings, install
from upstream_guard._fleet import FleetError, fleet_status
from upstream_guard._fleet import isolate as fleet_isolate
from upstream_guard._fleet import reset as fleet_reset
from upstream_guard.testing import FakeClock, Fault

pytestmark = pytest.mark.anyio
HEALTH = "/_upstream_guard/health"


def build_app(sim_url: str) -> FastAPI:
    app = FastAPI()

    @app.get("/me")
    async def me() -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{sim_url}/v1/me")
        response.raise_for_status()
        return {"id": response.json()["id"]}

    return app


def test_isolate_refuses_every_call_until_reset(sim, sim_url, clock):
    """Isolated: refused with reason 'isolated' and no upstream hit; reset: closed, counters 0."""
    guard = Guard(
        make_settings(sim_url, breaker={"fail_max": 5}, retry={"attempts": 1}), clock=clock
    )
    events: list[CallEvent] = []
    guard.subscribe(events.append)
    changes: list[tuple[str, str, str]] = []
    guard.state_hooks.append(lambda *change: changes.append(change))
    sim.set_fault(Fault.no_healthy_upstream())
    assert sync_get(guard, f"{sim_url}/v1/me").status_code == 503
    assert guard.snapshot()["upstreams"]["spotify_api"]["failures"] == 1
    sim.heal()

    guard.isolate("spotify_api")
    assert guard.state("spotify_api") == "isolated"
    for _ in range(3):
        with pytest.raises(CircuitOpenError) as info:
            sync_get(guard, f"{sim_url}/v1/me")
        assert info.value.reason == "isolated"
        assert info.value.upstream == "spotify_api"
        assert isinstance(info.value, httpx.TransportError)  # still the client's error class
    assert sim.total_hits == 0
    assert [(e.outcome, e.reason, e.breaker_state) for e in events[1:]] == [
        ("refused", "isolated", "isolated")
    ] * 3
    clock.advance(3600)  # no timeout ends an isolation
    assert guard.state("spotify_api") == "isolated"
    with pytest.raises(CircuitOpenError):
        sync_get(guard, f"{sim_url}/v1/me")
    assert guard.state("spotify_accounts") == "closed"  # only the one named

    guard.reset("spotify_api")
    assert guard.state("spotify_api") == "closed"
    assert changes == [("spotify_api", "closed", "isolated"), ("spotify_api", "isolated", "closed")]
    upstream = guard.snapshot()["upstreams"]["spotify_api"]
    assert (upstream["failures"], upstream["consecutive_failures"], upstream["isolated"]) == (
        0,
        0,
        False,
    )
    assert upstream["last_failure"] is None
    assert sync_get(guard, f"{sim_url}/v1/me").status_code == 200
    assert sim.total_hits == 1


def test_reset_closes_an_open_breaker_and_clears_its_count(sim, sim_url, clock):
    """An open breaker is closed by reset; it needs fail_max new failures to open again."""
    guard = Guard(
        make_settings(sim_url, breaker={"fail_max": 2}, retry={"attempts": 1}), clock=clock
    )
    sim.set_fault(Fault.no_healthy_upstream())
    for _ in range(2):
        sync_get(guard, f"{sim_url}/v1/me")
    assert guard.state("spotify_api") == "open"
    guard.reset("spotify_api")
    assert guard.state("spotify_api") == "closed"
    assert sync_get(guard, f"{sim_url}/v1/me").status_code == 503  # a failure, not a refusal
    assert guard.state("spotify_api") == "closed"  # one of two
    sync_get(guard, f"{sim_url}/v1/me")
    assert guard.state("spotify_api") == "open"


def test_isolation_covers_endpoint_breakers_made_later(sim, sim_url, clock):
    """With one breaker per endpoint, an endpoint first called after isolate is refused too."""
    settings = make_settings(sim_url, breaker={"scope": "endpoint"}, retry={"attempts": 1})
    guard = Guard(settings, clock=clock)
    assert sync_get(guard, f"{sim_url}/v1/me").status_code == 200
    guard.isolate("spotify_api")
    with pytest.raises(CircuitOpenError, match="isolated"):
        sync_get(guard, f"{sim_url}/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp")
    assert set(guard.snapshot()["upstreams"]["spotify_api"]["breakers"].values()) == {"isolated"}
    guard.reset("spotify_api")
    assert sync_get(guard, f"{sim_url}/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp").status_code == 200


def test_isolation_wins_over_a_cooldown(sim, sim_url, clock):
    """A call to an isolated upstream in a 429 cooldown is refused as isolated, not throttled."""
    guard = Guard(make_settings(sim_url, retry={"attempts": 1}), clock=clock)
    sim.set_fault(Fault.rate_limited(120))
    assert sync_get(guard, f"{sim_url}/v1/me").status_code == 429
    guard.isolate("spotify_api")
    with pytest.raises(CircuitOpenError) as info:
        sync_get(guard, f"{sim_url}/v1/me")
    assert info.value.reason == "isolated"
    guard.reset("spotify_api")  # the cooldown is Spotify's ask: it stays
    assert guard.snapshot()["upstreams"]["spotify_api"]["cooldown_s"] > 0


def test_unknown_upstream_is_a_clear_error(clock):
    """isolate and reset name the known upstreams when given an unknown one."""
    guard = Guard(GuardSettings(), clock=clock)
    for act in (guard.isolate, guard.reset, guard.state):
        with pytest.raises(
            KeyError,
            match=r"no upstream named 'spotfy_api' \(known: spotify_accounts, spotify_api\)",
        ):
            act("spotfy_api")


def test_health_and_fallback_say_isolated(sim, sim_url):
    """Health answers 503 with state 'isolated'; the app's request gets the 503 problem."""
    app = build_app(sim_url)
    guard = install(app, make_settings(sim_url), clock=FakeClock())
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get(HEALTH).status_code == 200
        guard.isolate("spotify_api")
        health = client.get(HEALTH)
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert health.json()["upstreams"]["spotify_api"]["state"] == "isolated"
        assert health.json()["upstreams"]["spotify_api"]["isolated"] is True
        answer = client.get("/me")
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert "(isolated)" in answer.json()["detail"]
        assert int(answer.headers["retry-after"]) >= 1
        guard.reset("spotify_api")
        assert client.get(HEALTH).status_code == 200
        assert client.get("/me").status_code == 200
    assert sim.total_hits == 1


async def test_span_shows_isolation(sim, sim_url, clock):
    """The call's span carries breaker state 'isolated', outcome refused, error 'isolated'."""
    exporter, _ = install_sdk()
    guard = Guard(make_settings(sim_url), clock=clock)
    guard.isolate("spotify_api")
    async with httpx.AsyncClient(transport=guard.async_transport()) as client:
        with pytest.raises(CircuitOpenError):
            await client.get(f"{sim_url}/v1/me")
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith("spotify_api GET")]
    assert len(spans) == 1
    attributes = spans[0].attributes or {}
    assert attributes["upstream_guard.breaker.state"] == "isolated"
    assert attributes["upstream_guard.outcome"] == "refused"
    assert attributes["error.type"] == "isolated"


# -- through Redis -----------------------------------------------------------------------------


def test_isolate_and_reset_reach_every_guard_through_redis(sim, sim_url, redis_url, shared_redis):
    """One guard's isolate and reset reach another at its next sync; a new guard starts isolated."""
    settings = shared_settings(sim_url, redis_url, breaker={"fail_max": 3}, retry={"attempts": 1})
    a, b = Guard(settings, clock=FakeClock()), Guard(settings, clock=FakeClock())
    assert a.shared is not None
    assert b.shared is not None
    sim.set_fault(Fault.no_healthy_upstream())
    sync_get(b, f"{sim_url}/v1/me")  # one failure on b, shared
    b.shared.sync_now()
    sim.heal()

    a.isolate("spotify_api")
    a.shared.sync_now()
    assert shared_redis.client().exists("{upstream_guard:spotify_api}:isolated") == 1
    b.shared.sync_now()
    assert b.state("spotify_api") == "isolated"
    with pytest.raises(CircuitOpenError, match="isolated"):
        sync_get(b, f"{sim_url}/v1/me")

    restarted = Guard(settings, clock=FakeClock())  # a worker started after the isolation
    assert restarted.shared is not None
    restarted.shared.sync_now()
    assert restarted.state("spotify_api") == "isolated"

    b.reset("spotify_api")
    b.shared.sync_now()
    for guard in (a, restarted):
        guard.shared.sync_now()  # type: ignore[union-attr]
        assert guard.state("spotify_api") == "closed"
        assert sync_get(guard, f"{sim_url}/v1/me").status_code == 200
    assert shared_redis.client().exists("{upstream_guard:spotify_api}:isolated") == 0
    (api,) = [
        u for u in fleet_status(shared_redis.client(), "upstream_guard") if u.name == "spotify_api"
    ]
    assert (api.state, api.failures, api.isolated) == ("closed", 0, False)


def test_reset_from_outside_closes_open_breakers_everywhere(sim, sim_url, redis_url, shared_redis):
    """The command's reset (Redis only) closes a fleet-wide open breaker and clears its counts."""
    settings = shared_settings(sim_url, redis_url, breaker={"fail_max": 2}, retry={"attempts": 1})
    a, b = Guard(settings, clock=FakeClock()), Guard(settings, clock=FakeClock())
    sim.set_fault(Fault.no_healthy_upstream())
    for _ in range(2):
        sync_get(a, f"{sim_url}/v1/me")
    a.shared.sync_now()  # type: ignore[union-attr]
    b.shared.sync_now()  # type: ignore[union-attr]
    assert b.state("spotify_api") == "open"
    client = shared_redis.client()
    (api,) = [u for u in fleet_status(client, "upstream_guard") if u.name == "spotify_api"]
    assert (api.state, api.failures, api.trips, len(api.workers)) == ("open", 2, 1, 2)

    fleet_reset(client, "upstream_guard", "spotify_api")
    (api,) = [u for u in fleet_status(client, "upstream_guard") if u.name == "spotify_api"]
    assert (api.state, api.failures) == ("closed", 0)  # as the next sync will make it
    sim.heal()
    for guard in (a, b):
        guard.shared.sync_now()  # type: ignore[union-attr]
        assert guard.state("spotify_api") == "closed"
        assert guard.snapshot()["upstreams"]["spotify_api"]["failures"] == 0
    assert client.hget("{upstream_guard:spotify_api}:breaker", "state") == "closed"
    assert client.hget("{upstream_guard:spotify_api}:breaker", "failures_total") == "0"
    sim.set_fault(Fault.no_healthy_upstream())
    sync_get(b, f"{sim_url}/v1/me")  # one failure after the reset does not re-open it
    b.shared.sync_now()  # type: ignore[union-attr]
    a.shared.sync_now()  # type: ignore[union-attr]
    assert a.state("spotify_api") == b.state("spotify_api") == "closed"

    fleet_isolate(client, "upstream_guard", "spotify_api")
    a.shared.sync_now()  # type: ignore[union-attr]
    assert a.state("spotify_api") == "isolated"
    with pytest.raises(
        FleetError,
        match=r"no upstream named 'nope' in Redis \(known: spotify_accounts, spotify_api\)",
    ):
        fleet_isolate(client, "upstream_guard", "nope")


def test_isolation_survives_redis_forgetting_it(sim, sim_url, redis_url, shared_redis):
    """Redis restarted empty: an isolated worker writes its isolation back at its next sync."""
    settings = shared_settings(sim_url, redis_url)
    a = Guard(settings, clock=FakeClock())
    a.isolate("spotify_api")
    a.shared.sync_now()  # type: ignore[union-attr]
    shared_redis.client().flushall()
    a.shared.sync_now()  # type: ignore[union-attr]
    b = Guard(settings, clock=FakeClock())
    b.shared.sync_now()  # type: ignore[union-attr]
    assert b.state("spotify_api") == "isolated"


def test_isolate_before_the_first_sync_is_kept(sim, sim_url, redis_url):
    """A worker isolating before it ever synced keeps it, even after an older fleet reset."""
    settings = shared_settings(sim_url, redis_url)
    first = Guard(settings, clock=FakeClock())
    first.reset("spotify_api")  # an older reset: a generation in Redis
    first.shared.sync_now()  # type: ignore[union-attr]
    late = Guard(settings, clock=FakeClock())
    late.isolate("spotify_api")
    late.shared.sync_now()  # type: ignore[union-attr]
    assert late.state("spotify_api") == "isolated"
    first.shared.sync_now()  # type: ignore[union-attr]
    assert first.state("spotify_api") == "isolated"
