"""The dashboard: off by default, token-guarded, no secrets, and live in a real browser."""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from conftest import CHROMIUM, CHROMIUM_ARGS, make_settings
from upstream_guard import (
    CallEvent,
    GuardSettings,
    SettingsError,
    UpstreamGuardMiddleware,
    install,
)
from upstream_guard._dashboard import _LOGS, PAGE, CallLog, call_log, percentile, timeline
from upstream_guard.testing import FakeClock, Fault, serve

DASHBOARD = "/_upstream_guard/dashboard"
DATA = f"{DASHBOARD}/data"
TOKEN = "dash-t0ken"  # noqa: S105 - a test token
TRACK = "3n3Ppam7vgaVa1iaRUc9Lp"


@pytest.fixture
def dashboard_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the dashboard on the way users do: through the environment."""
    monkeypatch.setenv("UPSTREAM_GUARD_DASHBOARD_PATH", DASHBOARD)
    monkeypatch.setenv("UPSTREAM_GUARD_DASHBOARD_TOKEN", TOKEN)


def build_app(api_url: str) -> FastAPI:
    """An app calling Spotify with a token in both the header and the query string."""
    app = FastAPI()

    @app.get("/tracks/{track_id}")
    async def track(track_id: str) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"{api_url}/v1/tracks/{track_id}",
                params={"access_token": "s3cret"},
                headers={"Authorization": "Bearer s3cret"},
            )
        response.raise_for_status()
        return {"name": response.json()["name"]}

    return app


@contextlib.contextmanager
def client_for(app: Any) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_off_by_default(sim, sim_url, clock):
    """Without dashboard_path the app answers both paths itself (404) and no hook is added."""
    app = build_app(sim_url)
    guard = install(app, make_settings(sim_url), clock=clock)
    assert guard.settings.dashboard_path is None
    with client_for(app) as client:
        assert client.get(DASHBOARD, headers=bearer()).status_code == 404
        assert client.get(DATA, headers=bearer()).status_code == 404
        assert client.get(f"/tracks/{TRACK}").status_code == 200
    assert guard not in _LOGS


@pytest.mark.usefixtures("dashboard_env")
def test_token_is_required(sim, sim_url, clock):
    """401 without or with a wrong token; 200 with the Bearer header or ?token=."""
    app = build_app(sim_url)
    install(app, make_settings(sim_url), clock=clock)
    with client_for(app) as client:
        for path in (DASHBOARD, DATA):
            refused = client.get(path)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert client.get(path, headers=bearer("wrong")).status_code == 401
            assert client.get(path, params={"token": "wrong"}).status_code == 401
            assert client.get(path, headers={"Authorization": TOKEN}).status_code == 401
            assert client.get(path, headers=bearer()).status_code == 200
            assert client.get(path, params={"token": TOKEN}).status_code == 200
        page = client.get(DASHBOARD, params={"token": TOKEN})
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"
        assert client.get(DATA, headers=bearer()).headers["content-type"] == "application/json"


@pytest.mark.usefixtures("dashboard_env")
def test_get_only_and_other_paths_untouched(sim, sim_url, clock):
    """Other methods get 405; paths beside the dashboard's two still reach the app."""
    app = build_app(sim_url)
    install(app, make_settings(sim_url), clock=clock)
    with client_for(app) as client:
        response = client.post(DATA, headers=bearer())
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"
        assert client.get(f"{DASHBOARD}/other", headers=bearer()).status_code == 404
        assert client.get(f"{DASHBOARD}/", headers=bearer()).status_code == 404
        assert client.get(f"/tracks/{TRACK}").status_code == 200
        assert client.get("/_upstream_guard/health").json()["status"] == "ok"


