"""The decisions of one guarded call, step by step, written once for every client.

``GuardedCall`` performs no I/O. ``begin()`` says what to do first, ``after(result)`` what to
do after an attempt, ``after_wait()`` what to do after a wait: send an ``Attempt`` (once,
with this timeout), ``Wait`` (sleep this long), or ``None``: deliver the last response. A
refusal or the end of the call raises an ``UpstreamUnavailable``. The runners in ``_call``
execute these steps for sync and async clients.

Most calls meet a closed breaker and get a healthy answer: ``begin`` admits them at once and
``after`` records the success without classifying anything else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, final

from ._breaker import CLOSED, HALF_OPEN, ISOLATED, OPEN, Breaker, Permit, StateHook
from ._bulkhead import Bulkhead
from ._cache import StaleCache
from ._classify import Outcome, classify_status, parse_retry_after
from ._clock import Clock
from ._coalesce import Flights
from ._cooldown import CooldownGate
from ._endpoints import TemplateMatcher
from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    RateLimitedError,
    RetriesExhaustedError,
    UpstreamUnavailable,
)
from ._pace import Pace
from ._retry import RetryBudget, decide_retry
from ._settings import UpstreamSettings


@dataclass(frozen=True, slots=True)
class Attempt:
    """Send the request once; the transport's own timeouts are capped at ``timeout_s``."""

    number: int
    timeout_s: float


@final  # the runners tell it by ``type(step) is Wait``
@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep before going on.

    With ``reserve_within_s`` the call first takes its slot from the shared pace (one Redis
    round trip) and hands the answer to ``GuardedCall.reserved``, whose wait replaces this.
    """

    seconds: float
    reserve_within_s: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt produced: a response, or a transport error.

    A response brings its status, Retry-After and (for failures) body; an error its
    ``error_kind``: ``timeout``, ``connect_error`` or ``network_error``.
    """

    status: int | None = None
    retry_after: str | None = None
    body: bytes = b""
    error_kind: str | None = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """One retry the guard decided on (or declined), for telemetry."""

    attempt: int
    reason: str
    delay_s: float
    honoured_retry_after: bool
    budget_left: float
    retried: bool


class CallRecord:
    """What one logical call did: the record telemetry, events and the request context read.

    Defaults live on the class: a healthy call sets only what differs (the hot path).
    ``GuardedCall`` is the record of the call it decides.
    """

    upstream: str
    endpoint: str
    method: str
    started: float
    breaker_state: str = CLOSED
    attempts: int = 0
    outcome: str = "cancelled"
    reason: str = ""
    status: int | None = None
    retries: list[RetryEvent] | None = None
    duration_s: float = 0.0
    pace_wait_s: float = 0.0
    """Time the call waited for its slot of the upstream's pace."""
    span: Any = None
    """The call's telemetry (``_telemetry.CallSpan``) when an OpenTelemetry SDK is installed."""
    coalesced: bool = False
    """The call shared an identical call's answer instead of making its own."""
    hedges: int = 0
    """Hedges sent (extra attempts in parallel with a slow one)."""
    hedges_won: int = 0
    """Hedges whose answer was delivered (0 or 1 per call)."""
    hedge_winner: int | None = None
    """The attempt whose answer a hedged call delivered."""
    hedge_log: list[tuple[int, str]] | None = None
    """Each attempt of a hedged call and how it ended: ``won``, ``cancelled``, ``failure``."""

    @property
    def hedged(self) -> bool:
        """Whether a hedge was sent."""
        return self.hedges > 0


