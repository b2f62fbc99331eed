"""pytest plugin: run a peer suite (httpx, requests) with its local calls through the guard.

Load it with ``PYTHONPATH=checks/peer_suites pytest -p guard_plugin ...`` (run.sh does).

At session start it builds one ``upstream_guard.Guard`` with an extra upstream ``local`` that
owns the loopback hosts the suites' own test servers listen on (``127.0.0.1``, ``localhost``,
``[::1]``; no port, so any port), set up to be as transparent as the guard can be:

* breaker: ``fail_max`` 1,000,000, ``failure_ratio`` 1.0 over ``minimum_calls`` 10**9: never opens;
* retry: ``attempts`` 1 (no retry);
* timeout: ``attempt_s`` = ``total_s`` = 600 s, so each suite's own timeouts rule.

It then instruments httpx, httpx2 and requests process-wide (``guard.instrument()``): with no
inbound request being served, the patched clients use the most recently instrumented guard
still alive. Guards are held weakly, so the plugin keeps this one for the whole session. It
counts every call the guard finishes (``guard.subscribe(fn)``). The terminal summary prints
that count; a run in which the guard saw no call, or saw a call with more than one attempt or
a breaker that was not closed, exits non-zero.
Under pytest-xdist each worker counts its own calls and the controller adds them up.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any

import netblock  # loaded beside this plugin in every run: it tracks the test running
import pytest

UPSTREAM = "local"
HOSTS = ("127.0.0.1", "localhost", "[::1]")
NEVER = 1_000_000_000

_lock = threading.Lock()
_stats: Counter[str] = Counter()
_tests_with_calls: set[str] = set()
_state: dict[str, Any] = {}


def build_guard() -> Any:
    """The guard the suites run through (also handy from a REPL)."""
    from upstream_guard import (  # noqa: PLC0415 - imported at session start, not at plugin load
        BreakerSettings,
        Guard,
        GuardSettings,
        RetrySettings,
        TimeoutSettings,
        UpstreamSettings,
    )

    local = UpstreamSettings(
        hosts=HOSTS,
        breaker=BreakerSettings(
            fail_max=1_000_000, failure_ratio=1.0, minimum_calls=NEVER, window_s=3600.0
        ),
        retry=RetrySettings(attempts=1),
        timeout=TimeoutSettings(attempt_s=600.0, total_s=600.0),
    )
    return Guard(GuardSettings(upstreams={UPSTREAM: local}))


def _on_call(event: Any) -> None:
    upstream = getattr(event, "upstream", UPSTREAM)
    outcome = getattr(event, "outcome", "?")
    attempts = getattr(event, "attempts", 1)
    breaker = getattr(event, "breaker_state", "closed")
    with _lock:
        _stats["calls"] += 1
        _stats[f"upstream:{upstream}"] += 1
        _stats[f"outcome:{outcome}"] += 1
        if attempts and attempts > 1:
            _stats["multi_attempt"] += 1
        if breaker != "closed" or outcome == "refused":
            _stats["breaker_not_closed"] += 1
        _tests_with_calls.add(netblock.current_test())


def pytest_sessionstart(session: pytest.Session) -> None:
    guard = build_guard()
    guard.instrument()
    _state["unsubscribe"] = guard.subscribe(_on_call)
    _state["guard"] = guard  # guards are held weakly: this one must live for the session
    import upstream_guard  # noqa: PLC0415

    _state["source"] = os.path.dirname(upstream_guard.__file__ or "?")


def _snapshot() -> dict[str, Any]:
    with _lock:
        return {"stats": dict(_stats), "tests": len(_tests_with_calls)}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    guard = _state.get("guard")
    if guard is not None:
        _state["breaker"] = guard.state(UPSTREAM)
        snap = _snapshot()
        snap["breaker"] = _state["breaker"]
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller adds the counts up
            workeroutput["guard_plugin"] = snap
        unsubscribe = _state.pop("unsubscribe", None)
        if callable(unsubscribe):
            unsubscribe()
        guard.close()
    if getattr(session.config, "workeroutput", None) is None:
        total = _total()
        if total["stats"].get("calls", 0) == 0 or _problems(total):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


_from_workers: list[dict[str, Any]] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    snap = getattr(node, "workeroutput", {}).get("guard_plugin")
    if snap is not None:
        _from_workers.append(snap)


def _total() -> dict[str, Any]:
    mine = _snapshot()
    mine["breakers"] = [_state.get("breaker")] if "guard" in _state else []
    stats = Counter(mine["stats"])
    tests = mine["tests"]
    for snap in _from_workers:
        stats.update(snap["stats"])
        tests += snap["tests"]
        mine["breakers"].append(snap.get("breaker"))
    return {"stats": dict(stats), "tests": tests, "breakers": mine["breakers"]}


def _problems(total: dict[str, Any]) -> list[str]:
    stats = total["stats"]
    found = []
    if stats.get("multi_attempt"):
        found.append(f"{stats['multi_attempt']} calls made more than one attempt")
    if stats.get("breaker_not_closed"):
        found.append(f"{stats['breaker_not_closed']} calls met a breaker that was not closed")
    if any(b not in (None, "closed") for b in total["breakers"]):
        found.append(f"breaker {UPSTREAM!r} ended {total['breakers']}")
    return found


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if getattr(terminalreporter.config, "workeroutput", None) is not None:
        return
    total = _total()
    stats = total["stats"]
    outcomes = ", ".join(
        f"{k.split(':', 1)[1]}={v}" for k, v in sorted(stats.items()) if k.startswith("outcome:")
    )
    workers = len(_from_workers)
    where = f"{workers} xdist workers" if workers else "this process"
    terminalreporter.write_line(
        f"guard_plugin: {stats.get('calls', 0)} calls went through the guard "
        f"({outcomes or 'none'}) in {total['tests']} tests; {where}; "
        f"guard from {_state.get('source', '?')}; "
        f"breaker {UPSTREAM!r} at end: {','.join(str(b) for b in total['breakers'])}"
    )
    terminalreporter.write_line(
        f"guard_plugin: upstream_guard imported from {_state.get('source')}"
    )
    if stats.get("calls", 0) == 0:
        terminalreporter.write_line("guard_plugin: BROKEN HARNESS: the guard saw no call")
    for problem in _problems(total):
        terminalreporter.write_line(f"guard_plugin: NOT TRANSPARENT: {problem}")
    path = os.environ.get("GUARD_PLUGIN_LOG")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(f"{key}\t{value}\n" for key, value in sorted(stats.items()))
