"""Chaos on loopback: a misbehaving HTTP/1.1 upstream, a guarded FastAPI app under uvicorn.

The upstream (``chaos_server.ChaosServer``) refuses, resets, truncates, drips, hangs, sends
20 MB, garbles its status line and answers 429 with every Retry-After there is. The app calls
it with plain ``httpx.AsyncClient`` and ``requests``, guarded by ``install(app)``. Figures
(requests driven, faults injected, answers, leaks) are printed (``pytest -s``) and collected
in ``SUMMARY``. What the chaos found wrong (fixed since) is pinned by tests of its own: a 2xx
whose body breaks or drips past ``total_s`` is an upstream failure, and Retry-After is not
rounded up for float noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import requests
from fastapi import FastAPI, Request

from chaos_server import KINDS, RETRY_AFTER, ChaosServer
from conftest import make_settings
from upstream_guard import Guard, GuardSettings, UpstreamUnavailable, install
from upstream_guard.testing import FakeClock, serve

pytestmark = pytest.mark.anyio

CLIENTS = ("httpx", "requests")
# A 2xx whose body breaks after the headers: the guard counts the broken body as an upstream
# failure, so the route's read error becomes a 503 (test_broken_2xx_body_answers_503_not_500).
BROKEN_2XX_KINDS = frozenset({"reset_200", "truncated_200"})
MAX_RETRY_AFTER_S = 1.0
BACKOFF_MAX_S = 0.5
FD_SLACK = 5
TLS = httpx.create_ssl_context()
"""One TLS context for every client made here: loading the CA bundle costs ~0.1 s a time."""
SUMMARY: dict[str, Any] = {}
"""Figures of every test in this module, printed at module teardown."""


@pytest.fixture(scope="module", autouse=True)
def _print_summary() -> Iterator[None]:
    yield
    print("\n== chaos summary ==")  # noqa: T201 - the figures are the point
    print(json.dumps(SUMMARY, indent=1, sort_keys=True, default=str))  # noqa: T201


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosServer]:
    with ChaosServer() as server:
        yield server


@contextlib.contextmanager
def uvicorn_errors() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of uvicorn (an exception in the app); enter it after ``serve`` started."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.ERROR)
    logger = logging.getLogger("uvicorn.error")  # serve() configures it: add ours after
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


FDS = Path("/proc/self/fd")
needs_proc = pytest.mark.skipif(not FDS.is_dir(), reason="counts fds in /proc/self/fd")


def fd_count() -> int:
    return sum(1 for _ in FDS.iterdir())


def settle(done: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll until ``done()``: real sockets close on their own schedule."""
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            return done()
        time.sleep(0.01)  # sleep-ok: polling real sockets and threads of real servers
    return True


def settle_fds(limit: int) -> tuple[bool, int]:
    """Wait for the fd count to fall to ``limit``, collecting garbage first; the count before.

    requests keeps a finished response's connection until the response object dies, and the
    ``HTTPError`` of ``raise_for_status`` holds it in a reference cycle through its traceback:
    those connections close at the next collection, guarded or not.
    """
    settle(lambda: fd_count() <= limit, timeout=0.5)
    before_gc = fd_count()
    gc.collect()
    return settle(lambda: fd_count() <= limit), before_gc


def chaos_settings(chaos: ChaosServer, **groups: Any) -> GuardSettings:
    """spotify_api is the chaos server and the refusing port beside it."""
    hosts = [url.split("://", 1)[1] for url in (chaos.url, chaos.refused_url)]
    return GuardSettings(upstreams={"spotify_api": {"hosts": hosts, **groups}})


