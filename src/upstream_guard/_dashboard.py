"""The dashboard: one self-contained page showing each upstream's breaker, live.

Served by the middleware at ``dashboard_path`` when that setting is given: the page itself
(inline CSS and JS, nothing fetched from elsewhere, locked down by a Content-Security-Policy
that allows only its own script and style) and ``{dashboard_path}/data``, the JSON it polls
every second: ``guard.snapshot()`` plus, per upstream, its recent calls and their latency.

Recent calls come from a ``CallLog`` subscribed to the guard's events: a bounded deque per
upstream of (endpoint template, outcome, status, duration). Nothing else of a call is kept,
so no header, query string or body can reach the page. The timeline (``_timeline``) keeps
per-second counts and state changes; the page draws it as inline SVG.

The page is read-only on purpose: its token is a read token that travels in URLs
(``?token=``), and a switch that refuses every call fleet-wide deserves more than that
(a separate secret, CSRF protection, an audit trail). Isolate and reset are the
``upstream-guard`` command's job, or ``guard.isolate`` behind an app's own admin route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from ._events import CallEvent
from ._guard import Guard
from ._timeline import Timeline

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

KEPT_CALLS = 200
"""Calls kept per upstream: the latency percentiles are over these."""
SHOWN_CALLS = 20
"""Calls per upstream the data endpoint lists (newest first)."""
_UNTIMED = frozenset({"refused", "cancelled"})
"""Outcomes left out of the latency: refused calls never ran, cancelled ones never ended."""

Entry = tuple[str, str, int | None, float]
"""One finished call: endpoint template, outcome, status, duration in seconds."""


class CallLog:
    """A guard subscriber keeping the last ``maxlen`` calls of each upstream."""

    def __init__(self, upstreams: list[str], maxlen: int = KEPT_CALLS) -> None:
        """One bounded deque per upstream name."""
        self._calls: dict[str, deque[Entry]] = {name: deque(maxlen=maxlen) for name in upstreams}
        self._lock = threading.Lock()  # hooks run in event loops and in client threads

    def __call__(self, record: CallEvent) -> None:
        """Keep what the dashboard shows of a finished call, and nothing more."""
        calls = self._calls.get(record.upstream)
        if calls is not None:
            entry = (record.endpoint, str(record.outcome), record.status, record.duration_s)
            with self._lock:
                calls.append(entry)

    def calls(self, upstream: str) -> list[Entry]:
        """The kept calls of an upstream, oldest first."""
        calls = self._calls.get(upstream)
        if calls is None:
            return []
        with self._lock:
            return list(calls)


_LOGS: weakref.WeakKeyDictionary[Guard, CallLog] = weakref.WeakKeyDictionary()


def call_log(guard: Guard) -> CallLog:
    """The guard's CallLog, subscribed on first use (once per guard)."""
    log = _LOGS.get(guard)
    if log is None:
        log = _LOGS[guard] = CallLog(list(guard.upstreams))
        guard.subscribe(log)
    return log


_TIMELINES: weakref.WeakKeyDictionary[Guard, Timeline] = weakref.WeakKeyDictionary()


