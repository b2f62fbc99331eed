"""An ASGI app served by uvicorn on loopback sockets, in a thread (tests, demos, intercept)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` (0: a free port).

    It listens before any server runs, so clients can connect at once (the kernel queues
    them) and nothing has to wait for the server to come up.

    The protocol is named (``IPPROTO_TCP``), as asyncio sets ``TCP_NODELAY`` on accepted
    connections only then: without it Nagle's algorithm holds a response's body until the
    client acknowledges its head, and the client delays that acknowledgement, about 40 ms
    added to every response on Linux.
    An IPv6 ``host`` (one with a colon) gets an IPv6 socket.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(512)
    return sock


@contextmanager
def serving(
    app: Any,
    sockets: list[socket.socket],
    *,
    release: Callable[[], None] | None = None,
    **config: Any,
) -> Iterator[None]:
    """Serve ``app`` with uvicorn on ``sockets`` in a daemon thread; stop it on exit.

    On exit ``release`` is called first (the simulator's: requests it holds answer, so the
    server can stop), then the server stops and the sockets are closed.
    """
    try:
        import uvicorn  # noqa: PLC0415 - a test-time dependency only
    except ImportError as exc:
        for sock in sockets:
            sock.close()
        raise ImportError(
            "the simulator is served by uvicorn: pip install 'upstream-guard[testing]'"
        ) from exc

    options: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": 2}
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        if release is not None:
            release()
        server.should_exit = True
        thread.join(timeout=10)
        for sock in sockets:
            sock.close()
