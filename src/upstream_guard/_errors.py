"""The guard's errors: one base class, ``UpstreamUnavailable``, that every guard error shares."""

from __future__ import annotations

from typing import Any


class UpstreamUnavailable(Exception):  # noqa: N818 - the name is the public contract
    """An upstream could not be used for this call; ``retry_after_s`` says when to try again."""

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        reason: str,
        retry_after_s: float | None = None,
    ) -> None:
        """Describe the failure: which upstream, a short machine-readable reason, and a wait."""
        super().__init__(message)
        self.upstream = upstream
        self.reason = reason
        self.retry_after_s = retry_after_s


class CircuitOpenError(UpstreamUnavailable):
    """The upstream's breaker is open (or its half-open probes are all taken): not called."""


class RetriesExhaustedError(UpstreamUnavailable):
    """Every allowed attempt failed, or the deadline or retry budget ended the call."""


class RateLimitedError(UpstreamUnavailable):
    """The upstream throttled the app (429): calls pause until its Retry-After has passed."""


class BulkheadFullError(UpstreamUnavailable):
    """The upstream already has ``max_concurrency`` calls in flight."""


_CLASSES: dict[tuple[type[BaseException], ...], type[Any]] = {}
_MADE: set[type[Any]] = set()


def is_client_error(exc: BaseException) -> bool:
    """Whether ``exc`` was made by ``as_client_error`` already."""
    return type(exc) in _MADE


def _both(ours: type[UpstreamUnavailable], *theirs: type[BaseException], name: str) -> type[Any]:
    """A class that is ``ours`` and each of ``theirs`` at once, made once, then reused."""
    key = (ours, *theirs)
    cls = _CLASSES.get(key)
    if cls is None:
        try:
            cls = type(name, key, {"__module__": "upstream_guard"})
            _MADE.add(cls)
        except TypeError:  # layouts that cannot be combined: ours alone still tells the story
            cls = ours
        _CLASSES[key] = cls
    return cls


def as_client_error(
    error: UpstreamUnavailable,
    *,
    base: type[Exception],
    request: object = None,
) -> Any:
    """``error`` as an instance of the client library's own error class as well as ours.

    When the call ended on an attempt's own error (``error.__cause__``: a ``ReadTimeout``,
    a ``ConnectError``...), the result is an instance of that error's class too, with its
    message and attributes: ``except httpx.ReadTimeout`` still matches, and ``str()`` reads
    as the client's, and of ``base`` when that class is not one already (aiohttp's
    ``ClientPayloadError`` is no ``ClientConnectionError``). The guard's account of the call
    is added as a note. Otherwise (a refusal), it is an instance of ``base``, the client's
    family of transport errors.
    """
    cause = error.__cause__
    cls = type(error)
    if isinstance(error, RetriesExhaustedError) and cause is not None:
        theirs = type(cause)
        extra = () if issubclass(theirs, base) else (base,)
        cls = _both(type(error), theirs, *extra, name=theirs.__name__)
    if cause is not None and cls is not type(error):  # combined with the cause's class
        mapped = cls.__new__(cls)
        mapped.args = cause.args  # set here: OSError's __new__ leaves them to an __init__
        attributes = dict(cause.__dict__)
        notes = attributes.pop("__notes__", [])
        mapped.__dict__.update(attributes)
        mapped.__notes__ = [*notes, f"upstream_guard: {error}"]
        mapped.__dict__.update(error.__dict__)  # upstream, reason, retry_after_s
        return mapped
    make = _both(type(error), base, name=type(error).__name__)
    mapped = make(
        str(error), upstream=error.upstream, reason=error.reason, retry_after_s=error.retry_after_s
    )
    if request is not None:
        mapped.request = request
    return mapped
