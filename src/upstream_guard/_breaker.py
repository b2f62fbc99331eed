"""The circuit breaker: pybreaker keeps the state; this wrapper owns admission.

pybreaker is the record of state (counters, transitions, listeners, storage). Its own call
path cannot be used across an ``await``: it counts cancellation as failure, admits every
caller in half-open and lets late results re-trip a breaker. So admission happens here,
synchronously between awaits, and each classified outcome is replayed into pybreaker.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import pybreaker

from ._classify import Outcome
from ._clock import Clock
from ._settings import BreakerSettings

CLOSED: Final = pybreaker.STATE_CLOSED
OPEN: Final = pybreaker.STATE_OPEN
HALF_OPEN: Final = pybreaker.STATE_HALF_OPEN
ISOLATED: Final = "isolated"
"""Set by an operator (``guard.isolate``): every call refused until ``guard.reset``.

pybreaker has no such state (Resilience4j calls it FORCED_OPEN): it is kept here, over
whatever pybreaker records, which no call can change while isolated.
"""

StateHook = Callable[[str, str, str], None]
"""Called as ``hook(breaker_name, old_state, new_state)`` on every transition."""


class _ReplayedFailure(Exception):  # noqa: N818 - never escapes this module
    """Stands for a classified failure while it is replayed into pybreaker."""


def _fail() -> None:
    raise _ReplayedFailure


def _succeed() -> None:
    return None


class Permit:
    """One admitted attempt; give it back with ``Breaker.record`` or ``Breaker.release``.

    Made by ``Breaker.admit`` (``_permit``). No ``__init__``: on CPython 3.11 a class whose
    ``__init__`` is Python costs twice as much to make, and a closed breaker makes one per
    call (``admit`` fills it in place).
    """

    __slots__ = ("breaker", "done", "generation", "probe", "started")
    breaker: Breaker
    generation: int
    """The breaker's generation when it was admitted: a later one makes the result stale."""
    probe: bool
    """A half-open probe (it holds one of the probe slots)."""
    started: float
    done: bool
    """Recorded or released: it counts once."""


def _permit(breaker: Breaker, generation: int, *, probe: bool, started: float) -> Permit:
    """A new permit, not done."""
    permit = Permit()
    permit.breaker, permit.generation, permit.started = breaker, generation, started
    permit.probe, permit.done = probe, False
    return permit


class _Window:
    """Calls and failures over the last ``window_s`` seconds, in ten buckets."""

    __slots__ = ("_fails", "_ids", "_span", "calls", "current", "since", "until")
    _N = 10

    def __init__(self, window_s: float) -> None:
        self._span = window_s / self._N
        self._ids = [-1] * self._N
        self.calls = [0] * self._N
        self._fails = [0] * self._N
        # The bucket the last call went to, and the times it covers: most calls find it
        # again without a division (``Breaker.record_success`` counts there directly).
        self.current = 0
        self.since = self.until = 0.0

    def add(self, now: float, *, failed: bool) -> None:
        if not self.since <= now < self.until:
            self._move(now)
        i = self.current
        self.calls[i] += 1
        if failed:
            self._fails[i] += 1

    def _move(self, now: float) -> None:
        bucket = int(now / self._span)
        i = bucket % self._N
        if self._ids[i] != bucket:
            self._ids[i] = bucket
            self.calls[i] = 0
            self._fails[i] = 0
        self.current = i
        self.since = bucket * self._span
        self.until = self.since + self._span

    def totals(self, now: float) -> tuple[int, int]:
        oldest = int(now / self._span) - self._N
        calls = fails = 0
        for i in range(self._N):
            if self._ids[i] > oldest:
                calls += self.calls[i]
                fails += self._fails[i]
        return calls, fails

    def clear(self) -> None:
        self._ids = [-1] * self._N
        self.since = self.until = 0.0


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: Breaker) -> None:
        self._owner = owner

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:  # noqa: ARG002
        self._owner.on_state_change(old_state.name if old_state else CLOSED, new_state.name)