class UpstreamRuntime:
    """The live state of one upstream: breakers, cooldown, retry budget, bulkhead."""

    def __init__(
        self,
        name: str,
        settings: UpstreamSettings,
        clock: Clock,
        state_hooks: list[StateHook],
        rng: random.Random,
    ) -> None:
        """Build from settings; breakers are made on first use (one, or one per endpoint)."""
        self.name = name
        self.settings = settings
        self.clock = clock
        self.monotonic = clock.monotonic
        """The clock's reading, for the hot path: ``read = rt.monotonic; read()`` is two
        specialized steps on CPython 3.11, where ``rt.clock.monotonic()`` is a generic lookup."""
        self.rng = rng
        """Jitter for backoffs (the guard's: tests seed it)."""
        self.matcher = TemplateMatcher(settings.templates)
        self.cooldown = CooldownGate()
        self.pace = Pace(name, settings.pace, clock)
        self.budget = RetryBudget(
            settings.retry.budget_ratio, settings.retry.budget_min_per_s, clock.monotonic()
        )
        fb = settings.fallback
        self.stale = (
            StaleCache(
                max_entries=fb.cache_max_entries,
                max_bytes=fb.cache_max_bytes,
                max_age_s=fb.stale_max_age_s,
                clock=clock,
            )
            if fb.stale_if_error
            else None
        )
        self.bulkhead = (
            Bulkhead(settings.max_concurrency) if settings.max_concurrency is not None else None
        )
        # Read on every call: kept here instead of walking the settings models each time.
        self.replay_methods = settings.retry.methods if settings.retry.attempts > 1 else frozenset()
        self.total_s = settings.timeout.total_s
        self.attempt_s = settings.timeout.attempt_s
        # The usual first attempt (immutable): one object for all calls.
        self.first_attempt = Attempt(1, min(self.total_s, self.attempt_s))
        co = settings.coalesce
        self.flights = Flights(co) if co.gets or co.token_requests else None
        """Calls in flight, for coalescing identical ones (None: coalescing is off)."""
        self.share_limit = co.max_body_bytes
        self.hedge_after_s = settings.hedge.after_s
        """When a slow GET gets a hedge (None: never)."""
        self._state_hooks = state_hooks
        self.isolated = False
        """Set by ``isolate`` (an operator): every breaker, even one made later, refuses."""
        self.reset_seen = -1
        """The last fleet-wide reset (shared state) this worker applied; -1: never synced."""
        self.reset_requested = False
        """A ``reset`` made here that shared state has yet to tell the others."""
        self.breakers: dict[str, Breaker] = {}
        self.breaker: Breaker | None = None
        """The upstream's one breaker (None with ``scope = endpoint``)."""
        if settings.breaker.scope == "upstream":
            self.breaker = self.breakers[name] = Breaker(name, settings.breaker, clock, state_hooks)

    def breaker_for(self, endpoint: str) -> Breaker:
        """The breaker that guards this endpoint (templates keep their number bounded)."""
        if self.breaker is not None:
            return self.breaker
        key = f"{self.name} {endpoint}"
        breaker = self.breakers.get(key)
        if breaker is None:
            made = Breaker(key, self.settings.breaker, self.clock, self._state_hooks)
            if self.isolated:
                made.isolate()
            breaker = self.breakers.setdefault(key, made)
        return breaker

    def isolate(self) -> None:
        """Refuse every call to this upstream until ``reset`` (its breakers say ``isolated``)."""
        self.isolated = True
        for breaker in list(self.breakers.values()):
            breaker.isolate()

    def reset(self) -> None:
        """Back to closed: isolation lifted, every breaker's counters cleared.

        The 429 cooldown stays: it is what the upstream asked for, not the guard's opinion.
        """
        self.isolated = False
        for breaker in list(self.breakers.values()):
            breaker.reset()

    def retry_after_s(self) -> float:
        """How long until this upstream may be called again (breakers and cooldown)."""
        now = self.clock.monotonic()
        waits = [b.retry_after_s() for b in self.breakers.values()]
        return max([self.cooldown.remaining(now), *waits])


def classify_result(result: AttemptResult) -> tuple[Outcome, str]:
    """Outcome and reason of one attempt."""
    status = result.status
    if status is None:
        return Outcome.FAILURE, result.error_kind or "network_error"
    if status < 400:
        return Outcome.SUCCESS, "ok"
    return classify_status(status, result.body)


# Healthy answers share their results (frozen): no allocation on the hot path.
HEALTHY = {status: AttemptResult(status=status) for status in range(100, 400)}


_SUCCESS = Outcome.SUCCESS


def _paced(rt: UpstreamRuntime, wait: float) -> RateLimitedError:
    rate, source = rt.pace.rate(rt.clock.monotonic())
    pace = "" if rate is None else f" at {rate:.2f} calls/s ({source})"
    return RateLimitedError(
        f"{rt.name} is paced{pace}; the next slot is {wait:.2f}s away, more than this call "
        "may wait (pace.max_wait_s and its deadline)",
        upstream=rt.name,
        reason="paced",
        retry_after_s=wait,
    )


def _cooling(rt: UpstreamRuntime, left: float) -> RateLimitedError:
    return RateLimitedError(
        f"{rt.name} is cooling down after a 429 for {left:.1f}s more",
        upstream=rt.name,
        reason="cooldown",
        retry_after_s=left,
    )


