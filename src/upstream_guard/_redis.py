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

# KEYS: per breaker (hash, probe leases); then per upstream (cooldown).
# ARGV: worker, lease ttl ms, breakers, cooldowns; 10 per breaker; 1 per cooldown.
SYNC_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local worker, ttl = ARGV[1], tonumber(ARGV[2])
local nb, nc = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {now}
local a = 5
for i = 0, nb - 1 do
  local h, z = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local delta, success, event = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  local eepoch, lstate, lage = tonumber(ARGV[a + 3]), ARGV[a + 4], tonumber(ARGV[a + 5])
  local fail_max, reset = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local want, max_probes = tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  a = a + 10
  local v = redis.call('HMGET', h, 'state', 'epoch', 'opened_at', 'failures')
  local state, epoch = v[1] or 'closed', tonumber(v[2] or '0')
  local opened, failures = tonumber(v[3] or '0'), tonumber(v[4] or '0')
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
  redis.call('HSET', h, 'state', state, 'epoch', epoch, 'opened_at', opened, 'failures', failures)
  table.insert(out, state)
  table.insert(out, epoch)
  table.insert(out, now - opened)
  table.insert(out, granted)
end
for k = 0, nc - 1 do
  local key = KEYS[2 * nb + k + 1]
  local incoming = tonumber(ARGV[a + k])
  local until_ms = tonumber(redis.call('GET', key) or '0')
  if incoming > 0 and now + incoming > until_ms then
    until_ms = now + incoming
    redis.call('SET', key, until_ms, 'PX', incoming)
  end
  table.insert(out, math.max(0, until_ms - now))
end
return out
"""


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
        self._worker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop = threading.Event()
        self.status = "starting"
        """``starting``, ``ok`` or ``degraded`` (Redis unreachable: local state only)."""
        self.round_trips = 0
        self.failed_round_trips = 0
        from ._pace import attach  # noqa: PLC0415 - the pace's own Redis code

        self.pace = attach(guard, url, prefix, self._timeout_s)
        """Slots of the fleet's pace, taken by calls (only while a pace is in force)."""

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sync thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        for rt in self._guard.upstreams.values():
            rt.cooldown.on_throttle = self.wake
            rt.pace.on_learn = self.wake
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
            rt.pace.on_learn = None

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
                await self.sync_paces(client)
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
                await self.sync_paces(client)
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
        breakers: list[Breaker] = []
        keys: list[str] = []
        args: list[Any] = [self._worker, self._lease_ms, 0, 0]
        reports: list[BreakerReport] = []
        for rt in list(self._guard.upstreams.values()):
            for breaker in list(rt.breakers.values()):
                report = breaker.take_report()
                s = breaker.settings
                breakers.append(breaker)
                reports.append(report)
                key = f"{self._prefix}:breaker:{breaker.name}"
                keys += [key, f"{key}:probes"]
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
        upstreams = list(self._guard.upstreams.values())
        now = self._guard.clock.monotonic()
        for rt in upstreams:
            keys.append(f"{self._prefix}:cooldown:{rt.name}")
            args.append(int(rt.cooldown.remaining(now) * 1000))
        args[2], args[3] = len(breakers), len(upstreams)
        try:
            result = await script(keys=keys, args=args)
        except Exception as exc:  # noqa: BLE001 - any Redis trouble means: local state only
            for breaker, report in zip(breakers, reports, strict=True):
                breaker.give_back(report)
                breaker.probe_allowance = breaker.settings.half_open_max_calls  # local rules
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
        self._adopt(result, breakers, upstreams)

    async def sync_paces(self, client: Any) -> None:
        """The paces' round trip: learned rates and live workers (see ``_pace``)."""
        from ._pace import sync_paces  # noqa: PLC0415 - the pace's own Redis code

        ttl_ms = int(max(2.0, self._interval_s * 10) * 1000)
        try:
            await sync_paces(
                self._guard, client, prefix=self._prefix, worker=self._worker, ttl_ms=ttl_ms
            )
        except Exception:  # noqa: BLE001 - Redis trouble: calls pace locally at their share
            self.failed_round_trips += 1
            self.pace.ok = False

    def _adopt(self, result: list[Any], breakers: list[Breaker], upstreams: list[Any]) -> None:
        values = [v.decode() if isinstance(v, bytes) else v for v in result]
        i = 1
        for breaker in breakers:
            state, epoch, age_ms, granted = values[i : i + 4]
            i += 4
            breaker.adopt(str(state), int(epoch), int(age_ms) / 1000, int(granted))
        now = self._guard.clock.monotonic()
        for rt in upstreams:
            remaining_ms = int(values[i])
            i += 1
            if remaining_ms > 0:
                rt.cooldown.adopt(now, remaining_ms / 1000)


def _safe_url(url: str) -> str:
    """The Redis URL without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
