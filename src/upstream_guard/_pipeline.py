"""The decision core of one guarded call, written once for every driver.

``guarded_call`` is a generator that performs no I/O: it yields ``Attempt`` (send the
request once, with this timeout) and ``Wait`` (sleep this long), receives each attempt's
``AttemptResult``, and finishes by returning (deliver the last response) or raising an
``UpstreamUnavailable``. ``run_in_thread`` and ``run_in_task`` execute it for the sync and
async drivers. Closing the generator mid-call (cancellation) releases the breaker permit and
bulkhead place without recording anything.

Most calls meet a closed breaker and get a healthy answer. The runners send that first
attempt on a fast path (``_fast_start``, ``_fast_done``) with the same bookkeeping, and only
build the generator, handing it the first attempt's result, when something is off.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

from ._breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Permit, StateHook
from ._bulkhead import Bulkhead
from ._cache import StaleCache
from ._classify import Outcome, classify_status, parse_retry_after
from ._clock import Clock
from ._cooldown import CooldownGate
from ._endpoints import TemplateMatcher
from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    RateLimitedError,
    RetriesExhaustedError,
    UpstreamUnavailable,
)
from ._retry import RetryBudget, decide_retry
from ._settings import UpstreamSettings


@dataclass(slots=True)
class Attempt:
    """Send the request once; the transport's own timeouts are capped at ``timeout_s``."""

    number: int
    timeout_s: float


@dataclass(slots=True)
class Wait:
    """Sleep before going on."""

    seconds: float


@dataclass(slots=True)
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


@dataclass(slots=True)
class RetryEvent:
    """One retry the guard decided on (or declined), for telemetry."""

    attempt: int
    reason: str
    delay_s: float
    honoured_retry_after: bool
    budget_left: float
    retried: bool


@dataclass(slots=True)
class CallRecord:
    """Everything decided during one logical call; filled in by ``guarded_call``."""

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
    span: Any = None
    """The call's telemetry (``_telemetry.CallSpan``) when an OpenTelemetry SDK is installed."""


Hook = Callable[[CallRecord], None]


class UpstreamRuntime:
    """The live state of one upstream: breakers, cooldown, retry budget, bulkhead."""

    def __init__(
        self,
        name: str,
        settings: UpstreamSettings,
        clock: Clock,
        state_hooks: list[StateHook],
    ) -> None:
        """Build from settings; breakers are made on first use (one, or one per endpoint)."""
        self.name = name
        self.settings = settings
        self.clock = clock
        self.matcher = TemplateMatcher(settings.templates)
        self.cooldown = CooldownGate()
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
        # The fast path's first attempt (attempts are never changed): one object for all.
        self.first_attempt = Attempt(1, min(self.total_s, self.attempt_s))
        self._state_hooks = state_hooks
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
            breaker = self.breakers.setdefault(
                key, Breaker(key, self.settings.breaker, self.clock, self._state_hooks)
            )
        return breaker

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


def _admission(
    rt: UpstreamRuntime, record: CallRecord, breaker: Breaker, total: float
) -> Generator[Wait, AttemptResult | None, None]:
    """Before the first attempt: wait out a short cooldown, take a bulkhead place."""
    if breaker.current != CLOSED:  # closed is the record's default
        record.breaker_state = breaker.state
    s = rt.settings
    start = record.started
    if rt.cooldown.until > start:
        left = rt.cooldown.until - start
        if left > s.retry.max_retry_after_s or left >= total:
            record.outcome, record.reason = "refused", "cooldown"
            raise RateLimitedError(
                f"{rt.name} is cooling down after a 429 for {left:.1f}s more",
                upstream=rt.name,
                reason="cooldown",
                retry_after_s=left,
            )
        yield Wait(left)

    if rt.bulkhead is not None and not rt.bulkhead.try_acquire():
        record.outcome, record.reason = "refused", "bulkhead_full"
        raise BulkheadFullError(
            f"{rt.name} already has {s.max_concurrency} calls in flight",
            upstream=rt.name,
            reason="bulkhead_full",
            retry_after_s=None,
        )
    rt.budget.deposit()


def _refusal(rt: UpstreamRuntime, record: CallRecord, breaker: Breaker) -> CircuitOpenError:
    wait = breaker.retry_after_s()
    state = OPEN if wait > 0 else HALF_OPEN  # refused: one or the other
    if not record.attempts:
        record.outcome, record.reason = "refused", "circuit_open"
        record.breaker_state = state
    return CircuitOpenError(
        f"{breaker.name} breaker is {state}; not calling it",
        upstream=rt.name,
        reason="circuit_open",
        # Half-open with every probe slot taken: worth asking again soon.
        retry_after_s=wait or 1.0,
    )