def build_chaos_app(chaos: ChaosServer) -> FastAPI:
    """Routes calling the upstream the way users do, passing the caller's Authorization on."""
    app = FastAPI()
    bases = {"chaos": chaos.url, "refused": chaos.refused_url}

    def summary(response: Any) -> dict[str, Any]:
        return {
            "bytes": len(response.content),
            "guard": response.headers.get("x-upstream-guard"),
            "body": response.text if len(response.content) < 1000 else None,
        }

    @app.get("/httpx/{target}/{path:path}")
    async def via_httpx(target: str, path: str, request: Request) -> dict[str, Any]:
        headers = {"authorization": request.headers.get("authorization", "")}
        async with httpx.AsyncClient(timeout=5, verify=TLS) as client:
            response = await client.get(f"{bases[target]}/{path}", headers=headers)
        response.raise_for_status()
        return summary(response)

    @app.get("/requests/{target}/{path:path}")
    def via_requests(target: str, path: str, request: Request) -> dict[str, Any]:
        headers = {"authorization": request.headers.get("authorization", "")}
        response = requests.get(f"{bases[target]}/{path}", headers=headers, timeout=5)
        response.raise_for_status()
        return summary(response)

    @app.get("/_tasks")
    async def tasks() -> dict[str, int]:
        return {"tasks": len(asyncio.all_tasks())}

    return app


def answer_label(response: httpx.Response) -> str:
    """What the app answered: ``200``, ``200 stale``, ``503 problem``, or what else it was."""
    if response.status_code == 200:
        return "200 stale" if response.json()["guard"] == "stale" else "200"
    if response.status_code == 503 and is_problem(response):
        return "503 problem"
    return str(response.status_code)


def is_problem(response: httpx.Response) -> bool:
    """A 503 problem+json with a Retry-After of whole seconds in [1, a day]."""
    if response.headers.get("content-type") != "application/problem+json":
        return False
    retry_after = response.headers.get("retry-after", "")
    body = response.json()
    return (
        retry_after.isdigit()
        and 1 <= int(retry_after) <= 86_400
        and body["status"] == 503
        and body["upstream"] == "spotify_api"
        and {"type", "title", "detail"} <= body.keys()
    )


CLOSE = {"connection": "close"}
"""Callers open a connection per request: no race with uvicorn closing an idle one."""


def path_for(client_kind: str, kind: str, n: int) -> str:
    target = "refused" if kind == "refused" else "chaos"
    upstream_kind = "hang" if kind == "hang_giveup" else kind
    return f"/{client_kind}/{target}/v1/chaos/{upstream_kind}/{n}"


def chaos_schedule(total: int, *, burst: int, seed: int = 8) -> list[tuple[str, str]]:
    """(client, kind) pairs: shuffled rounds of every fault, two no-healthy-upstream bursts.

    The 20 MB answers come in the first round only: they cost the most CPU on a small machine.
    """
    rng = random.Random(seed)
    mix = ["refused", "hang_giveup", *(k for k in KINDS if k != "flip")]
    body: list[tuple[str, str]] = []
    while len(body) < total - 2 * burst:
        one_round = [(c, k) for c in CLIENTS for k in mix if not (body and k.startswith("huge"))]
        rng.shuffle(one_round)
        body += one_round
    body = body[: total - 2 * burst]
    nhu = [(CLIENTS[i % 2], "nhu") for i in range(burst)]
    third = len(body) // 3
    return body[:third] + nhu + body[third : 2 * third] + nhu + body[2 * third :]


def app_tasks(client: httpx.Client) -> int:
    return int(client.get("/_tasks").json()["tasks"])


