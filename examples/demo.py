"""Live demo: the same FastAPI app, guarded and unguarded, through a scripted Spotify outage.

Run it with ``make demo`` (or ``python examples/demo.py``). It starts two simulated Spotify
Web APIs and two copies of ``examples/fastapi_app/app.py`` on loopback (uvicorn, in threads),
one of them guarded by ``install(app)``, and sends each copy the same open-loop load (a fixed
rate, whatever the answers do) while Spotify goes through: healthy -> a rate limit the guard
is not told (40 calls per rolling 4 s) -> hanging -> "no healthy upstream" -> a 429 storm ->
healthy again. A live table shows both copies side by side; a
plain-text summary follows. It ends by itself in about 50 s and works without a terminal.

Each copy has its own simulator, so "calls to Spotify" counts that copy's calls alone (and
the guard, which only guards the hosts it is told about, leaves the unguarded copy alone).
With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, the apps send their traces there.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import math
import os
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from upstream_guard import CallEvent, Guard, GuardSettings
from upstream_guard.testing import Fault, SpotifySimulator, serve

HERE = Path(__file__).resolve().parent
APP_PATH = HERE / "fastapi_app" / "app.py"
UPSTREAM = "spotify_api"
CLIENT_TIMEOUT_S = 3.0
RETRY_AFTER_S = 4
QUOTA_CALLS, QUOTA_WINDOW_S = 40, 4.0
RECENT_S = 3.0
WIDTH = 88  # of the plain-text summary
STATUS_EVERY_S = 4.0  # plain status lines, when there is no terminal

# Short settings, so that every decision happens within the demo.
GUARD_SETTINGS: dict[str, Any] = {
    "breaker": {"fail_max": 3, "reset_timeout_s": 3},
    "retry": {"max_retry_after_s": 0.5},
    "timeout": {"attempt_s": 1, "total_s": 2},
    "fallback": {"stale_if_error": True},
    "pace": {"calm_s": 10},
}
SETTINGS_TEXT = (
    "breaker.fail_max 3, breaker.reset_timeout_s 3, timeout.attempt_s 1, timeout.total_s 2, "
    "retry.max_retry_after_s 0.5, fallback.stale_if_error true, pace.calm_s 10 (adaptive, "
    "as by default)"
)

PLAYLISTS = (
    "37i9dQZF1DXcBWIGoYBM5M",
    "37i9dQZF1DX0XUsuxWHRQd",
    "37i9dQZF1DX4JAvHpjipBk",
    "37i9dQZF1DWXRqgorJj26U",
)
WORDS = ("abba", "bjork", "radiohead", "robyn", "daft punk", "massive attack", "sade")


@dataclass(frozen=True, slots=True)
class Phase:
    """One step of the outage script."""

    name: str
    seconds: float
    fault: Fault
    story: str


def script(scale: float = 1.0) -> tuple[Phase, ...]:
    """The outage, phase by phase; ``scale`` stretches or shrinks every phase."""
    return (
        Phase("healthy", 6 * scale, Fault.healthy(), "Spotify answers normally"),
        Phase(
            "rate limit",
            8 * scale,
            Fault.rolling_window(QUOTA_CALLS, QUOTA_WINDOW_S),
            f"Spotify answers {QUOTA_CALLS} calls per rolling {QUOTA_WINDOW_S:g} s and 429s "
            "the rest (the guard is not told the limit)",
        ),
        Phase("hang", 6 * scale, Fault.hang(), "Spotify accepts requests and never answers"),
        Phase(
            "no healthy upstream",
            8 * scale,
            Fault.no_healthy_upstream(),
            "Envoy answers every call 503 'no healthy upstream'",
        ),
        Phase(
            "429 storm",
            8 * scale,
            Fault.rate_limited(RETRY_AFTER_S),
            f"every call gets 429 Too Many Requests, Retry-After: {RETRY_AFTER_S}",
        ),
        Phase("recovered", 8 * scale, Fault.healthy(), "Spotify is healthy again"),
    )


@dataclass(frozen=True, slots=True)
class Result:
    """One request of the load and what came back."""

    phase: int
    route: str
    sent_at: float
    done_at: float
    status: int | None
    kind: str  # live, stale, fallback, refused, error, hung, failed, other
    error: str = ""  # the client's exception, when nothing came back

    @property
    def latency_s(self) -> float:
        """Seconds from sending to the answer (or to giving up)."""
        return self.done_at - self.sent_at


KIND_LABELS = {
    "live": "live",
    "stale": "stale copy",
    "fallback": "route fallback",
    "refused": "503 from the guard",
    "error": "5xx error",
    "hung": "hung (no answer in 3 s)",
    "failed": "connection failed",
    "other": "other",
}


@dataclass
class Target:
    """One copy of the app, its simulator, and everything seen of it."""

    name: str
    sim: SpotifySimulator
    guard: Guard | None
    url: str = ""
    results: list[Result] = field(default_factory=list)
    in_flight: int = 0
    sent: int = 0
    calls_at: list[int] = field(default_factory=list)  # simulator calls at each phase start
    throttled_at: list[int] = field(default_factory=list)  # rate-limit 429s at each phase start
    paces: list[str] = field(default_factory=list)  # the guard's pace at each phase end
    transitions: list[tuple[float, str, str]] = field(default_factory=list)
    decisions: Counter[str] = field(default_factory=Counter)  # the guard's call outcomes
    refusal_s: list[float] = field(default_factory=list)  # the guard's own time per refusal

    def calls(self) -> int:
        """Requests that reached this copy's simulated Spotify so far."""
        return len(self.sim.requests)


