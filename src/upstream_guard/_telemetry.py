"""OpenTelemetry, through the API only: spans and metrics that show every decision.

One INTERNAL span per logical call (``{upstream} {METHOD} {template}``) and one CLIENT span
per attempt (HTTP client semantic conventions), unless the official httpx/requests
instrumentation already makes the attempt spans. With no SDK installed nothing is built
(``Telemetry`` looks for one once a second).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ._classify import UNAVAILABLE_OUTCOMES

if TYPE_CHECKING:
    from ._guard import Guard
    from ._pipeline import CallRecord

_SCOPE = "upstream_guard"
_tracer = trace.get_tracer(_SCOPE)
_meter = metrics.get_meter(_SCOPE)
_STATE_VALUE = {"closed": 0, "half-open": 1, "open": 2, "isolated": 3}
# Query keys whose values are secrets (OAuth and signed-URL parameters).
_SECRET_KEYS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "code",
        "client_secret",
        "client_id",
        "token",
        "key",
        "api_key",
        "apikey",
        "password",
        "signature",
        "sig",
        "x-amz-signature",
        "x-goog-signature",
        "awsaccesskeyid",
    }
)
REDACTED = "REDACTED"

_guards: weakref.WeakSet[Guard] = weakref.WeakSet()


def tracing_on() -> bool:
    """Whether an SDK tracer provider is installed (spans are worth building)."""
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def metrics_on() -> bool:
    """Whether an SDK meter provider is installed (metrics are worth recording)."""
    provider = metrics.get_meter_provider()
    return not isinstance(provider, metrics.NoOpMeterProvider) and type(provider).__name__ != (
        "_ProxyMeterProvider"
    )


class Telemetry:
    """A guard's OpenTelemetry observer: spans while a call runs, metrics when it ends.

    Whether an SDK is installed is asked of the API at most once a second of the guard's
    clock: the API answers in ~1.7 us while no provider is set, a tenth of the guard's
    budget for a whole call. A provider set while the app runs is seen within a second; a
    new guard asks on its first call.
    """

    __slots__ = ("metrics", "tracing", "until")

    def __init__(self) -> None:
        """Nothing known yet: the first call asks."""
        self.until = 0.0
        """When to ask again, on the guard's clock (``refresh`` is due from then on)."""
        self.tracing = False
        """Whether spans are recorded (as last asked)."""
        self.metrics = False
        """Whether metrics are recorded (as last asked)."""

    def refresh(self, now: float) -> None:
        """Ask the API whether an SDK is installed; ask again a second after ``now``."""
        self.tracing, self.metrics = tracing_on(), metrics_on()
        self.until = now + 1.0


def redact_url(url: str) -> str:
    """The URL without credentials, and with secret query values replaced by REDACTED."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}:{REDACTED}@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, REDACTED if k.lower() in _SECRET_KEYS else v) for k, v in pairs], safe="/{}"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def official_instrumentation(library: str | None) -> bool:
    """Whether OpenTelemetry's own httpx or requests instrumentation is switched on."""
    if library not in ("httpx", "requests"):
        return False
    module = sys.modules.get(f"opentelemetry.instrumentation.{library}")
    if module is None:
        return False
    name = {"httpx": "HTTPXClientInstrumentor", "requests": "RequestsInstrumentor"}[library]
    instrumentor = getattr(module, name, None)
    return bool(instrumentor and instrumentor().is_instrumented_by_opentelemetry)