def warm_up(url: str, concurrency: int) -> int:
    """Start the app's worker threads (sync routes run in them); the server loop's task count."""
    path = path_for("requests", "slow_body", 0)
    with (
        httpx.Client(base_url=url, timeout=10, headers=CLOSE) as client,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        statuses = set(pool.map(lambda _: client.get(path).status_code, range(concurrency)))
        # On a loaded machine, 16 drips at once may outlast total_s: a 503, never a 500.
        assert statuses <= {200, 503}, statuses
        return app_tasks(client)


@needs_proc
@pytest.mark.slow
def test_chaos_run_answers_every_request_and_leaks_nothing(chaos):
    """200 requests through every fault: 200, stale or 503 problem; no fd, thread or task growth."""
    total, burst, concurrency = 200, 16, 8
    clock = FakeClock()
    settings = chaos_settings(
        chaos,
        # Trips now and then, probes widely: most calls still reach the chaos.
        breaker={
            "fail_max": 10,
            "failure_ratio": 1.0,
            "reset_timeout_s": 1,
            "half_open_max_calls": concurrency,
        },
        retry={"attempts": 2, "max_retry_after_s": MAX_RETRY_AFTER_S, "backoff_max_s": 0.5},
        timeout={"attempt_s": 0.3, "total_s": 1.0},
        fallback={"stale_if_error": True, "stale_max_age_s": 1e9},
        # On a clock that stands still, the chaos' 429s would teach a pace whose slots never
        # come, and the run would stop reaching the chaos: pacing is tested in test_pace.
        pace={"adaptive": False},
    )
    app = build_chaos_app(chaos)
    guard = install(app, settings, clock=clock)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def count_outcome(record: Any) -> None:
        with lock:
            outcomes[f"{record.outcome}:{record.reason}"] += 1

    guard.subscribe(count_outcome)
    keeper = {"authorization": "Bearer keeper"}
    answers: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    latencies: dict[str, float] = {}
    unexpected: list[tuple[Any, ...]] = []

    with (
        serve(app) as url,
        uvicorn_errors() as errors,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        with httpx.Client(base_url=url, timeout=10, headers=CLOSE) as warm:
            # Warm up: each route, each worker thread, and the keepers' copies to keep.
            kept = {c: warm.get(path_for(c, "flip", 0), headers=keeper) for c in CLIENTS}
            assert {r.status_code for r in kept.values()} == {200}
            list(pool.map(lambda i: warm.get(path_for(CLIENTS[i % 2], "ok", i)), range(16)))
        # Sync routes may hold more threads than callers: those who gave up leave theirs busy.
        tasks_before = warm_up(url, 2 * concurrency)
        settle(lambda: chaos.open_connections == 0)
        chaos.reset_counts()
        fds_before, threads_before = fd_count(), threading.active_count()
        started = time.monotonic()

        with httpx.Client(base_url=url, timeout=10, headers=CLOSE) as client:

            def drive(item: tuple[int, tuple[str, str]]) -> None:
                i, (client_kind, kind) = item
                headers = {"authorization": f"Bearer user-{i % 3}"}
                t0 = time.monotonic()
                try:
                    response = client.get(
                        path_for(client_kind, kind, i % 5),
                        headers=headers,
                        timeout=0.1 if kind == "hang_giveup" else 10,
                    )
                    label = answer_label(response)
                except httpx.TimeoutException:
                    label = "client gave up" if kind == "hang_giveup" else "no answer in 10 s"
                except httpx.TransportError as exc:
                    label = f"no answer: {exc!r}"
                took = time.monotonic() - t0
                # Let time pass on the guard's clock past any open breaker or cooldown.
                wait = guard.retry_after_s("spotify_api")
                if wait > 0:
                    clock.advance(wait)
                with lock:
                    answers[label] += 1
                    by_kind.setdefault(kind, Counter())[label] += 1
                    latencies[kind] = max(latencies.get(kind, 0.0), took)
                    allowed = {"200", "200 stale", "503 problem"}
                    allowed |= {"client gave up"} if kind == "hang_giveup" else set()
                    if label not in allowed:
                        details = "" if label.startswith(("no", "client")) else response.text
                        headers = {} if not details else dict(response.headers)
                        unexpected.append((client_kind, kind, label, details[:300], headers))

            schedule = list(enumerate(chaos_schedule(total, burst=burst)))
            # 20 MB answers one at a time: a few at once starve the GIL of this one process.
            huge = [item for item in schedule if item[1][1].startswith("huge")]
            for item in huge:
                drive(item)
            list(pool.map(drive, [item for item in schedule if item not in huge]))
            took = time.monotonic() - started
            faults = dict(chaos.served)

            # After the chaos: the keepers' copies answer them (and only them) while it fails.
            chaos.flip_mode = "nhu"
            for client_kind, before in kept.items():
                again = client.get(path_for(client_kind, "flip", 0), headers=keeper)
                assert again.status_code == 200, again.text
                assert again.json()["guard"] == "stale"
                assert again.json()["body"] == before.json()["body"]
                stranger = client.get(path_for(client_kind, "flip", 0), headers={"x": "y"})
                assert answer_label(stranger) == "503 problem"
            chaos.flip_mode = "ok"
            # Handlers of callers who gave up finish on the server's own schedule.
            settle(lambda: app_tasks(client) <= tasks_before + 1)
            tasks_after = app_tasks(client)

        fds_settled, fds_before_gc = settle_fds(fds_before + FD_SLACK)
        settle(lambda: chaos.open_connections == 0)
        resources = {
            "fds": [fds_before, fd_count()],
            "fds_before_gc": fds_before_gc,
            "threads": [threads_before, threading.active_count()],
            "server_loop_tasks": [tasks_before, tasks_after],
            "upstream_connections_left_open": dict(chaos.open_kinds()),
        }

    figures = {
        "requests_driven": sum(answers.values()),
        "faults_injected_by_kind": faults,
        "answers_by_status": dict(answers),
        "answers_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "guard_outcomes": dict(outcomes),
        "max_latency_s_by_kind": {k: round(v, 3) for k, v in sorted(latencies.items())},
        "fake_waits": {"count": len(clock.slept), "max_s": max(clock.slept, default=0.0)},
        "uvicorn_errors": len(errors),
        "resources_before_after": resources,
        "wall_s": round(took, 2),
    }
    SUMMARY["chaos_run"] = figures
    print(json.dumps(figures, indent=1, default=str))  # noqa: T201 - pytest -s shows the figures

    assert figures["requests_driven"] == total
    assert not unexpected, unexpected
    assert sum(faults.values()) >= total // 2  # most requests reached the upstream
    assert answers["500"] == 0
    assert not errors
    assert max(clock.slept, default=0.0) <= max(MAX_RETRY_AFTER_S, BACKOFF_MAX_S)
    assert max(latencies.values()) < 5.0
    assert fds_settled, resources
    assert threading.active_count() <= threads_before + 2, resources
    assert tasks_after <= tasks_before + 1, resources
    assert chaos.open_connections == 0


@pytest.mark.parametrize("client_kind", CLIENTS)
@pytest.mark.parametrize("kind", sorted(BROKEN_2XX_KINDS))
def test_broken_2xx_body_answers_503_not_500(chaos, clock, client_kind, kind):
    """A 200 reset or truncated mid-body is an upstream failure: 503 problem, never a 500."""
    app = build_chaos_app(chaos)
    guard = install(app, chaos_settings(chaos, retry={"attempts": 1}), clock=clock)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10, headers=CLOSE) as client:
        response = client.get(path_for(client_kind, kind, 0))
    SUMMARY.setdefault("broken_2xx_body", {})[f"{client_kind} {kind}"] = response.status_code
    assert answer_label(response) == "503 problem", response.text
    assert guard.snapshot()["upstreams"]["spotify_api"]["failures"] == 1


def test_retry_after_is_not_rounded_up(chaos):
    """A 429 asking for 30 s reaches the app's caller as Retry-After: 30, whatever the clock reads."""
    clock = FakeClock()
    clock.advance(0.1)
    clock.advance(0.2)  # 1000.3000000000001: any clock reading has such digits
    app = build_chaos_app(chaos)
    install(app, chaos_settings(chaos, retry={"max_retry_after_s": 1.0}), clock=clock)
    with serve(app) as url, httpx.Client(base_url=url, timeout=10, headers=CLOSE) as client:
        response = client.get(path_for("httpx", "429_ra_30", 0))
    SUMMARY["retry_after_30_answered_as"] = response.headers.get("retry-after")
    assert answer_label(response) == "503 problem"
    assert response.headers["retry-after"] == "30"


@pytest.mark.slow
@pytest.mark.parametrize("client_kind", CLIENTS)
def test_dripping_2xx_body_is_bounded_by_total_s(client_kind):
    """A 200 whose body drips for 1.4 s is cut off near total_s=0.4 (real clock)."""
    with ChaosServer(drip_gap_s=0.1, drip_chunks=15) as crawl:
        app = build_chaos_app(crawl)
        install(
            app,
            chaos_settings(
                crawl, retry={"attempts": 1}, timeout={"attempt_s": 0.3, "total_s": 0.4}
            ),
        )
        with serve(app) as url, httpx.Client(base_url=url, timeout=10, headers=CLOSE) as client:
            t0 = time.monotonic()
            response = client.get(path_for(client_kind, "slow_body", 0))
            took = time.monotonic() - t0
    SUMMARY.setdefault("dripping_2xx_body", {})[client_kind] = {
        "status": response.status_code,
        "took_s": round(took, 2),
    }
    assert took < 0.9
    assert answer_label(response) == "503 problem"


@needs_proc
@pytest.mark.slow
def test_clients_that_give_up_mid_request_leave_nothing_behind(chaos):
    """Callers that hang up while the app waits on a hanging upstream: no fd, task or thread left."""
    n = 10
    app = build_chaos_app(chaos)
    clock = FakeClock()
    settings = chaos_settings(
        chaos,
        breaker={"fail_max": 1000},
        retry={"attempts": 2},
        timeout={"attempt_s": 0.3, "total_s": 1.0},
    )
    guard = install(app, settings, clock=clock)
    finished = threading.Semaphore(0)
    records: list[Any] = []

    def on_finish(record: Any) -> None:
        records.append(record)
        finished.release()

    guard.subscribe(on_finish)
    with serve(app) as url, uvicorn_errors() as errors:
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=10, headers=CLOSE) as client:
            assert client.get(path_for("httpx", "ok", 0)).status_code == 200
        tasks_before = warm_up(url, n)
        for _ in range(n + 1):
            assert finished.acquire(timeout=5)
        records.clear()
        settle(lambda: chaos.open_connections == 0)
        chaos.reset_counts()
        fds_before, threads_before = fd_count(), threading.active_count()
        socks = []
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", port))
            target = path_for(CLIENTS[i % 2], "hang", i)
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
            socks.append(sock)
        for _ in range(n):  # every upstream call is now hanging
            assert chaos.hanging.acquire(timeout=5)
        for i, sock in enumerate(socks):
            if i % 2:  # half hang up abruptly (RST), half politely (FIN)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        for _ in range(n):  # the calls end by the attempt timeouts, not by the hang-ups
            assert finished.acquire(timeout=10)
        with httpx.Client(base_url=url, timeout=10, headers=CLOSE) as client:
            assert settle(lambda: app_tasks(client) <= tasks_before)
            tasks_after = app_tasks(client)
        fds_settled, fds_before_gc = settle_fds(fds_before + FD_SLACK)
        assert settle(lambda: chaos.open_connections == 0)
        resources = {
            "fds": [fds_before, fd_count()],
            "fds_before_gc": fds_before_gc,
            "threads": [threads_before, threading.active_count()],
            "server_loop_tasks": [tasks_before, tasks_after],
        }
    outcomes = Counter(f"{r.outcome}:{r.reason}" for r in records)
    SUMMARY["client_disconnects"] = {
        "requests_abandoned": n,
        "guard_outcomes": dict(outcomes),
        "uvicorn_errors": len(errors),
        "resources_before_after": resources,
    }
    assert sum(outcomes.values()) == n
    assert outcomes == {"failure:timeout": n}
    assert not errors, [r.getMessage() for r in errors]
    assert fds_settled, resources
    assert threading.active_count() <= threads_before + 2, resources