class GuardedCall(CallRecord):
    """The decisions of one logical call, and its record (see the module docstring).

    The call that owns it (``_call.Exchange``, a subclass, built once per call on the hot
    path) sets, besides the record's fields: ``rt``, the upstream's runtime; ``deadline``,
    when the call must end on the guard's clock; ``breaker``, the one for its endpoint.
    """

    rt: UpstreamRuntime
    deadline: float
    """The earlier of the inbound request's deadline and ``timeout.total_s``."""
    breaker: Breaker

    permit: Permit | None = None
    """The breaker permit of the attempt in flight, if one is."""
    _placed = False
    """Whether the call holds a bulkhead place."""
    _slotted = False
    """Whether the call has had its turn at the pace (a slot, or none was needed)."""
    _retryable = True
    _previous_reason = ""
    _last: AttemptResult | None = None
    """The last attempt's result, once one came back."""

    # -- the steps ---------------------------------------------------------------------------

    def begin(self, now: float | None = None) -> Attempt | Wait:  # noqa: C901, PLR0912 - in order
        """The first step: wait out a short 429 cooldown and the pace, take a place, admit.

        ``now``: the time, when it is no longer the call's start (after a wait).
        """
        rt = self.rt
        if now is None:
            now = self.started
        pace = rt.pace
        # A breaker that refuses does so before any wait: a refused call neither waits out a
        # cooldown nor takes a pace slot that a call it lets through would need.
        if (rt.cooldown.until > now or pace.active) and self.breaker.refuses(now):
            raise self._refusal()
        if rt.cooldown.until > now:
            now = rt.clock.monotonic()
            left = rt.cooldown.until - now
            if left > 0:
                if left > rt.settings.retry.max_retry_after_s or now + left >= self.deadline:
                    raise self._refused(_cooling(rt, left))
                # A slot taken before the 429 is stale: take a new one after the cooldown,
                # or every call held by it would go at once when it ends.
                self._slotted = False
                return Wait(left)
        if pace.active:
            wait = self._pace(now)
            if wait is not None:
                return wait
        if now >= self.deadline:  # the inbound request's time is spent: not worth a call
            message = f"{rt.name} {self.method} {self.endpoint}: the request's deadline has passed"
            raise self._refused(RetriesExhaustedError(message, upstream=rt.name, reason="deadline"))
        if rt.bulkhead is not None:
            if not rt.bulkhead.try_acquire():
                message = f"{rt.name} already has {rt.settings.max_concurrency} calls in flight"
                error = BulkheadFullError(message, upstream=rt.name, reason="bulkhead_full")
                raise self._refused(error)
            self._placed = True
        rt.budget.calls += 1  # it earns a share of a retry
        permit = self.breaker.admit(now)
        if permit is None:
            raise self._refusal()  # which records the breaker's state
        if now >= pace.next_mark:  # the meter of attempts sent (inline: every call)
            pace.mark(now)
        pace.sent += 1
        if permit.probe:  # closed, the record's default, otherwise
            self.breaker_state = HALF_OPEN
        self.permit = permit
        self.attempts = 1
        first = rt.first_attempt
        left = self.deadline - now
        return first if left >= first.timeout_s else Attempt(1, left)

    def after(self, result: AttemptResult) -> Attempt | Wait | None:
        """What follows an attempt: another after a wait, or the end (``None``: deliver it)."""
        permit: Permit = self.permit  # type: ignore[assignment]
        self.permit = None
        status = result.status
        if status is not None and status < 400:  # the hot path: a healthy answer
            read = self.rt.monotonic
            now = read()
            permit.breaker.record_success(permit, now)
            self.status = status
            self.outcome = _SUCCESS
            self.reason = "ok"
            self.duration_s = now - self.started  # delivered now: ``finish`` need not ask again
            return None
        try:
            outcome, reason = classify_result(result)
            permit.breaker.record(permit, outcome, reason)
        except BaseException:  # whatever happens, a probe slot is never kept
            permit.breaker.release(permit)
            raise
        self._last = result
        self.status = status
        self.outcome, self.reason = outcome, reason
        if outcome is Outcome.SUCCESS or outcome is Outcome.CLIENT_ERROR:
            return None
        return self._retry(result, outcome, reason)

    def after_wait(self) -> Attempt | Wait | None:
        """After a wait: the cooldown's end lets the call in; a backoff's may be cut short."""
        if not self.attempts:  # the cooldown or the pace waited for: go on from the start
            return self.begin(self.rt.clock.monotonic())
        last = self._last
        assert last is not None  # noqa: S101 - a backoff follows a result
        left = self.rt.cooldown.remaining(self.rt.clock.monotonic())
        if left > 0 and last.status != 429:
            # Another call was throttled meanwhile: don't dig deeper.
            if last.status is not None:
                return None
            raise _cooling(self.rt, left) from last.error
        return self._admit()

    def abandon(self, exc: BaseException, *, mistake: bool) -> None:
        """The call raised ``exc``, none of the upstream's answers: it counts for nothing.

        ``mistake``: the caller's own (an unsupported scheme, an invalid argument), recorded
        as ``client_error``. A cancellation (a ``BaseException`` that is not an
        ``Exception``) is ``cancelled``; any other error, ``failure`` under its class's name.
        """
        if mistake:
            self.outcome, self.reason = Outcome.CLIENT_ERROR, "invalid_request"
        elif isinstance(exc, Exception):
            self.outcome, self.reason = Outcome.FAILURE, type(exc).__name__
        else:
            self.outcome, self.reason = Outcome.CANCELLED, "cancelled"

    def reserved(self, granted: bool, wait: float) -> Wait:
        """The shared pace's answer: wait for the slot, or be refused (``paced``)."""
        if not granted:
            raise self._refused(_paced(self.rt, wait))
        self.pace_wait_s = wait
        return Wait(wait)

    # -- inside the steps ----------------------------------------------------------------------

    def _pace(self, now: float) -> Wait | None:
        """Take a slot: ``None`` to go now, a ``Wait`` for it, or refuse (``paced``)."""
        pace = self.rt.pace
        if self._slotted:
            return None
        self._slotted = True
        limit = min(pace.max_wait_s, self.deadline - now)
        if pace.shared is not None and pace.shared.ok:
            return Wait(0.0, reserve_within_s=limit)  # the runner asks Redis
        granted, wait = pace.take(now, limit)
        if granted and wait <= 0:
            return None
        return self.reserved(granted, wait)

    def _refused(self, error: UpstreamUnavailable) -> UpstreamUnavailable:
        """Record that the call was refused before reaching the upstream; return the error."""
        self.outcome, self.reason = "refused", error.reason
        self.breaker_state = self.breaker.state
        return error

    def _admit(self) -> Attempt | None:
        """Ask the breaker for a retry; ``None`` hands the last response back."""
        permit = self.breaker.admit()
        if permit is None:
            if self._last is not None and self._last.status is not None:
                return None  # opened by this call's own failures: hand back the last response
            raise self._refusal()
        self.permit = permit
        self.attempts += 1
        self.rt.pace.sent += 1
        return Attempt(self.attempts, min(self.deadline - permit.started, self.rt.attempt_s))

    def _refusal(self) -> CircuitOpenError:
        breaker, record = self.breaker, self
        if breaker.current == ISOLATED:
            if not record.attempts:
                record.outcome, record.reason = "refused", "isolated"
                record.breaker_state = ISOLATED
            return CircuitOpenError(
                f"{self.rt.name} is isolated by an operator; not calling it until it is reset",
                upstream=self.rt.name,
                reason="isolated",
            )
        wait = breaker.retry_after_s()
        state = OPEN if wait > 0 else HALF_OPEN  # refused: one or the other
        if not record.attempts:
            record.outcome, record.reason = "refused", "circuit_open"
            record.breaker_state = state
        return CircuitOpenError(
            f"{breaker.name} breaker is {state}; not calling it",
            upstream=self.rt.name,
            reason="circuit_open",
            # Half-open with every probe slot taken: worth asking again soon.
            retry_after_s=wait or 1.0,
        )

    def _retry(self, result: AttemptResult, outcome: Outcome, reason: str) -> Wait | None:
        rt, record = self.rt, self
        clock = rt.clock
        retry_after = None
        if outcome is Outcome.THROTTLED:
            retry_after = parse_retry_after(result.retry_after, clock.wall())
            cool = retry_after if retry_after is not None else rt.settings.retry.throttle_cooldown_s
            rt.cooldown.throttle(clock.monotonic(), cool)
            rt.pace.throttled(clock.monotonic(), record.started, cool)
        now = clock.monotonic()
        decision = decide_retry(
            settings=rt.settings.retry,
            # A body that cannot be sent twice makes the call unretryable, like a POST.
            method=record.method if self._retryable else "",
            attempt=record.attempts,
            outcome=outcome,
            reason=reason,
            status=result.status,
            retry_after_s=retry_after,
            repeated_reason=reason == self._previous_reason,
            remaining_s=self.deadline - now,
            budget=rt.budget,
            now=now,
            rng=rt.rng,
        )
        if record.retries is None:
            record.retries = []
        record.retries.append(
            RetryEvent(
                attempt=record.attempts,
                reason=decision.reason,
                delay_s=decision.delay_s,
                honoured_retry_after=decision.honoured_retry_after,
                budget_left=rt.budget.tokens,
                retried=decision.retry,
            )
        )
        if not decision.retry:
            if result.status is not None:
                return None  # the last response goes back, so client libraries handle it
            raise RetriesExhaustedError(
                f"{rt.name} {record.method} {record.endpoint} failed after "
                f"{record.attempts} attempt(s): {reason} ({decision.reason})",
                upstream=rt.name,
                reason=reason,
                retry_after_s=rt.retry_after_s() or None,
            ) from result.error
        self._previous_reason = reason
        return Wait(decision.delay_s)
