"""A loopback upstream for coalescing and hedging tests: it counts, holds and echoes calls.

Every answer says who asked (a hash of the Authorization header, the Accept-Language, the
path and query, and a token request's refresh token), so a test can check that each caller
got its own answer. ``hold()`` keeps requests waiting until ``release()``; ``first_hangs``
keeps the first request of each path waiting until released and answers the others.
``disconnects`` counts the held requests whose client went away before the release.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread


def who(authorization: str) -> str:
    """What the server says of an Authorization header: a short hash, never the token."""
    return hashlib.sha256(authorization.encode()).hexdigest()[:12]


class HerdServer:
    """An ASGI app: ``hits`` by path; modes ``ok``, ``fail`` (503), ``big`` (a large body),
    ``chunked`` (a large body in pieces, without Content-Length), ``sized`` (as ``ok``, with
    a Content-Length)."""

    def __init__(self) -> None:
        """Healthy, not holding."""
        self.hits: Counter[str] = Counter()
        self._gate = threading.Event()
        self._lock = threading.Lock()
        self.reset()

    def reset(self, *, first_hangs: bool = False) -> None:
        """As new: healthy, no hits, not holding (``first_hangs``: each path's first waits)."""
        self.mode = "ok"
        self.big_bytes = 4096
        self.first_hangs = first_hangs
        self.disconnects = 0
        self.hits.clear()
        self._gate.set()

    @property
    def total(self) -> int:
        """Requests received."""
        return sum(self.hits.values())

    def hold(self) -> None:
        """Keep requests waiting until ``release``."""
        self._gate.clear()

    def release(self) -> None:
        """Let waiting requests answer."""
        self._gate.set()

    async def _held_until_gone(self, receive: Any) -> bool:
        """Wait for ``release``; whether the client went away first (counted, unanswered)."""
        gone = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await anyio.to_thread.run_sync(self._gate.wait, abandon_on_cancel=True)
            tg.cancel_scope.cancel()
        if gone:
            with self._lock:
                self.disconnects += 1
        return gone

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one request."""
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path: str = scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        with self._lock:
            self.hits[path] += 1
            first = self.hits[path] == 1
        held = not self._gate.is_set() and (first or not self.first_hangs)
        if held and await self._held_until_gone(receive):
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if self.mode == "fail":
            await _answer(send, 503, b"no healthy upstream", "text/plain")
            return
        answer = {
            "path": path,
            "query": scope["query_string"].decode(),
            "who": who(headers.get("authorization", "")),
            "language": headers.get("accept-language", ""),
            "refresh_token": dict(parse_qsl(body.decode())).get("refresh_token", ""),
        }
        if self.mode in ("big", "chunked"):
            answer["padding"] = "x" * self.big_bytes
        body = json.dumps(answer).encode()
        if self.mode == "chunked":  # no Content-Length: sent in pieces
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for at in range(0, len(body), 1000):
                piece = body[at : at + 1000]
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        await _answer(send, 200, body, "application/json", sized=self.mode == "sized")


async def _answer(
    send: Any, status: int, body: bytes, content_type: str, *, sized: bool = False
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"cache-control", b"private")]
    if sized:
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
