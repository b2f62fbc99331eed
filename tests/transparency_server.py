"""A raw ASGI upstream for test_transparency: gzipped failure answers and a dripping 200.

Serve it with ``upstream_guard.testing.serve(Upstream(), lifespan="off")``. Any path works
(tests use Spotify's ``/v1/tracks/{id}``, so the guard names the endpoint); the query says
how to answer:

- no ``answer``: 200 with a small JSON body;
- ``answer=500`` / ``503`` / ``429``: the failure answer in ``FAILURES``, its body gzipped and
  sent with ``Content-Encoding: gzip`` (``GZIPPED`` holds the bytes on the wire);
- ``answer=drip``: 200, chunked, a few bytes every ``drip_gap_s`` for ``drip_s``, stopping as
  soon as the client goes away.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import anyio

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FAILURES: dict[int, tuple[bytes, list[tuple[bytes, bytes]]]] = {
    500: (
        json.dumps({"error": {"status": 500, "message": "Server error"}}).encode(),
        [(b"content-type", b"application/json; charset=utf-8")],
    ),
    503: (b"no healthy upstream", [(b"content-type", b"text/plain"), (b"server", b"envoy")]),
    429: (
        json.dumps({"error": {"status": 429, "message": "API rate limit exceeded"}}).encode(),
        [(b"content-type", b"application/json; charset=utf-8"), (b"retry-after", b"30")],
    ),
}
"""Each failure status with its uncompressed body and its headers (besides the encoding)."""
GZIPPED = {status: gzip.compress(body, mtime=0) for status, (body, _) in FAILURES.items()}
"""The bytes each failure answer carries on the wire."""


class Upstream:
    """The ASGI app; ``hits`` counts requests by answer (``ok``, ``500``, ``drip``, ...)."""

    def __init__(self, *, drip_s: float = 4.0, drip_gap_s: float = 0.1) -> None:
        """A drip lasts ``drip_s``, one small chunk every ``drip_gap_s``."""
        self.drip_s = drip_s
        self.drip_gap_s = drip_gap_s
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget the requests counted so far."""
        with self._lock:
            self.hits.clear()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Answer one HTTP request the way its query says."""
        assert scope["type"] == "http"  # served with lifespan="off"
        query = parse_qs(scope["query_string"].decode())
        answer = query.get("answer", ["ok"])[0]
        with self._lock:
            self.hits[answer] += 1
        if answer == "drip":
            await self._drip(receive, send)
        elif answer.isdigit() and int(answer) in FAILURES:
            status = int(answer)
            body = GZIPPED[status]
            headers = [
                *FAILURES[status][1],
                (b"content-encoding", b"gzip"),
                (b"content-length", str(len(body)).encode()),
            ]
            await _answer(send, status, headers, body)
        else:
            body = json.dumps({"type": "track", "path": scope["path"]}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ]
            await _answer(send, 200, headers, body)

    async def _drip(self, receive: Receive, send: Send) -> None:
        """A 200 whose body trickles in; the drip ends when the client disconnects."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                for _ in range(round(self.drip_s / self.drip_gap_s)):
                    await send({"type": "http.response.body", "body": b"drip", "more_body": True})
                    await anyio.sleep(self.drip_gap_s)  # sleep-ok: dripping is the fault
                await send({"type": "http.response.body", "body": b""})
            except OSError:  # the client went away between two chunks
                pass
            tg.cancel_scope.cancel()


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
