"""The fleet as Redis sees it, and the operator's switches: for the command, from outside any app.

Workers publish what this reads at every sync (see ``_redis``): per upstream the workers
seen lately, the breakers' hashes, the cooldown, and isolation. ``isolate`` and ``reset``
only write Redis; every worker applies them at its next sync.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ._redis import ISOLATE_SCRIPT, RESET_SCRIPT, upstream_key, upstream_tag

_RANK = {"closed": 0, "half-open": 1, "open": 2}


class FleetError(Exception):
    """An operator's request that cannot be done (unknown upstream); the message says why."""


@dataclass
class Worker:
    """One worker process that synced with Redis lately."""

    id: str
    last_seen_s: float


@dataclass
class UpstreamStatus:
    """One upstream across the fleet."""

    name: str
    state: str
    """``closed``, ``half-open``, ``open`` (worst of its breakers) or ``isolated``."""
    isolated: bool
    isolated_for_s: float | None
    failures: int
    """Failures counted by every worker since the last reset."""
    trips: int
    cooldown_s: float
    workers: list[Worker] = field(default_factory=list)
    breakers: dict[str, str] = field(default_factory=dict)


def upstream_names(client: Any, prefix: str) -> list[str]:
    """The upstreams whose workers ever synced with this Redis (or that an operator isolated)."""
    pattern = re.compile(r"^\{" + re.escape(prefix) + r":(.+)\}:(?:workers|breakers|isolated)$")
    names: set[str] = set()
    for key in client.scan_iter(match=_glob_escape("{" + prefix + ":") + "*}:*", count=500):
        text = key.decode() if isinstance(key, bytes) else key
        found = pattern.match(text)
        if found:
            names.add(found.group(1))
    return sorted(names)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def fleet_status(client: Any, prefix: str) -> list[UpstreamStatus]:
    """Every known upstream's fleet-wide state (one short read per upstream)."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    return [_status(client, prefix, name, now_ms) for name in upstream_names(client, prefix)]


def _status(client: Any, prefix: str, name: str, now_ms: int) -> UpstreamStatus:
    isolated_at = client.get(upstream_key(prefix, name, "isolated"))
    cooldown_ms = client.pttl(upstream_key(prefix, name, "cooldown"))
    workers = client.zrange(upstream_key(prefix, name, "workers"), 0, -1, withscores=True)
    generation = int(_text(client.get(upstream_key(prefix, name, "reset")) or 0))
    worst, failures, trips = "closed", 0, 0
    breakers: dict[str, str] = {}
    for key in sorted(_text(k) for k in client.smembers(upstream_key(prefix, name, "breakers"))):
        fields = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
        if int(fields.get("reset", "0")) < generation:
            fields = {}  # reset since its last sync: the next one clears it
        state = fields.get("state", "closed")
        opened = int(float(fields.get("opened_at", "0")))
        if state == "open" and now_ms >= opened + int(float(fields.get("reset_ms", "0"))):
            state = "half-open"  # past its reset timeout: the next call is a probe
        endpoint = key.removeprefix(f"{upstream_tag(prefix, name)}:breaker").removeprefix(":")
        breakers[f"{name} {endpoint}" if endpoint else name] = state
        if _RANK[state] > _RANK[worst]:
            worst = state
        failures += int(fields.get("failures_total", "0"))
        trips += int(fields.get("trips", "0"))
    return UpstreamStatus(
        name=name,
        state="isolated" if isolated_at is not None else worst,
        isolated=isolated_at is not None,
        isolated_for_s=None
        if isolated_at is None
        else round(max(0, now_ms - int(_text(isolated_at))) / 1000, 1),
        failures=failures,
        trips=trips,
        cooldown_s=round(max(0, cooldown_ms) / 1000, 1),
        workers=[
            Worker(_text(worker), round(max(0.0, now_ms - score) / 1000, 1))
            for worker, score in sorted(workers, key=lambda w: -w[1])
        ],
        breakers=breakers,
    )


def as_dicts(status: list[UpstreamStatus]) -> dict[str, Any]:
    """The status as plain data (for ``--json``)."""
    upstreams = {u.name: {k: v for k, v in asdict(u).items() if k != "name"} for u in status}
    return {"upstreams": upstreams}


def _known(client: Any, prefix: str, name: str) -> None:
    names = upstream_names(client, prefix)
    if name not in names:
        known = ", ".join(names) or "none yet: no worker has synced with this Redis"
        raise FleetError(f"no upstream named {name!r} in Redis (known: {known})")


def isolate(client: Any, prefix: str, name: str) -> None:
    """Isolate ``name`` for the whole fleet until ``reset`` (kept in Redis)."""
    _known(client, prefix, name)
    client.eval(ISOLATE_SCRIPT, 1, upstream_key(prefix, name, "isolated"))


def reset(client: Any, prefix: str, name: str) -> None:
    """Reset ``name`` for the whole fleet: closed, isolation lifted, counters cleared."""
    _known(client, prefix, name)
    client.eval(
        RESET_SCRIPT,
        2,
        upstream_key(prefix, name, "reset"),
        upstream_key(prefix, name, "isolated"),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
