"""Shared state through Redis: breakers and 429 cooldowns agree across workers and hosts.

The hot path never waits on Redis. Each guard keeps its state in memory; a background thread
(its own asyncio loop, so the app may run on trio or be synchronous) syncs it with Redis at a
short interval in one round trip: one Lua script that adds this worker's news (failures,
trips, closes, 429s) and answers with the shared view. A trip or a 429 is published at once.
Redis down, slow or restarted: calls go on from local state, health says ``degraded``, one
warning is logged per outage, and undelivered news is kept and sent when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from typing import TYPE_CHECKING, Any

from ._breaker import Breaker, BreakerReport

if TYPE_CHECKING:
    from ._guard import Guard

log = logging.getLogger("upstream_guard")

# KEYS: per upstream (cooldown, isolated, reset, workers); then per breaker (hash, probe
# leases, its upstream's reset and breaker index).
# ARGV: worker, lease ttl ms, breakers, upstreams, forget ms; 4 per upstream; 10 per breaker.
SYNC_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local worker, ttl = ARGV[1], tonumber(ARGV[2])
local nb, nc, forget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {now}
local a = 6
for k = 0, nc - 1 do
  local key, ikey, rkey, wkey = KEYS[4 * k + 1], KEYS[4 * k + 2], KEYS[4 * k + 3], KEYS[4 * k + 4]
  local incoming, isolated = tonumber(ARGV[a]), ARGV[a + 1]
  local seen, reset_req = tonumber(ARGV[a + 2]), ARGV[a + 3]
  a = a + 4
  local until_ms = tonumber(redis.call('GET', key) or '0')
  if incoming > 0 and now + incoming > until_ms then
    until_ms = now + incoming
    redis.call('SET', key, until_ms, 'PX', incoming)
  end
  -- Manual control: a reset is a generation (a time in ms) every worker applies once;
  -- isolation is a key that only a reset removes.
  local gen = tonumber(redis.call('GET', rkey) or '0')
  if seen < 0 then seen = gen end  -- a worker's first sync: earlier resets are not news
  if reset_req == '1' then
    gen = math.max(now, gen + 1)
    redis.call('SET', rkey, gen)
    redis.call('DEL', ikey)
    seen = gen
  elseif gen < seen then
    -- Redis forgot (restart, eviction): this worker's view is the newer one.
    gen = seen
    redis.call('SET', rkey, gen)
  end
  local is_isolated = redis.call('EXISTS', ikey)
  if isolated == '1' and gen <= seen and is_isolated == 0 then
    redis.call('SET', ikey, now)
    is_isolated = 1
  end
  redis.call('ZADD', wkey, now, worker)
  redis.call('ZREMRANGEBYSCORE', wkey, '-inf', now - forget)
  redis.call('PEXPIRE', wkey, forget)
  table.insert(out, math.max(0, until_ms - now))
  table.insert(out, is_isolated)
  table.insert(out, gen)
end
for i = 0, nb - 1 do
  local h, z = KEYS[4 * nc + 4 * i + 1], KEYS[4 * nc + 4 * i + 2]
  local rkey, index = KEYS[4 * nc + 4 * i + 3], KEYS[4 * nc + 4 * i + 4]
  local delta, success, event = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  local eepoch, lstate, lage = tonumber(ARGV[a + 3]), ARGV[a + 4], tonumber(ARGV[a + 5])
  local fail_max, reset = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local want, max_probes = tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  a = a + 10
  local v = redis.call('HMGET', h, 'state', 'epoch', 'opened_at', 'failures', 'reset')
  local state, epoch = v[1] or 'closed', tonumber(v[2] or '0')
  local opened, failures = tonumber(v[3] or '0'), tonumber(v[4] or '0')
  local rgen = tonumber(redis.call('GET', rkey) or '0')
  if tonumber(v[5] or '0') < rgen then
    if v[2] then
      -- The first sync since a reset: closed, counters cleared; news from before it is old.
      state, epoch, failures = 'closed', epoch + 1, 0
      delta, success, event = 0, '0', ''
      redis.call('HSET', h, 'failures_total', 0, 'trips', 0)
      redis.call('DEL', z)
    end
    redis.call('HSET', h, 'reset', rgen)
  end
  if eepoch > epoch then
    -- Redis forgot this breaker (restart, eviction): the worker's view is the newer one.
    epoch, failures = eepoch, 0
    if lstate == 'closed' then state = 'closed' else state = 'open'; opened = now - lage end
  end
  if event == 'open' and eepoch == epoch then
    -- A trip (from closed), or a failed probe (re-open): either starts a new episode.
    if state == 'closed' then redis.call('HINCRBY', h, 'trips', 1) end
    state, epoch, failures = 'open', epoch + 1, 0
    if now > opened then opened = now end
    redis.call('DEL', z)
  elseif event == 'close' and eepoch == epoch and state == 'open' then
    state, epoch, failures = 'closed', epoch + 1, 0
    redis.call('DEL', z)
  end
  if delta > 0 then redis.call('HINCRBY', h, 'failures_total', delta) end
  if state == 'closed' then
    if success == '1' and delta == 0 then failures = 0 else failures = failures + delta end
    if failures >= fail_max then
      state, epoch, opened, failures = 'open', epoch + 1, now, 0
      redis.call('HINCRBY', h, 'trips', 1)
    end
  end
  local granted = 0
  if state == 'open' and now >= opened + reset then
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    for j = 1, max_probes do redis.call('ZREM', z, worker .. ':' .. j) end
    granted = math.max(0, math.min(want, max_probes - redis.call('ZCARD', z)))
    for j = 1, granted do redis.call('ZADD', z, now + ttl, worker .. ':' .. j) end
    redis.call('PEXPIRE', z, ttl)
  end
  redis.call('HSET', h, 'state', state, 'epoch', epoch, 'opened_at', opened, 'failures', failures,
    'reset_ms', reset)
  redis.call('SADD', index, h)
  table.insert(out, state)
  table.insert(out, epoch)
  table.insert(out, now - opened)
  table.insert(out, granted)
end
return out
"""

