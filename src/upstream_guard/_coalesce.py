"""Coalescing: concurrent identical calls in one process share one upstream call.

Go's singleflight, keyed by what makes two calls the same answer: the method and the whole
URL (query included) and the caller's identity and the headers that vary the answer
(Authorization, Cookie, Accept, Accept-Language), hashed; a token is never kept in clear.
GETs coalesce; of POSTs only token requests (``/api/token``, the form body in the key) do.

The first call leads: it runs the guarded call as it would alone. Identical calls that come
while it is in flight follow: they wait for its answer and each gets a response of its own
client's type (status, headers, the same bytes) built by the adapter's ``stale``; or its
error, as an error of their own; or, when the leader went away without an answer or the
body is over ``coalesce.max_body_bytes``, they make their calls themselves (one of them
leading the rest). A follower never counts in the breaker, the bulkhead or the budget.

The hot path: a call made while no other call to the upstream is in flight registers itself
in ``Flights.calls`` (no key, no lock) and leaves when done. Keys are worked out only when a
second call comes: for the newcomer and the calls in flight not keyed yet, which move to
``Flights.leaders``. Once calls finish, the table is empty again.

Threads and event loops: a follower in the leader's thread (both async, one event loop)
waits on an ``anyio.Event``; in another thread, on a ``threading.Event`` (an async follower
through a worker thread). A sync call made on an event loop's thread never follows a call
of that loop: it would block the loop the leader needs.
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._breaker import CLOSED
from ._cache import CachedResponse
from ._errors import RetriesExhaustedError, UpstreamUnavailable

if TYPE_CHECKING:
    from ._call import Exchange
    from ._settings import CoalesceSettings

TOKEN_PATH = "/api/token"  # noqa: S105 - a path, not a secret
"""The OAuth token endpoint: its POSTs (refreshes, client credentials) may coalesce."""
_VARY = ("authorization", "cookie", "accept", "accept-language")
get_ident = threading.get_ident


def coalesce_key(x: Exchange, flights: Flights) -> bytes | None:
    """A hash of what makes ``x``'s answer (None: ``x`` never coalesces)."""
    adapter, request = x.adapter, x.request
    method = adapter.method(request)
    if method == "GET":
        if not flights.gets:
            return None
        body = b""
    elif method == "POST" and flights.token_requests and adapter.path(request) == TOKEN_PATH:
        content = adapter.content(request)
        if content is None:  # a streamed body: not known before it is sent
            return None
        body = content
    else:
        return None
    digest = hashlib.sha256(method.encode())
    for part in (str(adapter.location(request)), *(adapter.header(request, h) for h in _VARY)):
        digest.update(b"\0" + (part or "").encode("utf-8", "surrogateescape"))
    digest.update(b"\0")
    digest.update(body)
    return digest.digest()


class Flight:
    """One leader's call that followers wait for; its answer, once it has one."""

    __slots__ = (
        "answer",
        "closed",
        "deadline",
        "done",
        "event",
        "record",
        "rejoin",
        "thread",
        "waiters",
    )

    def __init__(self, thread: int, deadline: float) -> None:
        """A flight led from ``thread`` by a call that ends by ``deadline``."""
        self.thread = thread
        self.deadline = deadline
        self.waiters = 0
        self.closed = False
        """No one joins any more: the leader is handing its answer out."""
        self.done = threading.Event()
        self.event: anyio.Event | None = None
        """Set with ``done``, for followers on the leader's event loop (made by the first)."""
        self.answer: CachedResponse | UpstreamUnavailable | None = None
        """What followers get; None once done: the leader had nothing to share."""
        self.record: tuple[Any, ...] = ()
        """The leader's outcome, reason, status and breaker state."""
        self.rejoin = False
        """With no answer: the leader went away, so followers join again (one leads)."""

    def publish(
        self,
        answer: CachedResponse | UpstreamUnavailable | None,
        x: Exchange,
        *,
        rejoin: bool = False,
    ) -> None:
        """Hand ``answer`` to every follower and wake them."""
        self.answer = answer
        self.rejoin = rejoin
        self.record = (x.outcome, x.reason, x.status, x.breaker_state)
        self.done.set()
        if self.event is not None:  # made by a follower of this thread's event loop
            self.event.set()


