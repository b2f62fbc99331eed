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

Cancellation: a follower that is cancelled stops waiting; the others wait on. A leader's
caller that is cancelled cancels the call it runs (its attempt dies with its task) and the
followers lead again, unless the call was detached (``coalesce.detach_leaders``): then it
runs in a task of its own (``run_detached``), and a cancelled caller leaves at once while
the call goes on for its followers; with no followers it is cancelled and awaited, as it
would be without the guard. See the section at the end for why it costs a task, and so
why by default ("hot") only calls likely to be shared are detached: token requests, and
GETs whose key had a follower within ``coalesce.hot_s`` (``Flights.hot``: ``hash()`` of
keys and of their URLs, so an uncrowded call to a cold URL reads one empty dict).

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

import asyncio
import contextlib
import contextvars
import hashlib
import threading
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._breaker import CLOSED
from ._cache import CachedResponse
from ._errors import RetriesExhaustedError, UpstreamUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Coroutine

    from ._call import AsyncAdapter, Exchange, _Adapter
    from ._pipeline import UpstreamRuntime
    from ._settings import CoalesceSettings

TOKEN_PATH = "/api/token"  # noqa: S105 - a path, not a secret
"""The OAuth token endpoint: its POSTs (refreshes, client credentials) may coalesce."""
_VARY = {"authorization": 2, "cookie": 3, "accept": 4, "accept-language": 5}
"""The request headers that vary an answer (identity and content negotiation): where each
goes in a key's parts, after the method and the URL."""
get_ident = threading.get_ident


def coalesce_key(x: Exchange, flights: Flights) -> bytes | None:
    """A hash of what makes ``x``'s answer (None: ``x`` never coalesces)."""
    return request_key(x.adapter, x.request, flights)


def request_key(adapter: _Adapter, request: Any, flights: Flights) -> bytes | None:
    """A hash of what makes ``request``'s answer (None: it never coalesces)."""
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
    parts = [method, str(adapter.location(request)), "", "", "", ""]
    # One pass over the headers: a client's lookup by name (httpx's ``Headers.get``) scans
    # them all each time, and misses (no Cookie, no Accept-Language) are the common case.
    for name, value in adapter.headers(request).items():
        at = _VARY.get(name.lower())
        if at is not None:  # a repeated header: joined, as a lookup by name would give it
            parts[at] = f"{parts[at]}, {value}" if parts[at] else value
    text = "\0".join(parts).encode("utf-8", "surrogateescape")
    return hashlib.sha256(b"%s\0%s" % (text, body)).digest()


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
        "detach",
        "gets",
        "hot",
        "hot_s",
        "hot_urls",
        "leaders",
        "leads",
        "max_in_flight",
        "token_requests",
    )

    def __init__(self, settings: CoalesceSettings) -> None:
        """Empty, for these settings."""
        self.gets = settings.gets
        self.token_requests = settings.token_requests
        self.max_in_flight = settings.max_in_flight
        self.calls: dict[Exchange, int] = {}
        """Calls in flight not keyed yet, with their threads (the hot path adds here)."""
        self.leaders: dict[bytes, Exchange] = {}
        """Keyed calls in flight that identical calls may follow."""
        self.detach = settings.detach_leaders
        self.leads: dict[int, Lead] = {}
        """Detached calls running, by ``id()`` of their request (``coalesce.detach_leaders``)."""
        self.hot_s = settings.hot_s
        self.hot: dict[int, float] = {}
        """With ``detach_leaders`` "hot": ``hash()`` of the keys followed within ``hot_s``
        (never a key itself), with when, oldest first; at most ``max_in_flight`` of them."""
        self.hot_urls: dict[int, float] = {}
        """The same for ``hash()`` of their URLs: a call to another URL works out no key."""
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
                lead = self.leads.get(id(leader.request))
                if lead is not None:  # a detached leader: it outlives its caller from now on
                    lead.flight = flight
            if not sync and thread == flight.thread and flight.event is None:
                flight.event = anyio.Event()
            flight.waiters += 1
            if self.detach == "hot":
                url = hash(str(x.adapter.location(x.request)))
                self._heat(hash(key), url, x.rt.clock.monotonic())
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

    def _heat(self, key: int, url: int, now: float) -> None:
        # Under the lock. Followed now: to the end (the newest); the oldest go past the cap.
        for hot, hashed in ((self.hot, key), (self.hot_urls, url)):
            hot.pop(hashed, None)
            hot[hashed] = now
            self._cool(hot, now)
            if len(hot) > self.max_in_flight:
                del hot[next(iter(hot))]

    def _cool(self, hot: dict[int, float], now: float) -> None:
        # Under the lock. Oldest first: drop the entries not followed within ``hot_s``.
        while hot:
            hashed, at = next(iter(hot.items()))
            if now - at < self.hot_s:
                return
            del hot[hashed]

    def is_hot(self, adapter: AsyncAdapter, request: Any, now: float) -> bool:
        """Whether ``request``'s key was followed within ``hot_s`` and no call of it leads now.

        The URL first (cheap); the key (hashing the identity) only for a hot URL. A call
        that comes while an identical call leads will follow it: it needs no task.
        """
        url = hash(str(adapter.location(request)))
        with self._lock:
            self._cool(self.hot_urls, now)
            if url not in self.hot_urls:
                self._cool(self.hot, now)
                return False
        key = request_key(adapter, request, self)
        if key is None:
            return False
        with self._lock:
            self._cool(self.hot, now)
            return hash(key) in self.hot and key not in self.leaders

    def followed(self, lead: Lead) -> bool:
        """The caller of ``lead`` went away: whether followers still wait for its answer."""
        with self._lock:
            flight = lead.flight
            lead.orphaned = True
            return flight is not None and flight.waiters > 0 and not flight.done.is_set()

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