def load_app_module() -> ModuleType:
    """Import ``examples/fastapi_app/app.py`` (it is a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location("spotify_demo_app", APP_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {APP_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def request_for(i: int) -> tuple[str, dict[str, str], dict[str, str]]:
    """Route, query and headers of the ``i``-th request (the same for both copies).

    A third go to /now-playing, each as a different listener; a third search, each for a new
    query (so no stale copy can answer them); a third open one of four playlist pages.
    """
    n = i // 3
    if i % 3 == 0:
        return "/now-playing", {}, {"authorization": f"Bearer listener-{i}"}
    if i % 3 == 1:
        return "/search", {"q": f"{WORDS[n % len(WORDS)]} {n}"}, {}
    return f"/playlists/{PLAYLISTS[n % len(PLAYLISTS)]}", {}, {}


def classify(response: httpx.Response) -> str:
    """What kind of answer a response is, from its status and the guard's headers."""
    status = response.status_code
    mark = response.headers.get("x-upstream-guard")
    if status == 503 and mark == "unavailable":
        return "refused"
    if 200 <= status < 300:
        if mark == "fallback":
            return "fallback"
        return "stale" if response.headers.get("x-spotify-data") == "stale" else "live"
    return "error" if status >= 500 else "other"


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank percentile, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def fmt_s(seconds: float | None) -> str:
    """A duration for people: us, ms or s."""
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 0.1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def status_counts(results: Iterable[Result]) -> str:
    """``200x12 503x3 hungx4`` style counts."""
    counts = Counter(r.kind if r.status is None else str(r.status) for r in results)
    return " ".join(f"{key}x{n}" for key, n in sorted(counts.items())) or "-"


