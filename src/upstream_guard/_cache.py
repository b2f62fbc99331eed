"""Stale-if-error: the last good copy of guarded GETs, per caller identity, bounded LRU."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ._clock import Clock

GUARD_HEADER = "x-upstream-guard"
"""Names what the guard answered: ``stale``, ``fallback`` or ``unavailable``."""


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored 2xx answer."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float


# What an entry costs beyond its strings: the objects that hold them (measured, CPython 3.11).
_ENTRY_OVERHEAD = 400
_HEADER_OVERHEAD = 170


def _size(key: str, entry: CachedResponse) -> int:
    """An entry's memory, approximately: body, key and headers, with their objects."""
    headers = sum(len(k) + len(v) + _HEADER_OVERHEAD for k, v in entry.headers)
    return len(entry.body) + len(key) + headers + _ENTRY_OVERHEAD


def cache_key(upstream: str, url: str, header: Callable[[str], str | None]) -> str:
    """A key for a GET: a hash of the URL and the caller's identity, never the values in clear.

    The identity is the Authorization and Cookie headers, so one user's copy is never
    served to another; tokens in the query string are inside the hashed URL too.
    """
    digest = hashlib.sha256()
    for part in (upstream, url, header("authorization") or "", header("cookie") or ""):
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()


def wants_no_copy(request_cache_control: str | None) -> bool:
    """Whether the caller asked for no stored copy (``no-store``) in its request."""
    return "no-store" in (request_cache_control or "").lower()


def storable(status: int, cache_control: str | None) -> bool:
    """Whether a response may be kept: a 2xx without ``no-store``."""
    return 200 <= status < 300 and "no-store" not in (cache_control or "").lower()


class StaleCache:
    """Bounded by entries and bytes; entries older than ``max_age_s`` are never served."""

    def __init__(self, *, max_entries: int, max_bytes: int, max_age_s: float, clock: Clock) -> None:
        """Create an empty cache."""
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self.bytes = 0
        """Approximate memory held: bodies, keys and headers with their objects."""

    def __len__(self) -> int:
        """Entries held."""
        return len(self._entries)

    def put(self, key: str, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Keep a copy (replacing an older one); evict least recently used past the bounds."""
        entry = CachedResponse(status, tuple(headers), body, self._clock.monotonic())
        size = _size(key, entry)
        if size > self._max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= _size(key, old)
            self._entries[key] = entry
            self.bytes += size
            while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
                evicted_key, evicted = self._entries.popitem(last=False)
                self.bytes -= _size(evicted_key, evicted)

    def get(self, key: str) -> tuple[CachedResponse, int] | None:
        """The copy and its age in whole seconds, if one is young enough."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            age = self._clock.monotonic() - entry.stored_at
            if age > self._max_age_s:
                return None
            self._entries.move_to_end(key)
            return entry, int(age)


def stale_headers(entry: CachedResponse, age: int) -> list[tuple[str, str]]:
    """The stored headers, with ``Age`` and a header naming the guard."""
    skip = {"age", "content-length", "content-encoding", "transfer-encoding", GUARD_HEADER}
    headers = [(k, v) for k, v in entry.headers if k.lower() not in skip]
    headers += [("age", str(age)), (GUARD_HEADER, "stale")]
    return headers
