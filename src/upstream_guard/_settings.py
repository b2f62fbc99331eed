"""Settings: pydantic-settings models, read from code or ``UPSTREAM_GUARD_*`` variables."""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import idna
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as EnvSettingsError

ENV_PREFIX = "UPSTREAM_GUARD_"
SPOTIFY_TEMPLATES = "@spotify"
"""A ``templates`` entry that stands for the built-in Spotify Web API table."""


_NESTED: ContextVar[bool] = ContextVar("upstream_guard_settings_nested", default=False)


class SettingsError(ValueError):
    """Invalid settings: each line names the field, what is wrong, and its env variable."""


def _env_name(loc: tuple[int | str, ...], prefix: tuple[str, ...]) -> str:
    parts = [*prefix, *(str(p) for p in loc if not isinstance(p, int))]
    return ENV_PREFIX + "__".join(parts).upper()


def _format_errors(exc: ValidationError, prefix: tuple[str, ...]) -> str:
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        field = ".".join(str(p) for p in (*prefix, *loc)) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        got_text = "" if err["type"] == "missing" or isinstance(got, dict) else f", got {got!r}"
        lines.append(f"{field}: {msg}{got_text} ({_env_name(loc, prefix)})")
    return "invalid upstream_guard settings:\n  " + "\n  ".join(lines)


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if _NESTED.get():  # inside GuardSettings: it reports the whole path once
                raise
            raise SettingsError(_format_errors(exc, self._env_path())) from None

    _env_group: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _env_path(cls) -> tuple[str, ...]:
        # Built in code, a group does not know its upstream's name: show where it goes.
        return ("upstreams", "<name>", *cls._env_group)


class BreakerSettings(_Group):
    """When a breaker opens, and how it probes its way back to closed."""

    _env_group: ClassVar[tuple[str, ...]] = ("breaker",)

    fail_max: int = Field(5, ge=1, description="Consecutive failures that open the breaker.")
    failure_ratio: float = Field(
        0.5, gt=0, le=1, description="Failure ratio over `window_s` that opens the breaker."
    )
    minimum_calls: int = Field(
        20, ge=1, description="Calls in the window before `failure_ratio` is judged."
    )
    window_s: float = Field(30.0, gt=0, description="Sliding window for `failure_ratio`.")
    slow_call_s: float | None = Field(
        None, gt=0, description="A call slower than this counts as a failure (none: off)."
    )
    reset_timeout_s: float = Field(30.0, gt=0, description="Time open before probing.")
    half_open_max_calls: int = Field(1, ge=1, description="Probes allowed at once in half-open.")
    success_threshold: int = Field(1, ge=1, description="Good probes that close the breaker.")
    scope: Literal["upstream", "endpoint"] = Field(
        "upstream", description="One breaker per upstream, or one per endpoint template."
    )