class Demo:
    """Runs the servers, the load and the display."""

    def __init__(
        self,
        *,
        rate: float,
        phases: Sequence[Phase],
        console: Console,
        make_app: Callable[..., Any],
    ) -> None:
        """Prepare two simulators and the two copies' targets."""
        self.rate = rate
        self.phases = list(phases)
        self.console = console
        self.make_app = make_app
        self.ends = [sum(p.seconds for p in self.phases[: i + 1]) for i in range(len(phases))]
        self.total_s = self.ends[-1]
        self.phase = 0
        self.t0 = time.perf_counter()
        self.guarded = Target("guarded", SpotifySimulator(), None)
        self.unguarded = Target("unguarded", SpotifySimulator(), None)
        self.targets = (self.guarded, self.unguarded)
        self.logged_transitions = 0
        self.app_urls: dict[str, str] = {}

    def now(self) -> float:
        """Seconds since the load started."""
        return time.perf_counter() - self.t0

    def phase_at(self, t: float) -> int:
        """Index of the phase running at ``t``."""
        return next((i for i, end in enumerate(self.ends) if t < end), len(self.ends) - 1)

    def log(self, message: str) -> None:
        """An event line above the live table (and in plain output)."""
        self.console.print(
            f"[dim]{self.now():6.1f}s[/dim]  {message}", highlight=False, soft_wrap=True
        )

    # -- setup ----------------------------------------------------------------------------

    def start(self, stack: ExitStack) -> None:
        """Serve both simulators and both copies of the app on loopback."""
        quiet = {"log_level": "critical"}  # the unguarded copy's 500s would print tracebacks
        for target in self.targets:
            target.url = stack.enter_context(serve(target.sim, **quiet))
        hostport = self.guarded.url.split("://", 1)[1]
        settings = GuardSettings(upstreams={UPSTREAM: {"hosts": [hostport], **GUARD_SETTINGS}})
        guarded_app = self.make_app(settings, guarded=True, api_url=self.guarded.url)
        unguarded_app = self.make_app(guarded=False, api_url=self.unguarded.url)
        self.guarded.guard = guarded_app.state.upstream_guard
        self._watch(self.guarded)
        app_urls = (
            stack.enter_context(serve(guarded_app, **quiet)),
            stack.enter_context(serve(unguarded_app, **quiet)),
        )
        self.app_urls = dict(zip((t.name for t in self.targets), app_urls, strict=True))

    def _watch(self, target: Target) -> None:
        """Record the guard's breaker transitions and call outcomes as they happen."""
        guard = target.guard
        assert guard is not None  # noqa: S101 - only the guarded copy is watched

        def on_state(_name: str, old: str, new: str) -> None:
            # Called in the app's server thread, maybe under the breaker's lock: no I/O here.
            target.transitions.append((self.now(), old, new))

        def on_call(event: CallEvent) -> None:
            if event.outcome == "refused":
                target.decisions[f"refused ({event.reason})"] += 1
                target.refusal_s.append(event.duration_s)
            else:
                target.decisions[event.outcome] += 1

        guard.state_hooks.append(on_state)  # breaker transitions, as the telemetry hears them
        guard.subscribe(on_call)

    def log_transitions(self) -> None:
        """Print the breaker transitions recorded since the last call."""
        moves = self.guarded.transitions
        for t, old, new in moves[self.logged_transitions :]:
            self.console.print(
                f"[dim]{t:6.1f}s[/dim]  guarded: breaker {UPSTREAM} [bold]{old} -> {new}[/bold]",
                highlight=False,
                soft_wrap=True,
            )
        self.logged_transitions = len(moves)

    # -- load -----------------------------------------------------------------------------

    def enter_phase(self, index: int) -> None:
        """Switch both simulators to the phase's fault."""
        previous = self.phases[self.phase].fault if index else None
        phase = self.phases[index]
        for target in self.targets:
            target.sim.set_fault(phase.fault)
            if previous is not None and previous.kind == "hang":
                target.sim.release()  # let the requests still hanging go
            target.calls_at.append(target.calls())
            target.throttled_at.append(target.sim.throttled)
            if index:
                target.paces.append(self.pace_text(target))
        self.phase = index
        self.log(f"[bold]phase {index + 1}/{len(self.phases)}: {phase.name}[/bold] - {phase.story}")

    async def fire(self, client: httpx.AsyncClient, target: Target, i: int) -> None:
        """Send one request and record what came back (or that nothing did)."""
        route, params, headers = request_for(i)
        phase = self.phase
        target.sent += 1
        target.in_flight += 1
        sent = self.now()
        status: int | None = None
        error = ""
        try:
            response = await client.get(route, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            kind, error = "hung", type(exc).__name__
        except httpx.HTTPError as exc:
            kind, error = "failed", type(exc).__name__
        else:
            status, kind = response.status_code, classify(response)
        finally:
            target.in_flight -= 1
        target.results.append(Result(phase, route, sent, self.now(), status, kind, error))

    async def drive(self, clients: dict[str, httpx.AsyncClient]) -> None:
        """Open loop: one request to each copy every 1/rate s, whatever the answers do."""
        tasks: set[asyncio.Task[None]] = set()
        count = int(self.total_s * self.rate)  # bounded in count, and so in time
        self.t0 = time.perf_counter()
        self.enter_phase(0)
        for i in range(count):
            due = i / self.rate
            delay = due - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            index = self.phase_at(due)
            if index != self.phase:
                self.enter_phase(index)
            for target in self.targets:
                task = asyncio.create_task(self.fire(clients[target.name], target, i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, self.total_s - self.now()))
        for target in self.targets:
            target.calls_at.append(target.calls())
            target.throttled_at.append(target.sim.throttled)
            target.paces.append(self.pace_text(target))
        if tasks:  # every request has a client timeout: this ends
            self.log(f"load done; waiting for the last {len(tasks)} in flight")
            await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT_S + 2)

    async def run(self, live: Live | None) -> None:
        """Drive the load while refreshing the display."""
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        async with (
            httpx.AsyncClient(
                base_url=self.app_urls["guarded"], timeout=CLIENT_TIMEOUT_S, limits=limits
            ) as guarded,
            httpx.AsyncClient(
                base_url=self.app_urls["unguarded"], timeout=CLIENT_TIMEOUT_S, limits=limits
            ) as unguarded,
        ):
            load = asyncio.create_task(self.drive({"guarded": guarded, "unguarded": unguarded}))
            next_lines = STATUS_EVERY_S
            while not load.done():
                await asyncio.wait({load}, timeout=0.25)
                self.log_transitions()
                if live is not None:
                    live.update(self.render(), refresh=True)
                elif self.now() >= next_lines:
                    next_lines += STATUS_EVERY_S
                    self.log(escape(f"[{self.phases[self.phase].name}]"))
                    self.console.print(self.status_lines(), highlight=False, soft_wrap=True)
            await load
        self.log_transitions()
        if live is not None:
            live.update(self.render(), refresh=True)

    # -- display --------------------------------------------------------------------------

    def recent(self, target: Target) -> list[Result]:
        """Answers of the last few seconds."""
        since = self.now() - RECENT_S
        return [r for r in target.results[-400:] if r.done_at >= since]

    def breaker_text(self, target: Target) -> Text:
        """The breaker state of spotify_api, coloured, with its wait."""
        if target.guard is None:
            return Text("no guard", style="dim")
        state = target.guard.state(UPSTREAM)
        wait = target.guard.retry_after_s(UPSTREAM)
        style = {"closed": "green", "open": "bold red", "half-open": "yellow"}.get(state, "")
        text = Text(state, style=style)
        if state != "closed" and wait > 0:
            text.append(f" (retry in {wait:.1f} s)", style="dim")
        return text

    def cooldown_text(self, target: Target) -> str:
        """The 429 cooldown left."""
        if target.guard is None:
            return "-"
        left = target.guard.snapshot()["upstreams"][UPSTREAM].get("cooldown_s", 0.0)
        return f"{left:.1f} s left" if left > 0 else "-"

    @staticmethod
    def pace_text(target: Target) -> str:
        """The guard's pace for spotify_api: rate and source."""
        if target.guard is None:
            return "-"
        pace = target.guard.snapshot()["upstreams"][UPSTREAM]["pace"]
        if pace["rate_per_s"] is None:
            return "none"
        return f"{pace['rate_per_s']:.1f} calls/s ({pace['source']})"

    def render(self) -> Group:
        """The live view."""
        phase = self.phases[self.phase]
        steps = Text()
        for i, p in enumerate(self.phases):
            steps.append(f" {p.name} ", style="reverse bold" if i == self.phase else "dim")
            if i < len(self.phases) - 1:
                steps.append(">", style="dim")
        header = Text.assemble(
            ("upstream_guard demo  ", "bold"),
            f"t={min(self.now(), self.total_s):4.1f}/{self.total_s:.0f} s  ",
            (f"{self.rate:g} req/s to each app\n", "dim"),
            steps,
            ("\n" + phase.story, "italic"),
        )
        table = Table(show_edge=True, expand=False)
        table.add_column("", style="bold", no_wrap=True)
        table.add_column("guarded")
        table.add_column("unguarded")
        g, u = self.guarded, self.unguarded
        both = (g, u)
        table.add_row("phase", *(phase.name for _ in both))
        table.add_row(f"breaker {UPSTREAM}", *(self.breaker_text(t) for t in both))
        table.add_row("429 cooldown", *(self.cooldown_text(t) for t in both))
        table.add_row("pace", *(self.pace_text(t) for t in both))
        table.add_row("rate-limit 429s", *(str(t.sim.throttled) for t in both))
        table.add_row("requests sent", *(str(t.sent) for t in both))
        table.add_row("calls to Spotify", *(str(t.calls()) for t in both))
        kinds = [Counter(r.kind for r in t.results) for t in both]
        for kind in ("live", "stale", "fallback", "refused", "error", "hung"):
            table.add_row(KIND_LABELS[kind], *(str(c[kind]) for c in kinds))
        table.add_row("in flight", *(str(t.in_flight) for t in both))
        table.add_row(
            f"p50 / p99, last {RECENT_S:g} s",
            *(self.latency_text(self.recent(t)) for t in both),
        )
        table.add_row("status counts", *(status_counts(t.results) for t in both))
        return Group(header, table)

    @staticmethod
    def latency_text(results: Sequence[Result]) -> str:
        """p50 / p99 of some answers."""
        latencies = [r.latency_s for r in results]
        return f"{fmt_s(percentile(latencies, 50))} / {fmt_s(percentile(latencies, 99))}"

    def status_lines(self) -> str:
        """A few plain lines for logs, when there is no terminal to redraw a table."""
        lines = []
        for t in self.targets:
            kinds = Counter(r.kind for r in t.results)
            seen = ", ".join(f"{kind} {n}" for kind, n in kinds.items()) or "-"
            state = t.guard.state(UPSTREAM) if t.guard is not None else "-"
            p99 = percentile([r.latency_s for r in self.recent(t)], 99)
            lines.append(
                f"{t.name:<9} breaker {state:<9} sent {t.sent:>3}  calls {t.calls():>3}  "
                f"p99 {fmt_s(p99):>8}  | {seen}"
            )
        return "\n".join(f"{' ' * 8} {line}" for line in lines)

    # -- summary --------------------------------------------------------------------------

    def summary(self) -> tuple[list[str], list[Check]]:
        """The plain-text summary, and the checks of what the demo should show."""
        run = Run(self.phases, self.ends, self.guarded, self.unguarded, self.rate)
        return summarize(run)


