"""Hedging: a slow GET gets another attempt in parallel; the first good answer wins.

As in Polly and Envoy: an attempt with no answer after ``hedge.after_s`` gets a twin (at
most ``hedge.max_extra`` per call), each paid from the retry budget. The first answer that
is no failure (a response below 500 and not a 429) wins; the others are cancelled and
recorded as cancelled, never as failures. When every attempt fails, the last failure is
the attempt's result, and the call's retries go on from there. The attempt's one breaker
permit covers its hedges: the breaker records one outcome.

Never for other methods, never while a 429 cooldown runs, while the breaker is not closed
(a half-open probe is one call), or once the pace is short (``pace_is_short``).

Async clients only (anyio: asyncio and trio). A sync client's hedge would need a thread
per attempt, and a thread blocked in a socket read cannot be cancelled: the losing attempt
would hold its thread and its pooled connection until its own timeout, under exactly the
slow tail hedging is for. ``sync_sender`` hands the sender back unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import anyio

from ._breaker import CLOSED

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._call import AsyncAdapter, Exchange
    from ._pipeline import UpstreamRuntime


def pace_is_short(rt: UpstreamRuntime) -> bool:
    """Whether the upstream's pace leaves no room for an extra call.

    Any pace in force (configured, or learned from 429s) counts as short: the upstream has
    said, or was told, how many calls it takes, and a hedge would spend a slot that first
    attempts are waiting for (and, shared through Redis, a round trip to take it).
    """
    return rt.pace.active


def may_hedge(x: Exchange) -> bool:
    """Whether ``x`` may send a hedge now; if so, one retry is taken from the budget."""
    rt = x.rt
    if x.hedges >= rt.settings.hedge.max_extra:
        return False
    if x.breaker_state != CLOSED or x.breaker.state != CLOSED:
        return False  # a half-open probe is one call; an open breaker takes none
    now = rt.clock.monotonic()
    if rt.cooldown.until > now or now >= x.deadline or pace_is_short(rt):
        return False
    return rt.budget.try_withdraw(now)


def sync_sender(x: Exchange, sender: Any) -> Any:  # noqa: ARG001 - async_sender's twin
    """A sync client's sender, unchanged: sync calls are never hedged (see the module)."""
    return sender


def async_sender(x: Exchange, sender: Any) -> Any:
    """``sender``, hedged after ``hedge.after_s`` if ``x`` is a GET."""
    if x.method != "GET":
        return sender

    def hedged(request: Any) -> Awaitable[Any]:
        return _race(x, sender, request)

    return hedged


def _good(x: Exchange, response: Any) -> bool:
    status: int = x.adapter.status(response)
    return status < 500 and status != 429


class _Race:
    """The attempts of one hedged attempt: how many run, who won, the last failure."""

    __slots__ = ("adapter", "error", "failed", "log", "running", "scope", "sender", "winner", "x")

    def __init__(self, x: Exchange, sender: Callable[[Any], Awaitable[Any]]) -> None:
        self.x, self.sender = x, sender
        self.adapter = cast("AsyncAdapter", x.adapter)
        self.running = 0
        self.scope = anyio.CancelScope()
        self.winner: tuple[int, Any] | None = None
        self.failed: tuple[int, Any] | None = None
        """The latest failure response, to hand back if no attempt does better."""
        self.error: BaseException | None = None
        self.log: list[tuple[int, str]] = []

    async def attempt(self, number: int, request: Any) -> None:
        """Send one of the attempts; the first good answer ends the race."""
        adapter = self.adapter
        try:
            response = await self.sender(request)
        except adapter.attempt_errors as exc:
            self.error = exc
            self.log.append((number, "failure"))
        except anyio.get_cancelled_exc_class():
            self.log.append((number, "cancelled"))
            raise
        else:
            await self._answered(number, response)
        finally:
            self.running -= 1
        if self.winner is not None or self.running == 0:
            self.scope.cancel()

    async def _answered(self, number: int, response: Any) -> None:
        adapter = self.adapter
        if self.winner is not None:  # lost by a hair: its answer goes unread
            self.log.append((number, "cancelled"))
            await adapter.close(response)
        elif _good(self.x, response):
            self.winner = (number, response)
            self.log.append((number, "won"))
        else:
            if self.failed is not None:
                await adapter.close(self.failed[1])
            self.failed = (number, response)
            self.log.append((number, "failure"))

    async def run(self, request: Any) -> Any:
        """The winning response, else the last failure (a response, or raised)."""
        x = self.x
        after_s: float = x.rt.hedge_after_s  # type: ignore[assignment]
        first = x.attempts
        async with anyio.create_task_group() as tg:
            self.scope = tg.cancel_scope
            self.running = 1
            tg.start_soon(self.attempt, first, request)
            while True:
                await x.rt.clock.sleep(after_s)
                if not may_hedge(x):
                    break
                x.hedges += 1
                x.attempts += 1
                self.running += 1
                tg.start_soon(self.attempt, x.attempts, request)
        return await self._result(first)

    async def _result(self, first: int) -> Any:
        x = self.x
        if x.hedges:
            x.hedge_log = (x.hedge_log or []) + self.log
        ended = self.winner or self.failed
        if self.winner is not None and self.failed is not None:
            await self.adapter.close(self.failed[1])
        if ended is None:
            assert self.error is not None  # noqa: S101 - every attempt ended, none answered
            raise self.error
        number, response = ended
        if x.hedges:
            x.hedge_winner = number
            if self.winner is not None and number != first:
                x.hedges_won += 1
        return response


def _race(x: Exchange, sender: Callable[[Any], Awaitable[Any]], request: Any) -> Awaitable[Any]:
    """Send ``request``, and hedges while it is slow; the winning response."""
    return _Race(x, sender).run(request)