class Flights:
    """The calls to one upstream in flight, and the flights followers wait for."""

    __slots__ = (
        "_lock",
        "calls",
        "gets",
        "leaders",
        "max_body",
        "max_in_flight",
        "token_requests",
    )

    def __init__(self, settings: CoalesceSettings) -> None:
        """Empty, for these settings."""
        self.gets = settings.gets
        self.token_requests = settings.token_requests
        self.max_body = settings.max_body_bytes
        self.max_in_flight = settings.max_in_flight
        self.calls: dict[Exchange, int] = {}
        """Calls in flight not keyed yet, with their threads (the hot path adds here)."""
        self.leaders: dict[bytes, Exchange] = {}
        """Keyed calls in flight that identical calls may follow."""
        self._lock = threading.Lock()

    def join(self, x: Exchange, *, sync: bool) -> Flight | None:
        """The flight ``x`` follows; None: ``x`` makes its own call (leading, if it may).

        Only while the breaker is closed: open or half-open, calls are refused or probe one
        by one, as they would alone.
        """
        if x.breaker.state != CLOSED:
            return None
        key = coalesce_key(x, self)
        thread = get_ident()
        with self._lock:
            self._key_unkeyed()
            if key is None:
                return None
            leader = self.leaders.get(key)
            if leader is None or (leader.flight is not None and leader.flight.closed):
                if len(self.leaders) < self.max_in_flight:
                    self.leaders[key] = x
                    x.ckey, x.thread, x.keyed = key, thread, True
                return None
            if sync and leader.thread == thread:
                return None  # a sync call on the leader's event loop: waiting would block it
            flight = leader.flight
            if flight is None:
                flight = leader.flight = Flight(leader.thread, leader.deadline)
            if not sync and thread == flight.thread and flight.event is None:
                flight.event = anyio.Event()
            flight.waiters += 1
            return flight

    def _key_unkeyed(self) -> None:
        # Under the lock. A call leaving pops itself from ``calls`` then reads ``keyed``: the
        # one of this and ``leave`` that pops a call owns its entry; ``leave`` then cleans up.
        for other in list(self.calls):
            other.keyed = True
            key = coalesce_key(other, self)
            thread = self.calls.pop(other, None)
            if (
                thread is not None
                and key is not None
                and key not in self.leaders
                and len(self.leaders) < self.max_in_flight
            ):
                other.ckey, other.thread = key, thread
                self.leaders[key] = other

    def close(self, x: Exchange) -> bool:
        """No one joins ``x``'s flight any more; whether followers wait for its answer."""
        with self._lock:
            if x.ckey is not None and self.leaders.get(x.ckey) is x:
                del self.leaders[x.ckey]
            flight = x.flight
            assert flight is not None  # noqa: S101 - only a leader with a flight closes
            flight.closed = True
            return flight.waiters > 0

    def leave(self, x: Exchange) -> None:
        """A keyed call is over: out of the table; followers still waiting join again."""
        with self._lock:
            if x.ckey is not None and self.leaders.get(x.ckey) is x:
                del self.leaders[x.ckey]
            flight = x.flight
            if flight is not None:
                flight.closed = True
        if flight is not None and not flight.done.is_set():
            flight.publish(None, x, rejoin=True)

    def left(self, flight: Flight) -> None:
        """A follower is done waiting; the last one lets the answer go."""
        with self._lock:
            flight.waiters -= 1
            if flight.waiters == 0 and flight.done.is_set():
                flight.answer = None


def share(x: Exchange, response: Any, raw: bytes | None) -> None:
    """Hand the leader's answer to its followers (``raw`` None: over the cap)."""
    flight = x.flight
    assert flight is not None  # noqa: S101 - only called for a leader with a flight
    if raw is None:
        flight.publish(None, x)
        return
    adapter = x.adapter
    headers = tuple(adapter.all_headers(response))
    answer = CachedResponse(adapter.status(response), headers, raw, x.rt.clock.monotonic())
    flight.publish(answer, x)