def _breakdown(results: Sequence[Result]) -> str:
    counts = Counter(r.kind for r in results)
    order = ("live", "stale", "fallback", "refused", "error", "hung", "failed", "other")
    return ", ".join(f"{counts[k]} {KIND_LABELS[k]}" for k in order if counts[k]) or "-"


@dataclass(frozen=True, slots=True)
class Run:
    """What a finished run saw, for the summary."""

    phases: Sequence[Phase]
    ends: Sequence[float]
    guarded: Target
    unguarded: Target
    rate: float

    @property
    def starts(self) -> list[float]:
        """When each phase began."""
        return [0.0, *self.ends[:-1]]

    @property
    def last(self) -> int:
        """Index of the last (recovery) phase."""
        return len(self.phases) - 1

    def throttled_in(self, target: Target, index: int) -> int:
        """Rate-limit 429s the target's Spotify answered during a phase."""
        return target.throttled_at[index + 1] - target.throttled_at[index]

    @property
    def outage(self) -> range:
        """Indexes of the phases between the first (healthy) and the last (healed)."""
        return range(1, self.last)

    def phase_of(self, t: float) -> int:
        """Index of the phase running at ``t``."""
        return next((i for i, end in enumerate(self.ends) if t < end), self.last)

    def calls_in(self, target: Target, index: int) -> int:
        """Calls that reached the target's Spotify during a phase."""
        return target.calls_at[index + 1] - target.calls_at[index]


