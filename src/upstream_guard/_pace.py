"""The pace: how fast one upstream may be called, configured or learned from its 429s.

A pace is a rate in calls per second for the whole fleet. Each call takes a slot from a GCRA
(generic cell rate algorithm: one "theoretical arrival time" per upstream, ``burst`` calls
let through at once) before it is sent: it goes now, waits for its slot within
``pace.max_wait_s`` and its deadline, or is refused at once with reason ``paced``.

Where the rate comes from: ``pace.requests_per_s`` (a ceiling the user knows), and with
``pace.adaptive`` a rate learned from 429s (a multiplicative decrease, a CUBIC-like increase);
the lower of the two holds.

The controller, and why:

- **Decrease** on a 429. The rate that drew it is *measured*, not guessed: the attempts the
  upstream accepted (sent minus throttled) over the recent past (from the first second with
  a call, at most ``HORIZON_S`` = 60 s back; the whole fleet's, see below), divided by that
  time *plus the Retry-After*.
  A rolling-window limiter (Spotify counts over 30 s) asks the caller to wait until its
  oldest counted call leaves the window, so "accepted ÷ (time sent + time told to wait)" is
  the window's allowance, whatever the window's length: the guard need not be told it. A
  punitive Retry-After only makes the estimate lower, the safe side. The new pace is
  ``BETA`` = 0.9 of that estimate (or of the pace in force, if lower): close enough to the
  limit to keep goodput above 90%, far enough below it that the next 429 takes a while.
  A 429 answering a call sent before the last decrease is old news and changes nothing;
  nor does one when nothing got through lately (no rate to measure: the cooldown holds).
- **Increase** while no 429 comes: CUBIC-like, back to a plateau at the rate that drew the
  429 (``learned / BETA``), then beyond it:
  ``plateau * (1 + (1 - BETA) * ((t - PLATEAU_S) / PLATEAU_S) ** 3)``, ``t`` the seconds
  since the decrease. The pace regains most of the cut within ``PLATEAU_S`` / 2 (concave),
  sits within 1.25% of the plateau from 15 s to 45 s after the decrease, and only then
  probes for more room, faster and faster (convex: +10% at 60 s, +80% at 90 s), so a raised
  limit is found within a minute or two. Why: a rolling window answers an overshoot late,
  once the mean over the whole window has crossed the limit, i.e. half a window after the
  pace did; a pace that is still climbing meanwhile fills the window above the limit (a
  linear +0.4%/s climbed 5% past the limit before a 30 s window said so, and drew 1.8% to
  3.6% 429s). Near the plateau the pace moves by at most 1.25% in 15 s, half of Spotify's
  window, so the window answers before the overshoot is worth more than a 429. The plateau
  is a measured rate, so the pace does not need to know the window; windows much longer
  than ``2 * PLATEAU_S`` would see larger overshoots.
- **No burst** while the learned pace holds (unless ``pace.burst`` is set): calls go one
  every ``1 / rate``. A second's worth at once, right after a cooldown, lands in a window
  that has just refilled to its limit and draws a 429 again. For the same reason a call
  held by a cooldown takes a new slot when it ends (``GuardedCall.begin``).
- **Lapse**: after ``pace.calm_s`` without a 429 the learned pace is dropped (the demand
  that drew it is gone, or the limit moved).
- A Retry-After still starts the cooldown as before; the pace is what prevents the next one.

With ``redis_url`` the slot is taken from a GCRA in Redis (``PACE_SCRIPT``: one round trip,
the rate an argument; only while a pace is in force). The learned rate, the workers alive
and each worker's accepted calls/s are shared by ``sync_paces`` in the background sync
(``SYNC_PACE_SCRIPT``), so a decrease measures the fleet's accepted calls: this worker's
count plus the other workers' accepted rate (as the last sync found it) over the same time.
Workers need not split the calls evenly (uvicorn's keep their connections). With no sync
in the last ``FLEET_FRESH_S``, or Redis down, the guess is this worker's count times the
live workers it last saw. No call waits on any of this. Redis down: each process paces
locally at its share (the pace ÷ the live workers it last saw), says so in health, and
loses no call. Keys sit in one hash slot per upstream (``{prefix:NAME}``) for Redis Cluster.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ._clock import Clock
from ._redis import upstream_key
from ._settings import PaceSettings

if TYPE_CHECKING:
    from ._guard import Guard

log = logging.getLogger("upstream_guard")

BETA = 0.9
"""A 429 sets the pace to this share of the measured rate that drew it."""
PLATEAU_S = 30.0
"""Seconds after a decrease at which the learned pace is back at the rate that drew the 429."""
HORIZON_S = 60
"""How far back accepted calls are counted to measure the rate that drew a 429."""
MIN_RATE = 0.05
"""The learned pace never falls below one call in 20 s."""
FLEET_FRESH_S = 5.0
"""The other workers' accepted rate from a sync is used for this long; then the split guess."""
_SLOTS = 64  # seconds the meter remembers (> HORIZON_S, a power of two)

