"""requests (spotipy's client): the adapter of the one guarded call.

Unless the caller streams, the session reads a whole body right after the adapter returns:
the adapter reads its raw bytes within the attempt instead, so a body that breaks or drips
past the attempt's time is that attempt's failure, and puts them back as they came, so the
session decodes them once, as it would have. A failure answer's body is read and put back
the same way, streamed or not. Imported only when requests is used: ``import
upstream_guard`` never imports requests.
"""

from __future__ import annotations

import io
from http import HTTPStatus
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import requests
import requests.adapters
import urllib3
from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError

from ._classify import FAILURE_BODY

if TYPE_CHECKING:
    from ._body import BodyWatch
    from ._cache import CachedResponse
    from ._clock import Clock
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
        capped = user.clone()  # its connect and read limits as given; the whole attempt bounded
        capped.total = _capped(user.total, seconds)
        return capped
    if isinstance(user, tuple) and len(user) == 2:
        return tuple(_capped(t, seconds) for t in user)
    return user if isinstance(user, tuple) else _capped(user, seconds)


def _replayed(raw: Any, body: bytes) -> urllib3.HTTPResponse:
    """A raw response that gives ``body`` (bytes as sent) to whoever reads it next.

    It keeps the original's ``http.client`` response, where requests reads the cookies.
    """
    return urllib3.HTTPResponse(
        body=io.BytesIO(body),
        headers=raw.headers,
        status=raw.status,
        version=raw.version,
        reason=raw.reason,
        preload_content=False,
        decode_content=raw.decode_content,
        # What was read is the whole body: a HEAD's Content-Length promised none of it.
        enforce_content_length=False,
        original_response=getattr(raw, "_original_response", None),
        retries=raw.retries,
        request_url=raw.url,
    )


_STATUSES = frozenset(HTTPStatus)
_NETWORK_ERRORS = (
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.RetryError,
    ProtocolError,
)


class Adapter:
    """One requests call: the HTTPAdapter sending it, its arguments, URL and clock."""

    __slots__ = ("_clock", "_http", "_kwargs", "_parts")
    base_error: type[Exception] = requests.ConnectionError
    # ValueError: an argument requests refuses (``timeout="foo"``), the caller's mistake
    attempt_errors: tuple[type[BaseException], ...] = (
        requests.RequestException,
        HTTPError,
        ValueError,
    )
    instrumentation: str | None = "requests"

    def __init__(self, http: Any, kwargs: Any, parts: UrlParts, clock: Clock) -> None:
        self._http = http  # the HTTPAdapter sending
        self._kwargs, self._parts, self._clock = kwargs, parts, clock

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
        if isinstance(exc, requests.ConnectionError):  # a body's read timeout, as requests says it
            cause = exc.args[0] if exc.args else None
            return (
                "timeout" if isinstance(cause, urllib3.exceptions.TimeoutError) else "connect_error"
            )
        return "network_error" if isinstance(exc, _NETWORK_ERRORS) else None

    def replayable(self, request: Any, replay_methods: frozenset[str]) -> bool | None:  # noqa: ARG002
        return request.body is None or isinstance(request.body, bytes | str)  # else: a stream

    def buffer(self, request: Any) -> None:  # never asked for: ``replayable`` never says None
        raise NotImplementedError

    def send(self, request: Any, timeout_s: float, sender: Any) -> Any:
        timeout = _timeout(self._kwargs.get("timeout"), timeout_s)
        response = sender(request, **{**self._kwargs, "timeout": timeout})
        if not self._kwargs.get("stream") and response.status_code not in FAILURE_BODY:
            # The session reads the whole body next anyway: read it within the attempt, so a
            # body that breaks or drips past the attempt's time is the attempt's failure.
            self._read(response, self._clock.monotonic() + timeout_s)
        return response

    def read_failure(self, response: Any) -> bytes:
        return self._read(response, None)

    def read_shared(self, response: Any, limit: int) -> bytes | None:
        if self._kwargs.get("stream"):
            return None  # the caller streams it: read by no one but the caller
        body = self._read(response, None)  # in memory already: read within the attempt
        return body if len(body) <= limit else None

    @staticmethod
    def content(request: Any) -> bytes | None:
        body = request.body
        if body is None:
            return b""
        if isinstance(body, str):
            return body.encode("utf-8")
        return body if isinstance(body, bytes) else None

    def read_copy(self, response: Any) -> bytes | None:
        body = self._read(response, None)
        try:
            return _replayed(response.raw, body).read(decode_content=True)
        except urllib3.exceptions.DecodeError:
            return None

    def _read(self, response: Any, deadline: float | None) -> bytes:
        """The raw body, put back as it came: the session decodes it once, as it would have."""
        try:
            body = self._raw_body(response.raw, deadline)
        except ReadTimeoutError as exc:  # as requests itself says it when it reads a body
            raise requests.ConnectionError(exc, request=response.request) from exc
        except ProtocolError as exc:
            raise requests.exceptions.ChunkedEncodingError(exc, response=response) from exc
        response.raw = _replayed(response.raw, body)
        return body

    def _raw_body(self, raw: Any, deadline: float | None) -> bytes:
        read1 = getattr(raw, "read1", None)  # urllib3 2.2+: what has arrived, as it arrives
        if deadline is None or read1 is None:
            return raw.read(decode_content=False)  # type: ignore[no-any-return]
        chunks = []
        while chunk := read1(64 * 1024, decode_content=False):
            chunks.append(chunk)
            if self._clock.monotonic() > deadline:
                raise ReadTimeoutError(None, raw.url, "the body outlasted the attempt")  # type: ignore[arg-type]
        return b"".join(chunks)

    def watch(self, response: Any, watch: BodyWatch) -> None:
        """Nothing to watch: a body is read within the attempt, or left to a streaming caller."""

    def late_error(self, request: Any) -> Exception:
        return ReadTimeoutError(None, request.url, "the body outlasted the deadline")  # type: ignore[arg-type]

    def stale(self, request: Any, entry: CachedResponse, headers: list[tuple[str, str]]) -> Any:
        body = io.BytesIO(entry.body)
        reason = HTTPStatus(entry.status).phrase if entry.status in _STATUSES else ""
        raw = urllib3.HTTPResponse(
            body,
            urllib3.HTTPHeaderDict(headers),
            entry.status,
            reason=reason,
            preload_content=False,
        )
        return self._http.build_response(request, raw)