Check = tuple[str, bool]


def summarize(run: Run) -> tuple[list[str], list[Check]]:
    """The plain-text summary of a run, and the checks of what it should show."""
    lines = [
        "",
        "upstream_guard demo: summary",
        "============================",
        (
            f"{run.ends[-1]:.0f} s of open-loop load, {run.rate:g} requests/s to each copy, "
            f"client timeout {CLIENT_TIMEOUT_S:g} s."
        ),
        *textwrap.wrap(f"Guard settings: {SETTINGS_TEXT}.", WIDTH, subsequent_indent="  "),
        "'sent': requests sent during the phase; 'calls': calls that reached Spotify.",
        "",
    ]
    for i, phase in enumerate(run.phases):
        start, end = run.starts[i], run.ends[i]
        lines.append(f"{i + 1}. {phase.name}, {start:.0f}-{end:.0f} s: {phase.story}")
        lines.extend(_phase_line(run, t, i) for t in (run.guarded, run.unguarded))
    lines += ["", "What it shows:"]
    checks: list[Check] = []
    for section in (_pace, _breaker, _refusals, _fallbacks, _cooldown, _recovery, _unguarded):
        text, found = section(run)
        lines += textwrap.wrap(f"- {text}", WIDTH, subsequent_indent="  ")
        checks.extend(found)
    return lines, checks