# GCRA. KEYS[1]: the upstream's theoretical arrival time (microseconds, Redis' clock).
# ARGV: emission interval us (1/rate), burst (calls), longest wait us. Answers
# {granted 0|1, wait us}: wait until the slot, or (refused) until the next one.
PACE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - (burst - 1) * interval - now
if wait < 0 then wait = 0 end
if wait > limit then return {0, math.floor(wait)} end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
  math.floor((tat - now) / 1000) + 1000)
return {1, math.floor(wait)}
"""

# KEYS: learned (hash: rate, at = Redis ms of the decrease, hold ms), workers (zset: worker
# -> ms), meter (hash: worker -> its accepted calls/s lately). ARGV: worker, worker ttl ms,
# news (0|1), rate, age ms of the decrease, calm ms, hold ms, this worker's accepted calls/s.
# Answers {workers alive, rate or '', age ms of its decrease, hold ms, the other live
# workers' accepted calls/s summed}.
SYNC_PACE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, calm = tonumber(ARGV[2]), tonumber(ARGV[6])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
  redis.call('HDEL', KEYS[3], unpack(gone))
end
redis.call('PEXPIRE', KEYS[2], ttl)
local workers = redis.call('ZCARD', KEYS[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[8])
redis.call('PEXPIRE', KEYS[3], ttl)
local others = 0
for _, w in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if w ~= ARGV[1] then others = others + tonumber(redis.call('HGET', KEYS[3], w) or '0') end
end
local v = redis.call('HMGET', KEYS[1], 'rate', 'at', 'hold')
local rate, at, hold = tonumber(v[1]), tonumber(v[2] or '0'), tonumber(v[3] or '0')
if ARGV[3] == '1' then
  local incoming, iat, ihold = tonumber(ARGV[4]), now - tonumber(ARGV[5]), tonumber(ARGV[7])
  local changed = true
  if rate == nil or iat > at + 1000 then
    rate, at, hold = incoming, iat, ihold  -- a newer decrease wins
  elseif iat >= at - 1000 then
    -- Two workers measured one overload at about the same time: their mean.
    rate, at, hold = (rate + incoming) / 2, math.max(at, iat), math.max(hold, ihold)
  else
    changed = false  -- older than the one kept
  end
  if changed then
    redis.call('HSET', KEYS[1], 'rate', string.format('%.6f', rate), 'at', at, 'hold', hold)
    redis.call('PEXPIRE', KEYS[1], calm)
  end
end
others = string.format('%.6f', others)
if rate == nil then return {workers, '', 0, 0, others} end
return {workers, string.format('%.6f', rate), now - at, hold, others}
"""