async def test_cancelled_probe_frees_its_slot_and_bulkhead_place(chaos, clock):
    """A caller cancelled while its half-open probe hangs: the next call is admitted and closes."""
    settings = make_settings(
        chaos.url,
        max_concurrency=1,
        breaker={"fail_max": 1, "reset_timeout_s": 5, "half_open_max_calls": 1},
        retry={"attempts": 1},
        timeout={"attempt_s": 5.0, "total_s": 5.0},
    )
    guard = Guard(settings, clock=clock)
    base = f"{chaos.url}/v1/chaos"
    chaos.reset_counts()
    transport = guard.async_transport(httpx.AsyncHTTPTransport(verify=TLS))
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(f"{base}/nhu/0")).status_code == 503
        assert guard.state("spotify_api") == "open"
        clock.advance(5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.get, f"{base}/hang/0")
            assert await anyio.to_thread.run_sync(lambda: chaos.hanging.acquire(timeout=5))
            tg.cancel_scope.cancel()
        assert guard.state("spotify_api") == "half-open"  # the cancelled probe counted nothing
        response = await client.get(f"{base}/ok/0")
        assert response.status_code == 200
        assert guard.state("spotify_api") == "closed"
    assert await anyio.to_thread.run_sync(lambda: settle(lambda: chaos.open_connections == 0))