def _phase_line(run: Run, target: Target, index: int) -> str:
    results = [r for r in target.results if r.phase == index]
    latencies = [r.latency_s for r in results]
    return (
        f"   {target.name:<9}  sent {len(results):>3}  calls {run.calls_in(target, index):>3}  "
        f"p50 {fmt_s(percentile(latencies, 50)):>8}  p99 {fmt_s(percentile(latencies, 99)):>8}\n"
        f"   {'':<9}  {_breakdown(results)}"
    )


def _pace(run: Run) -> tuple[str, list[Check]]:
    quota = next((i for i, p in enumerate(run.phases) if p.fault.kind == "rolling_window"), None)
    if quota is None:
        return "Pace: no rate-limit phase in this script.", []
    share = {}
    for t in (run.guarded, run.unguarded):
        calls = run.calls_in(t, quota)
        share[t.name] = (run.throttled_in(t, quota), calls)
    (g429, gcalls), (u429, ucalls) = share["guarded"], share["unguarded"]
    text = (
        f"Pace: against {QUOTA_CALLS} calls per rolling {QUOTA_WINDOW_S:g} s, the guarded copy "
        f"learned a pace from the first 429s and ended the phase at "
        f"{run.guarded.paces[quota]}; Spotify answered it {g429} 429s of {gcalls} calls, "
        f"the unguarded copy {u429} of {ucalls}: {u429 - g429} 429s avoided (requests above "
        "the pace got their fallbacks at once). The learned pace lapsed after pace.calm_s."
    )
    learned = "learned" in run.guarded.paces[quota]
    fewer = g429 * 3 < max(u429, 1)
    return text, [
        ("a pace was learned from the rate limit's 429s", learned),
        ("the pace avoided most 429s", fewer),
    ]


def _breaker(run: Run) -> tuple[str, list[Check]]:
    moves = run.guarded.transitions
    opened = [t for t, _, new in moves if new == "open" and run.phase_of(t) in run.outage]
    listed = ", ".join(f"{t:.1f}s {old}->{new}" for t, old, new in moves) or "none"
    if not opened:
        return f"Breaker: never opened during the outage (transitions: {listed}).", [
            ("the breaker opened during the outage", False)
        ]
    phase = run.phases[run.phase_of(opened[0])].name
    text = (
        f"Breaker: opened at {opened[0]:.1f} s ({phase}) after "
        f"{GUARD_SETTINGS['breaker']['fail_max']} failed calls, then probed Spotify every "
        f"{GUARD_SETTINGS['breaker']['reset_timeout_s']} s; transitions: {listed}."
    )
    return text, [("the breaker opened during the outage", True)]


def _refusals(run: Run) -> tuple[str, list[Check]]:
    guarded = run.guarded
    refused = [r.latency_s for r in guarded.results if r.kind == "refused"]
    decided = guarded.refusal_s
    reasons = ", ".join(f"{n} {reason}" for reason, n in guarded.decisions.most_common()) or "-"
    p50 = percentile(refused, 50)
    text = (
        f"Refusals: {len(refused)} requests got a 503 problem+json with Retry-After, answered "
        f"end to end (HTTP over loopback, 5 servers sharing 2 cores) in p50 {fmt_s(p50)}, "
        f"p90 {fmt_s(percentile(refused, 90))}, p99 {fmt_s(percentile(refused, 99))} "
        "(the slowest had waited out a failed attempt first). "
        f"The guard's own decisions: {reasons}; a refusal took it p50 "
        f"{fmt_s(percentile(decided, 50))} (wall time in this busy process)."
    )
    fast = bool(refused) and p50 is not None and p50 < 0.05
    return text, [("refusals were answered fast (p50 under 50 ms)", fast)]


