"""The outage drill: the example app, guarded and unguarded, under open-loop load through an outage.

Everything runs on loopback: the simulated Spotify (``SpotifySimulator``) and the example app
(``examples/fastapi_app/app.py``) each under uvicorn (``serve``) in a process of its own, and
in this process an open-loop load of RATE requests/s (an asyncio task launched on a fixed
schedule, whatever the answers do; bounded in count, each with a client timeout), alternating
``/search?q=...`` and ``/playlists/{id}``. Three processes, because with all three in one
(threads sharing one GIL) the load generator and the servers starve each other at 100
requests/s and latencies measure the GIL, not the guard. Each copy gets its own simulator and
runs alone (guarded first, then unguarded), so one copy's hung requests cannot slow the other's.
Breaker transitions are recorded in the app's process (a ``state_hooks`` entry) on the
system-wide monotonic clock and sent back at the end.

Script per scenario: healthy (HEALTHY_S) -> outage (OUTAGE_S) -> healed (HEALED_S). The
outages: ``Fault.hang()`` (Spotify accepts and never answers) and
``Fault.no_healthy_upstream()`` (Envoy's instant 503). Latency figures are for requests
STARTED from WINDOW_FROM_S into the outage until its end (the steady state of the outage,
after the breaker has had time to trip); a client timeout counts as CLIENT_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

from _common import table, write

from upstream_guard import Guard, GuardSettings
from upstream_guard.testing import Fault, SpotifySimulator, serve

APP_PATH = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app" / "app.py"
UPSTREAM = "spotify_api"
RATE = 100.0
HEALTHY_S, OUTAGE_S, HEALED_S = 5.0, 15.0, 10.0
WINDOW_FROM_S = 5.0
CLIENT_TIMEOUT_S = 5.0
GUARD: dict[str, Any] = {
    "breaker": {"fail_max": 5, "reset_timeout_s": 5},
    "timeout": {"attempt_s": 2, "total_s": 4},
}
GUARD_TEXT = "breaker.fail_max 5, breaker.reset_timeout_s 5, timeout.attempt_s 2, timeout.total_s 4"
RESET_S = float(GUARD["breaker"]["reset_timeout_s"])
PROBE_S = float(GUARD["timeout"]["attempt_s"])  # the longest a probe can take
TOTAL_S = float(GUARD["timeout"]["total_s"])
P99_GOAL_MS = 20.0
PLAYLISTS = ("37i9dQZF1DXcBWIGoYBM5M", "37i9dQZF1DX0XUsuxWHRQd", "37i9dQZF1DX4JAvHpjipBk")
SCENARIOS = (("hang", Fault.hang()), ("no healthy upstream", Fault.no_healthy_upstream()))


@dataclass(frozen=True, slots=True)
class Answer:
    sent: float  # seconds since the load started
    done: float
    kind: str  # "200 live", "200 stale", "503 guard", "500", ..., "client timeout", "conn error"

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass
class Run:
    scenario: str
    guarded: bool
    answers: list[Answer] = field(default_factory=list)
    transitions: list[tuple[float, str, str]] = field(default_factory=list)
    upstream_calls_in_outage: int = 0
    final_state: str = "-"
    t0: float = 0.0  # time.monotonic() when the load started (system-wide on Linux)
    outage_at: float = HEALTHY_S  # when the simulator actually switched
    healed_at: float = HEALTHY_S + OUTAGE_S
    max_lag_s: float = 0.0  # how late the load generator launched a request, at worst
    app_cpu_s: float = 0.0  # CPU time of the app's process during the load
    sim_cpu_s: float = 0.0  # and of the simulator's


def load_app_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spotify_demo_app", APP_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {APP_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def request_for(i: int) -> str:
    if i % 2 == 0:
        return f"/search?q=drill+{i % 7}"
    return f"/playlists/{PLAYLISTS[i % len(PLAYLISTS)]}"


# -- the two servers, each in its own process (one GIL each) ---------------------------------


def upstream_process(conn: Connection) -> None:
    """Serve a simulator; obey ("fault", kind), ("release",), ("calls",), ("cpu",), ("stop",)."""
    faults = {"healthy": Fault.healthy(), **dict(SCENARIOS)}
    sim = SpotifySimulator()
    with serve(sim, log_level="critical") as url:
        conn.send(url)
        while True:
            command, *args = conn.recv()
            if command == "fault":
                sim.set_fault(faults[args[0]])
                conn.send(None)
            elif command == "release":
                sim.release()
                conn.send(None)
            elif command == "calls":
                conn.send(len(sim.requests))
            elif command == "cpu":
                conn.send(time.process_time())
            else:
                break


def app_process(conn: Connection, sim_url: str, guarded: bool) -> None:
    """Serve the example app (guarded or not); on ("stop",) send back the breaker's story."""
    make_app = load_app_module().create_app
    transitions: list[tuple[float, str, str]] = []
    if guarded:
        hostport = sim_url.split("://", 1)[1]
        settings = GuardSettings(upstreams={UPSTREAM: {"hosts": [hostport], **GUARD}})
        app = make_app(settings, guarded=True, api_url=sim_url)
        guard: Guard = app.state.upstream_guard

        def on_state(_name: str, old: str, new: str) -> None:
            transitions.append((time.monotonic(), old, new))

        guard.state_hooks.append(on_state)
    else:
        app = make_app(guarded=False, api_url=sim_url)
    with serve(app, log_level="critical") as url:  # the unguarded 500s would print tracebacks
        conn.send(url)
        cpu0 = time.process_time()
        conn.recv()
        cpu = time.process_time() - cpu0
        conn.send((transitions, guard.state(UPSTREAM) if guarded else "-", cpu))