def _caller(kind: str, guard: Guard) -> tuple[Callable[[str], Any], Callable[[], Any]]:
    """One GET for each driver (async httpx, sync httpx and requests in a thread), and close."""
    if kind == "async":
        inner = httpx.AsyncHTTPTransport(verify=TLS)
        client = httpx.AsyncClient(transport=guard.async_transport(inner))
        return client.get, client.aclose
    if kind == "sync":
        sync_client = httpx.Client(transport=guard.sync_transport(httpx.HTTPTransport(verify=TLS)))
        get: Callable[[str], Any] = sync_client.get
        close: Callable[[], None] = sync_client.close
    else:
        session = guard.requests_session()
        get, close = (lambda url: session.get(url, timeout=5)), session.close

    async def call(url: str) -> Any:
        return await anyio.to_thread.run_sync(get, url)

    async def aclose() -> None:
        close()

    return call, aclose


@pytest.mark.parametrize("driver", ["async", "sync", "requests"])
async def test_no_retry_after_makes_a_call_wait_longer_than_max_retry_after_s(chaos, driver):
    """Retry-After 0..86400, dates and garbage: no wait above max_retry_after_s, none real."""
    total_s = 1.0
    waits: dict[str, Any] = {}
    for kind, value in RETRY_AFTER.items():
        clock = FakeClock()
        settings = make_settings(
            chaos.url,
            retry={"attempts": 3, "max_retry_after_s": MAX_RETRY_AFTER_S},
            timeout={"attempt_s": 0.3, "total_s": total_s},
        )
        guard = Guard(settings, clock=clock)
        call, aclose = _caller(driver, guard)
        chaos.reset_counts()
        per_call = []
        t0 = time.monotonic()
        for _ in range(2):  # the second call meets the cooldown the first one started
            slept_before = len(clock.slept)
            with contextlib.suppress(UpstreamUnavailable):
                response = await call(f"{chaos.url}/v1/chaos/{kind}/0")
                assert response.status_code == 429
            per_call.append(clock.slept[slept_before:])
        took = time.monotonic() - t0
        await aclose()
        waits[kind] = {
            "retry_after": value,
            "fake_waits_s": per_call,
            "upstream_hits": chaos.served[kind],
            "cooldown_s": round(guard.retry_after_s("spotify_api"), 1),
            "real_s": round(took, 3),
        }
        for call_waits in per_call:
            assert all(0 <= w <= MAX_RETRY_AFTER_S for w in call_waits), waits[kind]
            assert sum(call_waits) <= total_s, waits[kind]
        assert took < 2.0, waits[kind]  # no wait was real
        assert guard.retry_after_s("spotify_api") <= 86_400
        seconds = _seconds(value)
        if seconds is not None and seconds > MAX_RETRY_AFTER_S:
            # Not slept, not retried; the cooldown covers it all and refuses the next call.
            assert per_call == [[], []], waits[kind]
            assert chaos.served[kind] == 1, waits[kind]
            assert guard.retry_after_s("spotify_api") == pytest.approx(min(seconds, 86_400))
    SUMMARY.setdefault("retry_after", {})[driver] = waits


def _seconds(value: str | None) -> float | None:
    """What the test expects a Retry-After to mean (None: unusable), for the long ones."""
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return float(value) if float(value) == float(value) else None  # nan is unusable
    return 86_400.0 if "2100" in value else None
