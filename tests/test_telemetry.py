"""OpenTelemetry spans and metrics, read back through the SDK's in-memory exporter and reader."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.testclient import TestClient

from conftest import make_settings
from otel_sdk import install_sdk
from upstream_guard import CircuitOpenError, Guard, install
from upstream_guard._telemetry import redact_url
from upstream_guard.testing import Fault

SECRET = "S3CR3T-t0ken"  # noqa: S105 - the secret that must never leak
TRACK = "3n3Ppam7vgaVa1iaRUc9Lp"


@pytest.fixture
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    """The SDK, installed once for the process, with no spans recorded yet."""
    exporter, reader = install_sdk()
    yield exporter, reader
    exporter.clear()


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    """Spans of one kind; for INTERNAL, only the guard's logical spans."""
    return [
        s
        for s in spans
        if s.kind is kind
        and (kind is not SpanKind.INTERNAL or "upstream_guard.upstream" in (s.attributes or {}))
    ]


def everything_text(spans: tuple[ReadableSpan, ...], reader: InMemoryMetricReader) -> str:
    """Every span name, attribute and event, and every metric attribute, as one string."""
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        parts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.append(event.name)
            parts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    parts.extend(f"{k}={v}" for k, v in (point.attributes or {}).items())
    return "\n".join(parts)


def test_logical_span_is_named_by_template_and_child_of_current(otel, sim, sim_url, clock):
    """One INTERNAL span per call, named {upstream} {METHOD} {template}, under the caller's span."""
    exporter, _ = otel
    guard = Guard(make_settings(sim_url), clock=clock)
    tracer = trace.get_tracer("test")
    with (
        tracer.start_as_current_span("inbound") as parent,
        httpx.Client(transport=guard.sync_transport()) as c,
    ):
        assert c.get(f"{sim_url}/v1/tracks/{TRACK}").status_code == 200
    spans = exporter.get_finished_spans()
    (logical,) = by_kind(spans, SpanKind.INTERNAL)
    (attempt,) = by_kind(spans, SpanKind.CLIENT)
    assert logical.name == "spotify_api GET /v1/tracks/{id}"
    assert TRACK not in logical.name
    assert logical.parent is not None
    assert logical.parent.span_id == parent.get_span_context().span_id
    assert attempt.parent is not None
    assert attempt.parent.span_id == logical.context.span_id
    attrs = logical.attributes or {}
    assert attrs["upstream_guard.upstream"] == "spotify_api"
    assert attrs["upstream_guard.endpoint"] == "/v1/tracks/{id}"
    assert attrs["upstream_guard.breaker.state"] == "closed"
    assert attrs["upstream_guard.outcome"] == "success"
    assert attrs["upstream_guard.attempts"] == 1
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.template"] == "/v1/tracks/{id}"
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["http.response.status_code"] == 200
    assert (attempt.attributes or {})["http.response.status_code"] == 200
    assert "http.request.resend_count" not in (attempt.attributes or {})


def test_retried_call_has_resend_count_and_retry_event(otel, sim, sim_url, clock):
    """A retried call: two CLIENT spans, the second with http.request.resend_count=1."""
    exporter, _ = otel
    guard = Guard(make_settings(sim_url, retry={"attempts": 3}), clock=clock)
    sim.script([Fault.json_5xx(503), Fault.healthy()])
    with httpx.Client(transport=guard.sync_transport()) as c:
        assert c.get(f"{sim_url}/v1/me").status_code == 200
    spans = exporter.get_finished_spans()
    attempts = by_kind(spans, SpanKind.CLIENT)
    assert len(attempts) == 2
    assert "http.request.resend_count" not in (attempts[0].attributes or {})
    assert (attempts[1].attributes or {})["http.request.resend_count"] == 1
    assert attempts[0].status.status_code is StatusCode.ERROR
    (logical,) = by_kind(spans, SpanKind.INTERNAL)
    (retry,) = [e for e in logical.events if e.name == "upstream_guard.retry"]
    assert retry.attributes is not None
    assert retry.attributes["upstream_guard.retry.reason"] == "status_503"
    assert retry.attributes["upstream_guard.retry.retried"] is True
    assert retry.attributes["upstream_guard.retry.retry_after_honoured"] is False
    assert "upstream_guard.retry.budget_left" in retry.attributes
    assert (logical.attributes or {})["upstream_guard.attempts"] == 2


def test_trip_and_refusal_are_visible(otel, sim, sim_url, clock):
    """The call that trips carries a state-change event; refused calls are ERROR, state open."""
    exporter, _ = otel
    guard = Guard(
        make_settings(sim_url, breaker={"fail_max": 1}, retry={"attempts": 1}), clock=clock
    )
    sim.set_fault(Fault.no_healthy_upstream())
    with httpx.Client(transport=guard.sync_transport()) as c:
        c.get(f"{sim_url}/v1/me")
        with pytest.raises(CircuitOpenError):
            c.get(f"{sim_url}/v1/me")
    first, refused = by_kind(exporter.get_finished_spans(), SpanKind.INTERNAL)
    change = [e for e in first.events if e.name == "upstream_guard.breaker.state_change"]
    assert change
    assert change[0].attributes is not None
    assert change[0].attributes["upstream_guard.to"] == "open"
    assert first.status.status_code is StatusCode.ERROR
    attrs = refused.attributes or {}
    assert attrs["upstream_guard.breaker.state"] == "open"
    assert attrs["upstream_guard.outcome"] == "refused"
    assert attrs["upstream_guard.attempts"] == 0
    assert refused.status.status_code is StatusCode.ERROR
    assert not [
        s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.CLIENT and s.start_time > first.end_time
    ]