def closing(x: Exchange) -> bool:
    """Close a leader's flight to newcomers; whether followers wait for its answer."""
    flights = x.rt.flights
    return flights is not None and flights.close(x)


def fail(x: Exchange, error: UpstreamUnavailable) -> None:
    """Hand the leader's error to its followers: each raises one of its own."""
    if closing(x):
        x.flight.publish(error, x)  # type: ignore[union-attr]


def _answer(x: Exchange, flight: Flight) -> Any:
    """The follower's response or error from the leader's answer; None: call yourself."""
    answer = flight.answer
    if answer is None:
        return None
    x.coalesced = True
    x.outcome, x.reason, x.status, x.breaker_state = flight.record
    x.attempts = 0
    x.duration_s = x.rt.clock.monotonic() - x.started
    if isinstance(answer, UpstreamUnavailable):
        raise _own_error(x, answer)
    return x.adapter.stale(x.request, answer, list(answer.headers))


def _own_error(x: Exchange, error: UpstreamUnavailable) -> UpstreamUnavailable:
    """A new error of the leader's kind (ours, not its client's); its cause if this client's."""
    cls = next(c for c in type(error).__mro__ if c.__module__ == UpstreamUnavailable.__module__)
    mine: UpstreamUnavailable = cls(
        str(error), upstream=error.upstream, reason=error.reason, retry_after_s=error.retry_after_s
    )
    cause = error.__cause__
    if cause is not None and isinstance(cause, x.adapter.attempt_errors):
        mine.__cause__ = cause
    return mine


def _deadline(x: Exchange) -> UpstreamUnavailable:
    x.outcome, x.reason = "failure", "deadline"
    x.coalesced = True
    return RetriesExhaustedError(
        f"{x.upstream} {x.method} {x.endpoint}: the call's deadline passed while it waited "
        "for an identical call in flight",
        upstream=x.upstream,
        reason="deadline",
    )


def follow_sync(x: Exchange) -> Any:
    """Follow an identical call in flight, if there is one: its answer; None: call yourself."""
    flights = x.rt.flights
    assert flights is not None  # noqa: S101 - only crowded calls get here
    while (flight := flights.join(x, sync=True)) is not None:
        try:
            # On the thread's own clock: a sync wait has no other (the leader ends by its
            # deadline anyway, so a follower's own deadline only matters when shorter).
            if not flight.done.wait(max(0.0, x.deadline - x.rt.clock.monotonic())):
                raise _deadline(x)
            response = _answer(x, flight)
        finally:
            flights.left(flight)
        if response is not None:
            return response
        if not flight.rejoin:  # an answer too large to share: each makes its own call
            return None
    return None


async def follow_async(x: Exchange) -> Any:
    """Follow an identical call in flight, if there is one: its answer; None: call yourself."""
    flights = x.rt.flights
    assert flights is not None  # noqa: S101 - only crowded calls get here
    while (flight := flights.join(x, sync=False)) is not None:
        try:
            if not await _wait(x, flight):
                raise _deadline(x)
            response = _answer(x, flight)
        finally:
            flights.left(flight)
        if response is not None:
            return response
        if not flight.rejoin:  # an answer too large to share: each makes its own call
            return None
    return None


async def _wait(x: Exchange, flight: Flight) -> bool:
    """Wait for the flight's answer, at most until ``x``'s deadline; whether it came."""
    clock = x.rt.clock
    event = flight.event
    if event is None or flight.thread != get_ident():  # led from another thread
        left = max(0.0, x.deadline - clock.monotonic())
        return await anyio.to_thread.run_sync(flight.done.wait, left, abandon_on_cancel=True)
    if x.deadline >= flight.deadline:  # the leader's call ends first, whatever happens to it
        await event.wait()
        return True
    async with anyio.create_task_group() as tg:

        async def deadline() -> None:
            await clock.sleep(max(0.0, x.deadline - clock.monotonic()))
            tg.cancel_scope.cancel()

        tg.start_soon(deadline)
        await event.wait()
        tg.cancel_scope.cancel()
    return flight.done.is_set()