def timeline(guard: Guard) -> Timeline:
    """The guard's Timeline, fed by its events and state changes (once per guard)."""
    found = _TIMELINES.get(guard)
    if found is None:
        found = _TIMELINES[guard] = Timeline(
            list(guard.upstreams), wall=guard.clock.wall, state_of=guard.state
        )
        guard.subscribe(found.on_event)
        guard.state_hooks.append(found.on_state_change)
    return found


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of values sorted ascending (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def dashboard_data(
    guard: Guard, log: CallLog, shown: int = SHOWN_CALLS, line: Timeline | None = None
) -> dict[str, Any]:
    """``guard.snapshot()`` with each upstream's recent calls, latency and timeline added."""
    snapshot = guard.snapshot()
    for name, upstream in snapshot["upstreams"].items():
        if line is not None:
            upstream["timeline"] = line.data(name)
        calls = log.calls(name)
        durations = sorted(c[3] for c in calls if c[1] not in _UNTIMED)
        upstream["recent"] = [
            {"endpoint": endpoint, "outcome": outcome, "status": status, "duration_ms": _ms(dur)}
            for endpoint, outcome, status, dur in reversed(calls[-shown:])
        ]
        upstream["latency_ms"] = {
            "p50": _ms(percentile(durations, 0.5)),
            "p99": _ms(percentile(durations, 0.99)),
            "calls": len(durations),
        }
    snapshot["recent_limit"] = shown
    return snapshot


class Dashboard:
    """The ASGI app behind ``dashboard_path`` and ``{dashboard_path}/data`` (GET only)."""

    def __init__(self, guard: Guard) -> None:
        """Serve ``guard``'s state; register its CallLog hook."""
        settings = guard.settings
        if settings.dashboard_path is None:
            raise ValueError("the dashboard needs dashboard_path to be set")
        self.guard = guard
        self.path = settings.dashboard_path
        self.data_path = f"{self.path}/data"
        self.paths = frozenset({self.path, self.data_path})
        token = settings.dashboard_token
        self._token = None if token is None else token.get_secret_value().encode()
        self.log = call_log(guard)
        self.timeline = timeline(guard)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the page or its data; 405 for other methods, 401 without the token."""
        response: Response
        if scope["method"] != "GET":
            response = PlainTextResponse(
                "method not allowed", status_code=405, headers={"allow": "GET"}
            )
        elif not self._authorized(scope):
            response = PlainTextResponse(
                "a dashboard token is required: Authorization: Bearer <token> or ?token=<token>",
                status_code=401,
                headers={"www-authenticate": 'Bearer realm="upstream_guard"', **_NO_STORE},
            )
        elif scope["path"] == self.data_path:
            response = JSONResponse(
                dashboard_data(self.guard, self.log, line=self.timeline), headers=_NO_STORE
            )
        else:
            response = HTMLResponse(PAGE, headers=_PAGE_HEADERS)
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        expected = self._token
        if expected is None:
            return True  # dashboard_allow_anonymous: the settings refuse a path without both
        given: bytes | None = None
        for key, value in scope["headers"]:
            if key == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
                break
        if given is None:
            query = scope.get("query_string", b"").decode("latin-1")
            for key, value in parse_qsl(query, keep_blank_values=True):
                if key == "token":
                    given = value.encode()
                    break
        return given is not None and hmac.compare_digest(given, expected)


_STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --warn: #b35900; --bad: #c4282c;
  --muted: #6e7781; --line: #d0d7de; --bg: #ffffff; --fg: #1f2328; --chip: #eaeef2;
  --iso: #6639ba; --stale: #0969da; --fallback: #bf8700; }
@media (prefers-color-scheme: dark) {
  :root { --line: #30363d; --bg: #0d1117; --fg: #e6edf3; --muted: #8b949e; --chip: #21262d; }
}
* { box-sizing: border-box; }
body { margin: 0; padding: 1.5rem 2rem; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
@media (max-width: 40rem) { body { padding: 1rem .75rem; } }
header { display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; }
h1 { font-size: 1.25rem; margin: 0 0 1rem; }
h2 { font-size: 1rem; margin: 1.5rem 0 .5rem; }
.meta { color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid var(--line);
  vertical-align: middle; white-space: nowrap; }
th { font-weight: 600; color: var(--muted); font-size: .8rem; text-transform: uppercase;
  letter-spacing: .03em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, monospace; }
.badge { display: inline-block; min-width: 5.5em; text-align: center; padding: .1rem .55rem;
  border-radius: 999px; font-weight: 600; color: #fff; background: var(--muted); }
.badge.closed, .badge.ok { background: var(--ok); }
.badge.half-open, .badge.degraded { background: var(--warn); }
.badge.open, .badge.unavailable { background: var(--bad); }
.badge.isolated { background: var(--iso); }
.chips { display: inline-flex; gap: 2px; vertical-align: middle; }
.chip { width: 9px; height: 18px; border-radius: 2px; background: var(--chip); }
.chip.success { background: var(--ok); }
.chip.client_error { background: #8250df; }
.chip.throttled { background: var(--warn); }
.chip.failure { background: var(--bad); }
.chip.refused { background: var(--bad); opacity: .45; }
.chip.cancelled { background: var(--muted); }
.outcome { font-weight: 600; }
.outcome.success { color: var(--ok); }
.outcome.failure, .outcome.refused { color: var(--bad); }
.outcome.throttled { color: var(--warn); }
/* Cards never grow past their column: a grid item's min-width is its content's otherwise,
   and a long endpoint spilled over the next card. Wide tables scroll inside their card. */
.cards { display: grid; gap: 1rem;
  grid-template-columns: repeat(auto-fill, minmax(min(26rem, 100%), 1fr)); }
.cards section { min-width: 0; border: 1px solid var(--line); border-radius: 6px;
  padding: .25rem .75rem .5rem; }
.cards h3 { font-size: .9rem; margin: .5rem 0; }
.scroll { overflow-x: auto; max-width: 100%; }
td.endpoint { white-space: normal; overflow-wrap: anywhere; min-width: 8rem; }
.chart { width: 100%; height: 120px; }
.chart svg { display: block; }
rect.band.closed { fill: var(--ok); } rect.band.half-open { fill: var(--warn); }
rect.band.open { fill: var(--bad); } rect.band.isolated { fill: var(--iso); }
rect.bar.live, .swatch.live { fill: var(--ok); background: var(--ok); }
rect.bar.stale, .swatch.stale { fill: var(--stale); background: var(--stale); }
rect.bar.fallback, .swatch.fallback { fill: var(--fallback); background: var(--fallback); }
rect.bar.refused, .swatch.refused { fill: var(--muted); background: var(--muted); }
rect.bar.failed, .swatch.failed { fill: var(--bad); background: var(--bad); }
.axis { fill: var(--muted); font-size: 10px; }
line.axis { stroke: var(--line); }
.legend { display: flex; flex-wrap: wrap; gap: .25rem .75rem; color: var(--muted);
  font-size: .8rem; }
.swatch.band-closed { background: var(--ok); opacity: .6; }
.swatch.band-half-open { background: var(--warn); opacity: .6; }
.swatch.band-open { background: var(--bad); opacity: .6; }
.swatch.band-isolated { background: var(--iso); opacity: .6; }
.swatch { display: inline-block; width: .7rem; height: .7rem; border-radius: 2px;
  margin-right: .25rem; vertical-align: -1px; }
.changes { color: var(--muted); font-size: .8rem; margin: .25rem 0 0; }
.empty { color: var(--muted); font-style: italic; }
#error { display: none; margin: 0 0 1rem; padding: .5rem .75rem; border-radius: 6px;
  background: var(--bad); color: #fff; }
#error.shown { display: block; }
"""

_SCRIPT = """
"use strict";
const POLL_MS = 1000;
const token = new URLSearchParams(location.search).get("token");
const dataUrl = location.pathname.replace(/\\/+$/, "") + "/data";
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}
const seconds = (s) => (s > 0 ? s.toFixed(1) + " s" : "\\u2013");
const millis = (ms) => (ms === null || ms === undefined ? "\\u2013" : ms.toFixed(1) + " ms");

function setField(row, field, text, cls) {
  const cell = row.querySelector(`[data-field="${field}"]`);
  if (cls !== undefined) {
    let badge = cell.firstElementChild;
    if (!badge) { badge = el("span"); cell.append(badge); }
    badge.className = "badge " + cls;
    badge.textContent = text;
  } else {
    cell.textContent = text;
  }
}

function upstreamRow(name) {
  const rows = $("#upstreams tbody");
  for (const row of rows.children) if (row.dataset.upstream === name) return row;
  const td = (field, cls) => el("td", cls ? {"data-field": field, class: cls}
                                           : {"data-field": field});
  const row = el("tr", {"data-upstream": name},
    el("td", {}, el("code", {}, name)), td("state"), td("failures", "num"),
    td("consecutive_failures", "num"), td("retry_after", "num"), td("cooldown", "num"),
    td("pace", "num"), td("p50", "num"), td("p99", "num"), td("recent"));
  rows.append(row);
  return row;
}

function callsSection(name) {
  const box = $("#calls");
  for (const sec of box.children) if (sec.dataset.upstreamCalls === name) return sec;
  const sec = el("section", {"data-upstream-calls": name},
    el("h3", {}, el("code", {}, name)),
    el("div", {class: "scroll"}, el("table", {}, el("thead", {}, el("tr", {},
      el("th", {}, "outcome"), el("th", {class: "num"}, "status"),
      el("th", {class: "num"}, "duration"), el("th", {}, "endpoint"))), el("tbody"))));
  box.append(sec);
  return sec;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], {hour12: false});

function timelineSection(name, series) {
  const box = $("#timelines");
  for (const sec of box.children) if (sec.dataset.upstreamTimeline === name) return sec;
  const legend = el("div", {class: "legend"});
  for (const item of series) {
    legend.append(el("span", {}, el("span", {class: "swatch " + item}), item));
  }
  for (const state of ["closed", "half-open", "open", "isolated"]) {
    legend.append(el("span", {}, el("span", {class: "swatch band-" + state}), state));
  }
  const sec = el("section", {"data-upstream-timeline": name},
    el("h3", {}, el("code", {}, name), " \u2013 calls per second and breaker state"),
    el("div", {class: "chart"}), legend, el("p", {class: "changes"}));
  box.append(sec);
  return sec;
}

function drawTimeline(sec, tl) {
  const box = sec.querySelector(".chart");
  const width = Math.max(160, box.clientWidth), height = 120;
  const bandH = 14, plotTop = bandH + 14, plotBottom = height - 16;
  const start = tl.now - tl.window_s;
  const x = (t) => Math.max(0, Math.min(width, (t - start) / tl.window_s * width));
  const chart = svg("svg", {width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "calls per second by outcome, and the breaker state, over the last " +
      Math.round(tl.window_s / 60) + " minutes"});
  for (const band of tl.bands) {
    const rect = svg("rect", {class: "band " + band.state, "data-state": band.state,
      "data-from": band.from, "data-to": band.to, x: x(band.from), y: 0,
      width: Math.max(1, x(band.to) - x(band.from)), height: bandH});
    rect.append(svg("title", {}, `${band.state} ${clock(band.from)}\u2013${clock(band.to)}`));
    chart.append(rect);
  }
  const totals = tl.seconds.map((s) => s.slice(1).reduce((a, b) => a + b, 0));
  const top = Math.max(1, ...totals);
  const barW = Math.max(1, width / tl.window_s - 0.5);
  tl.seconds.forEach((second) => {
    let y = plotBottom;
    tl.series.forEach((name, i) => {
      const n = second[i + 1];
      if (!n) return;
      const h = n / top * (plotBottom - plotTop);
      y -= h;
      const rect = svg("rect", {class: "bar " + name, "data-series": name, "data-t": second[0],
        "data-n": n, x: x(second[0]), y, width: barW, height: h});
      rect.append(svg("title", {}, `${clock(second[0])} ${name}: ${n}/s`));
      chart.append(rect);
    });
  });
  chart.append(svg("line", {class: "axis", x1: 0, x2: width, y1: plotBottom, y2: plotBottom}));
  chart.append(svg("text", {class: "axis", x: 2, y: plotTop - 3}, top + "/s"));
  chart.append(svg("text", {class: "axis", x: 2, y: height - 3}, clock(start)));
  chart.append(svg("text", {class: "axis", x: width - 2, y: height - 3, "text-anchor": "end"},
    clock(tl.now)));
  box.replaceChildren(chart);
  // In words, for a glance: "open at 12:03:10 · closed at 12:05:12".
  const changes = tl.bands.slice(1).map((b) => `${b.state} at ${clock(b.from)}`);
  sec.querySelector(".changes").textContent = changes.length ? changes.join(" \u00b7 ")
    : `${tl.bands[0]?.state ?? "closed"} throughout`;
}

function render(data) {
  setField(document.body, "status", data.status, data.status);
  $("#shared").textContent = data.shared_state;
  $("#updated").textContent = new Date().toLocaleTimeString();
  for (const [name, u] of Object.entries(data.upstreams)) {
    const row = upstreamRow(name);
    setField(row, "state", u.state, u.state);
    setField(row, "failures", String(u.failures));
    setField(row, "consecutive_failures", String(u.consecutive_failures));
    setField(row, "retry_after", seconds(u.retry_after_s));
    setField(row, "cooldown", seconds(u.cooldown_s));
    const pace = u.pace || {rate_per_s: null, source: "none"};
    setField(row, "pace", pace.rate_per_s === null ? "\u2013"
      : pace.rate_per_s.toFixed(2) + "/s " + pace.source
        + (pace.shared === "local_share" ? " (local share)" : ""));
    setField(row, "p50", millis(u.latency_ms.p50));
    setField(row, "p99", millis(u.latency_ms.p99));
    if (u.timeline) drawTimeline(timelineSection(name, u.timeline.series), u.timeline);
    const chips = el("span", {class: "chips"});
    for (const call of [...u.recent].reverse()) {
      const title = [call.outcome, call.status ?? "", millis(call.duration_ms), call.endpoint];
      chips.append(el("span", {class: "chip " + call.outcome, title: title.join(" ")}));
    }
    row.querySelector('[data-field="recent"]').replaceChildren(chips);
    const body = callsSection(name).querySelector("tbody");
    if (!u.recent.length) {
      body.replaceChildren(el("tr", {}, el("td", {colspan: "4", class: "empty"}, "no calls yet")));
      continue;
    }
    body.replaceChildren(...u.recent.map((call) => el("tr", {"data-outcome": call.outcome},
      el("td", {class: "outcome " + call.outcome}, call.outcome),
      el("td", {class: "num"}, call.status === null ? "\\u2013" : String(call.status)),
      el("td", {class: "num"}, millis(call.duration_ms)),
      el("td", {class: "endpoint"}, el("code", {}, call.endpoint)))));
  }
}

async function poll() {
  try {
    const response = await fetch(dataUrl, {
      headers: token ? {Authorization: "Bearer " + token} : {},
      cache: "no-store", credentials: "same-origin",
    });
    if (!response.ok) throw new Error(response.status === 401
      ? "unauthorized: open this page with ?token=<dashboard token>"
      : "data endpoint answered " + response.status);
    render(await response.json());
    $("#error").className = "";
  } catch (err) {
    $("#error").textContent = "Not updating: " + err.message;
    $("#error").className = "shown";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
"""

_BODY = """
<header>
  <h1>upstream_guard</h1>
  <span data-field="status"></span>
  <span class="meta">shared state: <span id="shared">\u2013</span></span>
  <span class="meta">updated <span id="updated">never</span></span>
</header>
<div id="error" role="alert"></div>
<div class="scroll">
<table id="upstreams">
  <thead><tr>
    <th>upstream</th><th>breaker</th><th class="num">failures</th>
    <th class="num">consecutive</th><th class="num">retry after</th>
    <th class="num">cooldown</th><th class="num">pace</th>
    <th class="num">p50</th><th class="num">p99</th>
    <th>recent calls (oldest \u2192 newest)</th>
  </tr></thead>
  <tbody></tbody>
</table>
</div>
<h2>Timeline (last 3 minutes)</h2>
<div id="timelines" class="cards"></div>
<h2>Recent calls (newest first)</h2>
<div id="calls" class="cards"></div>
"""


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>upstream_guard dashboard</title>\n"
    f"<style>{_STYLE}</style>\n</head>\n<body>{_BODY}<script>{_SCRIPT}</script>\n</body>\n</html>\n"
)
"""The whole page: no external resource, no data (it fetches that), no secret."""

_NO_STORE = {"cache-control": "no-store"}
_PAGE_HEADERS = {
    **_NO_STORE,
    # Only the inline script and style above may run; the page may fetch from itself only.
    "content-security-policy": (
        f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}
