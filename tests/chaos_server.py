"""A raw HTTP/1.1 server on loopback that misbehaves on purpose, one behaviour per path.

``GET /v1/chaos/{kind}/{anything}`` answers the way ``kind`` says (see ``KINDS``). It runs an
asyncio loop in a daemon thread on plain sockets, so it can do what a well-behaved server
framework never would: reset a connection mid-body, lie about Content-Length, drip bytes,
never answer, or send a status line that is not HTTP. ``refused_url`` is a loopback port with
a bound socket that never listens: connecting to it is refused.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections import Counter
from email.utils import formatdate
from typing import Any, Self

HUGE_BYTES = 20 * 1024 * 1024
_CHUNK = 1024 * 1024
# A far-future HTTP-date (capped at a day by the guard) and one long past (means "now").
FUTURE_DATE = "Fri, 31 Dec 2100 23:59:59 GMT"
PAST_DATE = formatdate(0, usegmt=True)

RETRY_AFTER = {
    "429_ra_0": "0",
    "429_ra_1": "1",
    "429_ra_30": "30",
    "429_ra_86400": "86400",
    "429_ra_neg": "-5",
    "429_ra_garbage": "soon, maybe",
    "429_ra_future_date": FUTURE_DATE,
    "429_ra_past_date": PAST_DATE,
    "429_ra_empty": "",
    "429_ra_huge": "1e12",
    "429_ra_nan": "nan",
    "429_ra_none": None,
}

KINDS = (
    "ok",  # 200, small JSON body
    "flaky",  # per path: 200, then 503 no healthy upstream, then 200, ...
    "flip",  # whatever ``flip_mode`` says: "ok" or "nhu"
    "nhu",  # Envoy's 503 "no healthy upstream"
    "reset_200",  # 200, Content-Length 1000, a few bytes, then RST
    "reset_503",  # the same with a 503
    "truncated_200",  # 200, Content-Length 1000, 100 bytes, then FIN
    "truncated_503",  # the same with a 503
    "slow_body",  # 200 whose body drips in over ~0.2 s, each gap well under a read timeout
    "hang",  # read the request, never answer; close when the client does
    "huge_200",  # 20 MB 200
    "huge_503",  # 20 MB 503
    "bad_status",  # "HTTP/1.1 abc"
    "garbage",  # bytes that are not HTTP at all
    *RETRY_AFTER,
)


class ChaosServer:
    """Start with ``with ChaosServer() as chaos:``; ``chaos.url`` is its base URL."""

    def __init__(self, *, drip_gap_s: float = 0.02, drip_chunks: int = 10) -> None:
        """Not started yet; ``drip_*`` shape the ``slow_body`` answer."""
        self.drip_gap_s = drip_gap_s
        self.drip_chunks = drip_chunks
        self.flip_mode = "ok"
        self.served: Counter[str] = Counter()
        """Requests received, by kind (the faults injected)."""
        self.hanging = threading.Semaphore(0)
        """Released once per request the ``hang`` behaviour has started holding."""
        self._flaky_hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._open: dict[asyncio.StreamWriter, str] = {}
        """Each open connection, with the kind of its last request."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._refused = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.url = ""
        self.refused_url = ""

    def __enter__(self) -> Self:
        """Listen on a free loopback port, and reserve a port that refuses connections."""
        self._refused.bind(("127.0.0.1", 0))  # bound, never listening: SYNs get a RST
        self.refused_url = f"http://127.0.0.1:{self._refused.getsockname()[1]}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            _start_server(self._handle, sock), self._loop
        ).result(timeout=5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close every connection and the listening socket; stop the loop thread."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
        self._refused.close()

    @property
    def open_connections(self) -> int:
        """Connections the server holds open (each closes once its client closes its end)."""
        return len(self._open)

    def open_kinds(self) -> Counter[str]:
        """The kinds of the last requests on the connections still open."""
        return Counter(list(self._open.values()))

    def reset_counts(self) -> None:
        """Forget the requests served and the hangs started so far."""
        with self._lock:
            self.served.clear()
            self.hanging = threading.Semaphore(0)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._open[writer] = "-"
        try:
            while True:
                path = await _read_request(reader)
                if path is None:
                    return
                parts = path.split("?", 1)[0].split("/")
                kind = parts[3] if len(parts) > 3 and parts[1:3] == ["v1", "chaos"] else "ok"
                with self._lock:
                    self.served[kind] += 1
                self._open[writer] = kind
                if not await self._behave(kind, path, reader, writer):
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            del self._open[writer]
            self._tasks.discard(task)

    async def _behave(  # noqa: PLR0911, PLR0912 - one branch per behaviour reads best
        self, kind: str, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; whether the connection may serve another."""
        if kind == "flaky":
            with self._lock:
                self._flaky_hits[path] += 1
                kind = "ok" if self._flaky_hits[path] % 2 else "nhu"
        elif kind == "flip":
            kind = self.flip_mode
        if kind == "ok":
            body = json.dumps({"kind": "ok", "path": path}).encode()
            await _respond(writer, 200, body, content_type="application/json")
            return True
        if kind == "nhu":
            await _respond(writer, 503, b"no healthy upstream")
            return True
        if kind in RETRY_AFTER:
            value = RETRY_AFTER[kind]
            extra = [] if value is None else [f"Retry-After: {value}"]
            body = b'{"error":{"status":429,"message":"API rate limit exceeded"}}'
            await _respond(writer, 429, body, extra=extra, content_type="application/json")
            return True
        if kind in {"reset_200", "reset_503"}:
            writer.write(_head(int(kind[-3:]), 1000) + b"0123456789")
            await writer.drain()
            # Let the client read the head first: a RST may drop bytes not yet read.
            await asyncio.sleep(0.01)  # sleep-ok: the misbehaving server's own pacing
            sock: Any = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if kind in {"truncated_200", "truncated_503"}:
            writer.write(_head(int(kind[-3:]), 1000) + b"x" * 100)
            await writer.drain()
            return False
        if kind == "slow_body":
            chunk = b"d" * 20
            writer.write(_head(200, len(chunk) * self.drip_chunks))
            for _ in range(self.drip_chunks):
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(self.drip_gap_s)  # sleep-ok: dripping is the fault
            return True
        if kind == "hang":
            self.hanging.release()
            while await reader.read(65536):  # until the client gives up and closes
                pass
            return False
        if kind in {"huge_200", "huge_503"}:
            writer.write(_head(int(kind[-3:]), HUGE_BYTES))
            block = b"h" * _CHUNK
            for _ in range(HUGE_BYTES // _CHUNK):
                writer.write(block)
                await writer.drain()
            return True
        if kind == "bad_status":
            writer.write(b"HTTP/1.1 abc\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return False
        if kind == "garbage":
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xff\xfe\x00garbage\r\n\r\n")
            await writer.drain()
            return False
        await _respond(writer, 404, b"unknown chaos kind")
        return True


async def _start_server(handler: Any, sock: socket.socket) -> asyncio.AbstractServer:
    return await asyncio.start_server(handler, sock=sock)


async def _read_request(reader: asyncio.StreamReader) -> str | None:
    """The request target of the next request (its headers read), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip() or 0)
    if length:
        await reader.readexactly(length)
    return lines[0].split(" ")[1]


def _head(
    status: int, length: int, extra: list[str] | None = None, content_type: str = ""
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}",
        f"Content-Length: {length}",
        "Server: envoy",
        *([f"Content-Type: {content_type}"] if content_type else ["Content-Type: text/plain"]),
        *(extra or []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    *,
    extra: list[str] | None = None,
    content_type: str = "",
) -> None:
    writer.write(_head(status, len(body), extra, content_type) + body)
    await writer.drain()


_REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 503: "Service Unavailable"}