def guarded_call(  # noqa: C901, PLR0912, PLR0915 - the pipeline reads best in one place
    rt: UpstreamRuntime,
    record: CallRecord,
    *,
    retryable_body: bool,
    deadline_s: float | None,
    rng: random.Random,
    first: tuple[Permit, AttemptResult] | None = None,
) -> Generator[Attempt | Wait, AttemptResult | None, None]:
    """Run one logical call (see the module docstring for the protocol).

    ``first``: the fast path already admitted and sent the first attempt (``_fast_start``);
    the call goes on from its result.
    """
    s = rt.settings
    clock = rt.clock
    start = record.started
    total = rt.total_s if deadline_s is None else min(rt.total_s, deadline_s)
    deadline = start + total
    breaker = rt.breaker_for(record.endpoint)
    if first is None:
        yield from _admission(rt, record, breaker, total)
    previous_reason = ""
    last_status: int | None = None
    try:
        while True:
            if first is not None:
                permit, result = first
                first = None
            else:
                permit_or_none = breaker.admit()
                if permit_or_none is None:
                    if last_status is not None:  # opened by this call's own failures
                        return  # hand back the last response
                    raise _refusal(rt, record, breaker)
                permit = permit_or_none
                record.attempts += 1
                try:
                    left = deadline - permit.started
                    sent = yield Attempt(record.attempts, min(left, rt.attempt_s))
                except BaseException:  # cancelled: free a probe slot, record nothing
                    breaker.release(permit)
                    raise
                assert sent is not None  # noqa: S101 - the drivers always send a result
                result = sent
            try:
                status = result.status
                if status is not None and status < 400:  # the common case, inline
                    outcome, reason = Outcome.SUCCESS, "ok"
                else:
                    outcome, reason = classify_result(result)
                breaker.record(permit, outcome, reason)
            except BaseException:  # whatever happens, a probe slot is never kept
                breaker.release(permit)
                raise
            record.status = last_status = result.status
            record.outcome, record.reason = outcome, reason
            retry_after = None
            if outcome is Outcome.THROTTLED:
                retry_after = parse_retry_after(result.retry_after, clock.wall())
                cool = retry_after if retry_after is not None else s.retry.throttle_cooldown_s
                rt.cooldown.throttle(clock.monotonic(), cool)
            if outcome is Outcome.SUCCESS or outcome is Outcome.CLIENT_ERROR:
                return
            now = clock.monotonic()
            decision = decide_retry(
                settings=s.retry,
                # A body that cannot be sent twice makes the call unretryable, like a POST.
                method=record.method if retryable_body else "",
                attempt=record.attempts,
                outcome=outcome,
                reason=reason,
                status=result.status,
                retry_after_s=retry_after,
                repeated_reason=reason == previous_reason,
                remaining_s=deadline - now,
                budget=rt.budget,
                now=now,
                rng=rng,
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
                    return  # the last response goes back, so client libraries handle it
                raise RetriesExhaustedError(
                    f"{rt.name} {record.method} {record.endpoint} failed after "
                    f"{record.attempts} attempt(s): {reason} ({decision.reason})",
                    upstream=rt.name,
                    reason=reason,
                    retry_after_s=rt.retry_after_s() or None,
                ) from result.error
            previous_reason = reason
            yield Wait(decision.delay_s)
            left = rt.cooldown.remaining(clock.monotonic())
            if left > 0 and outcome is not Outcome.THROTTLED:
                # Another call was throttled meanwhile: don't dig deeper.
                if last_status is not None:
                    return
                raise RateLimitedError(
                    f"{rt.name} is cooling down after a 429 for {left:.1f}s more",
                    upstream=rt.name,
                    reason="cooldown",
                    retry_after_s=left,
                ) from result.error
    except GeneratorExit:
        record.outcome, record.reason = "cancelled", "cancelled"
        raise
    finally:
        record.duration_s = clock.monotonic() - start
        if rt.bulkhead is not None:
            rt.bulkhead.release()


def _fast_start(
    rt: UpstreamRuntime, record: CallRecord, deadline_s: float | None
) -> tuple[Permit, Attempt] | None:
    """The first attempt, when nothing stands in its way; None leaves it to ``guarded_call``.

    Nothing in the way: a closed breaker (which admits every call), no cooldown, no
    bulkhead. Does the bookkeeping of ``_admission`` (the retry budget's deposit). An open
    breaker before its reset timeout refuses here, as ``guarded_call`` would.
    """
    if rt.bulkhead is not None or rt.cooldown.until > record.started:
        return None
    breaker = rt.breaker or rt.breaker_for(record.endpoint)
    generation = breaker.generation  # before the state: a transition in between makes it stale
    if breaker.current != CLOSED:
        if breaker.current == OPEN and breaker.retry_after_s() > 0:
            rt.budget.deposit()  # as _admission does before the refusal
            record.duration_s = rt.clock.monotonic() - record.started
            raise _refusal(rt, record, breaker)
        return None
    rt.budget.deposit()
    record.attempts = 1
    opening = rt.first_attempt
    if deadline_s is not None and deadline_s < opening.timeout_s:
        opening = Attempt(1, deadline_s)
    return Permit(breaker, generation, False, record.started), opening


def _fast_done(rt: UpstreamRuntime, record: CallRecord, permit: Permit, status: int | None) -> bool:
    """Record the fast path's attempt and end the call, if it was a healthy answer."""
    if status is None or status >= 400:
        return False  # guarded_call classifies it and decides what follows
    now = rt.clock.monotonic()
    permit.breaker.record_success(permit, now)
    record.status = status
    record.outcome = Outcome.SUCCESS
    record.reason = "ok"
    record.duration_s = now - record.started
    return True


def _abandoned(rt: UpstreamRuntime, record: CallRecord, permit: Permit) -> None:
    """The fast path's attempt did not finish (cancelled, or a bug below): record nothing."""
    permit.breaker.release(permit)
    record.outcome, record.reason = "cancelled", "cancelled"
    record.duration_s = rt.clock.monotonic() - record.started


def run_in_thread(
    rt: UpstreamRuntime,
    record: CallRecord,
    attempt: Callable[[Attempt], tuple[Any, AttemptResult]],
    *,
    retryable_body: bool,
    deadline_s: float | None,
    rng: random.Random,
) -> Any:
    """Run one call in this thread: the sync loop of httpx and requests.

    ``attempt`` sends once; returns the response to hand back, or raises the call's
    ``UpstreamUnavailable``. Responses that a retry replaces are closed.
    """
    first = None
    response: Any = None
    fast = _fast_start(rt, record, deadline_s)
    if fast is not None:
        permit, opening = fast
        try:
            response, result = attempt(opening)
        except BaseException:
            _abandoned(rt, record, permit)
            raise
        if _fast_done(rt, record, permit, result.status):
            return response
        first = (permit, result)
    call = guarded_call(
        rt, record, retryable_body=retryable_body, deadline_s=deadline_s, rng=rng, first=first
    )
    try:
        action = next(call)
        while True:
            if type(action) is Wait:
                rt.clock.sleep_sync(action.seconds)
                # The call may end here too (its own failures opened the breaker meanwhile).
                action = call.send(None)
                continue
            assert isinstance(action, Attempt)  # noqa: S101 - narrowed for the type checker
            if response is not None:
                response.close()
            response, result = attempt(action)
            action = call.send(result)
    except StopIteration:
        return response
    finally:
        call.close()


async def run_in_task(
    rt: UpstreamRuntime,
    record: CallRecord,
    attempt: Callable[[Attempt], Awaitable[tuple[Any, AttemptResult]]],
    *,
    retryable_body: bool,
    deadline_s: float | None,
    rng: random.Random,
) -> Any:
    """``run_in_thread``'s twin for async code: waits and attempts are awaited."""
    first = None
    response: Any = None
    fast = _fast_start(rt, record, deadline_s)
    if fast is not None:
        permit, opening = fast
        try:
            response, result = await attempt(opening)
        except BaseException:
            _abandoned(rt, record, permit)
            raise
        if _fast_done(rt, record, permit, result.status):
            return response
        first = (permit, result)
    call = guarded_call(
        rt, record, retryable_body=retryable_body, deadline_s=deadline_s, rng=rng, first=first
    )
    try:
        action = next(call)
        while True:
            if type(action) is Wait:
                await rt.clock.sleep(action.seconds)
                action = call.send(None)
                continue
            assert isinstance(action, Attempt)  # noqa: S101 - narrowed for the type checker
            if response is not None:
                await response.aclose()
            response, result = await attempt(action)
            action = call.send(result)
    except StopIteration:
        return response
    finally:
        call.close()


__all__ = [
    "Attempt",
    "AttemptResult",
    "CallRecord",
    "Hook",
    "UpstreamRuntime",
    "UpstreamUnavailable",
    "Wait",
    "guarded_call",
    "run_in_task",
    "run_in_thread",
]
