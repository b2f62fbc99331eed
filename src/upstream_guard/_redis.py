"""Shared state through Redis: breakers and 429 cooldowns agree across workers and hosts.

The hot path never waits on Redis. Each guard keeps its state in memory; a background thread
(its own asyncio loop, so the app may run on trio or be synchronous) syncs it with Redis at a
short interval: a Lua script adds this worker's news (failures, trips, closes, 429s) and
answers with the shared view. A trip or a 429 is published at once.

Every key of one upstream carries the hash tag ``{PREFIX:NAME}``, so all of them sit in one
hash slot. One Redis takes every upstream in one script call (one round trip; slots do not
matter there). Redis Cluster (``redis+cluster://`` URLs) only runs a script whose keys share
a slot: there the script runs once per upstream, on the node that owns that upstream's slot,
each node's calls one after another and all nodes at once.

Redis down, slow or restarted: calls go on from local state, health says ``degraded``, one
warning is logged per outage, and undelivered news is kept and sent when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import uuid
from typing import TYPE_CHECKING, Any

from ._breaker import Breaker, BreakerReport

if TYPE_CHECKING:
    from ._guard import Guard
    from ._pipeline import UpstreamRuntime

log = logging.getLogger("upstream_guard")

# KEYS: per upstream (cooldown, isolated, reset, workers); then per breaker (hash, probe
# leases, its upstream's reset and breaker index, the failures this worker has reported).
# On a cluster, one call per upstream, so that every key is in that upstream's hash slot
# ({PREFIX:NAME}).
# ARGV: worker, lease ttl ms, breakers, upstreams, forget ms; 4 per upstream; 11 per breaker.
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
  local k = 4 * nc + 5 * i
  local h, z, rkey, index, sent = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local delta, success, event = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  local eepoch, lstate, lage = tonumber(ARGV[a + 3]), ARGV[a + 4], tonumber(ARGV[a + 5])
  local fail_max, reset = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local want, max_probes = tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  local reported = tonumber(ARGV[a + 10])
  a = a + 11
  -- A report resent after a lost reply: count only the failures this key has not seen.
  local seen = redis.call('GET', sent)
  if seen then delta = math.max(0, math.min(delta, reported - tonumber(seen))) end
  redis.call('SET', sent, reported, 'PX', forget)
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


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that name a Redis Cluster, and the scheme redis-py's parser takes for each."""


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return _cluster_url(url) is not None


def _cluster_url(url: str) -> str | None:
    """A cluster URL as redis-py's parser takes it (``redis://...``); None: not a cluster."""
    scheme, _, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower())
    return None if plain is None else f"{plain}://{rest}"


def connect(url: str, timeout_s: float) -> Any:
    """A ``redis.asyncio`` client for ``url``: a ``RedisCluster`` for a cluster URL.

    Nothing connects yet. No retries inside redis-py: the sync loop is the retry, and a
    sync must not outlast its interval by much while Redis is away. A cluster client first
    asks for the slot map and the command table (``CLUSTER SLOTS``, ``COMMAND``), and again
    after any node failed, so its timeouts are at least half a second.
    """
    import redis.asyncio  # noqa: PLC0415 - optional dependency, only with redis_url
    from redis.asyncio.retry import Retry  # noqa: PLC0415
    from redis.backoff import NoBackoff  # noqa: PLC0415

    cluster = _cluster_url(url)
    if cluster is not None:
        from redis.asyncio.cluster import RedisCluster  # noqa: PLC0415

        t = max(0.5, timeout_s)
        return RedisCluster.from_url(
            cluster,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=t,
            socket_connect_timeout=t,
        )
    return redis.asyncio.from_url(
        url, retry_on_timeout=False, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )


def connect_sync(url: str, timeout_s: float) -> Any:
    """A blocking ``redis`` client for ``url``: a ``RedisCluster`` for a cluster URL.

    For calls that take a pace slot from their own thread.
    """
    import redis  # noqa: PLC0415 - optional dependency, only with redis_url

    cluster = _cluster_url(url)
    if cluster is not None:
        from redis.cluster import RedisCluster  # noqa: PLC0415

        t = max(0.5, timeout_s)
        return RedisCluster.from_url(
            cluster,
            socket_timeout=t,
            socket_connect_timeout=t,
        )
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def upstream_tag(prefix: str, name: str) -> str:
    """The hash tag that puts every key of one upstream in one slot: ``{PREFIX:NAME}``."""
    return f"{{{prefix}:{name}}}"