class Breaker:
    """A breaker for one upstream (or one endpoint of it)."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        clock: Clock,
        hooks: list[StateHook] | None = None,
    ) -> None:
        """Create a closed breaker; ``hooks`` hear every state change."""
        self.name = name
        self.settings = settings
        self._clock = clock
        self._hooks = hooks if hooks is not None else []
        self._lock = threading.Lock()
        self.generation = 0
        """Bumped by every transition: permits from an older generation count for nothing."""
        self.current: str = CLOSED
        """The recorded state (``state`` also reads an expired open breaker as half-open)."""
        self.isolated = False
        self._opened_at = 0.0
        self._probes = 0
        self._window = _Window(settings.window_s)
        self._slow_s = settings.slow_call_s
        # Whether pybreaker holds consecutive failures that a success must reset.
        self._dirty = False
        self.failures_total = 0
        self.last_failure: str | None = None
        # Shared state (Redis): what this worker must tell the others, and what they allow.
        self.epoch = 0
        """The shared episode (each open and each close starts one) this breaker is in."""
        self.unsynced_failures = 0
        self.reported_failures = 0
        """Every failure this breaker has put in a report, counting each once: Redis applies
        only what it has not seen, so a report resent after a lost reply counts once."""
        self.unsynced_success = False
        self.event: str | None = None
        """``open`` or ``close``: a transition of ours the others have not heard of yet."""
        self.event_epoch = 0
        self.probe_allowance = settings.half_open_max_calls
        """Probes this worker may have in flight (shared mode: the leases it holds)."""
        self._demand_until = 0.0
        self._adopting = False
        self._cb = pybreaker.CircuitBreaker(
            fail_max=settings.fail_max,
            reset_timeout=settings.reset_timeout_s,
            success_threshold=settings.success_threshold,
            name=name,
            listeners=[_Listener(self)],
        )

    # -- reading -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``closed``, ``open``, ``half-open`` or ``isolated``.

        Open past its timeout reads half-open.
        """
        if self.current == OPEN and self.retry_after_s() <= 0:
            return HALF_OPEN
        return self.current

    @property
    def fail_counter(self) -> int:
        """Consecutive failures recorded by pybreaker."""
        return int(self._cb.fail_counter)

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.current != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.settings.reset_timeout_s - self._clock.monotonic())

    # -- admission -----------------------------------------------------------------------

    def admit(self, now: float | None = None) -> Permit | None:
        """A permit for an attempt starting ``now`` (default: the clock's), or None: refused."""
        if now is None:
            now = self._clock.monotonic()
        generation = self.generation  # before the state: a transition in between makes it stale
        if self.current == CLOSED:  # the hot path: no lock, no pybreaker, ``_permit`` inline
            permit = Permit()
            permit.breaker, permit.generation, permit.started = self, generation, now
            permit.probe = permit.done = False
            return permit
        if self.refuses(now):
            return None  # a refusal needs no lock either: nothing changes
        with self._lock:
            if self.current == OPEN:
                if now < self._opened_at + self.settings.reset_timeout_s:
                    return None
                self._cb.half_open()
            if self.current == CLOSED:  # closed by a probe that just finished
                return _permit(self, self.generation, probe=False, started=now)
            if self._probes >= self.probe_allowance:
                # Remembered a while: the lease this asks for arrives with a later sync.
                self._demand_until = now + 1.0
                return None
            self._probes += 1
            return _permit(self, self.generation, probe=True, started=now)

    def refuses(self, now: float) -> bool:
        """Whether a call at ``now`` is refused outright: isolated, or open within its timeout."""
        current = self.current
        return current == ISOLATED or (
            current == OPEN and now < self._opened_at + self.settings.reset_timeout_s
        )

    def release(self, permit: Permit) -> None:
        """Give back a permit whose call was cancelled: neither success nor failure."""
        if permit.done:
            return
        permit.done = True
        if permit.probe:
            with self._lock:
                if permit.generation == self.generation:
                    self._probes -= 1

    def record(self, permit: Permit, outcome: Outcome, reason: str = "") -> None:
        """Replay an attempt's classified outcome; results from an older state are dropped."""
        if outcome is Outcome.CANCELLED or outcome is Outcome.THROTTLED:
            # Neither health nor ill health: a 429 is the app's quota, not the upstream's state.
            self.release(permit)
        elif outcome is Outcome.FAILURE:
            self._settle(permit, self._clock.monotonic(), failed=True, reason=reason)
        else:  # a success, or a client error: the upstream answered as it should
            self.record_success(permit, self._clock.monotonic())

    def record_success(self, permit: Permit, now: float) -> None:
        """``record(permit, Outcome.SUCCESS)`` at ``now``: the hot path of a healthy call.

        A success that changes nothing in pybreaker touches only the window, without the
        lock: the window is a statistic, and a count lost to a thread race cannot open or
        close anything.
        """
        slow_s = self._slow_s
        slow = slow_s is not None and now - permit.started > slow_s
        if (
            self.current == CLOSED
            and not self._dirty
            and not slow
            and not permit.done
            and permit.generation == self.generation
        ):
            permit.done = True
            window = self._window
            if window.since <= now < window.until:  # ``window.add``, inlined
                window.calls[window.current] += 1
            else:
                window.add(now, failed=False)
            self.unsynced_success = True
        else:
            self._settle(permit, now, failed=slow, reason="")

    def _settle(self, permit: Permit, now: float, *, failed: bool, reason: str) -> None:
        if permit.done:
            return
        permit.done = True
        with self._lock:
            if permit.probe and permit.generation == self.generation:
                self._probes -= 1
            if permit.generation != self.generation:
                return  # a late result: the state moved on while it was in flight
            if failed:
                self.failures_total += 1
                self.unsynced_failures += 1
                self.unsynced_success = False
                self.last_failure = reason or "slow_call"
                self._record_failure(now)
            else:
                self._window.add(now, failed=False)
                self.unsynced_success = True
                if self.current == HALF_OPEN or self._dirty:
                    self._replay(_succeed)
                    self._dirty = False

    def late_failure(self, reason: str) -> None:
        """A call recorded as a success failed afterwards (its body broke): count it."""
        with self._lock:
            if self.current != CLOSED:
                return  # open already, or a probe's verdict: nothing to add
            self.failures_total += 1
            self.unsynced_failures += 1
            self.unsynced_success = False
            self.last_failure = reason
            self._record_failure(self._clock.monotonic())

    def _record_failure(self, now: float) -> None:
        if self.current == CLOSED:
            self._window.add(now, failed=True)
        self._dirty = True
        self._replay(_fail)
        if self.current == CLOSED:
            calls, fails = self._window.totals(now)
            s = self.settings
            if calls >= s.minimum_calls and fails >= s.failure_ratio * calls:
                self._cb.open()

    def _replay(self, func: Callable[[], None]) -> None:
        with contextlib.suppress(_ReplayedFailure, pybreaker.CircuitBreakerError):
            self._cb.call(func)

    # -- transitions ---------------------------------------------------------------------

    def force_open(self) -> None:
        """Open the breaker now (operators, tests, shared state)."""
        with self._lock:
            self._cb.open()

    def force_close(self) -> None:
        """Close the breaker now."""
        with self._lock:
            self._cb.close()

    def isolate(self) -> None:
        """Refuse every call until ``reset`` (an operator's decision; no event to publish)."""
        with self._lock:
            if self.isolated:
                return
            old, self.isolated = self.current, True
            self.generation += 1  # permits in flight count for nothing
            self.current = ISOLATED
            self._probes = 0
            for hook in self._hooks:
                hook(self.name, old, ISOLATED)

    def reset(self) -> None:
        """Closed, isolation lifted, every counter cleared (failures, window, reports)."""
        with self._lock:
            self.isolated = False
            self._adopting = True  # the others hear of a reset through its own shared key
            try:
                self._cb.close()  # pybreaker clears its counter; our listener moves ``current``
            finally:
                self._adopting = False
            self._dirty = False
            self._window.clear()
            self.failures_total = 0
            self.last_failure = None
            self.unsynced_failures = 0
            self.unsynced_success = False
            self.event = None

    def on_state_change(self, old: str, new: str) -> None:
        """Follow pybreaker's transitions (its listener calls this)."""
        # Runs inside pybreaker's call, under our lock: no locking here.
        self.generation += 1
        if self.isolated:  # forced underneath (force_open, say): isolation still holds
            return
        old, self.current = self.current, new  # ours: ``isolated`` when a reset lifts it
        self._probes = 0
        self._dirty = self._cb.fail_counter > 0
        if new == OPEN:
            self._opened_at = self._clock.monotonic()
        elif new == CLOSED:
            self._window.clear()
        if not self._adopting and new != HALF_OPEN:
            self.event = "open" if new == OPEN else "close"
            self.event_epoch = self.epoch
        for hook in self._hooks:
            hook(self.name, old, new)

    # -- shared state ----------------------------------------------------------------------

    def take_report(self) -> BreakerReport:
        """What happened here since the last report; the counters start again from zero."""
        with self._lock:
            self.reported_failures += self.unsynced_failures
            report = BreakerReport(
                failures=self.unsynced_failures,
                reported_failures=self.reported_failures,
                success=self.unsynced_success,
                event=self.event,
                event_epoch=self.event_epoch if self.event else self.epoch,
                # Isolation is shared through a key of its own; the episode goes on below it.
                state=self._cb.current_state if self.isolated else self.current,
                open_age_s=max(0.0, self._clock.monotonic() - self._opened_at),
                want_probes=min(
                    self.settings.half_open_max_calls,
                    self._probes + (1 if self._clock.monotonic() < self._demand_until else 0),
                ),
            )
            self.unsynced_failures = 0
            self.unsynced_success = False
            self.event = None
            return report

    def give_back(self, report: BreakerReport) -> None:
        """A report that could not be delivered: keep it for the next try (nothing is lost)."""
        with self._lock:
            self.unsynced_failures += report.failures
            self.reported_failures -= report.failures  # the next report carries them again
            self.unsynced_success = self.unsynced_success or report.success
            if self.event is None and report.event is not None:
                self.event, self.event_epoch = report.event, report.event_epoch

    def adopt(self, state: str, epoch: int, open_age_s: float, allowance: int) -> None:
        """Take the shared view: a newer episode wins; an open breaker never opens earlier.

        Redis has no half-open state: it is open until the reset timeout, and a local
        half-open breaker stays half-open while the shared episode is the same one.
        """
        with self._lock:
            self.probe_allowance = allowance
            if self.isolated:  # until a reset, which brings its own newer episode
                self.epoch = max(self.epoch, epoch)
                return
            if epoch < self.epoch or self.event is not None:
                return  # our news is not out yet: the next report carries it
            opened_at = self._clock.monotonic() - open_age_s
            self._adopting = True
            try:
                if state == OPEN and epoch > self.epoch:  # a trip, or a failed probe elsewhere
                    if self.current != OPEN:
                        self._cb.open()
                    self._opened_at = max(self._opened_at, opened_at)
                elif state == OPEN and self.current == OPEN:
                    self._opened_at = max(self._opened_at, opened_at)
                elif state == CLOSED and epoch > self.epoch and self.current != CLOSED:
                    self._cb.close()
            finally:
                self._adopting = False
            self.epoch = epoch


@dataclass(frozen=True, slots=True)
class BreakerReport:
    """One breaker's news for the other workers."""

    failures: int
    reported_failures: int
    """All failures reported so far, these included: how Redis tells a resent report."""
    success: bool
    event: str | None
    event_epoch: int
    state: str
    open_age_s: float
    want_probes: int