class CallSpan:
    """The logical span of one guarded call, current while its attempts run."""

    __slots__ = ("_attempt_spans", "_token", "record", "span")

    def __init__(
        self, record: CallRecord, host: str, port: int | None, *, attempt_spans: bool
    ) -> None:
        """Start the INTERNAL span as a child of the current span and make it current."""
        self.record = record
        attributes: dict[str, Any] = {
            "upstream_guard.upstream": record.upstream,
            "upstream_guard.endpoint": record.endpoint,
            "http.request.method": record.method,
            "url.template": record.endpoint,
            "server.address": host,
        }
        if port is not None:
            attributes["server.port"] = port
        self.span = _tracer.start_span(
            f"{record.upstream} {record.method} {record.endpoint}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
        )
        self._attempt_spans = attempt_spans
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def attempt(self, number: int, url: str, host: str, port: int | None) -> Span | None:
        """A CLIENT span for one attempt, unless the official instrumentation makes it."""
        if not self._attempt_spans:
            return None
        attributes: dict[str, Any] = {
            "http.request.method": self.record.method,
            "server.address": host,
            "url.full": redact_url(url),
            "url.template": self.record.endpoint,
            "upstream_guard.upstream": self.record.upstream,
        }
        if port is not None:
            attributes["server.port"] = port
        if number > 1:
            attributes["http.request.resend_count"] = number - 1
        return _tracer.start_span(
            f"{self.record.method} {self.record.endpoint}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )

    @staticmethod
    def attempt_done(span: Span | None, status: int | None, error: BaseException | None) -> None:
        """End an attempt span with its status code or error type."""
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        elif error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    def end(self) -> None:
        """Set what was decided, add the retry events, detach and end the span."""
        record, span = self.record, self.span
        otel_context.detach(self._token)
        span.set_attribute("upstream_guard.breaker.state", record.breaker_state)
        span.set_attribute("upstream_guard.outcome", str(record.outcome))
        span.set_attribute("upstream_guard.attempts", record.attempts)
        if record.pace_wait_s:
            span.set_attribute("upstream_guard.pace_wait_s", record.pace_wait_s)
        if record.status is not None:
            span.set_attribute("http.response.status_code", record.status)
        if record.coalesced:
            span.set_attribute("upstream_guard.coalesced", True)
        if record.hedges:
            span.set_attribute("upstream_guard.hedged", True)
            span.set_attribute("upstream_guard.hedge.sent", record.hedges)
            if record.hedge_winner is not None:
                span.set_attribute("upstream_guard.hedge.winner", record.hedge_winner)
            for number, ended in record.hedge_log or ():
                span.add_event(
                    "upstream_guard.hedge.attempt",
                    {"upstream_guard.attempt": number, "upstream_guard.attempt.outcome": ended},
                )
        for retry in record.retries or ():
            span.add_event(
                "upstream_guard.retry",
                {
                    "upstream_guard.retry.attempt": retry.attempt,
                    "upstream_guard.retry.reason": retry.reason,
                    "upstream_guard.retry.backoff_s": retry.delay_s,
                    "upstream_guard.retry.retry_after_honoured": retry.honoured_retry_after,
                    "upstream_guard.retry.budget_left": retry.budget_left,
                    "upstream_guard.retry.retried": retry.retried,
                },
            )
        if record.outcome in UNAVAILABLE_OUTCOMES:
            span.set_attribute("error.type", record.reason or record.outcome)
            span.set_status(Status(StatusCode.ERROR, record.reason))
        span.end()


def inject(span: Span, headers: Any) -> None:
    """Put the attempt span's context (traceparent) into the outgoing headers."""
    propagate.inject(headers, context=trace.set_span_in_context(span))


def annotate_inbound(upstreams: list[str], answered: str, *, stale: bool) -> None:
    """Tell the inbound request's span which upstreams it used and who answered it."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("upstream_guard.upstreams", upstreams)
        span.set_attribute("upstream_guard.answered_by", answered)
        span.set_attribute("upstream_guard.stale", stale)


def breaker_changed(name: str, old: str, new: str) -> None:
    """A breaker hook: an event on the span that caused the change (if one is recording)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(
            "upstream_guard.breaker.state_change",
            {"upstream_guard.breaker": name, "upstream_guard.from": old, "upstream_guard.to": new},
        )


# -- metrics ---------------------------------------------------------------------------------

_calls = _meter.create_counter(
    "upstream_guard.calls", unit="{call}", description="Guarded calls by outcome."
)
_retries = _meter.create_counter(
    "upstream_guard.retries", unit="{retry}", description="Retries sent."
)
_refused = _meter.create_counter(
    "upstream_guard.refused", unit="{call}", description="Calls refused without being sent."
)
_coalesced = _meter.create_counter(
    "upstream_guard.coalesced",
    unit="{call}",
    description="Calls answered by an identical call in flight: upstream calls saved.",
)
_hedges = _meter.create_counter(
    "upstream_guard.hedges", unit="{attempt}", description="Hedges sent (extra attempts)."
)
_hedges_won = _meter.create_counter(
    "upstream_guard.hedges.won", unit="{attempt}", description="Hedges whose answer was used."
)
_duration = _meter.create_histogram(
    "upstream_guard.call.duration", unit="s", description="Duration of guarded calls."
)


def record_metrics(record: CallRecord) -> None:
    """Count one finished call (a Guard hook)."""
    base = {"upstream_guard.upstream": record.upstream, "upstream_guard.endpoint": record.endpoint}
    outcome = str(record.outcome)
    _calls.add(1, {**base, "upstream_guard.outcome": outcome})
    _duration.record(record.duration_s, {**base, "upstream_guard.outcome": outcome})
    if record.outcome == "refused":
        _refused.add(1, {**base, "upstream_guard.reason": record.reason})
    sent = sum(1 for r in record.retries or () if r.retried)
    if sent:
        _retries.add(sent, base)
    if record.coalesced and record.reason != "deadline":  # answered by an identical call
        _coalesced.add(1, base)
    if record.hedges:
        _hedges.add(record.hedges, base)
        if record.hedges_won:
            _hedges_won.add(record.hedges_won, base)


def _worst(values: dict[tuple[str, str], float]) -> Iterable[Observation]:
    for (upstream, breaker), value in values.items():
        attributes = {"upstream_guard.upstream": upstream}
        if breaker:
            attributes["upstream_guard.breaker"] = breaker
        yield Observation(value, attributes)


def _observe_states(options: CallbackOptions) -> Iterable[Observation]:  # noqa: ARG001
    # Several guards in one process (tests, several apps) report the worst state per breaker.
    worst: dict[tuple[str, str], float] = {}
    for guard in list(_guards):
        for rt in guard.upstreams.values():
            for name, breaker in rt.breakers.items():
                key = (rt.name, name)
                worst[key] = max(worst.get(key, 0), _STATE_VALUE[breaker.state])
    return _worst(worst)


def _observe_cooldowns(options: CallbackOptions) -> Iterable[Observation]:  # noqa: ARG001
    longest: dict[tuple[str, str], float] = {}
    for guard in list(_guards):
        now = guard.clock.monotonic()
        for rt in guard.upstreams.values():
            key = (rt.name, "")
            longest[key] = max(longest.get(key, 0.0), rt.cooldown.remaining(now))
    return _worst(longest)


def _observe_paces(options: CallbackOptions) -> Iterable[Observation]:  # noqa: ARG001
    # Several guards in one process: the lowest pace in force per upstream.
    lowest: dict[str, float] = {}
    for guard in list(_guards):
        now = guard.clock.monotonic()
        for rt in guard.upstreams.values():
            rate, _ = rt.pace.rate(now)
            if rate is not None:
                lowest[rt.name] = min(lowest.get(rt.name, rate), rate)
    return [Observation(rate, {"upstream_guard.upstream": name}) for name, rate in lowest.items()]


_meter.create_observable_gauge(
    "upstream_guard.pace",
    callbacks=[_observe_paces],
    unit="{call}/s",
    description="The pace in force per upstream (calls per second, fleet-wide); absent: none.",
)
_meter.create_observable_gauge(
    "upstream_guard.breaker.state",
    callbacks=[_observe_states],
    description="Breaker state: 0 closed, 1 half-open, 2 open, 3 isolated.",
)
_meter.create_observable_gauge(
    "upstream_guard.cooldown",
    callbacks=[_observe_cooldowns],
    unit="s",
    description="Seconds left of the 429 cooldown.",
)


def register(guard: Guard) -> None:
    """Observe ``guard``'s breakers and cooldowns, and mark its state changes on spans."""
    _guards.add(guard)
    guard.state_hooks.append(breaker_changed)