def test_settings_refuse_a_dashboard_without_token(monkeypatch):
    """dashboard_path without a token is refused, naming the fields and env variables."""
    with pytest.raises(SettingsError) as info:
        GuardSettings(dashboard_path=DASHBOARD)
    message = str(info.value)
    assert "dashboard_token" in message
    assert "UPSTREAM_GUARD_DASHBOARD_TOKEN" in message
    assert "UPSTREAM_GUARD_DASHBOARD_ALLOW_ANONYMOUS" in message
    monkeypatch.setenv("UPSTREAM_GUARD_DASHBOARD_PATH", DASHBOARD)
    with pytest.raises(SettingsError, match="UPSTREAM_GUARD_DASHBOARD_TOKEN"):
        UpstreamGuardMiddleware(FastAPI())
    with pytest.raises(SettingsError, match="must not be empty"):
        GuardSettings(dashboard_token="")
    with pytest.raises(SettingsError, match="UPSTREAM_GUARD_DASHBOARD_PATH"):
        GuardSettings(dashboard_path="dashboard", dashboard_token=TOKEN)
    with pytest.raises(SettingsError, match="overlap health_path"):
        GuardSettings(dashboard_path="/_upstream_guard/health", dashboard_token=TOKEN)
    settings = GuardSettings(dashboard_path=f"{DASHBOARD}/", dashboard_token=TOKEN)
    assert settings.dashboard_path == DASHBOARD
    assert TOKEN not in repr(settings)


def test_anonymous_dashboard_when_explicitly_allowed(sim, sim_url, clock, monkeypatch):
    """dashboard_allow_anonymous serves the dashboard without any token."""
    monkeypatch.setenv("UPSTREAM_GUARD_DASHBOARD_PATH", DASHBOARD)
    monkeypatch.setenv("UPSTREAM_GUARD_DASHBOARD_ALLOW_ANONYMOUS", "true")
    app = build_app(sim_url)
    install(app, make_settings(sim_url), clock=clock)
    with client_for(app) as client:
        assert client.get(DASHBOARD).status_code == 200
        assert client.get(DATA).status_code == 200


@pytest.mark.usefixtures("dashboard_env")
def test_data_shape(sim, sim_url, clock):
    """The data is the health snapshot plus each upstream's recent calls and latency."""
    app = build_app(sim_url)
    guard = install(
        app, make_settings(sim_url, breaker={"fail_max": 2}, retry={"attempts": 1}), clock=clock
    )
    with client_for(app) as client:
        empty = client.get(DATA, headers=bearer()).json()
        assert empty["upstreams"]["spotify_api"]["recent"] == []
        assert empty["upstreams"]["spotify_api"]["latency_ms"] == {
            "p50": None,
            "p99": None,
            "calls": 0,
        }
        assert client.get(f"/tracks/{TRACK}").status_code == 200
        sim.set_fault(Fault.no_healthy_upstream())
        for _ in range(3):  # two failures open the breaker, the third is refused
            assert client.get(f"/tracks/{TRACK}").status_code == 503
        data = client.get(DATA, headers=bearer()).json()
    snapshot = guard.snapshot()
    assert data["status"] == snapshot["status"] == "unavailable"
    assert data["shared_state"] == "off"
    assert data["recent_limit"] == 20
    assert set(data["upstreams"]) == {"spotify_api", "spotify_accounts"}
    api = data["upstreams"]["spotify_api"]
    for key, value in snapshot["upstreams"]["spotify_api"].items():
        assert api[key] == value
    assert api["state"] == "open"
    assert api["failures"] == 2
    assert api["retry_after_s"] > 0
    assert [(c["outcome"], c["status"]) for c in api["recent"]] == [
        ("refused", None),
        ("failure", 503),
        ("failure", 503),
        ("success", 200),
    ]
    for call in api["recent"]:
        assert set(call) == {"endpoint", "outcome", "status", "duration_ms"}
        assert call["endpoint"] == "/v1/tracks/{id}"
        assert call["duration_ms"] == 0.0  # the fake clock never moves on its own
    assert api["latency_ms"] == {"p50": 0.0, "p99": 0.0, "calls": 3}  # refused: not timed
    assert data["upstreams"]["spotify_accounts"]["recent"] == []