class Pace:
    """One upstream's pace: the configured ceiling, the learned rate, the local GCRA.

    ``active`` is the only thing a call reads when no pace is in force.
    """

    def __init__(self, name: str, settings: PaceSettings, clock: Clock) -> None:
        """Start with the configured ceiling (if any) and nothing learned."""
        self.name = name
        self.clock = clock
        self.configured = settings.requests_per_s
        self.adaptive = settings.adaptive
        self.max_wait_s = settings.max_wait_s
        self.calm_s = settings.calm_s
        self._burst = settings.burst
        self.active = self.configured is not None
        """Whether a pace is in force (a call then takes a slot)."""
        self.learned: float | None = None
        """The rate the last decrease set (it has risen since: see ``learned_rate``)."""
        self.learned_at = -math.inf
        """When (monotonic) the last decrease was."""
        self.news = False
        """A decrease not yet published to the fleet."""
        self._news_after = -math.inf
        self.hold_s = 0.0
        """How long after the last decrease a 429 is old news (published with it)."""
        self.on_learn: Callable[[], None] | None = None
        """Called after a decrease (shared state publishes it at once)."""
        self._tat = 0.0
        self._lock = threading.Lock()
        # The meter: attempts sent minus those throttled (counted by every call, without a
        # lock: a count lost to a thread race does not matter), and what it was at the first
        # call of each of the last seconds (a ring).
        self.sent = 0
        self.next_mark = -math.inf
        self._mark_sec = [-1] * _SLOTS
        self._mark_sent = [0] * _SLOTS
        self._mark_at = [0.0] * _SLOTS
        # Shared pacing (set by ``SharedPace`` with redis_url).
        self.shared: SharedPace | None = None
        self.workers = 1
        """Live workers this process last saw through Redis (itself included)."""
        self.others_rate: float | None = None
        """The other live workers' accepted calls/s, as the last sync found them."""
        self.others_at = -math.inf
        """When (monotonic) that sync was."""
        self.refused = 0
        """Calls refused because their slot was too far off."""

    # -- the rate ------------------------------------------------------------------------------

    def learned_rate(self, now: float) -> float | None:
        """The learned pace now (it rises with the calm since the decrease), or None."""
        learned = self.learned
        if learned is None:
            return None
        calm = now - self.learned_at
        if calm >= self.calm_s:  # a long calm: the learned pace lapses
            self.learned = None
            self.active = self.configured is not None
            return None
        x = (max(0.0, calm) - PLATEAU_S) / PLATEAU_S
        return learned / BETA * (1.0 + (1.0 - BETA) * x * x * x)

    def rate(self, now: float) -> tuple[float | None, str]:
        """The fleet-wide pace in force and its source: ``none``, ``configured``, ``learned``."""
        learned = self.learned_rate(now)
        configured = self.configured
        if learned is not None and (configured is None or learned < configured):
            return learned, "learned"
        if configured is not None:
            return configured, "configured"
        return None, "none"

    def local_share(self) -> bool:
        """Whether this process paces alone at its share (Redis configured but unreachable)."""
        return self.shared is not None and not self.shared.ok

    def burst(self, rate: float, source: str) -> float:
        """Calls let through at once: the setting, else 1 (learned) or a second's worth."""
        if self._burst is not None:
            return self._burst
        return 1.0 if source == "learned" else max(1.0, rate)

    # -- slots ---------------------------------------------------------------------------------

    def take(self, now: float, limit_s: float) -> tuple[bool, float]:
        """Take a slot from the local GCRA: (granted, wait); refused: (False, time to a slot).

        Redis down, the fleet's pace is split: this process takes its share.
        """
        rate, source = self.rate(now)
        if rate is None:  # lapsed meanwhile
            return True, 0.0
        burst = self.burst(rate, source)
        if self.local_share():
            rate /= max(1, self.workers)
            burst = max(1.0, burst / max(1, self.workers))
        interval = 1.0 / rate
        with self._lock:
            tat = max(self._tat, now)
            wait = max(0.0, tat - (burst - 1.0) * interval - now)
            if wait > limit_s:
                self.refused += 1
                return False, wait
            self._tat = tat + interval
        return True, wait

    def shared_args(self, now: float, limit_s: float) -> tuple[float, float, float] | None:
        """The GCRA script's arguments (interval us, burst, limit us); None: no pace now."""
        rate, source = self.rate(now)
        if rate is None:
            return None
        return 1e6 / rate, self.burst(rate, source), max(0.0, limit_s) * 1e6

    def reserve_sync(self, limit_s: float) -> tuple[bool, float]:
        """Take a slot, from Redis when shared (one round trip), else locally (a thread)."""
        now = self.clock.monotonic()
        shared = self.shared
        if shared is not None and shared.ok:
            taken = shared.take(self, now, limit_s)
            if taken is not None:
                if not taken[0]:
                    self.refused += 1
                return taken
        return self.take(now, limit_s)

    async def reserve(self, limit_s: float) -> tuple[bool, float]:
        """``reserve_sync`` off the event loop (any anyio backend)."""
        return await anyio.to_thread.run_sync(self.reserve_sync, limit_s)

    # -- the meter and the controller ----------------------------------------------------------

    def mark(self, now: float) -> None:
        """The first call of a new second: note how many attempts were sent before it."""
        sec = int(now)
        slot = sec & (_SLOTS - 1)
        self._mark_sec[slot] = sec
        self._mark_at[slot] = now
        self._mark_sent[slot] = self.sent
        self.next_mark = sec + 1.0

    def accepted(self, now: float) -> tuple[int, float]:
        """Attempts accepted (sent, not throttled) over the recent past, and the time it covers.

        The past starts at the first second with a call within ``HORIZON_S``: idle time
        before it is not part of the rate.
        """
        sec = int(now)
        for s in range(sec - HORIZON_S, sec + 1):
            slot = s & (_SLOTS - 1)
            if self._mark_sec[slot] == s:
                seconds = now - self._mark_at[slot]
                return max(0, self.sent - self._mark_sent[slot]), max(0.1, seconds)
        return 0, 0.1

    def own_rate(self, now: float) -> float:
        """Accepted calls per second of this worker over the recent past (a sync publishes it)."""
        accepted, seconds = self.accepted(now)
        return accepted / seconds if accepted > 0 else 0.0

    def fleet_accepted(self, accepted: int, seconds: float, now: float) -> float:
        """The fleet's accepted calls over the last ``seconds``, given this worker's.

        Shared through Redis: this worker's count plus the other workers' accepted rate (as
        the last sync found it) over the same time. Without a recent sync, the split guess:
        this worker's count times the live workers it last saw (even split assumed).
        """
        shared = self.shared
        if shared is None:
            return float(accepted)
        others = self.others_rate
        if shared.ok and others is not None and now - self.others_at <= FLEET_FRESH_S:
            return accepted + others * seconds
        return float(accepted * max(1, self.workers))

    def throttled(self, now: float, call_started: float, retry_after_s: float) -> None:
        """A 429 came for an attempt of a call started at ``call_started``: learn from it."""
        self.sent -= 1  # sent, but not accepted
        if not self.adaptive or call_started < self._news_after:
            return  # not learning, or old news: that call was sent before the last decrease
        accepted, seconds = self.accepted(now)
        if accepted <= 0:
            return  # nothing got through lately: no rate to measure; the cooldown holds them
        measured = self.fleet_accepted(accepted, seconds, now) / (seconds + max(0.0, retry_after_s))
        current, _ = self.rate(now)
        base = measured if current is None else min(measured, current)
        self.learned = max(MIN_RATE, BETA * base)
        self.learned_at = now
        # The upstream still counts the calls measured until they leave its window: a 429
        # for a call sent before then is their doing, not the new pace's.
        self.hold_s = min(seconds + max(0.0, retry_after_s), HORIZON_S / 2)
        self._news_after = now + self.hold_s
        self.active = True
        self.news = True
        log.info(
            "upstream_guard: %s answered 429; pacing at %.2f calls/s (measured %.2f)",
            self.name,
            self.learned,
            measured,
        )
        if self.on_learn is not None:
            self.on_learn()

    def adopt(self, rate: float | None, age_s: float, hold_s: float, now: float) -> None:
        """Take the fleet's learned pace (from Redis), unless a newer decrease is unsent.

        Its hold too: a 429 here for a call sent before the fleet's decrease was drawn by
        the old pace, as it would be after a decrease of this worker's own.
        """
        if self.news or rate is None:
            return
        at = min(now - age_s, now)
        if self.learned is None or at > self.learned_at + 1e-3 or rate != self.learned:
            self.learned, self.learned_at = rate, at
            self.active = True
        self._news_after = max(self._news_after, at + hold_s)

    def view(self) -> dict[str, Any]:
        """Health's ``pace``: rate and source, and how it is shared."""
        rate, source = self.rate(self.clock.monotonic())
        mode = "off" if self.shared is None else "redis" if self.shared.ok else "local_share"
        view: dict[str, Any] = {
            "rate_per_s": None if rate is None else round(rate, 3),
            "source": source,
            "shared": mode,
            "refused": self.refused,
        }
        if mode != "off":
            view["workers"] = self.workers
        if mode == "local_share" and rate is not None:
            view["local_rate_per_s"] = round(rate / max(1, self.workers), 3)
        return view