def _fallbacks(run: Run) -> tuple[str, list[Check]]:
    results = run.guarded.results
    fallbacks = sum(r.kind == "fallback" for r in results)
    stale = Counter(r.route.rsplit("/", 1)[0] or r.route for r in results if r.kind == "stale")
    where = ", ".join(f"{n} on {route}" for route, n in stale.items()) or "none"
    text = (
        '/now-playing\'s route fallback answered 200 {"is_playing": false, "degraded": true} '
        f"{fallbacks} times; stale copies answered {stale.total()} times ({where}); "
        "searches were all new queries, with no copy to serve."
    )
    return "Fallbacks: " + text, [
        ("the route fallback answered", fallbacks > 0),
        ("stale copies answered", stale.total() > 0),
    ]


def _cooldown(run: Run) -> tuple[str, list[Check]]:
    storm = next((i for i, p in enumerate(run.phases) if p.fault.kind == "rate_limited"), None)
    if storm is None:
        return "429 cooldown: no 429 phase in this script.", []
    guarded = run.calls_in(run.guarded, storm)
    unguarded = run.calls_in(run.unguarded, storm)
    text = (
        f"429 cooldown: while Spotify answered 429 with Retry-After: {RETRY_AFTER_S} for "
        f"{run.phases[storm].seconds:.0f} s, the guarded copy called it {guarded} times "
        "(a 429 pauses every call to the upstream until its Retry-After has passed; "
        f"meanwhile its callers got fallbacks), the unguarded copy {unguarded} times."
    )
    return text, [("the 429 cooldown held calls back", guarded * 4 < max(unguarded, 1))]


def _recovery(run: Run) -> tuple[str, list[Check]]:
    guarded, last = run.guarded, run.last
    healed = run.starts[last]
    first = min(
        (r.done_at for r in guarded.results if r.phase == last and r.kind == "live"),
        default=None,
    )
    closed = [t for t, _, new in guarded.transitions if new == "closed" and t >= healed]
    tail = [r for r in guarded.results if r.phase == last and r.sent_at >= healed + RECENT_S]
    live = sum(r.kind == "live" for r in tail)
    state = guarded.guard.state(UPSTREAM) if guarded.guard is not None else "?"
    text = (
        f"Recovery: Spotify healed at {healed:.0f} s; first live answer "
        + (f"{first - healed:.1f} s later" if first is not None else "never")
        + (f", breaker closed at {closed[0]:.1f} s" if closed else "")
        + f"; from {healed + RECENT_S:.0f} s on, {live} of {len(tail)} answers were live; "
        f"breaker {state} at the end."
    )
    ok = state == "closed" and len(tail) > 0 and live >= 0.9 * len(tail)
    return text, [("the guarded copy recovered", ok)]


def _unguarded(run: Run) -> tuple[str, list[Check]]:
    kinds = {t.name: Counter(r.kind for r in t.results) for t in (run.guarded, run.unguarded)}
    worst = {
        t.name: max(
            percentile([r.latency_s for r in t.results if r.phase == i], 99) or 0.0
            for i in run.outage
        )
        for t in (run.guarded, run.unguarded)
    }
    u, g = kinds["unguarded"], kinds["guarded"]
    errors = Counter(r.error for r in run.unguarded.results if r.kind == "failed")
    failed = f", {u['failed']} lost their connection ({', '.join(errors)})" if u["failed"] else ""
    text = (
        f"Unguarded copy: {u['hung']} requests hung until the {CLIENT_TIMEOUT_S:g} s client "
        f"timeout, {u['error']} got 500 Internal Server Error{failed}; its worst outage phase "
        f"p99 was {fmt_s(worst['unguarded'])}. The guarded copy: {g['hung']} hung, "
        f"{g['error']} 5xx errors, worst outage phase p99 {fmt_s(worst['guarded'])}."
    )
    return text, [
        ("the unguarded copy had hung requests", u["hung"] > 0),
        ("the guarded copy had no hung requests and no 5xx errors", not g["hung"] + g["error"]),
    ]