@pytest.mark.usefixtures("dashboard_env")
def test_no_secret_in_page_or_data(sim, sim_url, clock):
    """Tokens in headers and query strings, and upstream bodies, never reach the dashboard."""
    app = build_app(sim_url)
    install(app, make_settings(sim_url, retry={"attempts": 1}), clock=clock)
    with client_for(app) as client:
        inbound = {"params": {"access_token": "s3cret"}, "headers": bearer("s3cret")}
        assert client.get(f"/tracks/{TRACK}", **inbound).status_code == 200
        sim.set_fault(Fault.no_healthy_upstream())
        assert client.get(f"/tracks/{TRACK}", **inbound).status_code == 503
        page = client.get(DASHBOARD, params={"token": TOKEN}).text
        data = client.get(DATA, headers=bearer()).text
    assert "failure" in data
    for text in (page, data):
        assert "s3cret" not in text
        assert "access_token" not in text
        assert "no healthy upstream" not in text
        assert TOKEN not in text
        assert "127.0.0.1" not in text


def test_page_is_self_contained():
    """The page loads nothing from elsewhere, and its CSP allows only its own script."""
    # The SVG namespace is a name for createElementNS, never fetched; nothing else may appear.
    assert PAGE.count('"http://www.w3.org/2000/svg"') == 1
    page = PAGE.replace('"http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "http://" not in page
    assert "src=" not in PAGE
    assert "<link" not in PAGE
    assert "@import" not in PAGE
    settings = GuardSettings(dashboard_path=DASHBOARD, dashboard_allow_anonymous=True)
    app = FastAPI()
    install(app, settings)
    with client_for(app) as client:
        csp = client.get(DASHBOARD).headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'sha256-" in csp
    assert "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp


def test_call_log_is_bounded_and_registered_once(clock):
    """Each upstream keeps its last N calls; one guard gets one CallLog however often asked."""
    settings = GuardSettings(dashboard_path=DASHBOARD, dashboard_token=TOKEN)
    app = FastAPI()
    guard = install(app, settings, clock=clock)
    UpstreamGuardMiddleware(app, guard=guard)
    UpstreamGuardMiddleware(app, guard=guard)
    listeners = guard._subscribers.listeners
    assert len(listeners) == 2  # the call log and the timeline, once each
    assert isinstance(listeners[0], CallLog)
    assert listeners[1] == timeline(guard).on_event
    assert guard.state_hooks.count(timeline(guard).on_state_change) == 1
    log = CallLog(["a"], maxlen=3)
    for i in range(5):
        log(CallEvent("a", "/x", "GET", "success", "ok", 200, 1, duration_s=i))
    log(CallEvent("unknown", "/x", "GET", "cancelled", "cancelled", None, 1, 0.0))
    assert [c[3] for c in log.calls("a")] == [2, 3, 4]
    assert log.calls("unknown") == []
    assert call_log(guard) is call_log(guard)


def test_percentile_nearest_rank():
    """p50 and p99 by nearest rank; None for no calls."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


@pytest.mark.usefixtures("dashboard_env")
def test_dashboard_in_a_browser_follows_the_breaker(sim, sim_url, sync_playwright, tmp_path):
    """Headless Chromium reads 'closed', then 'open' once the upstream fails; screenshot."""
    expect = sync_playwright.expect
    app = build_app(sim_url)
    install(
        app,
        make_settings(sim_url, breaker={"fail_max": 1}, retry={"attempts": 1}),
        clock=FakeClock(),
    )
    problems: list[str] = []
    requested: list[str] = []
    with (
        serve(app) as url,
        httpx.Client(base_url=url, timeout=10) as client,
        sync_playwright.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requested.append(r.url))
            page.goto(f"{url}{DASHBOARD}?token={TOKEN}")
            row = page.locator('tr[data-upstream="spotify_api"]')
            state = row.locator("[data-field=state]")
            expect(state).to_have_text("closed")
            expect(page.locator('[data-field="status"]')).to_have_text("ok")

            assert client.get(f"/tracks/{TRACK}").status_code == 200
            calls = page.locator('[data-upstream-calls="spotify_api"] tbody tr')
            expect(calls.first).to_have_attribute("data-outcome", "success")

            sim.set_fault(Fault.no_healthy_upstream())
            assert client.get(f"/tracks/{TRACK}").status_code == 503
            assert client.get(f"/tracks/{TRACK}").status_code == 503  # refused: open
            expect(state).to_have_text("open", timeout=10_000)
            expect(state.locator(".badge")).to_have_class("badge open")
            expect(page.locator('[data-field="status"]')).to_have_text("unavailable")
            expect(row.locator("[data-field=failures]")).to_have_text("1")
            expect(calls).to_have_count(3)
            expect(calls.first).to_have_attribute("data-outcome", "refused")
            expect(row.locator("[data-field=recent] .chip")).to_have_count(3)
            expect(page.locator("#error")).to_be_hidden()

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    shutil.copyfile(shot, "/tmp/dashboard.png")  # noqa: S108 - a fixed path, for review
    assert shot.stat().st_size > 0
    assert problems == []  # no script error, no CSP violation
    assert all(u.startswith(url) for u in requested)  # nothing fetched from elsewhere
    data_requests = [u for u in requested if u.split("?")[0].endswith(DATA)]
    assert data_requests
    assert all("token" not in u for u in data_requests)  # sent as a header instead


CATEGORY_PLAYLISTS = "/v1/browse/categories/{category_id}/playlists"
NO_OVERFLOW_JS = """() => {
  const problems = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > doc.clientWidth) problems.push(`page ${doc.scrollWidth} > ${doc.clientWidth}`);
  const cards = [...document.querySelectorAll("#calls > section, #timelines > section")];
  for (const card of cards) {
    const name = card.dataset.upstreamCalls || card.dataset.upstreamTimeline;
    if (card.scrollWidth > card.clientWidth + 1) problems.push(`${name}: ${card.scrollWidth} > ${card.clientWidth}`);
    const box = card.getBoundingClientRect();
    for (const other of cards) {
      if (other === card) continue;
      const o = other.getBoundingClientRect();
      const overlap = box.left < o.right && o.left < box.right && box.top < o.bottom && o.top < box.bottom;
      if (overlap) problems.push(`${name} overlaps another card`);
    }
  }
  return problems;
}"""


def outage_app(api_url: str) -> FastAPI:
    """An app calling two endpoints of spotify_api, one with a long template."""
    app = FastAPI()

    @app.get("/playlists/{category}")
    async def playlists(category: str) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{api_url}/v1/browse/categories/{category}/playlists")
        response.raise_for_status()
        return {"ok": True}

    return app


@pytest.mark.usefixtures("dashboard_env")
def test_timeline_shows_an_outage_and_nothing_overflows(sim, sim_url, sync_playwright, tmp_path):
    """The timeline draws the open period and isolation as bands; no card spills at 1400 or 390."""
    expect = sync_playwright.expect
    app = outage_app(sim_url)
    settings = make_settings(
        sim_url, breaker={"fail_max": 2, "reset_timeout_s": 120}, retry={"attempts": 1}
    )
    guard = install(app, settings)  # the real clock: the timeline is in real seconds
    problems: list[str] = []
    shots: dict[str, Path] = {}
    with (
        serve(app) as url,
        httpx.Client(base_url=url, timeout=10) as client,
        sync_playwright.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{url}{DASHBOARD}?token={TOKEN}")
            line = page.locator('[data-upstream-timeline="spotify_api"]')
            for _ in range(3):
                assert client.get("/playlists/party-and-celebration-time").status_code == 200
            expect(line.locator('rect.bar[data-series="live"]').first).to_be_visible()
            expect(line.locator(".changes")).to_have_text("closed throughout")

            sim.set_fault(Fault.no_healthy_upstream())
            for _ in range(4):  # two failures open it; two refusals follow
                assert client.get("/playlists/party-and-celebration-time").status_code == 503
            state = page.locator('tr[data-upstream="spotify_api"] [data-field=state]')
            expect(state).to_have_text("open", timeout=10_000)
            open_band = line.locator('rect.band[data-state="open"]')
            expect(open_band).to_have_count(1)
            expect(line.locator('rect.band[data-state="closed"]')).to_have_count(1)
            for series in ("failed", "refused", "fallback"):
                expect(line.locator(f'rect.bar[data-series="{series}"]').first).to_be_attached()
            expect(line.locator(".changes")).to_contain_text("open at ")
            assert float(open_band.get_attribute("width") or 0) >= 1
            band_from = float(open_band.get_attribute("data-from") or 0)
            band_to = float(open_band.get_attribute("data-to") or 0)
            assert band_from <= band_to
            expect(
                page.locator('[data-upstream-calls="spotify_api"] td.endpoint').first
            ).to_have_text(CATEGORY_PLAYLISTS)
            shots["outage"] = tmp_path / "dashboard-outage.png"
            page.screenshot(path=str(shots["outage"]), full_page=True)
            assert page.evaluate(NO_OVERFLOW_JS) == []

            guard.isolate("spotify_api")
            expect(state).to_have_text("isolated", timeout=10_000)
            expect(line.locator('rect.band[data-state="isolated"]')).to_have_count(1)
            guard.reset("spotify_api")
            expect(state).to_have_text("closed", timeout=10_000)
            expect(line.locator('rect.band[data-state="closed"]')).to_have_count(2)

            page.set_viewport_size({"width": 390, "height": 844})  # a phone
            expect(line.locator("svg")).to_have_attribute("width", re.compile(r"^[0-9]+$"))
            page.wait_for_function(
                "() => Number(document.querySelector('.chart svg').getAttribute('width')) < 390"
            )
            assert page.evaluate(NO_OVERFLOW_JS) == []
            shots["phone"] = tmp_path / "dashboard-phone.png"
            page.screenshot(path=str(shots["phone"]), full_page=True)
        finally:
            browser.close()
    for name, shot in shots.items():
        shutil.copyfile(shot, f"/tmp/dashboard-{name}.png")  # noqa: S108 - a fixed path, for review
    assert problems == []


@pytest.mark.usefixtures("dashboard_env")
def test_timeline_counts_outcomes_per_second_and_state_bands(sim, sim_url):
    """Per second: live, failed, refused and fallback counts; bands closed -> open -> isolated -> closed."""
    clock = FakeClock(start=1_000.0, wall_start=1_800_000_000.0)
    app = build_app(sim_url)
    settings = make_settings(
        sim_url, breaker={"fail_max": 2, "reset_timeout_s": 600}, retry={"attempts": 1}
    )
    guard = install(app, settings, clock=clock)
    with client_for(app) as client:
        clock.advance(10)
        for _ in range(3):
            assert client.get(f"/tracks/{TRACK}").status_code == 200
        clock.advance(1)
        sim.set_fault(Fault.no_healthy_upstream())
        for _ in range(3):  # failed, failed (opens), refused: each answered by the 503 problem
            assert client.get(f"/tracks/{TRACK}").status_code == 503
        clock.advance(5)
        guard.isolate("spotify_api")
        clock.advance(2)
        guard.reset("spotify_api")
        clock.advance(1)
        line = client.get(DATA, headers=bearer()).json()["upstreams"]["spotify_api"]["timeline"]
        accounts = client.get(DATA, headers=bearer()).json()["upstreams"]["spotify_accounts"][
            "timeline"
        ]
    start = 1_800_000_000
    assert line["series"] == ["live", "stale", "fallback", "refused", "failed"]
    assert line["window_s"] == 180
    assert line["now"] == start + 19
    assert line["seconds"] == [[start + 10, 3, 0, 0, 0, 0], [start + 11, 0, 0, 3, 1, 2]]
    assert [(b["from"] - start, b["to"] - start, b["state"]) for b in line["bands"]] == [
        (0, 11, "closed"),
        (11, 16, "open"),
        (16, 18, "isolated"),
        (18, 19, "closed"),
    ]
    assert accounts["seconds"] == []
    assert [b["state"] for b in accounts["bands"]] == ["closed"]
    clock.advance(200)  # past the window: the old seconds and bands fall out
    later = timeline(guard).data("spotify_api")
    assert later["seconds"] == []
    assert [(b["from"] - start, b["state"]) for b in later["bands"]] == [(39, "closed")]