_DEFAULT_RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class RetrySettings(_Group):
    """Which calls are retried, how long to wait, and how many retries a sick upstream gets."""

    _env_group: ClassVar[tuple[str, ...]] = ("retry",)

    attempts: int = Field(3, ge=1, le=20, description="Attempts per call, the first included.")
    backoff_base_s: float = Field(0.1, ge=0, description="First backoff (full jitter).")
    backoff_max_s: float = Field(2.0, ge=0, description="Largest backoff.")
    methods: frozenset[str] = Field(
        _DEFAULT_RETRY_METHODS, description="Methods retried (POST never is by default)."
    )
    statuses: frozenset[int] = Field(
        frozenset({429, 500, 502, 503, 504}), description="Response statuses retried."
    )
    max_retry_after_s: float = Field(
        1.0,
        ge=0,
        description="Longest Retry-After waited for within a call; longer ends the call at once.",
    )
    throttle_cooldown_s: float = Field(
        1.0, ge=0, description="Cooldown after a 429 that carries no usable Retry-After."
    )
    budget_ratio: float = Field(
        0.2, ge=0, le=1, description="Retries earned per call (token bucket)."
    )
    budget_min_per_s: float = Field(1.0, ge=0, description="Retries always allowed per second.")

    @field_validator("methods", mode="before")
    @classmethod
    def _upper_methods(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [m for m in value.replace(",", " ").split() if m]
        if isinstance(value, list | tuple | set | frozenset):
            return frozenset(str(m).strip().upper() for m in value)
        return value

    @field_validator("statuses")
    @classmethod
    def _status_range(cls, value: frozenset[int]) -> frozenset[int]:
        bad = sorted(s for s in value if not 400 <= s <= 599)
        if bad:
            raise ValueError(f"statuses must be 4xx or 5xx codes, not {bad}")
        return value

    @field_validator("backoff_max_s")
    @classmethod
    def _max_over_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("backoff_base_s")
        if base is not None and value < base:
            raise ValueError(f"backoff_max_s must be >= backoff_base_s ({base})")
        return value


class TimeoutSettings(_Group):
    """Time limits: one attempt, and the whole call with its retries and waits."""

    _env_group: ClassVar[tuple[str, ...]] = ("timeout",)

    attempt_s: float = Field(5.0, gt=0, description="Limit for one attempt.")
    total_s: float = Field(12.0, gt=0, description="Limit for the whole call, retries included.")

    @field_validator("total_s")
    @classmethod
    def _total_covers_attempt(cls, value: float, info: ValidationInfo) -> float:
        attempt = info.data.get("attempt_s")
        if attempt is not None and attempt > value:
            raise ValueError(f"total_s must be >= timeout.attempt_s ({attempt})")
        return value


class FallbackSettings(_Group):
    """What the guard answers with when an upstream is unavailable."""

    _env_group: ClassVar[tuple[str, ...]] = ("fallback",)

    stale_if_error: bool = Field(
        default=False, description="Serve the last good copy of a GET when the upstream fails."
    )
    stale_max_age_s: float = Field(300.0, gt=0, description="Oldest stale copy served.")
    cache_max_entries: int = Field(1024, ge=1, description="Stale copies kept (LRU).")
    cache_max_bytes: int = Field(8 * 1024 * 1024, ge=1, description="Bytes of stale copies kept.")


class CoalesceSettings(_Group):
    """Concurrent identical calls in one process share one upstream call (per identity)."""

    _env_group: ClassVar[tuple[str, ...]] = ("coalesce",)

    gets: bool = Field(
        default=True,
        description="Identical GETs in flight at once (same URL, Authorization, Cookie, "
        "Accept, Accept-Language) share one upstream call.",
    )
    token_requests: bool = Field(
        default=True,
        description="Identical POSTs to `/api/token` (same form body and Authorization) share "
        "one call; no other POST ever does.",
    )
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description="Largest answer body shared with waiting callers; larger ones make their "
        "own calls.",
    )
    max_in_flight: int = Field(
        1024,
        ge=1,
        description="Calls tracked in flight at once; calls beyond it are not coalesced. "
        "Also bounds the hot keys kept for `detach_leaders`.",
    )
    detach_leaders: Literal["never", "hot", "always"] = Field(
        default="hot",
        description="Which async calls run in a task of their own, so that a leader whose "
        "caller is cancelled still answers the calls waiting for it (one upstream call, not "
        "two): `hot` token requests and GETs whose key had a follower within `hot_s`; "
        "`always` every GET and token request (a task each: about 95k CPU instructions on "
        "asyncio); `never`.",
    )
    hot_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="With `detach_leaders` `hot`: how long a key stays hot after a call "
        "followed another (at most `max_in_flight` keys are remembered, the oldest dropped "
        "first).",
    )


class HedgeSettings(_Group):
    """A slow GET gets extra attempts in parallel; the first good answer wins."""

    _env_group: ClassVar[tuple[str, ...]] = ("hedge",)

    after_s: float | None = Field(
        None,
        gt=0,
        description="Send a hedge when a GET has no answer after this long (none: off). "
        "Paid from the retry budget.",
    )
    max_extra: int = Field(1, ge=1, le=5, description="Hedges at most per attempt.")


class PaceSettings(_Group):
    """How fast calls may go: a ceiling the user knows, and a pace learned from 429s."""

    _env_group: ClassVar[tuple[str, ...]] = ("pace",)

    requests_per_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Ceiling on calls per second, fleet-wide (none: no ceiling).",
    )
    burst: float | None = Field(
        None,
        ge=1,
        allow_inf_nan=False,
        description="Calls let through at once above the pace (none: a second's; 1 if learned).",
    )
    adaptive: bool = Field(
        default=True, description="Learn a pace from 429s and raise it while none come."
    )
    max_wait_s: float = Field(
        1.0,
        ge=0,
        allow_inf_nan=False,
        description="Longest a call waits for its slot; past it, refused (`paced`).",
    )
    calm_s: float = Field(
        600.0,
        gt=0,
        allow_inf_nan=False,
        description="A learned pace lapses after this long without a 429.",
    )


