"""The example app exports its traces over OTLP/HTTP: what Jaeger would receive, decoded."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from upstream_guard.testing import free_port, serve

if TYPE_CHECKING:
    from starlette.requests import Request

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parent.parent / "examples" / "fastapi_app"
SERVER, INTERNAL, CLIENT = 2, 1, 3  # OTLP's SpanKind numbers


class Receiver:
    """A loopback OTLP/HTTP receiver that decodes the protobuf, as Jaeger's collector does."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[
                Route("/v1/traces", self.traces, methods=["POST"]),
                Route("/v1/metrics", self.ignore, methods=["POST"]),
            ]
        )

    async def traces(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get(
                "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "service": service,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        }
                    )
        return Response(status_code=200, media_type="application/x-protobuf")

    async def ignore(self, request: Request) -> Response:
        await request.body()
        return Response(status_code=200, media_type="application/x-protobuf")


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()
    with serve(rec.app) as url:
        yield rec, url


def test_example_app_exports_one_trace_per_request(receiver, sim, sim_url):
    """Inbound, logical and attempt spans of one request arrive in one trace, as protobuf."""
    rec, otlp_url = receiver
    port = free_port()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
        "OTEL_SERVICE_NAME": "spotify-demo-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRICS_EXPORTER": "none",
        "SPOTIFY_API_URL": sim_url,
        "SPOTIFY_TOKEN": "test-token-not-exported",
        "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS": json.dumps([sim_url.split("://", 1)[1]]),
    }
    app = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app:create_app",
            "--factory",
            "--app-dir",
            str(EXAMPLE),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/_upstream_guard/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the example app did not start"
                time.sleep(0.05)  # sleep-ok: waiting for a real app process to listen
        assert (
            httpx.get(f"{base}/search", params={"q": "band of horses"}, timeout=10).status_code
            == 200
        )

        def one_trace() -> list[dict[str, Any]] | None:
            servers = [s for s in rec.spans if s["kind"] == SERVER and "/search" in s["name"]]
            for server in servers:
                trace = [s for s in rec.spans if s["trace_id"] == server["trace_id"]]
                if any(s["kind"] == CLIENT for s in trace) and any(
                    s["name"] == "spotify_api GET /v1/search" for s in trace
                ):
                    return trace
            return None

        deadline = time.monotonic() + 15
        while one_trace() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # sleep-ok: the app's batch processor exports on its own schedule
        trace = one_trace()
        assert trace is not None, [(s["name"], s["kind"]) for s in rec.spans]
        logical = next(s for s in trace if s["name"] == "spotify_api GET /v1/search")
        attempt = next(s for s in trace if s["kind"] == CLIENT)
        assert logical["kind"] == INTERNAL
        assert attempt["parent"] == logical["span_id"]
        assert logical["attributes"]["upstream_guard.outcome"] == "success"
        assert logical["attributes"]["url.template"] == "/v1/search"
        assert all(s["service"] == "spotify-demo-test" for s in trace)
        assert "test-token-not-exported" not in str(rec.spans)
    finally:
        app.terminate()
        app.wait(timeout=15)