class SharedPace:
    """Takes slots from the fleet's GCRA in Redis; says when to pace locally instead."""

    def __init__(self, url: str, prefix: str, timeout_s: float) -> None:
        """Prepare a client (connections are made on first use, in a pool)."""
        from ._redis import connect_sync  # noqa: PLC0415 - optional dependency

        self._client = connect_sync(url, timeout_s)
        self._script = self._client.register_script(PACE_SCRIPT)
        self._prefix = prefix
        self.ok = True
        """Redis answered last time (set again by the background sync when it comes back)."""

    def take(self, pace: Pace, now: float, limit_s: float) -> tuple[bool, float] | None:
        """One round trip; None if Redis failed (then pace locally until it is back)."""
        args = pace.shared_args(now, limit_s)
        if args is None:
            return True, 0.0
        try:
            key = upstream_key(self._prefix, pace.name, "pace")
            granted, wait_us = self._script(keys=[key], args=list(args))
        except Exception as exc:  # noqa: BLE001 - any Redis trouble: pace locally, lose nothing
            if self.ok:
                log.warning(
                    "upstream_guard: Redis unreachable for %s's pace (%s); pacing locally at "
                    "1/%d of it",
                    pace.name,
                    type(exc).__name__,
                    pace.workers,
                )
            self.ok = False
            return None
        return bool(int(granted)), int(wait_us) / 1e6

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def attach(guard: Guard, url: str, prefix: str, timeout_s: float) -> SharedPace:
    """Share every upstream's pace through Redis at ``url``."""
    shared = SharedPace(url, prefix, timeout_s)
    for rt in guard.upstreams.values():
        rt.pace.shared = shared
    return shared


