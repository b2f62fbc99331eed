"""requests sessions: the one entry of every requests call, and a guarded session.

``guard.requests_session()`` mounts ``GuardedAdapter``; the instrumented ``HTTPAdapter``
(``install(app)``) enters through the same ``send_guarded``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

import requests
import requests.adapters

from ._call import run_sync
from ._requests import Adapter

if TYPE_CHECKING:
    from ._guard import Guard

SEND_ARGS = ("stream", "timeout", "verify", "cert", "proxies")
"""``HTTPAdapter.send``'s arguments after the request, in order."""


class UrlParts(NamedTuple):
    """What the guard reads of a URL: ``host``, ``port``, ``scheme``; ``str()`` is the URL."""

    host: str
    port: int | None
    scheme: str
    path: str
    url: str

    def __str__(self) -> str:
        """The whole URL."""
        return self.url


def send_guarded(
    guard: Guard | None, http: Any, send: Callable[..., Any], request: Any, kwargs: Any
) -> Any:
    """Send a prepared request with ``http``'s ``send``, guarded if its host is an upstream's."""
    try:
        split = urlsplit(request.url or "")
        parts = UrlParts(split.hostname or "", split.port, split.scheme, split.path, request.url)
    except ValueError:  # not a URL the guard can read: requests will say what is wrong
        return send(request, **kwargs)
    rt = None if guard is None else guard._route(parts)  # noqa: SLF001 - the package's own
    if rt is None:
        return send(request, **kwargs)
    assert guard is not None  # noqa: S101 - route found it
    return run_sync(guard, rt, Adapter(http, kwargs, parts, rt.clock), request, send)


class GuardedAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose calls to guarded hosts go through a guard."""

    def __init__(self, guard: Guard, **kwargs: Any) -> None:
        """Mount it on a session: ``session.mount("https://", GuardedAdapter(guard))``."""
        super().__init__(**kwargs)
        self._guard = guard

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        """Send ``request``, guarded when its host belongs to an upstream."""
        kwargs.update(zip(SEND_ARGS, args, strict=False))
        return send_guarded(self._guard, self, super().send, request, kwargs)


def guarded_session(guard: Guard) -> requests.Session:
    """A ``requests.Session`` whose calls to guarded hosts go through ``guard``."""
    session = requests.Session()
    adapter = GuardedAdapter(guard)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session
