"""The public API: its types, its lifecycle, and the two runners that must stay twins."""

from __future__ import annotations

import gc
import inspect
import weakref
from pathlib import Path

import aiohttp
import httpx
import requests.adapters
from starlette.applications import Starlette

from upstream_guard import UpstreamGuardMiddleware, install
from upstream_guard.testing import FakeClock

TYPING = Path(__file__).parent / "typing" / "api.py"


def test_public_api_type_checks_under_mypy_strict():
    """tests/typing/api.py, written as users write the API, passes mypy --strict."""
    from mypy import api

    out, err, status = api.run(["--strict", "--no-incremental", str(TYPING)])
    assert status == 0, out + err


def patched() -> bool:
    return any(
        hasattr(method, "__upstream_guard__")
        for method in (
            httpx.AsyncHTTPTransport.handle_async_request,
            httpx.HTTPTransport.handle_request,
            requests.adapters.HTTPAdapter.send,
            aiohttp.ClientSession._request,
        )
    )


def test_apps_built_and_dropped_leave_no_guard_behind():
    """1000 apps built without running their lifespan: every guard is collected, clients unpatched."""
    refs = []
    app: Starlette | UpstreamGuardMiddleware
    for i in range(1000):
        app = Starlette()
        if i % 2:
            refs.append(weakref.ref(install(app, clock=FakeClock())))
        else:
            app = UpstreamGuardMiddleware(app)
            refs.append(weakref.ref(app.guard))
    assert patched()  # the last app is alive: its guard is installed
    del app
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0
    assert not patched()


def test_a_live_app_keeps_its_guard_and_the_patches():
    """The guard of an app still referenced stays installed while others are collected."""
    kept = Starlette()
    guard = install(kept, clock=FakeClock())
    for _ in range(10):
        install(Starlette(), clock=FakeClock())
    gc.collect()
    assert patched()
    guard.close()
    assert not patched()


def test_sync_runner_is_the_async_runner_without_await():
    """run_sync is run_async with the awaits taken out, as httpcore keeps its twins."""
    from upstream_guard import _call

    rewritten = (
        inspect.getsource(_call.run_async)
        .replace("async def run_async", "def run_sync")
        .replace("AsyncAdapter", "SyncAdapter")
        .replace("an async client", "a sync client")
        .replace("await rt.clock.sleep(", "rt.clock.sleep_sync(")
        .replace("await coalesce.follow_async(", "coalesce.follow_sync(")
        .replace("hedge.async_sender(", "hedge.sync_sender(")
        .replace("await rt.pace.reserve(", "rt.pace.reserve_sync(")
        .replace("await ", "")
    )
    assert rewritten == inspect.getsource(_call.run_sync)
