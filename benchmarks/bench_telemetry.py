"""The guard's added cost with an SDK recording every span, beside the official httpx instrumentation.

One process, the OpenTelemetry SDK installed with a BatchSpanProcessor and an exporter that drops
everything (so export cost does not blur the figure). Three async clients over the same
httpx.MockTransport: bare, guarded (logical + attempt spans, metrics), and instrumented by
opentelemetry-instrumentation-httpx alone. Interleaved rounds; medians of per-round differences.
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
from collections.abc import Sequence

import httpx
from _common import interleaved, per_call, table, write
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from upstream_guard import Guard, GuardSettings

URL = "https://api.spotify.com/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp"
ROUNDS = 40
CALLS = 200


class NullExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:  # noqa: ARG002
        return SpanExportResult.SUCCESS


def handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b'{"id": "3n3Ppam7vgaVa1iaRUc9Lp"}')


async def main() -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter(), max_queue_size=65536))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    mock = httpx.MockTransport(handler)
    guard = Guard(GuardSettings())
    clients = {
        "bare": httpx.AsyncClient(transport=mock),
        "guard (SDK recording)": httpx.AsyncClient(transport=guard.async_transport(mock)),
        "official httpx instrumentation": httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    }
    HTTPXClientInstrumentor().instrument_client(clients["official httpx instrumentation"])
    samples = await interleaved(
        {
            name: functools.partial(per_call, functools.partial(c.get, URL), CALLS)
            for name, c in clients.items()
        },
        ROUNDS,
    )
    bare = samples["bare"]
    added = {
        name: statistics.median((g - b) * 1e6 for g, b in zip(got, bare, strict=True))
        for name, got in samples.items()
    }
    rows = [
        [name, f"{statistics.median(got) * 1e6:.1f}", f"{added[name]:+.1f}"]
        for name, got in samples.items()
    ]
    ours, theirs = added["guard (SDK recording)"], added["official httpx instrumentation"]
    body = (
        f"{ROUNDS} interleaved rounds of {CALLS} calls; SDK with BatchSpanProcessor and a null "
        "exporter.\n\n"
        + table(["variant", "us per call (median)", "added us"], rows)
        + f"\n\nGuard with spans and metrics adds {ours:.1f} us; the official instrumentation "
        + f"alone adds {theirs:.1f} us (goal: guard <= official: {'yes' if ours <= theirs else 'NO'})."
    )
    write("telemetry", "Added cost with the OpenTelemetry SDK recording", body)
    provider.shutdown()


if __name__ == "__main__":
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    asyncio.run(main())
