"""Outcome classification and Retry-After parsing: pure functions, no I/O."""

from __future__ import annotations

import enum
import math
import zlib
from datetime import UTC
from email.utils import parsedate_to_datetime

# Spotify has been seen to ask for up to a day; anything larger is garbage, capped here.
MAX_RETRY_AFTER_S = 86_400.0

_FAILURE_STATUSES = frozenset({500, 502, 503, 504})
# Plain-text local replies of the proxies in front of Spotify (SPOTIFY.md).
_BODY_MARKERS = (
    (b"no healthy upstream", "no_healthy_upstream"),
    (b"no server is available", "no_server_available"),
    (b"upstream connect error", "upstream_connect_error"),
)


UNAVAILABLE_OUTCOMES = frozenset({"failure", "refused", "throttled"})
"""Outcomes of a logical call that mean "this upstream let the caller down"."""


class Outcome(enum.StrEnum):
    """What one attempt said about the upstream's health (a str: usable as a label as is)."""

    SUCCESS = "success"
    FAILURE = "failure"
    THROTTLED = "throttled"
    CLIENT_ERROR = "client_error"
    CANCELLED = "cancelled"


def classify_status(status: int, body: bytes = b"") -> tuple[Outcome, str]:
    """Classify a response by status (and, for failures, its body): (outcome, reason)."""
    if status < 400:
        return Outcome.SUCCESS, "ok"
    if status == 429:
        return Outcome.THROTTLED, "throttled"
    if status in _FAILURE_STATUSES or (status >= 500 and status not in (501, 505)):
        lowered = body[:512].lower()
        for marker, reason in _BODY_MARKERS:
            if marker in lowered:
                return Outcome.FAILURE, reason
        return Outcome.FAILURE, f"status_{status}"
    return Outcome.CLIENT_ERROR, f"status_{status}"


FAILURE_BODY = frozenset({429, *range(500, 1000)})
"""Statuses whose body ``classify_status`` and the retry decision read (a proxy's marker)."""


def readable(body: bytes, content_encoding: str | None) -> bytes:
    """The start of a failure answer's body, decoded enough to look for a proxy's marker.

    The body the caller gets is left as it came; this reads a copy. gzip and deflate are
    undone (the first 4 KiB); other encodings, or a body that does not decode, stay raw.
    """
    encoding = (content_encoding or "").strip().lower()
    if not encoding or encoding == "identity" or not body:
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
    if encoding not in wbits:
        return body
    try:
        return zlib.decompressobj(wbits[encoding]).decompress(body, 4096)
    except zlib.error:
        if encoding == "deflate":  # some servers send raw deflate, without the zlib header
            try:
                return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, 4096)
            except zlib.error:
                return body
        return body


def parse_retry_after(value: str | bytes | None, now_wall: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date).

    Never raises: empty, garbage, negative or non-finite values give None, and values
    over a day are capped at a day. A date in the past gives 0.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = value.strip()
    if not text or len(text) > 64:
        return None
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _parse_http_date(text, now_wall)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def _parse_http_date(text: str, now_wall: float) -> float | None:
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000": RFC 9110 dates are GMT anyway
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now_wall)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