def configure_otel_line() -> str | None:
    """Where traces go, when OpenTelemetry is on."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    service = os.environ.get("OTEL_SERVICE_NAME", "spotify-demo")
    return f"OpenTelemetry: traces go to {endpoint} as service {service!r}."


def flush_telemetry() -> None:
    """Send the spans still buffered before the process exits."""
    from opentelemetry import metrics, trace  # noqa: PLC0415 - only when telemetry is on

    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        flush = getattr(provider, "force_flush", None)
        if flush is not None:
            flush()


SPOTIFYAIO_CHECK = (
    "spotifyaio route /me (aiohttp, https://api.spotify.com hard-coded): healthy 200, "
    "then 503 problem+json, not 500, when Spotify has no healthy upstream"
)


def aiohttp_adapter_present() -> bool:
    """Whether this upstream_guard guards aiohttp and can intercept its calls to Spotify."""
    if importlib.util.find_spec("upstream_guard._aiohttp") is None:
        return False
    module = importlib.import_module("upstream_guard._aiohttp")
    return hasattr(module, "intercepting")


def check_spotifyaio_route(make_app: Callable[..., Any]) -> tuple[list[str], list[Check]]:
    """The guarded copy's /me route, which spotifyaio cannot point anywhere but Spotify.

    Spotify's real hosts are answered by a simulator through ``SpotifySimulator.intercept()``
    (one more loopback server); the route is asked once healthy and once while Spotify
    answers "no healthy upstream", with stale copies off. Without the aiohttp adapter nothing
    is sent (spotifyaio would call the real Spotify) and the check is reported missing.
    """
    if not aiohttp_adapter_present():
        missing = (
            "spotifyaio /me: not run: this upstream_guard has no aiohttp adapter "
            "(upstream_guard._aiohttp.intercepting)"
        )
        return [missing], [(SPOTIFYAIO_CHECK, False)]
    # Stale copies off: spotifyaio hides the guard's stale marker, and the 503 is the point.
    no_stale = {**GUARD_SETTINGS, "fallback": {"stale_if_error": False}}
    app = make_app(GuardSettings(upstreams={UPSTREAM: no_stale}), guarded=True)
    with (
        SpotifySimulator().intercept() as spotify,
        serve(app, log_level="critical") as url,
        httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S * 2) as client,
    ):
        healthy = client.get("/me")
        spotify.set_fault(Fault.no_healthy_upstream())
        outage = client.get("/me")
    problem = outage.headers.get("content-type") == "application/problem+json"
    line = (
        "spotifyaio /me through SpotifySimulator.intercept(): "
        f"healthy {healthy.status_code}, no healthy upstream {outage.status_code} "
        f"{outage.headers.get('content-type', '-')}"
    )
    ok = healthy.status_code == 200 and outage.status_code == 503 and problem
    return [line], [(SPOTIFYAIO_CHECK, ok)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; the exit status says whether it showed everything it should."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=20, help="requests/s to each copy")
    parser.add_argument("--scale", type=float, default=1.0, help="stretch every phase by this")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 100 or not 0.5 <= args.scale <= 3:
        parser.error("--rate must be in (0, 100] and --scale in [0.5, 3]")

    console = Console()
    app_module = load_app_module()
    demo = Demo(
        rate=args.rate, phases=script(args.scale), console=console, make_app=app_module.create_app
    )
    console.print(
        "[bold]upstream_guard demo[/bold]: the example FastAPI app, guarded (install(app)) "
        "and unguarded, through a simulated Spotify outage.",
        highlight=False,
    )
    console.print(f"Guard settings: {SETTINGS_TEXT}.", highlight=False)
    otel = configure_otel_line()
    if otel:
        console.print(otel, highlight=False)
    with ExitStack() as stack:
        demo.start(stack)
        if console.is_interactive:
            with Live(demo.render(), console=console, auto_refresh=False, transient=False) as live:
                asyncio.run(demo.run(live))
                live.refresh()
        else:
            asyncio.run(demo.run(None))
            console.print(demo.render())
    lines, checks = demo.summary()
    aio_lines, aio_checks = check_spotifyaio_route(app_module.create_app)
    lines, checks = [*lines, *aio_lines], [*checks, *aio_checks]
    if otel:
        flush_telemetry()
    print("\n".join(lines))  # plain text on purpose: it should read the same in a CI log
    print()
    for label, ok in checks:
        print(f"[{'ok' if ok else 'MISSING'}] {label}")
    failed = [label for label, ok in checks if not ok]
    print(
        "\nEverything the demo should show was shown."
        if not failed
        else f"\n{len(failed)} expected behaviour(s) not seen in this run."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