def ask(conn: Connection, *command: Any) -> Any:
    conn.send(command)
    return conn.recv()


async def http_get(host: str, port: int, path: str) -> tuple[int, dict[str, str]]:
    """One GET on a new connection: status and headers (the body is read and dropped).

    A few lines of asyncio instead of an httpx client: at 100 requests/s with hundreds of
    requests hanging, httpcore's pool spends its time scanning connections (its work per
    request grows with the requests in flight), and the load generator, not the app, becomes
    the bottleneck. Here each request costs the same, whatever the others are doing.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("ascii"))
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        await (reader.readexactly(int(length)) if length is not None else reader.read())
        return status, headers
    finally:
        writer.close()


def kind_of(status: int, headers: dict[str, str]) -> str:
    if headers.get("x-upstream-guard") == "unavailable":
        return f"{status} guard"
    if status == 200:
        return f"200 {headers.get('x-spotify-data', 'live')}"
    return str(status)


async def drive(app_url: str, sim: Connection, scenario: str, run: Run) -> None:
    """Open loop: one request every 1/RATE s; the simulator switched on the phase boundaries."""
    total = HEALTHY_S + OUTAGE_S + HEALED_S
    count = int(total * RATE)
    tasks: set[asyncio.Task[None]] = set()
    host, port = app_url.split("://", 1)[1].rsplit(":", 1)
    t0 = run.t0

    async def fire(i: int) -> None:
        sent = time.monotonic() - t0
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                status, headers = await http_get(host, int(port), request_for(i))
        except TimeoutError:
            kind = "client timeout"
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            kind = "conn error"
        else:
            kind = kind_of(status, headers)
        run.answers.append(Answer(sent, time.monotonic() - t0, kind))

    phase = 0
    calls_at_outage = 0
    for i in range(count):
        due = i / RATE
        delay = due - (time.monotonic() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        run.max_lag_s = max(run.max_lag_s, -delay)
        if phase == 0 and due >= HEALTHY_S:
            phase = 1
            calls_at_outage = ask(sim, "calls")
            ask(sim, "fault", scenario)
            run.outage_at = time.monotonic() - t0
        elif phase == 1 and due >= HEALTHY_S + OUTAGE_S:
            phase = 2
            ask(sim, "fault", "healthy")
            ask(sim, "release")  # requests still hanging answer (504) now
            run.healed_at = time.monotonic() - t0
            run.upstream_calls_in_outage = ask(sim, "calls") - calls_at_outage
        task = asyncio.create_task(fire(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:  # every request has a client timeout: this ends
        await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT_S + 2)


def run_once(scenario: str, *, guarded: bool) -> Run:
    run = Run(scenario, guarded)
    ctx = multiprocessing.get_context("spawn")
    sim_conn, sim_child = ctx.Pipe()
    app_conn, app_child = ctx.Pipe()
    upstream = ctx.Process(target=upstream_process, args=(sim_child,), daemon=True)
    upstream.start()
    sim_url = sim_conn.recv()
    app = ctx.Process(target=app_process, args=(app_child, sim_url, guarded), daemon=True)
    app.start()
    app_url = app_conn.recv()
    try:
        sim_cpu0 = ask(sim_conn, "cpu")
        run.t0 = time.monotonic()
        asyncio.run(drive(app_url, sim_conn, scenario, run))
        run.sim_cpu_s = ask(sim_conn, "cpu") - sim_cpu0
        transitions, run.final_state, run.app_cpu_s = ask(app_conn, "stop")
        run.transitions = [(t - run.t0, old, new) for t, old, new in transitions]
        sim_conn.send(("stop",))
    finally:
        for process in (app, upstream):
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
    return run


# -- figures ---------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


@dataclass
class Figures:
    base_p50: float | None  # the healthy phase before the outage
    base_p99: float | None
    base_bad: int  # answers other than a live 200 in the healthy phase
    p50: float | None  # requests started in the window
    p99: float | None
    worst: float | None
    window_kinds: Counter[str]
    run_kinds: Counter[str]
    over_total: int  # requests (whole run) slower than timeout.total_s, plus a little
    trip_s: float | None  # breaker open, after the outage started
    first_guard_s: float | None  # first guard 503 answered, after the outage started
    first_live_s: float | None  # first live 200 of a request sent after the heal
    closed_s: float | None  # breaker closed, after the heal
    recovered_s: float | None
    tail_live: float  # share of live 200s among requests sent in the last 3 s


def figures(run: Run) -> Figures:
    outage, healed = run.outage_at, run.healed_at
    base = [a for a in run.answers if a.sent < outage]
    window = [a for a in run.answers if outage + WINDOW_FROM_S <= a.sent < healed]
    tail = [a for a in run.answers if a.sent >= healed + HEALED_S - 3]
    lat = [a.latency for a in window]
    opened = [t for t, _, new in run.transitions if new == "open" and t >= outage]
    guard_503 = [a.done for a in run.answers if a.kind.endswith("guard") and a.done >= outage]
    live = [a.done for a in run.answers if a.sent >= healed and a.kind == "200 live"]
    closed = [t for t, _, new in run.transitions if new == "closed" and t >= healed]
    first_live = min(live) - healed if live else None
    closed_s = closed[0] - healed if closed else None
    if run.guarded:
        recovered = None if first_live is None or closed_s is None else max(first_live, closed_s)
    else:
        recovered = first_live
    return Figures(
        base_p50=statistics.median([a.latency for a in base]) if base else None,
        base_p99=pct([a.latency for a in base], 99),
        base_bad=sum(a.kind != "200 live" for a in base),
        p50=statistics.median(lat) if lat else None,
        p99=pct(lat, 99),
        worst=max(lat) if lat else None,
        window_kinds=Counter(a.kind for a in window),
        run_kinds=Counter(a.kind for a in run.answers),
        over_total=sum(a.latency > TOTAL_S + 0.25 for a in run.answers),
        trip_s=opened[0] - outage if opened else None,
        first_guard_s=min(guard_503) - outage if guard_503 else None,
        first_live_s=first_live,
        closed_s=closed_s,
        recovered_s=recovered,
        tail_live=sum(a.kind == "200 live" for a in tail) / max(1, len(tail)),
    )


def kinds_text(kinds: Counter[str]) -> str:
    order = ["200 live", "200 stale", "503 guard", "500", "client timeout", "conn error"]
    keys = [k for k in order if kinds[k]] + sorted(k for k in kinds if k not in order)
    return ", ".join(f"{kinds[k]} {k}" for k in keys) or "-"


def verdict(measured: float | None, goal: float, unit: str = "") -> str:
    if measured is None:
        return "NO (not measured)"
    if measured <= goal:
        return "yes"
    return f"NO, missed by {measured - goal:.3g}{unit}"


def transitions_text(run: Run) -> str:
    moves = [(t - run.outage_at, new) for t, _, new in run.transitions]
    return ", ".join(f"{new} {t:+.2f}s" for t, new in moves) or "none"


def report(runs: list[Run]) -> str:
    parts = []
    checks = []
    story = []
    for scenario, _ in SCENARIOS:
        rows, notes = [], []
        for run in (r for r in runs if r.scenario == scenario):
            f = figures(run)
            name = "guard on" if run.guarded else "guard off"
            rows.append(
                [
                    name,
                    f"{ms(f.base_p50)} / {ms(f.base_p99)}, {f.base_bad} not live",
                    ms(f.p50),
                    ms(f.p99),
                    ms(f.worst),
                    kinds_text(f.window_kinds),
                    str(f.run_kinds["500"]),
                    str(f.run_kinds["client timeout"]),
                    str(f.over_total),
                    str(run.upstream_calls_in_outage),
                    ms(f.first_live_s),
                    f"{f.tail_live:.0%}",
                ]
            )
            notes.append(
                f"{name}: {len(run.answers)} requests, launched at worst {ms(run.max_lag_s)} "
                f"late; the app's process used {run.app_cpu_s:.1f} s of CPU "
                f"({run.app_cpu_s / max(1, len(run.answers)) * 1000:.2f} ms per request), the "
                f"simulator's {run.sim_cpu_s:.1f} s."
                + (
                    f" Breaker transitions (from the outage start): {transitions_text(run)}; "
                    f"state at the end: {run.final_state}."
                    if run.guarded
                    else ""
                )
            )
            if not run.guarded:
                continue
            story.append(
                [
                    scenario,
                    ms(f.trip_s),
                    ms(f.first_guard_s),
                    ms(f.first_live_s),
                    ms(f.closed_s),
                    ms(f.recovered_s),
                ]
            )
            bound = RESET_S + PROBE_S
            p99_ms = None if f.p99 is None else f.p99 * 1000
            checks += [
                [
                    f"{scenario}: p99 in the window",
                    ms(f.p99),
                    f"< {P99_GOAL_MS:g} ms",
                    verdict(p99_ms, P99_GOAL_MS, " ms"),
                ],
                [
                    f"{scenario}: 500s (whole run)",
                    str(f.run_kinds["500"]),
                    "0",
                    verdict(f.run_kinds["500"], 0),
                ],
                [
                    f"{scenario}: recovery after the heal",
                    ms(f.recovered_s),
                    f"<= {bound:g} s (reset_timeout_s + one probe of at most attempt_s)",
                    verdict(f.recovered_s, bound, " s"),
                ],
            ]
        parts.append(
            f"### Outage: {scenario}\n\n"
            + table(
                [
                    "copy",
                    "healthy phase p50 / p99",
                    "window p50",
                    "window p99",
                    "window max",
                    "answers in the window",
                    "500s (run)",
                    "client timeouts (run)",
                    f"slower than {TOTAL_S + 0.25:g} s (run)",
                    "upstream calls in the outage",
                    "first live 200 after heal",
                    "live, last 3 s",
                ],
                rows,
            )
            + "\n\n"
            + "\n\n".join(notes)
        )
    intro = (
        f"Open loop, {RATE:g} requests/s on loopback (example app and simulator each under "
        "uvicorn in its own process, the load in a third, a new connection per request), "
        f"client timeout {CLIENT_TIMEOUT_S:g} s (total), alternating /search?q= and "
        f"/playlists/{{id}}. Each scenario: healthy {HEALTHY_S:g} s -> outage {OUTAGE_S:g} s "
        f"-> healed {HEALED_S:g} s; guard on and guard off run one after the other, each "
        f"against its own simulator. Guard settings: {GUARD_TEXT} (the rest default; "
        "stale-if-error off, so every request the guard cannot serve gets its 503). 'window': "
        f"requests started from {WINDOW_FROM_S:g} s into the outage until its end; a client "
        f"timeout counts as {CLIENT_TIMEOUT_S:g} s. 'slower than': requests of the whole run "
        f"that took longer than timeout.total_s + 0.25 s end to end. 'live, last 3 s': share "
        "of live 200s among the requests sent in the last 3 s of the run. The healthy-phase "
        "column is the baseline: if it is slow or not all live, the machine was saturated "
        "and the rest of the row says more about the machine than about the guard.\n\n"
    )
    timeline = (
        "### Trip and recovery (guard on)\n\n"
        + table(
            [
                "outage",
                "breaker open after",
                "first guard 503 after",
                "first live 200 after heal",
                "breaker closed after heal",
                "recovered after heal",
            ],
            story,
        )
        + "\n\n'after' the outage start, or the heal; 'recovered': the later of the first "
        "live 200 and the breaker closing."
    )
    return (
        intro
        + "\n\n".join(parts)
        + "\n\n"
        + timeline
        + "\n\n### Targets (guard on)\n\n"
        + table(["target", "measured", "goal", "met"], checks)
    )


def main() -> None:
    runs = []
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    for scenario, _ in SCENARIOS:
        for guarded in (True, False):
            print(f"running: {scenario}, guard {'on' if guarded else 'off'}", flush=True)
            runs.append(run_once(scenario, guarded=guarded))
    body = (
        report(runs)
        + f"\n\nWall time of the drill: {time.perf_counter() - started:.0f} s; 1-min load "
        + f"average at the start: {load0:.2f}."
    )
    write("outage_drill", "Outage drill: the example app under load through an outage", body)


if __name__ == "__main__":
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # no telemetry export in the drill
    main()
