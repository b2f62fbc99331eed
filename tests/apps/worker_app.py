"""An app for multi-process tests: uvicorn --workers N imports it; settings come from the env."""

from __future__ import annotations

import os
from typing import Any

import httpx
from fastapi import FastAPI

from upstream_guard import install

SIM_URL = os.environ.get("SIM_URL", "http://127.0.0.1:9")

inner = FastAPI()
guard = install(inner)


@inner.get("/t")
async def t() -> dict[str, Any]:
    # A long client timeout: the guard's own (from the env) decide, and a held call waits.
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{SIM_URL}/v1/me")
    response.raise_for_status()
    return {"pid": os.getpid()}


async def app(scope: Any, receive: Any, send: Any) -> None:
    """The app, with each answer saying which worker process gave it."""
    if scope["type"] != "http":
        await inner(scope, receive, send)
        return

    async def send_with_pid(message: Any) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [
                *message.get("headers", []),
                (b"x-pid", str(os.getpid()).encode()),
            ]
        await send(message)

    await inner(scope, receive, send_with_pid)
