"""Secrets and isolation: no token, cookie or secret anywhere the guard writes."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import requests
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from conftest import make_settings
from otel_sdk import install_sdk
from upstream_guard import install
from upstream_guard.testing import Fault

TOKEN = "tok-7f3a9c2e-SECRET"  # noqa: S105 - the secret that must never leak
COOKIE = "sess-51bd0e-SECRET"
CLIENT_SECRET = "cs-90aa1c-SECRET"  # noqa: S105
DASHBOARD = "dash-token-4411"


def test_no_secret_in_any_output(sim, sim_url, clock, caplog, monkeypatch):
    """Spans, metrics, logs, health, dashboard, problem bodies and cache keys hold no secret."""
    exporter, reader = install_sdk()
    monkeypatch.setenv("UPSTREAM_GUARD_DASHBOARD_PATH", "/_upstream_guard/dashboard")
    monkeypatch.setenv("UPSTREAM_GUARD_DASHBOARD_TOKEN", DASHBOARD)
    app = FastAPI()

    @app.get("/all")
    def everything(request: Request) -> Any:
        auth = {"Authorization": f"Bearer {TOKEN}", "Cookie": f"sp_dc={COOKIE}"}
        query = (
            f"access_token={TOKEN}&code={TOKEN}&refresh_token={TOKEN}&client_secret={CLIENT_SECRET}"
        )
        base = sim_url.replace("http://", f"http://user:{CLIENT_SECRET}@")
        got = httpx.get(f"{base}/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp?{query}", headers=auth)
        got.raise_for_status()
        requests.get(f"{sim_url}/v1/me?{query}", headers=auth, timeout=5).raise_for_status()
        return got.json()["id"]

    settings = make_settings(
        sim_url,
        breaker={"fail_max": 2},
        retry={"attempts": 2},
        fallback={"stale_if_error": True},
    )
    assert settings.dashboard_path == "/_upstream_guard/dashboard"  # from the env above
    guard = install(app, settings, clock=clock)
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG), TestClient(app) as client:
        texts.append(client.get("/all").text)
        sim.set_fault(Fault.no_healthy_upstream())
        for _ in range(3):
            response = client.get("/all")
            texts.append(response.text)
            texts.append(str(response.headers))
        texts.append(client.get("/_upstream_guard/health").text)
        dash = {"Authorization": f"Bearer {DASHBOARD}"}
        texts.append(client.get("/_upstream_guard/dashboard", headers=dash).text)
        texts.append(client.get("/_upstream_guard/dashboard/data", headers=dash).text)
    for span in exporter.get_finished_spans():
        texts.append(span.name)
        texts.append(str(dict(span.attributes or {})))
        texts.extend(f"{e.name} {dict(e.attributes or {})}" for e in span.events)
    texts.append(str(reader.get_metrics_data()))
    # The guard's own log lines (httpx logs its URLs itself, at INFO: the app's choice).
    texts.extend(r.getMessage() for r in caplog.records if r.name.startswith("upstream_guard"))
    stale = guard.upstreams["spotify_api"].stale
    assert stale is not None
    assert len(stale) >= 1
    texts.extend(stale._entries)  # the cache keys: hashes only
    everything_written = "\n".join(texts)
    assert len(exporter.get_finished_spans()) >= 4
    for secret in (TOKEN, COOKIE, CLIENT_SECRET):
        assert secret not in everything_written
    # the dashboard token is only ever compared, never echoed
    assert DASHBOARD not in "\n".join(texts[1:])
