"""The OpenTelemetry SDK for tests: installed once per process (the API allows one provider)."""

from __future__ import annotations

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

EXPORTER = InMemorySpanExporter()
READER = InMemoryMetricReader()
_installed: list[bool] = []


def install_sdk() -> tuple[InMemorySpanExporter, InMemoryMetricReader]:
    """Set the global providers the first time; clear the recorded spans every time."""
    if not _installed:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))
        _installed.append(True)
    EXPORTER.clear()
    return EXPORTER, READER


def metric_total(reader: InMemoryMetricReader, name: str) -> float:
    """The sum of a metric's points so far (the process's counters only grow: compare two)."""
    data = reader.get_metrics_data()
    return sum(
        point.value
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    )
