"""requests (spotipy's client): the adapter of the one guarded call.

The session reads a delivered body after the adapter returns, as it always does; the raw
body is watched while it does. A failure answer's raw bytes are read to classify it and
replayed, so the session (or a ``stream=True`` caller) reads them as sent. Imported only
when requests is used: ``import upstream_guard`` never imports requests.
"""

from __future__ import annotations

import io
from collections.abc import Generator
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import requests
import requests.adapters
import urllib3
from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError

if TYPE_CHECKING:
    from ._body import BodyWatch
    from ._cache import CachedResponse
    from ._sessions import UrlParts


def _capped(value: Any, seconds: float) -> Any:
    # A value requests would refuse is left for it to refuse, with its own error.
    if value is None or value is urllib3.Timeout.DEFAULT_TIMEOUT:
        return seconds
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return min(value, seconds)


def _timeout(user: Any, seconds: float) -> Any:
    """The caller's timeout (a number, a pair or a ``urllib3.Timeout``) capped at ``seconds``."""
    if isinstance(user, urllib3.Timeout):
        connect, read = user.connect_timeout, user.read_timeout
        return urllib3.Timeout(connect=_capped(connect, seconds), read=_capped(read, seconds))
    if isinstance(user, tuple) and len(user) == 2:
        return tuple(_capped(t, seconds) for t in user)
    return user if isinstance(user, tuple) else _capped(user, seconds)


def _replayed(raw: Any, body: bytes) -> urllib3.HTTPResponse:
    """A raw response that gives ``body`` (bytes as sent) to whoever reads it next."""
    return urllib3.HTTPResponse(
        body=io.BytesIO(body),
        headers=raw.headers,
        status=raw.status,
        version=raw.version,
        reason=raw.reason,
        preload_content=False,
        decode_content=raw.decode_content,
    )


_NETWORK_ERRORS = (
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.RetryError,
    ProtocolError,
)


class Adapter:
    """One requests call: the HTTPAdapter sending it, its send arguments and its URL."""

    __slots__ = ("_http", "_kwargs", "_parts")
    base_error: type[Exception] = requests.ConnectionError
    attempt_errors: tuple[type[BaseException], ...] = (requests.RequestException, HTTPError)
    instrumentation: str | None = "requests"

    def __init__(self, http: Any, kwargs: Any, parts: UrlParts) -> None:
        self._http = http  # the HTTPAdapter sending
        self._kwargs, self._parts = kwargs, parts

    def location(self, request: Any) -> UrlParts:  # noqa: ARG002 - the protocol's signature
        return self._parts

    def method(self, request: Any) -> str:
        return str(request.method)

    def path(self, request: Any) -> str:  # noqa: ARG002 - the protocol's signature
        return self._parts.path

    header = staticmethod(lambda message, name: message.headers.get(name))
    headers = attrgetter("headers")  # not a descriptor: never bound
    all_headers = staticmethod(lambda response: list(response.headers.items()))
    status = attrgetter("status_code")
    close = staticmethod(lambda response: response.close())

    @staticmethod
    def error_kind(exc: BaseException) -> str | None:
        if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError):
            return "timeout"
        if isinstance(exc, requests.ConnectionError):
            return "connect_error"
        return "network_error" if isinstance(exc, _NETWORK_ERRORS) else None

    def replayable(self, request: Any, replay_methods: frozenset[str]) -> bool | None:  # noqa: ARG002
        return request.body is None or isinstance(request.body, bytes | str)  # else: a stream

    def buffer(self, request: Any) -> None:  # never asked for: ``replayable`` never says None
        raise NotImplementedError

    def send(self, request: Any, timeout_s: float, sender: Any) -> Any:
        timeout = _timeout(self._kwargs.get("timeout"), timeout_s)
        return sender(request, **{**self._kwargs, "timeout": timeout})

    def read_failure(self, response: Any) -> bytes:
        try:
            body: bytes = response.raw.read(decode_content=False)
        except ReadTimeoutError as exc:  # as requests itself says it when it reads a body
            raise requests.ConnectionError(exc) from exc
        except ProtocolError as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        response.raw = _replayed(response.raw, body)
        return body

    def read_copy(self, response: Any) -> bytes | None:
        body = self.read_failure(response)
        try:
            return _replayed(response.raw, body).read(decode_content=True)
        except urllib3.exceptions.DecodeError:
            return None

    def watch(self, response: Any, watch: BodyWatch) -> None:
        response.raw = _WatchedRaw(response.raw, watch)

    def late_error(self, request: Any) -> Exception:
        return ReadTimeoutError(None, request.url, "the body outlasted the deadline")  # type: ignore[arg-type]

    def stale(self, request: Any, entry: CachedResponse, headers: list[tuple[str, str]]) -> Any:
        body = io.BytesIO(entry.body)
        raw = urllib3.HTTPResponse(
            body, urllib3.HTTPHeaderDict(headers), entry.status, reason="OK", preload_content=False
        )
        return self._http.build_response(request, raw)


class _WatchedRaw:
    """``response.raw`` read through a watch; the rest is the raw response's own."""

    def __init__(self, raw: Any, watch: BodyWatch) -> None:
        self._raw, self._watch = raw, watch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def stream(self, amt: int = 2**16, decode_content: bool | None = None) -> Generator[bytes]:
        """What ``iter_content`` reads: each chunk as it arrives (``read1``), watched."""
        read1 = partial(self._raw.read1, amt, decode_content=decode_content)
        try:
            yield from map(self._watch.passed, iter(read1, b""))
        except Exception as exc:
            error = self._watch.replacement(exc)
            if error is None:
                raise
            raise error from exc

    def read(self, amt: int | None = None, decode_content: bool | None = None, **_: Any) -> bytes:
        """Read as ``HTTPResponse.read`` does, chunk by chunk, watched."""
        chunks = self.stream(amt or 2**16, decode_content)
        if amt is None:
            return b"".join(chunks)
        try:
            return next(chunks, b"")
        finally:
            chunks.close()