# -- a leader that outlives its caller (``coalesce.detach_leaders``) -----------------------------
#
# A call runs in its caller's task, so cancelling the caller cancels the attempt in flight:
# httpcore, aiohttp and every other client close the connection of a request cancelled
# half-way. To keep the attempt for the followers, it must already run in another task
# when the cancellation comes; followers come at any time, so every call that may lead pays
# for a task (two more turns of the event loop on asyncio). Hence a setting.
#
# The caller waits for the task. Cancelled, it looks at the call's flight: followers wait
# for it, so the task goes on alone (its response, which no one will read, is closed; its
# record is made once, by the call itself); or none do, so the task is cancelled and
# awaited before the caller's own cancellation goes on, as if the call had run in the
# caller's task. The task gets a copy of the caller's context (request context, tracing).

_orphans: set[asyncio.Task[Any]] = set()
"""Tasks whose callers went away, kept from the garbage collector until they end."""


class Lead:
    """A call running in a task of its own, and what its caller needs to know of it."""

    __slots__ = ("adapter", "error", "finished", "flight", "orphaned", "result", "scope")

    def __init__(self, adapter: AsyncAdapter) -> None:
        """A call of a client of ``adapter``, not started."""
        self.adapter = adapter
        self.flight: Flight | None = None
        """The flight that followers wait on, once one has joined (set by ``Flights.join``)."""
        self.orphaned = False
        """The caller went away: the call goes on for its followers alone."""
        # The trio task's outcome and its cancel scope (asyncio's task keeps its own).
        self.result: Any = None
        self.error: Exception | None = None
        self.finished: Any = None
        self.scope: Any = None

    async def _close(self, response: Any) -> None:
        """Close an answer no caller will read (its connection goes back to the pool)."""
        if response is not None:
            await self.adapter.close(response)

    async def _asyncio(self, run: Coroutine[Any, Any, Any]) -> Any:
        response = await run
        if self.orphaned:
            await self._close(response)
        return response

    async def _trio(self, run: Coroutine[Any, Any, Any]) -> None:
        import trio  # noqa: PLC0415 - only on trio

        try:
            with self.scope:
                try:
                    self.result = await run
                except Exception as exc:  # noqa: BLE001 - handed to the caller to raise
                    self.error = exc
        finally:
            self.finished.set()
        if self.orphaned:
            with trio.CancelScope(shield=True):
                await self._close(self.result)


def detachable(
    run: Coroutine[Any, Any, Any], rt: UpstreamRuntime, adapter: AsyncAdapter, request: Any
) -> Awaitable[Any]:
    """``run`` (an async guarded call), detached from its caller as ``detach_leaders`` says.

    "always": every call that may lead. "hot": token requests, and GETs whose key was
    followed within ``hot_s`` (none were: one look at an empty table, no key worked out).
    """
    flights = rt.flights
    if flights is None:
        return run
    detach = flights.detach
    if detach == "never":
        return run
    method = adapter.method(request)
    if method == "GET":
        if not flights.gets or (
            detach == "hot"
            and (not flights.hot_urls or not flights.is_hot(adapter, request, rt.clock.monotonic()))
        ):
            return run
    elif not (method == "POST" and flights.token_requests and adapter.path(request) == TOKEN_PATH):
        return run
    return run_detached(run, flights, adapter, request)


async def run_detached(
    run: Coroutine[Any, Any, Any], flights: Flights, adapter: AsyncAdapter, request: Any
) -> Any:
    """Await ``run`` (a guarded call that may lead identical calls) in a task of its own."""
    lead = Lead(adapter)
    key = id(request)
    flights.leads[key] = lead
    try:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no asyncio loop: trio (anyio's other backend)
            return await _on_trio(run, flights, lead)
        return await _on_asyncio(loop, run, flights, lead)
    finally:
        del flights.leads[key]


async def _on_asyncio(
    loop: asyncio.AbstractEventLoop,
    run: Coroutine[Any, Any, Any],
    flights: Flights,
    lead: Lead,
) -> Any:
    task = loop.create_task(lead._asyncio(run))  # noqa: SLF001 - its own helper
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():  # answered as the caller went: no one reads the answer
            if not task.cancelled() and task.exception() is None:
                _orphan(loop.create_task(lead._close(task.result())))  # noqa: SLF001
        elif flights.followed(lead):
            _orphan(task)
        else:  # alone: cancel the call, as the caller's own cancellation would have
            task.cancel()
            while not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait((task,))
            _forget(task)
        raise


def _orphan(task: asyncio.Task[Any]) -> None:
    _orphans.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Task[Any]) -> None:
    _orphans.discard(task)
    if not task.cancelled():
        task.exception()  # recorded by the call itself: retrieved, so asyncio does not log it


async def _on_trio(run: Coroutine[Any, Any, Any], flights: Flights, lead: Lead) -> Any:
    import trio  # noqa: PLC0415 - only on trio

    lead.finished = trio.Event()
    lead.scope = trio.CancelScope()
    trio.lowlevel.spawn_system_task(
        lead._trio,  # noqa: SLF001 - its own helper
        run,
        context=contextvars.copy_context(),
    )
    try:
        await lead.finished.wait()
    except BaseException:
        if lead.finished.is_set():  # answered as the caller went: no one reads the answer
            with trio.CancelScope(shield=True):
                await lead._close(lead.result)  # noqa: SLF001
        elif not flights.followed(lead):  # alone: cancel the call, and let it end first
            lead.scope.cancel()
            with trio.CancelScope(shield=True):
                await lead.finished.wait()
        raise
    if lead.error is not None:
        raise lead.error
    return lead.result