def _parse_host(entry: str) -> str:
    text = entry.strip().lower()
    if not text or "/" in text or "@" in text or " " in text:
        raise ValueError(f"hosts entries are 'host' or 'host:port', not {entry!r}")
    if text.startswith("["):  # IPv6 literal: [::1] or [::1]:8000
        end = text.find("]")
        rest = text[end + 1 :] if end > 1 else "x"
        port = rest[1:]
        if end < 0 or (
            rest and not (rest.startswith(":") and port.isdigit() and 0 < int(port) < 65536)
        ):
            raise ValueError(f"hosts entries are 'host' or 'host:port', not {entry!r}")
        return text
    host, sep, port = text.rpartition(":")
    if sep and (not host or not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"hosts entries are 'host' or 'host:port', not {entry!r}")
    return text


def ascii_host(entry: str) -> str:
    """A ``host`` or ``host:port`` entry with the host as clients send it.

    That is IDNA 2008 (as httpx encodes it) for an internationalised name; anything else
    stays as it is.
    """
    if entry.isascii():
        return entry
    host, sep, port = entry.rpartition(":") if ":" in entry else (entry, "", "")
    try:
        return idna.encode(host).decode("ascii") + sep + port
    except (idna.IDNAError, UnicodeError):
        return entry


class UpstreamSettings(_Group):
    """One upstream: the hosts that belong to it and how its calls are guarded."""

    hosts: tuple[str, ...] = Field(description="Hosts, as 'host' or 'host:port'.")
    templates: tuple[str, ...] = Field(
        (), description="Path templates like /v1/tracks/{id}; '@spotify' adds Spotify's table."
    )
    enabled: bool = Field(default=True, description="Guard this upstream at all.")
    max_concurrency: int | None = Field(
        None, ge=1, description="Calls in flight at once (none: unlimited)."
    )
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    timeout: TimeoutSettings = Field(default_factory=TimeoutSettings)
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)
    coalesce: CoalesceSettings = Field(default_factory=CoalesceSettings)
    hedge: HedgeSettings = Field(default_factory=HedgeSettings)
    pace: PaceSettings = Field(default_factory=PaceSettings)

    @field_validator("hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(h for h in value.replace(",", " ").split() if h)
        return value

    @field_validator("hosts")
    @classmethod
    def _valid_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("hosts must name at least one host")
        return tuple(_parse_host(h) for h in value)

    @field_validator("templates")
    @classmethod
    def _valid_templates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for template in value:
            if template != SPOTIFY_TEMPLATES and not template.startswith("/"):
                raise ValueError(f"templates start with '/' (or are '@spotify'), not {template!r}")
        return value


_JSON_FIELDS = ("HOSTS", "TEMPLATES", "METHODS", "STATUSES", "UPSTREAMS")


def _undecodable_env(exc: Exception) -> str:
    """Name the variables whose list value is not JSON (pydantic-settings does not say)."""
    lines = []
    for name, value in os.environ.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or not upper.endswith(_JSON_FIELDS):
            continue
        try:
            json.loads(value)
        except ValueError:
            example = '["api.spotify.com", "127.0.0.1:8000"]'
            lines.append(f"{upper}: must be JSON, e.g. {example}; got {value!r}")
    if not lines:
        lines.append(f"{exc} (lists and mappings in variables are written as JSON)")
    return "invalid upstream_guard settings:\n  " + "\n  ".join(lines)


def default_upstreams() -> dict[str, dict[str, Any]]:
    """The two Spotify upstreams every guard starts with (as plain data, to merge into)."""
    return {
        "spotify_api": {"hosts": ("api.spotify.com",), "templates": (SPOTIFY_TEMPLATES,)},
        "spotify_accounts": {"hosts": ("accounts.spotify.com",), "templates": ("/api/token",)},
    }


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class GuardSettings(BaseSettings):
    """All of the guard's settings; environment variables use the ``UPSTREAM_GUARD_`` prefix."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    upstreams: dict[str, UpstreamSettings] = Field(
        default_factory=dict,
        description="Upstreams by name; merged over spotify_api and spotify_accounts.",
    )
    health_path: str = Field("/_upstream_guard/health", description="Path of the health endpoint.")
    request_deadline_s: float | None = Field(
        None, gt=0, description="Deadline of an inbound request; bounds its outbound retries."
    )
    fallback_retry_after_s: int = Field(
        5, ge=1, description="Retry-After of a 503 answer when no breaker or cooldown says more."
    )
    server_timing: bool = Field(
        default=True, description="Add a Server-Timing header with each upstream's time."
    )
    redis_url: str | None = Field(
        None,
        description="Share state through Redis (none: memory); `redis+cluster://host:port` "
        "for Redis Cluster.",
    )
    redis_prefix: str = Field(
        "upstream_guard", min_length=1, description="Prefix of every Redis key the guard writes."
    )
    redis_sync_interval_s: float = Field(
        0.2, gt=0, le=10, description="How often state is synced with Redis (one round trip)."
    )
    dashboard_path: str | None = Field(
        None,
        description="Serve a live dashboard page at this path, its JSON at `{path}/data` "
        "(none: off).",
    )
    dashboard_allow_anonymous: bool = Field(
        default=False, description="Serve the dashboard without a token (it is refused otherwise)."
    )
    dashboard_token: SecretStr | None = Field(
        None,
        description="Token the dashboard requires: `Authorization: Bearer <token>` or "
        "`?token=<token>`.",
    )

    def __init__(self, **data: Any) -> None:
        """Build from keyword arguments over the environment; raise SettingsError if invalid."""
        token = _NESTED.set(True)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SettingsError(_format_errors(exc, ())) from None
        except EnvSettingsError as exc:  # a list or dict variable that is not JSON
            raise SettingsError(_undecodable_env(exc)) from None
        finally:
            _NESTED.reset(token)

    @model_validator(mode="before")
    @classmethod
    def _merge_default_upstreams(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = data.get("upstreams") or {}
        if not isinstance(given, dict):
            return data
        merged: dict[str, Any] = default_upstreams()
        for name, value in given.items():
            key = str(name).lower()
            if isinstance(value, dict) and key in merged:
                merged[key] = _deep_merge(merged[key], value)
            else:
                merged[key] = value
        return {**data, "upstreams": merged}

    @field_validator("health_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/") or len(value) < 2:
            raise ValueError("health_path must be an absolute path like /_upstream_guard/health")
        return value.rstrip("/")

    @field_validator("dashboard_path")
    @classmethod
    def _dashboard_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or len(value.rstrip("/")) < 2:
            raise ValueError(
                "dashboard_path must be an absolute path like /_upstream_guard/dashboard"
            )
        value = value.rstrip("/")
        health = info.data.get("health_path")
        if health is not None and health in (value, f"{value}/data"):
            raise ValueError(f"dashboard_path must not overlap health_path ({health})")
        return value

    @field_validator("dashboard_token")
    @classmethod
    def _dashboard_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("dashboard_token must not be empty")
        path = info.data.get("dashboard_path")
        if value is None and path is not None and not info.data.get("dashboard_allow_anonymous"):
            raise ValueError(
                f"dashboard_path is set ({path}) but dashboard_token is not: set a token, or "
                f"set dashboard_allow_anonymous ({ENV_PREFIX}DASHBOARD_ALLOW_ANONYMOUS=true) "
                "to serve the dashboard to anyone who can reach it"
            )
        return value

    @field_validator("upstreams")
    @classmethod
    def _hosts_unique(cls, value: dict[str, UpstreamSettings]) -> dict[str, UpstreamSettings]:
        owner: dict[str, str] = {}
        for name, upstream in value.items():
            # An internationalised name and its punycode are one host.
            for host in dict.fromkeys(form for h in upstream.hosts for form in (h, ascii_host(h))):
                if host in owner and owner[host] != name:
                    other = ENV_PREFIX + f"UPSTREAMS__{name.upper()}__HOSTS"
                    raise ValueError(
                        f"upstreams.{name}.hosts: host {host!r} is also in "
                        f"upstreams.{owner[host]}.hosts; give it to one of them ({other})"
                    )
                owner[host] = name
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError as exc:
            raise ValueError(f"redis_url is not a URL: {exc}") from None
        if parts.scheme in ("redis+cluster", "rediss+cluster"):
            if not parts.hostname:
                raise ValueError(
                    "redis_url needs a host, as in redis+cluster://node1:6379 "
                    "(any node of the cluster: the others are discovered)"
                )
            if parts.path.strip("/") not in ("", "0"):
                raise ValueError(
                    f"redis_url: Redis Cluster has only database 0, not {parts.path.strip('/')!r}; "
                    "drop the path, as in redis+cluster://node1:6379"
                )
            return value
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "redis_url must start with redis://, rediss:// or unix:// (one Redis), "
                "or redis+cluster:// or rediss+cluster:// (Redis Cluster)"
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("redis_url needs a host, as in redis://localhost:6379/0")
        return value

    @field_validator("redis_prefix")
    @classmethod
    def _redis_prefix(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError(
                "redis_prefix must not contain braces: the guard puts each upstream's keys "
                "in a hash tag of its own, {PREFIX:NAME}"
            )
        return value
