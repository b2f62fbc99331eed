"""The dashboard: one self-contained page showing each upstream's breaker, live.

Served by the middleware at ``dashboard_path`` when that setting is given: the page itself
(inline CSS and JS, nothing fetched from elsewhere, locked down by a Content-Security-Policy
that allows only its own script and style) and ``{dashboard_path}/data``, the JSON it polls
every second: ``guard.snapshot()`` plus, per upstream, its recent calls and their latency.

Recent calls come from a ``CallLog`` subscribed to the guard's events: a bounded deque per
upstream of (endpoint template, outcome, status, duration). Nothing else of a call is kept,
so no header, query string or body can reach the page.
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


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of values sorted ascending (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def dashboard_data(guard: Guard, log: CallLog, shown: int = SHOWN_CALLS) -> dict[str, Any]:
    """``guard.snapshot()`` with each upstream's recent calls and latency added."""
    snapshot = guard.snapshot()
    for name, upstream in snapshot["upstreams"].items():
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
            response = JSONResponse(dashboard_data(self.guard, self.log), headers=_NO_STORE)
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
  --muted: #6e7781; --line: #d0d7de; --bg: #ffffff; --fg: #1f2328; --chip: #eaeef2; }
@media (prefers-color-scheme: dark) {
  :root { --line: #30363d; --bg: #0d1117; --fg: #e6edf3; --muted: #8b949e; --chip: #21262d; }
}
* { box-sizing: border-box; }
body { margin: 0; padding: 1.5rem 2rem; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
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
.calls { display: grid; grid-template-columns: repeat(auto-fill, minmax(26rem, 1fr)); gap: 1rem; }
.calls section { border: 1px solid var(--line); border-radius: 6px; padding: .25rem .75rem .5rem; }
.calls h3 { font-size: .9rem; margin: .5rem 0; }
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
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "outcome"),
      el("th", {class: "num"}, "status"), el("th", {class: "num"}, "duration"),
      el("th", {}, "endpoint"))), el("tbody")));
  box.append(sec);
  return sec;
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
      el("td", {}, el("code", {}, call.endpoint)))));
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
<h2>Recent calls (newest first)</h2>
<div id="calls" class="calls"></div>
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
