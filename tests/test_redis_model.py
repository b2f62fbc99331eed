"""The Redis-shared breaker, driven by hypothesis: nothing lost, never backwards, agreement."""

from __future__ import annotations

import redis as redis_lib
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from upstream_guard import Guard, GuardSettings
from upstream_guard._breaker import OPEN
from upstream_guard._classify import Outcome
from upstream_guard.testing import FakeClock, RedisServer

SERVER = RedisServer()
KEY = "{upstream_guard:spotify_api}:breaker"
WORKERS = 3
FAIL_MAX = 4


def setup_module() -> None:
    SERVER.start()


def teardown_module() -> None:
    SERVER.kill()


class SharedBreakers(RuleBasedStateMachine):
    """Three guards (workers) with random outcomes, syncs and outages of their Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.redis = redis_lib.Redis.from_url(SERVER.url, decode_responses=True)
        self.redis.flushall()
        settings_ = GuardSettings(
            redis_url=SERVER.url,
            upstreams={
                "spotify_api": {
                    "hosts": ["api.test"],
                    # Redis judges the reset by its own clock: 1 ms has always passed there;
                    # each guard's fake clock decides when it tries a probe.
                    "breaker": {
                        "fail_max": FAIL_MAX,
                        "reset_timeout_s": 0.001,
                        "half_open_max_calls": 1,
                        "minimum_calls": 10_000,
                    },
                }
            },
        )
        self.guards = [Guard(settings_, clock=FakeClock()) for _ in range(WORKERS)]
        self.recorded = 0  # failures each guard recorded locally, summed
        self.last_epoch = 0

    def breaker(self, i: int):
        return self.guards[i].upstreams["spotify_api"].breakers["spotify_api"]

    @rule(
        i=st.integers(0, WORKERS - 1),
        outcome=st.sampled_from([Outcome.FAILURE] * 3 + [Outcome.SUCCESS]),
    )
    def call(self, i: int, outcome: Outcome) -> None:
        breaker = self.breaker(i)
        permit = breaker.admit()
        if permit is None:
            return
        before = breaker.failures_total
        breaker.record(permit, outcome, "status_503")
        self.recorded += breaker.failures_total - before

    @rule(i=st.integers(0, WORKERS - 1))
    def advance(self, i: int) -> None:
        self.guards[i].clock.advance(1.0)  # type: ignore[attr-defined]

    @rule(i=st.integers(0, WORKERS - 1))
    def sync(self, i: int) -> None:
        shared = self.guards[i].shared
        assert shared is not None
        shared.sync_now()

    @rule(i=st.integers(0, WORKERS - 1))
    def sync_with_redis_away(self, i: int) -> None:
        """A sync that cannot reach Redis: the news must be kept for later."""
        shared = self.guards[i].shared
        assert shared is not None
        url = shared._url
        shared._url = "redis://127.0.0.1:1/0"  # nothing listens there
        try:
            shared.sync_now()
            assert shared.status == "degraded"
        finally:
            shared._url = url

    @invariant()
    def epochs_never_go_backwards(self) -> None:
        epoch = int(self.redis.hget(KEY, "epoch") or 0)
        assert epoch >= self.last_epoch
        self.last_epoch = epoch

    @invariant()
    def probe_leases_stay_within_the_limit(self) -> None:
        assert self.redis.zcard(f"{KEY}:probes") <= 1
        assert sum(self.breaker(i)._probes for i in range(WORKERS)) <= WORKERS  # one each at most

    @invariant()
    def no_failure_is_lost(self) -> None:
        shared_total = int(self.redis.hget(KEY, "failures_total") or 0)
        pending = sum(self.breaker(i).unsynced_failures for i in range(WORKERS))
        assert shared_total + pending == self.recorded

    @precondition(lambda self: True)
    @rule()
    def everyone_syncs_twice(self) -> None:
        """After two rounds of syncs, every worker agrees with Redis."""
        for _ in range(2):
            for guard in self.guards:
                guard.shared.sync_now()  # type: ignore[union-attr]
        state = self.redis.hget(KEY, "state") or "closed"
        for i in range(WORKERS):
            local = self.breaker(i).current
            # Redis has no half-open: an open episode reads half-open locally once it may probe.
            assert local == state or (state == OPEN and local == "half-open")
        if state == OPEN:
            assert int(self.redis.hget(KEY, "trips") or 0) >= 1

    def teardown(self) -> None:
        self.redis.close()


SharedBreakers.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
TestSharedBreakers = SharedBreakers.TestCase