RESET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gen = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0') + 1)
redis.call('SET', KEYS[1], gen)
redis.call('DEL', KEYS[2])
return gen
"""
"""KEYS: an upstream's reset and isolated keys. Workers apply the new reset at their next sync."""

ISOLATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], now, 'NX')
return now
"""
"""KEYS: an upstream's isolated key. Workers isolate the upstream at their next sync."""


def breaker_key(prefix: str, breaker: str) -> str:
    """The hash holding one breaker's shared state."""
    return f"{prefix}:breaker:{breaker}"


def cooldown_key(prefix: str, upstream: str) -> str:
    """The key holding an upstream's shared 429 cooldown (its end, in Redis ms)."""
    return f"{prefix}:cooldown:{upstream}"


def upstream_key(prefix: str, upstream: str, what: str) -> str:
    """An upstream's key, hash-tagged so that all of one upstream's keys share a cluster slot.

    ``what``: ``isolated`` (set while isolated), ``reset`` (the last reset's generation),
    ``workers`` (sorted set: worker -> last sync, ms), ``breakers`` (set of breaker hashes).
    """
    return f"{{{prefix}:{upstream}}}:{what}"


class SharedState:
    """Keeps one guard's breakers and cooldowns in step with Redis, from a daemon thread."""

    def __init__(self, guard: Guard, url: str, *, prefix: str, interval_s: float) -> None:
        """Prepare; nothing connects until ``start()``."""
        self._guard = guard
        self._url = url
        self._prefix = prefix
        self._interval_s = interval_s
        self._timeout_s = max(0.05, min(1.0, interval_s * 2))
        self._lease_ms = int(max(1.0, interval_s * 5) * 1000)
        # A worker not heard from for this long is no longer listed as seen.
        self._forget_ms = int(max(10.0, interval_s * 20) * 1000)
        self._worker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop = threading.Event()
        self.status = "starting"
        """``starting``, ``ok`` or ``degraded`` (Redis unreachable: local state only)."""
        self.round_trips = 0
        self.failed_round_trips = 0

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sync thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        for rt in self._guard.upstreams.values():
            rt.cooldown.on_throttle = self.wake
        self._guard.state_hooks.append(self._on_state_change)
        self._thread = threading.Thread(target=self._run, name="upstream-guard-redis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sync thread after one last sync (so news is not lost on shutdown)."""
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None
        if self._on_state_change in self._guard.state_hooks:
            self._guard.state_hooks.remove(self._on_state_change)
        for rt in self._guard.upstreams.values():
            rt.cooldown.on_throttle = None

    def wake(self) -> None:
        """Sync now instead of at the next tick (a trip or a 429 is news for everyone)."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(event.set)

    def _on_state_change(self, name: str, old: str, new: str) -> None:  # noqa: ARG002
        if new != "half-open":
            self.wake()

    def sync_now(self) -> None:
        """One round trip from the calling thread, on a loop of its own (tests, scripts).

        Not for use while the background thread runs: it is the same round trip, done now.
        """

        async def once() -> None:
            import redis.asyncio  # noqa: PLC0415 - optional dependency, only with redis_url

            client = redis.asyncio.from_url(
                self._url, socket_timeout=self._timeout_s, socket_connect_timeout=self._timeout_s
            )
            try:
                await self.sync_once(client.register_script(SYNC_SCRIPT))
            finally:
                await client.aclose()

        asyncio.run(once())

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import redis.asyncio  # noqa: PLC0415 - optional dependency, only with redis_url

        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            client = redis.asyncio.from_url(
                self._url,
                socket_timeout=self._timeout_s,
                socket_connect_timeout=self._timeout_s,
                retry_on_timeout=False,
            )
        except ValueError as exc:  # settings validate the URL; this is the last safety net
            self.status = "degraded"
            log.warning("upstream_guard: unusable redis_url (%s); local state only", exc)
            return
        script = client.register_script(SYNC_SCRIPT)
        try:
            while True:
                await self.sync_once(script)
                if self._stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval_s)
                self._wake.clear()
        finally:
            self._loop = None
            await client.aclose()

    async def sync_once(self, script: Any) -> None:
        """One round trip: send every breaker's and cooldown's news, adopt the shared view."""
        prefix = self._prefix
        upstreams = list(self._guard.upstreams.values())
        keys: list[str] = []
        args: list[Any] = [self._worker, self._lease_ms, 0, len(upstreams), self._forget_ms]
        now = self._guard.clock.monotonic()
        requested: list[bool] = []
        for rt in upstreams:
            asked, rt.reset_requested = rt.reset_requested, False
            requested.append(asked)
            keys += [
                cooldown_key(prefix, rt.name),
                upstream_key(prefix, rt.name, "isolated"),
                upstream_key(prefix, rt.name, "reset"),
                upstream_key(prefix, rt.name, "workers"),
            ]
            args += [
                int(rt.cooldown.remaining(now) * 1000),
                int(rt.isolated),
                rt.reset_seen,
                int(asked),
            ]
        breakers: list[Breaker] = []
        reports: list[BreakerReport] = []
        for rt in upstreams:
            for breaker in list(rt.breakers.values()):
                report = breaker.take_report()
                s = breaker.settings
                breakers.append(breaker)
                reports.append(report)
                key = breaker_key(prefix, breaker.name)
                keys += [
                    key,
                    f"{key}:probes",
                    upstream_key(prefix, rt.name, "reset"),
                    upstream_key(prefix, rt.name, "breakers"),
                ]
                args += [
                    report.failures,
                    int(report.success),
                    report.event or "",
                    report.event_epoch,
                    report.state,
                    int(report.open_age_s * 1000),
                    s.fail_max,
                    int(s.reset_timeout_s * 1000),
                    report.want_probes,
                    s.half_open_max_calls,
                ]
        args[2] = len(breakers)
        try:
            result = await script(keys=keys, args=args)
        except Exception as exc:  # noqa: BLE001 - any Redis trouble means: local state only
            for breaker, report in zip(breakers, reports, strict=True):
                breaker.give_back(report)
                breaker.probe_allowance = breaker.settings.half_open_max_calls  # local rules
            for rt, asked in zip(upstreams, requested, strict=True):
                rt.reset_requested = rt.reset_requested or asked  # sent with the next one
            self.failed_round_trips += 1
            if self.status != "degraded":
                log.warning(
                    "upstream_guard: Redis at %s unreachable (%s); serving from local state",
                    _safe_url(self._url),
                    type(exc).__name__,
                )
            self.status = "degraded"
            return
        self.round_trips += 1
        if self.status == "degraded":
            log.warning("upstream_guard: Redis is back; sharing state again")
        self.status = "ok"
        self._adopt(result, breakers, upstreams, requested)

    def _adopt(
        self,
        result: list[Any],
        breakers: list[Breaker],
        upstreams: list[Any],
        requested: list[bool],
    ) -> None:
        values = [v.decode() if isinstance(v, bytes) else v for v in result]
        i = 1
        now = self._guard.clock.monotonic()
        for rt, asked in zip(upstreams, requested, strict=True):
            remaining_ms, isolated, generation = (int(v) for v in values[i : i + 3])
            i += 3
            if remaining_ms > 0:
                rt.cooldown.adopt(now, remaining_ms / 1000)
            if generation > rt.reset_seen:
                if not asked and rt.reset_seen >= 0:  # a reset made elsewhere, since we synced
                    rt.reset()
                rt.reset_seen = generation
            if isolated and not rt.isolated:
                rt.isolate()
        for breaker in breakers:
            state, epoch, age_ms, granted = values[i : i + 4]
            i += 4
            breaker.adopt(str(state), int(epoch), int(age_ms) / 1000, int(granted))


def _safe_url(url: str) -> str:
    """The Redis URL without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