def test_no_secret_reaches_spans_or_metrics(otel, sim, sim_url, clock):
    """A token in the header and in the query string appears nowhere in telemetry."""
    exporter, reader = otel
    app = FastAPI()

    @app.get("/t")
    def t() -> Any:
        url = f"{sim_url}/v1/tracks/{TRACK}?access_token={SECRET}&market=SE"
        headers = {"Authorization": f"Bearer {SECRET}"}
        httpx.get(url, headers=headers)
        requests.get(url, headers=headers, auth=("user", SECRET), timeout=5)
        return "ok"

    install(app, make_settings(sim_url, retry={"attempts": 2}), clock=clock)
    sim.script([Fault.json_5xx(500)])
    with TestClient(app) as client:
        assert client.get("/t").status_code == 200
    spans = exporter.get_finished_spans()
    assert len(by_kind(spans, SpanKind.CLIENT)) >= 3
    text = everything_text(spans, reader)
    assert SECRET not in text
    assert "REDACTED" in text  # url.full kept, with the secret replaced


def test_redact_url():
    """Credentials and secret query values are replaced; other values stay."""
    got = redact_url(
        f"https://u:{SECRET}@api.spotify.com/v1/me?code={SECRET}&market=SE&refresh_token={SECRET}"
    )
    assert SECRET not in got
    assert "market=SE" in got
    assert got.startswith("https://REDACTED:REDACTED@api.spotify.com/v1/me?")


def test_metrics_have_low_cardinality_attributes(otel, sim, sim_url, clock):
    """Calls, retries, refusals, duration and breaker state, keyed by upstream and template."""
    _, reader = otel
    guard = Guard(
        make_settings(sim_url, breaker={"fail_max": 2}, retry={"attempts": 2}), clock=clock
    )
    sim.set_fault(Fault.json_5xx(502))
    with httpx.Client(transport=guard.sync_transport()) as c:
        for i in range(3):
            with contextlib.suppress(CircuitOpenError):
                c.get(f"{sim_url}/v1/tracks/{i:022d}")
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            if sm.scope.name == "upstream_guard":
                for metric in sm.metrics:
                    found[metric.name] = list(metric.data.data_points)
    assert {
        "upstream_guard.calls",
        "upstream_guard.call.duration",
        "upstream_guard.refused",
        "upstream_guard.retries",
        "upstream_guard.breaker.state",
        "upstream_guard.cooldown",
    } <= found.keys()
    endpoints = {p.attributes.get("upstream_guard.endpoint") for p in found["upstream_guard.calls"]}
    assert "/v1/tracks/{id}" in endpoints
    assert not any(e and "000000" in e for e in endpoints)
    outcomes = {p.attributes["upstream_guard.outcome"] for p in found["upstream_guard.calls"]}
    assert {"failure", "refused"} <= outcomes
    states = [
        p
        for p in found["upstream_guard.breaker.state"]
        if p.attributes["upstream_guard.upstream"] == "spotify_api"
    ]
    assert any(p.value == 2 for p in states)


def test_official_httpx_instrumentation_means_one_client_span_per_attempt(
    otel, sim, sim_url, clock
):
    """With HTTPXClientInstrumentor on, the guard adds no CLIENT spans of its own."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    exporter, _ = otel
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument()
    try:
        guard = Guard(make_settings(sim_url, retry={"attempts": 3}), clock=clock)
        sim.script([Fault.json_5xx(503), Fault.healthy()])
        with httpx.Client(transport=guard.sync_transport()) as c:
            assert c.get(f"{sim_url}/v1/me").status_code == 200
    finally:
        instrumentor.uninstrument()
    spans = exporter.get_finished_spans()
    clients = by_kind(spans, SpanKind.CLIENT)
    assert len(clients) == 2  # one per attempt
    assert {s.instrumentation_scope.name for s in clients} == {
        "opentelemetry.instrumentation.httpx"
    }
    (logical,) = by_kind(spans, SpanKind.INTERNAL)
    assert all(
        s.parent is not None and s.parent.span_id == logical.context.span_id for s in clients
    )


def test_inbound_span_says_what_was_used_and_who_answered(otel, sim, sim_url, clock):
    """The middleware marks the inbound SERVER span with the upstreams used and the fallback."""
    exporter, _ = otel
    app = FastAPI()

    @app.get("/t")
    async def t() -> Any:
        async with httpx.AsyncClient() as client:
            (await client.get(f"{sim_url}/v1/me")).raise_for_status()
        return "ok"

    install(app, make_settings(sim_url, retry={"attempts": 1}), clock=clock)
    tracer = trace.get_tracer("test")

    class ServerSpan:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                await self.inner(scope, receive, send)
                return
            with tracer.start_as_current_span("GET /t", kind=SpanKind.SERVER):
                await self.inner(scope, receive, send)

    sim.set_fault(Fault.json_5xx(500))
    with TestClient(ServerSpan(app)) as client:
        assert client.get("/t").status_code == 503
    servers = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    # FastAPI's own telemetry makes the innermost SERVER span: the guard annotates that one.
    marked = [s for s in servers if "upstream_guard.upstreams" in (s.attributes or {})]
    assert len(marked) == 1
    attrs = marked[0].attributes or {}
    assert list(attrs["upstream_guard.upstreams"]) == ["spotify_api"]
    assert attrs["upstream_guard.answered_by"] == "unavailable"
