"""The breaker against a simple reference model (hypothesis stateful testing)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from upstream_guard._breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Permit
from upstream_guard._classify import Outcome
from upstream_guard._settings import BreakerSettings
from upstream_guard.testing import FakeClock

FAIL_MAX = 3
MAX_PROBES = 2
SUCCESSES = 2
RESET = 10.0


@dataclass
class ModelPermit:
    generation: int
    probe: bool


class BreakerModel(RuleBasedStateMachine):
    """Consecutive failures, bounded probes, success threshold, late results dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.breaker = Breaker(
            "m",
            BreakerSettings(
                fail_max=FAIL_MAX,
                half_open_max_calls=MAX_PROBES,
                success_threshold=SUCCESSES,
                reset_timeout_s=RESET,
                minimum_calls=10_000,  # the ratio window is tested elsewhere
            ),
            self.clock,
        )
        self.outstanding: list[tuple[Permit, ModelPermit]] = []
        self.state = CLOSED
        self.generation = 0
        self.fails = 0
        self.successes = 0
        self.probes = 0
        self.opened_at = 0.0

    def _move(self, state: str) -> None:
        self.generation += 1
        self.state = state
        self.probes = 0
        self.successes = 0
        if state == OPEN:
            self.opened_at = self.clock.monotonic()
        if state == CLOSED:
            self.fails = 0

    @rule(n=st.integers(1, 3))
    def admit_some(self, n: int) -> None:
        for _ in range(n):
            self.admit()

    def admit(self) -> None:
        if self.state == OPEN and self.clock.monotonic() >= self.opened_at + RESET:
            self._move(HALF_OPEN)
        expected: ModelPermit | None = None
        if self.state == CLOSED:
            expected = ModelPermit(self.generation, probe=False)
        elif self.state == HALF_OPEN and self.probes < MAX_PROBES:
            self.probes += 1
            expected = ModelPermit(self.generation, probe=True)
        permit = self.breaker.admit()
        assert (permit is None) == (expected is None)
        if permit is not None and expected is not None:
            assert permit.probe == expected.probe
            self.outstanding.append((permit, expected))

    @precondition(lambda self: self.outstanding)
    @rule(
        data=st.data(),
        # Failures weigh more, so that runs reach open and half-open often.
        outcome=st.sampled_from(
            [Outcome.FAILURE] * 3
            + [Outcome.SUCCESS, Outcome.CLIENT_ERROR, Outcome.THROTTLED, Outcome.CANCELLED]
        ),
    )
    def finish(self, data: st.DataObject, outcome: Outcome) -> None:
        i = data.draw(st.integers(0, len(self.outstanding) - 1))
        permit, model = self.outstanding.pop(i)
        if outcome is Outcome.CANCELLED:
            self.breaker.release(permit)
        else:
            self.breaker.record(permit, outcome)
        current = model.generation == self.generation
        if model.probe and current:
            self.probes -= 1
        if not current or outcome in (Outcome.CANCELLED, Outcome.THROTTLED):
            return
        if outcome is Outcome.FAILURE:
            if self.state == CLOSED:
                self.fails += 1
                if self.fails >= FAIL_MAX:
                    self._move(OPEN)
            elif self.state == HALF_OPEN:
                self._move(OPEN)
        elif self.state == CLOSED:
            self.fails = 0
        elif self.state == HALF_OPEN:
            self.successes += 1
            if self.successes >= SUCCESSES:
                self._move(CLOSED)

    @rule(seconds=st.sampled_from([0.5, 3.0, RESET, 25.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.breaker.current == self.state
        assert self.breaker._probes == self.probes
        assert 0 <= self.breaker._probes <= MAX_PROBES
        if self.state == CLOSED:
            assert self.breaker.fail_counter == self.fails

    @invariant()
    def half_open_never_sticks(self) -> None:
        # With every probe returned, half-open always admits a new probe.
        if self.state == HALF_OPEN and not any(m.probe for _, m in self.outstanding):
            assert self.breaker._probes == 0


BreakerModel.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestBreakerModel = BreakerModel.TestCase
