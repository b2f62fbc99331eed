"""Test helpers for users of upstream_guard and for its own tests.

- ``FakeClock``: a clock that never waits, for ``Guard(settings, clock=FakeClock())``.
- ``SpotifySimulator`` and ``Fault``: a simulated Spotify Web API with switchable faults.
- ``serve(app)``: run an ASGI app under uvicorn on a free loopback port, in a thread.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio.lowlevel

from ._simulator import Fault, SpotifySimulator

__all__ = ["FakeClock", "Fault", "SpotifySimulator", "serve"]


class FakeClock:
    """A clock that moves only when told to, or when the guard sleeps on it.

    Pass it as ``Guard(settings, clock=FakeClock())``: backoffs and Retry-After waits then
    take no wall time, and ``advance()`` moves past a breaker's reset timeout at once.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_800_000_000.0) -> None:
        """Start at ``start`` seconds (monotonic) and ``wall_start`` (epoch seconds)."""
        self._now = start
        self._wall_offset = wall_start - start
        self._lock = threading.Lock()
        self.slept: list[float] = []

    def monotonic(self) -> float:
        """The fake monotonic time."""
        return self._now

    def wall(self) -> float:
        """The fake epoch time, moving with the monotonic one."""
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        with self._lock:
            self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the wait, move time forward, and yield to the event loop once."""
        self.slept.append(seconds)
        self.advance(seconds)
        await anyio.lowlevel.checkpoint()

    def sleep_sync(self, seconds: float) -> None:
        """Record the wait and move time forward."""
        self.slept.append(seconds)
        self.advance(seconds)


@contextmanager
def serve(app: Any, *, host: str = "127.0.0.1", **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of ``host``; yield its base URL.

    The socket listens before the server thread starts, so clients can connect at once
    (the kernel queues them) and nothing has to wait for the server to come up.
    """
    import uvicorn  # noqa: PLC0415 - a test-time dependency only

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    options: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": 2}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        if isinstance(app, SpotifySimulator):
            app.release()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