def upstream_key(prefix: str, upstream: str, what: str) -> str:
    """One of an upstream's keys, ``{PREFIX:NAME}:what``, in the upstream's hash slot.

    ``what``: ``cooldown`` (the 429 cooldown's end, Redis ms), ``isolated`` (set while
    isolated), ``reset`` (the last reset's generation), ``workers`` (sorted set: worker ->
    last sync, ms), ``breakers`` (set of the breaker hashes' keys); ``breaker`` and
    ``probes`` (``:<endpoint>`` added for each breaker of scope endpoint).
    """
    return f"{upstream_tag(prefix, upstream)}:{what}"


class _Batch:
    """Some upstreams' part of a sync: their keys and news, sent in one script call.

    One Redis takes every upstream in one batch. A cluster takes one batch per upstream, as
    a script may only touch the keys of one slot.
    """

    __slots__ = ("args", "breakers", "keys", "reports", "requested", "upstreams")

    def __init__(
        self,
        upstreams: list[UpstreamRuntime],
        prefix: str,
        worker: str,
        lease_ms: int,
        forget_ms: int,
    ) -> None:
        self.upstreams = upstreams
        self.breakers: list[Breaker] = []
        self.reports: list[BreakerReport] = []
        self.requested: list[bool] = []
        """Per upstream: whether this sync carries a reset made here."""
        self.keys: list[str] = []
        self.args: list[Any] = [worker, lease_ms, 0, len(upstreams), forget_ms]
        for rt in upstreams:
            asked, rt.reset_requested = rt.reset_requested, False
            self.requested.append(asked)
            self.keys += [
                upstream_key(prefix, rt.name, what)
                for what in ("cooldown", "isolated", "reset", "workers")
            ]
            self.args += [
                int(rt.cooldown.remaining(rt.clock.monotonic()) * 1000),
                int(rt.isolated),
                rt.reset_seen,
                int(asked),
            ]
        for rt in upstreams:
            tag = upstream_tag(prefix, rt.name)
            for breaker in list(rt.breakers.values()):
                report = breaker.take_report()
                s = breaker.settings
                self.breakers.append(breaker)
                self.reports.append(report)
                # The upstream's one breaker, or ":<endpoint>" for each of scope endpoint.
                endpoint = breaker.name.removeprefix(rt.name).removeprefix(" ")
                suffix = f":{endpoint}" if endpoint else ""
                self.keys += [
                    f"{tag}:breaker{suffix}",
                    f"{tag}:probes{suffix}",
                    f"{tag}:reset",
                    f"{tag}:breakers",
                    f"{tag}:sent{suffix}:{worker}",
                ]
                self.args += [
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
                    report.reported_failures,
                ]
        self.args[2] = len(self.breakers)

    def give_back(self) -> None:
        """Redis did not take the news: keep it for the next sync, and go by local rules."""
        for breaker, report in zip(self.breakers, self.reports, strict=True):
            breaker.give_back(report)
            breaker.probe_allowance = breaker.settings.half_open_max_calls
        for rt, asked in zip(self.upstreams, self.requested, strict=True):
            rt.reset_requested = rt.reset_requested or asked  # sent with the next sync

    def adopt(self, result: list[Any]) -> None:
        """Take the shared view the script answered with."""
        values = [v.decode() if isinstance(v, bytes) else v for v in result]
        i = 1
        for rt, asked in zip(self.upstreams, self.requested, strict=True):
            remaining_ms, isolated, generation = (int(v) for v in values[i : i + 3])
            i += 3
            if remaining_ms > 0:
                rt.cooldown.adopt(rt.clock.monotonic(), remaining_ms / 1000)
            if generation > rt.reset_seen:
                if not asked and rt.reset_seen >= 0:  # a reset made elsewhere, since we synced
                    rt.reset()
                rt.reset_seen = generation
            if isolated and not rt.isolated:
                rt.isolate()
        for breaker in self.breakers:
            state, epoch, age_ms, granted = values[i : i + 4]
            i += 4
            breaker.adopt(str(state), int(epoch), int(age_ms) / 1000, int(granted))


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
        self._sha = hashlib.sha1(SYNC_SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis's name
        self._cluster = is_cluster_url(url)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop = threading.Event()
        self.status = "starting"
        """``starting``, ``ok`` or ``degraded`` (Redis unreachable: local state only)."""
        self.round_trips = 0
        """Syncs that reached Redis (one round trip; on a cluster, one call per upstream)."""
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
        """One sync from the calling thread, on a loop of its own (tests, scripts).

        Not for use while the background thread runs: it is the same sync, done now.
        """

        async def once() -> None:
            client = connect(self._url, self._timeout_s)
            try:
                await self.sync(client)
            finally:
                await client.aclose()

        asyncio.run(once())

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            client = connect(self._url, self._timeout_s)
        except ValueError as exc:  # settings validate the URL; this is the last safety net
            self.status = "degraded"
            log.warning("upstream_guard: unusable redis_url (%s); local state only", exc)
            return
        try:
            while True:
                await self.sync(client)
                if self._stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._interval_s)
                self._wake.clear()
        finally:
            self._loop = None
            await client.aclose()

    async def sync(self, client: Any) -> None:
        """One tick: the shared state, then the paces; with Redis away, no second timeout."""
        if await self.sync_once(client):
            await self.sync_paces(client)
        else:
            self.pace.ok = False

    async def sync_once(self, client: Any) -> bool:
        """Send every upstream's news (one script call each), adopt the shared view."""
        upstreams = list(self._guard.upstreams.values())
        groups = [[rt] for rt in upstreams] if self._cluster else [upstreams]
        batches = [
            _Batch(g, self._prefix, self._worker, self._lease_ms, self._forget_ms) for g in groups
        ]
        results = await self._send(client, batches)
        failure: BaseException | None = None
        for batch, result in zip(batches, results, strict=True):
            if isinstance(result, BaseException):
                batch.give_back()
                failure = result
            else:
                batch.adopt(result)
        if failure is not None:
            self.failed_round_trips += 1
            if self.status != "degraded":
                log.warning(
                    "upstream_guard: Redis at %s unreachable (%s); serving from local state",
                    _safe_url(self._url),
                    type(failure).__name__,
                )
            self.status = "degraded"
            return False
        self.round_trips += 1
        if self.status == "degraded":
            log.warning("upstream_guard: Redis is back; sharing state again")
        self.status = "ok"
        return True

    async def _call(self, client: Any, batch: _Batch) -> Any:
        from redis.exceptions import NoScriptError  # noqa: PLC0415 - optional dependency

        try:
            return await client.evalsha(self._sha, len(batch.keys), *batch.keys, *batch.args)
        except NoScriptError:  # a new or restarted server: load the script, send again
            await client.script_load(SYNC_SCRIPT)  # on a cluster: on every primary
            return await client.evalsha(self._sha, len(batch.keys), *batch.keys, *batch.args)

    async def _send(self, client: Any, batches: list[_Batch]) -> list[Any]:
        """Each batch's answer, or the exception that stopped it (one per batch)."""
        if self._cluster:
            return await self._send_to_cluster(client, batches)
        # One Redis, one batch: one round trip.
        try:
            return [await self._call(client, batch) for batch in batches]
        except Exception as exc:  # noqa: BLE001 - any Redis trouble: local state only
            return [exc] * len(batches)

    async def _send_to_cluster(self, client: Any, batches: list[_Batch]) -> list[Any]:
        """Each node's calls one after another (one connection per node), all nodes at once.

        Calls do not share a pipeline because redis-py refuses EVALSHA in a cluster pipeline.
        A node that cannot be reached fails the rest of its calls at once: one timeout per
        node and sync, not one per upstream.
        """
        from redis.exceptions import ConnectionError as Unreachable  # noqa: PLC0415
        from redis.exceptions import TimeoutError as TimedOut  # noqa: PLC0415

        results: list[Any] = [None] * len(batches)

        async def in_turn(indexes: list[int]) -> None:
            for n, i in enumerate(indexes):
                try:
                    results[i] = await self._call(client, batches[i])
                except (Unreachable, TimedOut) as exc:
                    for j in indexes[n:]:
                        results[j] = exc
                    return
                except Exception as exc:  # noqa: BLE001 - this upstream: local state only
                    results[i] = exc

        try:
            await client.initialize()  # learn the slots first: once, not in every call
            by_node: dict[str, list[int]] = {}
            for i, batch in enumerate(batches):
                node = client.get_node_from_key(batch.keys[0])  # the cooldown key: always there
                by_node.setdefault(node.name, []).append(i)
        except Exception as exc:  # noqa: BLE001 - cluster unreachable: local state only
            return [exc] * len(batches)
        await asyncio.gather(*(in_turn(indexes) for indexes in by_node.values()))
        return results

    async def sync_paces(self, client: Any) -> None:
        """The paces' round trip: learned rates and live workers (see ``_pace``)."""
        from ._pace import sync_paces  # noqa: PLC0415 - the pace's own Redis code

        ttl_ms = int(max(2.0, self._interval_s * 10) * 1000)
        try:
            await sync_paces(
                self._guard,
                client,
                prefix=self._prefix,
                worker=self._worker,
                ttl_ms=ttl_ms,
                cluster=self._cluster,
            )
        except Exception:  # noqa: BLE001 - Redis trouble: calls pace locally at their share
            self.failed_round_trips += 1
            self.pace.ok = False


def _safe_url(url: str) -> str:
    """The Redis URL without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