_SYNC_KEYS = ("learned", "pace_workers", "pace_meter")
"""An upstream's keys ``SYNC_PACE_SCRIPT`` takes, in its order."""


async def sync_paces(
    guard: Guard, client: Any, *, prefix: str, worker: str, ttl_ms: int, cluster: bool = False
) -> None:
    """One background round trip (a pipeline): publish decreases, adopt the fleet's pace.

    On Redis Cluster, one script call per upstream instead (redis-py refuses scripts in a
    cluster pipeline; each upstream's keys are in its own slot). Raises what Redis raises;
    the caller counts the failure.
    """
    script = client.register_script(SYNC_PACE_SCRIPT)
    paces = [rt.pace for rt in guard.upstreams.values()]
    now = guard.clock.monotonic()
    sent = []
    pipe = None if cluster else client.pipeline(transaction=False)
    answered: list[Any] = []
    try:
        for pace in paces:
            news = pace.news
            pace.news = False
            sent.append(news)
            age_ms = int(max(0.0, now - pace.learned_at) * 1000) if news else 0
            calm_ms = int(pace.calm_s * 1000)
            hold_ms = int(pace.hold_s * 1000)
            own = f"{pace.own_rate(now):.6f}"
            args = [worker, ttl_ms, int(news), pace.learned or 0.0, age_ms, calm_ms, hold_ms, own]
            keys = [upstream_key(prefix, pace.name, k) for k in _SYNC_KEYS]
            if pipe is None:  # a cluster: this upstream's slot, now
                answered.append(await script(keys=keys, args=args))
            else:  # queued: one round trip for all
                await script(keys=keys, args=args, client=pipe)
        results = answered if pipe is None else await pipe.execute()
    except BaseException:
        for pace, news in zip(paces, sent, strict=False):
            pace.news = pace.news or news  # publish it next time
        raise
    now = guard.clock.monotonic()
    for pace, (workers, rate, age_ms, hold_ms, others) in zip(paces, results, strict=True):
        pace.workers = max(1, int(workers))
        pace.others_rate, pace.others_at = float(others), now
        text = rate.decode() if isinstance(rate, bytes) else str(rate)
        pace.adopt(float(text) if text else None, int(age_ms) / 1000, int(hold_ms) / 1000, now)
        if pace.shared is not None:
            pace.shared.ok = True
