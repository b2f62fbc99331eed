"""Per-call cost of the guard beside the alternatives a user would otherwise wire by hand.

In-process, every client over the same kind of httpx.MockTransport (a plain function answering
200), so the figures are the libraries' own work. Variants run interleaved in rounds; each
figure is the median over rounds of the mean per-call time within a round, each ratio the
median of per-round ratios to the bare call measured in the same round.

- bare: ``httpx.AsyncClient`` alone.
- guard: ``Guard(GuardSettings()).async_transport(mock)``: breaker, retries with budget,
  timeouts, 429 cooldown, no OpenTelemetry SDK.
- pybreaker + tenacity: ``AsyncRetrying(stop_after_attempt(3), wait_random_exponential)``
  around ``breaker.calling()`` around the call (a 5xx raises, so it counts).
- pybreaker + stamina: the same with ``stamina.retry_context(on=..., attempts=3)``.
- purgatory: ``async with await factory.get_breaker("spotify")`` (a breaker, no retries).

The OpenTelemetry variants (the guard with the SDK recording, and the official httpx
instrumentation alone with the SDK on) run in a child process of this script: a global tracer
provider cannot be unset, and the guard builds spans whenever one is installed. The child
measures its own bare client in the same rounds, and its ratios are to that.

Transport-level costs are measured by calling ``handle_async_request`` directly: the refusal
of an open breaker, and a host that no upstream names passing through the guard's transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence

import httpx
import pybreaker
import stamina
from _common import interleaved, per_call, table, transport_costs, write
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
from tenacity import wait_random_exponential as wait_exp

from upstream_guard import Guard, GuardSettings

URL = "https://api.spotify.com/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp"
OTHER = "https://i.scdn.co/image/ab67616d0000b273"
ROUNDS = 40
CALLS = 200
TRANSPORT_CALLS = 2000
CHILD_FLAG = "--sdk-child"

Variant = Callable[[], Awaitable[float]]


def handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b'{"id": "3n3Ppam7vgaVa1iaRUc9Lp"}')


class UpstreamFailedError(Exception):
    """A 5xx, raised by the hand-wired variants so their breaker and retry see it."""


def check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 500:
        raise UpstreamFailedError(response.status_code)
    return response


async def measure(variants: dict[str, Variant]) -> dict[str, list[float]]:
    return await interleaved(variants, ROUNDS)


# -- the SDK variants, in a child process ------------------------------------------------


async def sdk_child() -> dict[str, list[float]]:
    from opentelemetry import metrics, trace  # noqa: PLC0415 - only in the child
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor  # noqa: PLC0415
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class NullExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:  # noqa: ARG002
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter(), max_queue_size=65536))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    guard = Guard(GuardSettings())
    bare = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    guarded = httpx.AsyncClient(transport=guard.async_transport(httpx.MockTransport(handler)))
    official = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    HTTPXClientInstrumentor().instrument_client(official)
    samples = await measure(
        {
            "bare (SDK process)": lambda: per_call(lambda: bare.get(URL), CALLS),
            "guard, OpenTelemetry SDK recording": lambda: per_call(lambda: guarded.get(URL), CALLS),
            "OpenTelemetry httpx instrumentation alone (SDK on)": lambda: per_call(
                lambda: official.get(URL), CALLS
            ),
        }
    )
    provider.shutdown()
    return samples


def run_sdk_child() -> dict[str, list[float]]:
    out = subprocess.run(
        [sys.executable, __file__, CHILD_FLAG], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- the main process: never any SDK -----------------------------------------------------


async def main() -> None:
    stamina.set_testing(False)  # real backoff and attempts (it is off unless a test turns it on)
    mock = httpx.MockTransport(handler)
    guard = Guard(GuardSettings())
    bare = httpx.AsyncClient(transport=mock)
    guarded = httpx.AsyncClient(transport=guard.async_transport(mock))

    breaker_t = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, name="spotify-tenacity")
    breaker_s = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, name="spotify-stamina")
    retryable = (httpx.TransportError, UpstreamFailedError)

    async def pybreaker_tenacity() -> httpx.Response:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(3),
            wait=wait_exp(multiplier=0.1, max=2),
            retry=retry_if_exception_type(retryable),
            reraise=True,
        ):
            with attempt, breaker_t.calling():
                return check(await bare.get(URL))
        raise AssertionError  # unreachable: reraise=True

    async def pybreaker_stamina() -> httpx.Response:
        async for attempt in stamina.retry_context(on=retryable, attempts=3):
            with attempt, breaker_s.calling():
                return check(await bare.get(URL))
        raise AssertionError  # unreachable: the last failure is raised

    factory = AsyncCircuitBreakerFactory()  # default threshold (5) and ttl (30 s)

    async def purgatory_call() -> httpx.Response:
        async with await factory.get_breaker("spotify"):
            return check(await bare.get(URL))

    # Transport level: what the guard does before the inner transport is reached.
    ours = transport_costs(guard, mock, URL, OTHER, TRANSPORT_CALLS)
    guarded_request = httpx.Request("GET", URL)

    # The same refusal in the alternatives, for scale.
    open_pybreaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600, name="open")
    open_pybreaker.open()

    async def pybreaker_refusal() -> None:
        with contextlib.suppress(pybreaker.CircuitBreakerError), open_pybreaker.calling():
            await mock.handle_async_request(guarded_request)

    open_factory = AsyncCircuitBreakerFactory(default_ttl=3600)
    for _ in range(5):
        with contextlib.suppress(RuntimeError):
            async with await open_factory.get_breaker("spotify"):
                raise RuntimeError
    assert isinstance((await open_factory.get_breaker("spotify")).context._state, OpenedState)  # noqa: SLF001

    async def purgatory_refusal() -> None:
        with contextlib.suppress(Exception):
            async with await open_factory.get_breaker("spotify"):
                await mock.handle_async_request(guarded_request)

    calls: dict[str, Variant] = {
        "bare httpx AsyncClient": lambda: per_call(lambda: bare.get(URL), CALLS),
        "guard (no OpenTelemetry SDK)": lambda: per_call(lambda: guarded.get(URL), CALLS),
        "pybreaker + tenacity, hand-wired": lambda: per_call(pybreaker_tenacity, CALLS),
        "pybreaker + stamina, hand-wired": lambda: per_call(pybreaker_stamina, CALLS),
        "purgatory (breaker only)": lambda: per_call(purgatory_call, CALLS),
    }
    transport: dict[str, Variant] = {
        "inner transport alone, other host": ours["inner"],
        "guard transport, other host (pass-through)": ours["pass-through"],
        "guard transport, open breaker (refusal)": ours["refusal"],
        "pybreaker calling(), open breaker": lambda: per_call(pybreaker_refusal, TRANSPORT_CALLS),
        "purgatory, open breaker": lambda: per_call(purgatory_refusal, TRANSPORT_CALLS),
    }
    samples = await measure({**calls, **transport})
    await bare.aclose()
    await guarded.aclose()
    sdk = run_sdk_child()

    def med(s: list[float]) -> float:
        return statistics.median(s) * 1e6

    def ratio(got: list[float], base: list[float]) -> float:
        return statistics.median(g / b for g, b in zip(got, base, strict=True))

    def added(got: list[float], base: list[float]) -> float:
        return statistics.median(g - b for g, b in zip(got, base, strict=True)) * 1e6

    bare_s = samples["bare httpx AsyncClient"]
    sdk_bare = sdk["bare (SDK process)"]
    rows = [
        [name, f"{med(s):.1f}", f"{ratio(s, bare_s):.3f}x", f"{added(s, bare_s):+.1f}"]
        for name, s in samples.items()
        if name in calls
    ]
    rows += [
        [
            name + " [child]",
            f"{med(s):.1f}",
            f"{ratio(s, sdk_bare):.3f}x",
            f"{added(s, sdk_bare):+.1f}",
        ]
        for name, s in sdk.items()
    ]
    inner = samples["inner transport alone, other host"]
    trows = [[name, f"{med(s):.2f}"] for name, s in samples.items() if name in transport]
    passthrough = added(samples["guard transport, other host (pass-through)"], inner)
    refusal = med(samples["guard transport, open breaker (refusal)"])
    guard_ratio = ratio(samples["guard (no OpenTelemetry SDK)"], bare_s)
    verdicts = [
        ["guard / bare (no SDK)", f"{guard_ratio:.3f}x", "<= 1.10x", _ok(guard_ratio <= 1.10)],
        ["open-breaker refusal", f"{refusal:.1f} us", "< 20 us", _ok(refusal < 20)],
        ["unguarded host pass-through", f"{passthrough:+.2f} us", "< 2 us", _ok(passthrough < 2)],
    ]
    body = (
        f"{ROUNDS} interleaved rounds of {CALLS} calls (transport rows: {TRANSPORT_CALLS}); "
        "median of per-round mean per-call time; ratio and added us are medians of per-round "
        "ratios and differences to the bare call of the same round. Rows marked [child] ran "
        "in a child process with the OpenTelemetry SDK installed (BatchSpanProcessor, null "
        "exporter, in-memory metric reader); their bare call is the child's own. The main "
        "process never had an SDK. Pinned to one core.\n\n"
        + table(["variant", "us per call", "ratio to bare", "added us"], rows)
        + "\n\nTransport level (`handle_async_request` called directly):\n\n"
        + table(["variant", "us per call"], trows)
        + f"\n\nPass-through adds {passthrough:+.2f} us over the inner transport alone.\n\n"
        + table(["target", "measured", "goal", "met"], verdicts)
    )
    write("alternatives", "The guard beside hand-wired alternatives", body)


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    if CHILD_FLAG in sys.argv:
        print(json.dumps(asyncio.run(sdk_child())))
    else:
        asyncio.run(main())
