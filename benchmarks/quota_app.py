"""The quota drill's app: one route that calls Spotify; ``uvicorn --workers N`` imports it.

``QUOTA_GUARD=0`` leaves it unguarded; otherwise ``install(app)`` reads its settings from
the ``UPSTREAM_GUARD_*`` variables the drill sets (Redis, the pace).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from fastapi import FastAPI

from upstream_guard import install

SIM_URL = os.environ.get("SIM_URL", "http://127.0.0.1:9")

app = FastAPI()
if os.environ.get("QUOTA_GUARD", "1") == "1":
    install(app)
client = httpx.AsyncClient(timeout=10)


@app.get("/track/{n}")
async def track(n: int) -> dict[str, Any]:
    response = await client.get(f"{SIM_URL}/v1/tracks/{n:022d}")
    response.raise_for_status()
    return {"name": response.json()["name"]}
