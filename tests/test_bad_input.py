"""Bad input everywhere (hypothesis): settings, upstream answers, URLs and inbound requests.

Whatever it is fed, the guard answers in the documented ways only: settings are valid or a
``SettingsError`` naming the field and its env variable; a guarded call returns a response
or raises an ``UpstreamUnavailable`` (also an ``httpx.TransportError``) and never waits
longer than its settings allow; an installed app answers 2xx/4xx or a 503 problem, never a
500 of the guard's making. ``EXAMPLES`` counts the inputs tried (``-s`` prints the figures).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from conftest import make_settings
from upstream_guard import (
    BreakerSettings,
    CallEvent,
    CoalesceSettings,
    FallbackSettings,
    Guard,
    GuardSettings,
    HedgeSettings,
    PaceSettings,
    RetrySettings,
    SettingsError,
    TimeoutSettings,
    UpstreamSettings,
    UpstreamUnavailable,
    install,
)
from upstream_guard.testing import FakeClock, Fault

EXAMPLES: Counter[str] = Counter()
"""Inputs tried per test (one per hypothesis example)."""
SEEN: Counter[str] = Counter()
"""What those inputs led to (answers, errors, waits), to show the tests reach every path."""

ENV_PREFIX = "UPSTREAM_GUARD_"
GROUPS: dict[str, type[Any]] = {
    "breaker": BreakerSettings,
    "retry": RetrySettings,
    "timeout": TimeoutSettings,
    "fallback": FallbackSettings,
    "coalesce": CoalesceSettings,
    "hedge": HedgeSettings,
    "pace": PaceSettings,
}
UPSTREAM_FIELDS = [f for f in UpstreamSettings.model_fields if f not in GROUPS]
TOP_FIELDS = [f for f in GuardSettings.model_fields if f != "upstreams"]
# A new upstream needs hosts: it gets a valid one unless the example overrides it.
NEW_UPSTREAM = "lastfm"
NAMES = ["spotify_api", "spotify_accounts", NEW_UPSTREAM]


def _field_paths() -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [("upstreams",), *((f,) for f in TOP_FIELDS)]
    for name in NAMES:
        paths.append(("upstreams", name))
        paths.extend(("upstreams", name, f) for f in UPSTREAM_FIELDS)
        for group, model in GROUPS.items():
            paths.append(("upstreams", name, group))
            paths.extend(("upstreams", name, group, f) for f in model.model_fields)
    return paths


FIELD_PATHS = _field_paths()
# Fields pydantic-settings reads as JSON from the environment (lists, sets, models, dicts).
COMPLEX_LEAVES = {"hosts", "templates", "methods", "statuses", *GROUPS}


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(path).upper()


def is_complex(path: tuple[str, ...]) -> bool:
    return path[-1] in COMPLEX_LEAVES or (path[0] == "upstreams" and len(path) <= 2)


# -- garbage --------------------------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(
        sorted({p[-1] for p in FIELD_PATHS} | {"spotify_api", "fail_max", "hosts", "x"})
    ),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
)
TRICKY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "0",
        "-1",
        "1e309",
        "-inf",
        "inf",
        "nan",
        "NaN",
        "true",
        "none",
        "null",
        "GET",
        "get, post",
        "/",
        "/x/",
        "@spotify",
        "{id}",
        "127.0.0.1:8000",
        "127.0.0.1:0",
        "host:99999",
        "[::1]:9000",
        "[::1",
        "a b",
        "https://api.example.com/v1",
        "user@host",
        "redis://127.0.0.1:6379/0",
        "[]",
        "{}",
        '["x"]',
        "\x7f\u00e9\u2028",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-5, 600),
    st.floats(),  # NaN, inf, -inf, -0.0 and subnormals included
    st.floats(-10, 100),
    st.decimals(),
    st.text(max_size=20),
    TRICKY_TEXT,
    st.binary(max_size=8),
)
GARBAGE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
        st.dictionaries(KEYS, inner, max_size=3),
    ),
    max_leaves=8,
)
JSON_GARBAGE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=12),
        TRICKY_TEXT,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=8,
)
# Environment values: no NUL (the OS refuses it) and no lone surrogates (not encodable).
ENV_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20
)


def nest(assignments: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """Keyword arguments for GuardSettings with each value at its path (later ones win)."""
    data: dict[str, Any] = {"upstreams": {NEW_UPSTREAM: {"hosts": ["ws.audioscrobbler.com"]}}}
    for path, value in assignments:
        node = data
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[path[-1]] = value
    return data


# -- what a SettingsError must say ------------------------------------------------------------

ERROR_LINE = re.compile(r"^  (?P<field>\S+): .* \((?P<env>UPSTREAM_GUARD_\S*)\)$")


def env_names_for(field: str) -> set[str]:
    """The env variable of a reported field (list indexes never appear in variable names)."""
    parts = field.split(".")
    return {
        ENV_PREFIX + "__".join(parts).upper(),
        ENV_PREFIX + "__".join(p for p in parts if not p.isdigit()).upper(),
    }


def related(field: str, path: tuple[str, ...]) -> bool:
    """Whether a reported field is the one set, inside it, or a sibling it is checked against."""
    if path[0] != "upstreams" or len(path) == 1:
        return True  # top-level fields are checked against each other; "upstreams" holds all
    parent = ".".join(path[:-1])
    return field == parent or field.startswith(parent + ".")


def check_settings_error(exc: SettingsError, paths: list[tuple[str, ...]]) -> None:
    """Every line names a field and that field's env variable; one is a field that was set."""
    text = str(exc)
    lines = text.splitlines()
    assert lines[0] == "invalid upstream_guard settings:", text
    assert len(lines) > 1, text
    fields = []
    for line in lines[1:]:
        match = ERROR_LINE.match(line)
        assert match, f"unexpected error line: {line!r}"
        assert match["env"] in env_names_for(match["field"]), line
        fields.append(match["field"])
    if fields:
        assert any(related(f, p) for f in fields for p in paths), (text, paths)


def check_valid(built: GuardSettings) -> None:
    """Valid settings make a guard that can describe itself."""
    assert isinstance(built, GuardSettings)
    guard = Guard(built, clock=FakeClock())
    snapshot = guard.snapshot()
    assert set(snapshot["upstreams"]) == {n for n, u in built.upstreams.items() if u.enabled}


# -- settings from code -----------------------------------------------------------------------

PLAUSIBLE = st.one_of(
    st.integers(0, 30),
    st.floats(0, 60),
    st.booleans(),
    st.none(),
    st.sampled_from(["/x", "@spotify", "127.0.0.1:8000", "upstream", "endpoint", "GET"]),
    st.lists(st.sampled_from(["127.0.0.1:9", "GET", "/v1/x/{id}", 500, 429]), max_size=3),
)
"""Values of the right shape, often in range: so valid settings get built too."""
ASSIGNMENT = st.tuples(st.sampled_from(FIELD_PATHS), st.one_of(GARBAGE, PLAUSIBLE))


@settings(max_examples=200, deadline=None)
@given(assignments=st.lists(ASSIGNMENT, min_size=1, max_size=3))
def test_code_values_give_settings_or_a_named_error(assignments):
    """Any values for any fields: valid settings, or a SettingsError naming field and variable."""
    EXAMPLES["settings from code"] += 1
    try:
        built = GuardSettings(**nest(assignments))
    except SettingsError as exc:
        SEEN["code settings refused"] += 1
        check_settings_error(exc, [p for p, _ in assignments])
    else:
        SEEN["code settings valid"] += 1
        check_valid(built)


@settings(max_examples=60, deadline=None)
@given(group=st.sampled_from(sorted(GROUPS)), values=st.dictionaries(KEYS, GARBAGE, max_size=3))
def test_groups_built_alone_give_a_group_or_a_named_error(group, values):
    """A group built in code on its own is valid or names its field and variable pattern."""
    EXAMPLES["groups built alone"] += 1
    try:
        GROUPS[group](**values)
    except SettingsError as exc:
        text = str(exc)
        assert f"(UPSTREAM_GUARD_UPSTREAMS__<NAME>__{group.upper()}__" in text, text
        assert f"upstreams.<name>.{group}." in text, text


# -- settings from the environment ------------------------------------------------------------


@contextmanager
def environ(values: list[tuple[str, str]]) -> Iterator[None]:
    """Set ``UPSTREAM_GUARD_*`` variables for one example, then restore the environment.

    Not monkeypatch: a function-scoped fixture is not reset between hypothesis examples.
    """
    ours = [k for k in os.environ if k.upper().startswith(ENV_PREFIX)]
    saved = {k: os.environ.pop(k) for k in ours}
    try:
        for name, value in values:
            os.environ[name] = value
        yield
    finally:
        for k in [k for k in os.environ if k.upper().startswith(ENV_PREFIX)]:
            del os.environ[k]
        os.environ.update(saved)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def env_values(path: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Values for a field's variable: JSON for lists, sets and models; any text for the rest.

    Non-JSON text for a JSON field is test_env_list_that_is_not_json_names_its_variable's.
    """
    as_json = JSON_GARBAGE.map(json.dumps)
    if is_complex(path):
        return st.one_of(as_json, TRICKY_TEXT.filter(_is_json))
    return st.one_of(ENV_TEXT, TRICKY_TEXT, st.floats().map(str), st.integers().map(str), as_json)


@st.composite
def env_assignments(draw: Callable[..., Any]) -> list[tuple[tuple[str, ...], str, str]]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(FIELD_PATHS))
        case = draw(st.sampled_from([str.upper, str.lower]))
        out.append((path, case(env_name(path)), draw(env_values(path))))
    return out


@settings(max_examples=150, deadline=None)
@given(assignments=env_assignments())
def test_env_values_give_settings_or_a_named_error(assignments):
    """Any text in any UPSTREAM_GUARD_* variable: valid settings or a named SettingsError."""
    EXAMPLES["settings from env"] += 1
    base = [(env_name(("upstreams", NEW_UPSTREAM, "hosts")), '["ws.audioscrobbler.com"]')]
    with environ(base + [(name, value) for _, name, value in assignments]):
        try:
            built = GuardSettings()
        except SettingsError as exc:
            SEEN["env settings refused"] += 1
            check_settings_error(exc, [p for p, _, _ in assignments])
            return
    SEEN["env settings valid"] += 1
    check_valid(built)


# -- gaps these tests found, fixed since ----------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS", "127.0.0.1:8000"),
        ("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__METHODS", "GET,POST"),
        ("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__STATUSES", "[500,"),
        ("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__TEMPLATES", "/v1/x"),
        ("UPSTREAM_GUARD_UPSTREAMS", "garbage"),
    ],
)
def test_env_list_that_is_not_json_names_its_variable(monkeypatch, variable, value):
    """A list variable that is not JSON is a SettingsError naming that variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=re.escape(variable)):
        GuardSettings()


def test_shared_host_error_names_the_hosts_variable():
    """Two upstreams claiming one host: the error names the hosts field and its variable."""
    with pytest.raises(SettingsError) as info:
        GuardSettings(upstreams={"lastfm": {"hosts": ["api.spotify.com"]}})
    assert "upstreams.lastfm.hosts" in str(info.value)
    assert "UPSTREAM_GUARD_UPSTREAMS__LASTFM__HOSTS" in str(info.value)


@pytest.mark.parametrize("url", ["foo", "http://127.0.0.1:6379", "redis://127.0.0.1:99999"])
def test_redis_url_that_redis_cannot_parse_is_refused(url):
    """A redis_url redis cannot use fails at construction, naming UPSTREAM_GUARD_REDIS_URL."""
    with pytest.raises(SettingsError, match="UPSTREAM_GUARD_REDIS_URL"):
        GuardSettings(redis_url=url)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
        ("redis+cluster:///0", "needs a host"),
        ("unix+cluster:///tmp/redis.sock", "redis+cluster://"),
        ("redis+cluster://127.0.0.1:99999", "not a URL"),
    ],
)
def test_cluster_redis_url_mistakes_are_explained(url, words):
    """A redis+cluster:// URL the cluster client cannot use is refused with the reason."""
    with pytest.raises(SettingsError, match="UPSTREAM_GUARD_REDIS_URL") as info:
        GuardSettings(redis_url=url)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "url", ["redis+cluster://127.0.0.1:7000", "rediss+cluster://u:p@node1:6380/0"]
)
def test_cluster_redis_urls_are_accepted(url):
    """redis+cluster:// and rediss+cluster:// name a cluster by any one of its nodes."""
    assert GuardSettings(redis_url=url).redis_url == url


@pytest.mark.parametrize("prefix", ["{app}", "app}", "a{b"])
def test_redis_prefix_with_braces_is_refused(prefix):
    """Braces in redis_prefix would break the guard's own hash tags: a clear error instead."""
    with pytest.raises(SettingsError, match="UPSTREAM_GUARD_REDIS_PREFIX") as info:
        GuardSettings(redis_prefix=prefix)
    assert "hash tag" in str(info.value)


@pytest.mark.parametrize("host", ["[::1]:0", "[::1]:99999", "[]"])
def test_bracketed_ipv6_hosts_get_the_same_checks(host):
    """'[v6]:port' is checked like 'host:port': port 1-65535, a non-empty address."""
    with pytest.raises(SettingsError, match="UPSTREAM_GUARD_UPSTREAMS__MINE__HOSTS"):
        GuardSettings(upstreams={"mine": {"hosts": [host]}})


# -- upstream answers and URLs at the transport -----------------------------------------------

LATIN1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=16)
WALL = FakeClock().wall()
RETRY_DATE = format_datetime(datetime.fromtimestamp(WALL + 2, UTC), usegmt=True)
RETRY_AFTER = st.one_of(
    st.none(),
    st.sampled_from(["0", "0.3", "1", "2"]),
    LATIN1,
    st.integers(-10, 10**7).map(str),
    st.floats().map(str),
    st.sampled_from(
        [
            "0",
            "0.2",
            "1",
            "2",
            "86400",
            " 3 ",
            "1e309",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            RETRY_DATE,
            format_datetime(datetime.fromtimestamp(WALL + 600, UTC), usegmt=True),
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Mon, 99 Foo 2026 99:99:99 GMT",
        ]
    ),
)
HAPROXY_503 = (
    b"<html><body><h1>503 Service Unavailable</h1>\n"
    b"No server is available to handle this request.\n</body></html>\n"
)
ENVOY_RESET = (
    b"upstream connect error or disconnect/reset before headers. reset reason: "
    b"connection termination"
)
UPSTREAM_BODY = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"no healthy upstream",
            HAPROXY_503,
            ENVOY_RESET,
            b'{"error":{"status":429,"message":"API rate limit exceeded"}}',
            b'{"error":{"status":502,"message":"Bad gateway"}}',
        ]
    ),
)
RESPONSE = st.fixed_dictionaries(
    {
        "status": st.one_of(
            st.sampled_from([200, 200, 204, 304, 401, 404, 429, 429, 500, 501, 502, 503, 504]),
            st.integers(100, 599),
        ),
        "retry_after": RETRY_AFTER,
        "cache_control": st.one_of(
            st.none(), LATIN1, st.sampled_from(["no-store", "NO-STORE, private", "max-age=0"])
        ),
        "content_type": st.one_of(
            st.none(), LATIN1, st.sampled_from(["application/json", "text/plain; charset=x"])
        ),
        "body": UPSTREAM_BODY,
    }
)
ERRORS: dict[str, type[httpx.TransportError]] = {
    "connect_error": httpx.ConnectError,
    "read_timeout": httpx.ReadTimeout,
    "remote_protocol_error": httpx.RemoteProtocolError,
}
THROTTLED = st.fixed_dictionaries(
    {
        "status": st.sampled_from([429, 429, 503]),
        "retry_after": st.sampled_from(["0", "0.3", "1", "2", "4", "30", RETRY_DATE]),
        "cache_control": st.none(),
        "content_type": st.none(),
        "body": st.sampled_from([b"", b"Too many requests"]),
    }
)
STEP = st.one_of(RESPONSE, RESPONSE, THROTTLED, st.sampled_from(sorted(ERRORS)))
SEGMENT = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=6),
    st.sampled_from(
        ["v1", "tracks", "me", "top", "artists", "..", ".", "%2F", "%zz", "{id}", "", "?", "#"]
    ),
    st.just("3n3Ppam7vgaVa1iaRUc9Lp"),
)
URL_PATH = st.lists(SEGMENT, max_size=4).map("/".join)
QUERY = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=16),
    st.sampled_from(["ids=a,b", "access_token=secret&x=1", "q=%%", "&&==", "code=x#frag"]),
)
ADVANCE = st.one_of(st.just(0.0), st.floats(0, 60), st.just(86_401.0))
"""Time between calls; a day and a second outlasts any cooldown and reset timeout."""
METHOD = st.sampled_from(["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])


def raw_query(text: str) -> bytes:
    """A query string as sent: non-ASCII percent-encoded, stray '%' and the rest kept."""
    return quote(text, safe="=&%+,;:@/?!$'()*[]~").encode("ascii")


def upstream_response(step: Any, request: httpx.Request) -> httpx.Response:
    """The mock upstream's answer for one step of its script (or the error it raises)."""
    if isinstance(step, str):
        raise ERRORS[step](step, request=request)
    headers = [
        (name.encode(), step[key].encode("latin-1"))
        for name, key in [
            ("retry-after", "retry_after"),
            ("cache-control", "cache_control"),
            ("content-type", "content_type"),
        ]
        if step[key] is not None
    ]
    return httpx.Response(step["status"], headers=headers, content=step["body"])


class Upstream:
    """A scripted upstream for httpx.MockTransport: each request takes the next step.

    ``ascii_headers`` replaces non-ASCII header bytes while stale copies are kept: a stale
    copy of a response with such a header crashes the httpx drivers, a known bug pinned by
    test_stale_copy_with_a_non_ascii_header_is_served (unset it once that is fixed).
    """

    def __init__(self, *, ascii_headers: bool = False) -> None:
        self.script: list[Any] = [{"status": 200}]
        self.requests = 0
        self.ascii_headers = ascii_headers

    def load(self, script: list[Any]) -> None:
        self.script = list(script)
        self.requests = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, dict) and "body" not in step:
            return httpx.Response(step["status"], json={})
        response = upstream_response(step, request)
        if self.ascii_headers:
            raw = [
                (k, v.decode("ascii", "replace").encode("ascii", "replace"))
                for k, v in response.headers.raw
            ]
            response.headers = httpx.Headers(raw)
        return response


@st.composite
def upstream_groups(draw: Callable[..., Any]) -> dict[str, Any]:
    """Valid (and lively) settings for one upstream: small timeouts, retries and waits."""
    attempt_s = draw(st.floats(0.05, 5))
    base = draw(st.floats(0, 0.5))
    return {
        "breaker": {
            "fail_max": draw(st.integers(1, 4)),
            "reset_timeout_s": draw(st.floats(0.5, 30)),
            "half_open_max_calls": draw(st.integers(1, 3)),
            "scope": draw(st.sampled_from(["upstream", "endpoint"])),
        },
        "retry": {
            "attempts": draw(st.integers(1, 5)),
            "max_retry_after_s": draw(st.floats(0, 5)),
            "backoff_base_s": base,
            "backoff_max_s": draw(st.floats(base, 3)),
            "throttle_cooldown_s": draw(st.floats(0, 5)),
            "methods": draw(st.sampled_from([["GET"], ["GET", "PUT", "DELETE"], ["GET", "POST"]])),
        },
        "timeout": {"attempt_s": attempt_s, "total_s": draw(st.floats(attempt_s, 20))},
        "fallback": {"stale_if_error": draw(st.booleans())},
    }


def guard_settings() -> st.SearchStrategy[GuardSettings]:
    return upstream_groups().map(
        lambda g: GuardSettings(upstreams={"spotify_api": g, "spotify_accounts": g})
    )


OUTBOUND = st.fixed_dictionaries(
    {
        "method": METHOD,
        "host": st.sampled_from(["api.spotify.com", "accounts.spotify.com", "example.org"]),
        "path": URL_PATH,
        "query": QUERY,
        "headers": st.lists(
            st.tuples(st.sampled_from(["authorization", "cache-control", "cookie"]), LATIN1),
            max_size=3,
        ),
        "content": st.one_of(st.none(), st.binary(max_size=50)),
        "script": st.lists(STEP, min_size=1, max_size=3),
        "advance_s": ADVANCE,
    }
)


def outbound_request(client: httpx.Client | httpx.AsyncClient, call: dict[str, Any]) -> Any:
    """The request for one generated call; a URL httpx itself refuses is not our input."""
    try:
        url = httpx.URL(
            scheme="http",
            host=call["host"],
            path="/" + call["path"],
            query=raw_query(call["query"]),
        )
        headers = [(k.encode(), v.encode("latin-1")) for k, v in call["headers"]]
        return client.build_request(call["method"], url, headers=headers, content=call["content"])
    except httpx.InvalidURL:
        reject()


def check_call(
    guard: Guard,
    call: dict[str, Any],
    request: httpx.Request,
    outcome: httpx.Response | Exception,
    waits: list[float],
    records: list[CallEvent],
    upstream: Upstream,
) -> None:
    """A response or an UpstreamUnavailable, and waits within the upstream's settings."""
    rt = guard._route(request.url)
    if rt is None:  # not a guarded host: passed straight through
        assert not waits
        assert upstream.requests == 1
        if isinstance(outcome, Exception):
            assert isinstance(outcome, tuple(ERRORS.values())), repr(outcome)
        return
    if isinstance(outcome, Exception):
        SEEN[f"outbound raised {type(outcome).__name__} ({getattr(outcome, 'reason', '?')})"] += 1
        assert isinstance(outcome, UpstreamUnavailable), repr(outcome)
        assert isinstance(outcome, httpx.TransportError), repr(outcome)
        assert outcome.upstream == rt.name
    else:
        SEEN[f"outbound returned a {outcome.status_code // 100}xx"] += 1
        assert isinstance(outcome, httpx.Response)
        assert 100 <= outcome.status_code <= 599
    retry = rt.settings.retry
    assert upstream.requests <= retry.attempts
    longest = max(retry.max_retry_after_s, retry.backoff_max_s)
    for wait in waits:
        assert math.isfinite(wait), waits
        assert 0 <= wait <= longest + 1e-9, (waits, retry)
    assert sum(waits) <= rt.total_s + 1e-9, (waits, rt.total_s)
    assert len(records) == 1
    assert records[0].attempts == upstream.requests, (records[0], upstream.requests)
    assert records[0].attempts <= records[0].retries + 1, records[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=guard_settings(),
    calls=st.lists(OUTBOUND, min_size=1, max_size=3),
    driver=st.sampled_from(["sync", "asyncio", "trio"]),
)
def test_transport_returns_a_response_or_upstream_unavailable(config, calls, driver):
    """Any status, Retry-After, headers, body, path and query: a response or our error only."""
    clock = FakeClock()
    guard = Guard(config, clock=clock)
    records: list[CallEvent] = []
    guard.subscribe(records.append)
    upstream = Upstream(ascii_headers=config.upstreams["spotify_api"].fallback.stale_if_error)
    mock = httpx.MockTransport(upstream)

    def before(call: dict[str, Any]) -> int:
        clock.advance(call["advance_s"])
        upstream.load(call["script"])
        records.clear()
        return len(clock.slept)

    if driver == "sync":
        with httpx.Client(transport=guard.sync_transport(mock)) as client:
            for call in calls:
                request = outbound_request(client, call)
                EXAMPLES["outbound calls"] += 1
                slept = before(call)
                try:
                    outcome: Any = client.send(request)
                except Exception as exc:  # which exception is the question
                    outcome = exc
                check_call(guard, call, request, outcome, clock.slept[slept:], records, upstream)
        EXAMPLES["outbound call sequences"] += 1
        return

    async def main() -> None:
        async with httpx.AsyncClient(transport=guard.async_transport(mock)) as client:
            for call in calls:
                request = outbound_request(client, call)
                EXAMPLES["outbound calls"] += 1
                slept = before(call)
                try:
                    outcome: Any = await client.send(request)
                except Exception as exc:  # which exception is the question
                    outcome = exc
                check_call(guard, call, request, outcome, clock.slept[slept:], records, upstream)

    anyio.run(main, backend=driver)
    EXAMPLES["outbound call sequences"] += 1


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_stale_copy_with_a_non_ascii_header_is_served(driver):
    """A kept copy whose header has a non-ASCII byte is served like any other stale copy."""
    guard = Guard(
        GuardSettings(
            upstreams={
                "spotify_api": {"fallback": {"stale_if_error": True}, "retry": {"attempts": 1}}
            }
        ),
        clock=FakeClock(),
    )
    script = [
        httpx.Response(200, headers=[(b"content-type", "caf\xe9".encode("latin-1"))], json={}),
        httpx.Response(503, text="no healthy upstream"),
    ]
    mock = httpx.MockTransport(lambda request: script.pop(0))
    url = "http://api.spotify.com/v1/me"
    if driver == "sync":
        with httpx.Client(transport=guard.sync_transport(mock)) as client:
            assert client.get(url).status_code == 200
            stale = client.get(url)
    else:

        async def twice() -> httpx.Response:
            async with httpx.AsyncClient(transport=guard.async_transport(mock)) as client:
                assert (await client.get(url)).status_code == 200
                return await client.get(url)

        stale = anyio.run(twice)
    assert stale.status_code == 200
    assert stale.headers["x-upstream-guard"] == "stale"


@pytest.mark.parametrize(
    "driver",
    [
        "sync",
        "async",
        "requests",
    ],
)
def test_a_call_that_trips_its_own_breaker_mid_retry_hands_back_its_response(sim, sim_url, driver):
    """fail_max 1, a retry allowed: the 503 that trips the breaker ends the call, as a response.

    Found by test_transport_returns_a_response_or_upstream_unavailable: after the backoff
    wait the breaker refuses the retry, and the call must hand back the 503 it got.
    """
    settings_ = make_settings(
        sim_url,
        breaker={"fail_max": 1},
        retry={"attempts": 2, "backoff_base_s": 0, "backoff_max_s": 0},
    )
    guard = Guard(settings_, clock=FakeClock())
    sim.set_fault(Fault.json_5xx(503))
    url = f"{sim_url}/v1/me"
    if driver == "sync":
        with httpx.Client(transport=guard.sync_transport()) as client:
            status = client.get(url).status_code
    elif driver == "async":

        async def once() -> int:
            async with httpx.AsyncClient(transport=guard.async_transport()) as client:
                return (await client.get(url)).status_code

        status = anyio.run(once)
    else:
        with guard.requests_session() as session:
            status = session.get(url, timeout=10).status_code
    assert status == 503
    assert guard.state("spotify_api") == "open"
    assert sim.total_hits == 1


# -- inside a request: an installed app fed garbage -------------------------------------------

NOT_OURS = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade"}
HEADER_NAME = st.one_of(
    st.sampled_from(
        ["authorization", "cache-control", "cookie", "content-type", "accept", "traceparent"]
    ),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True).filter(
        lambda n: n.lower() not in NOT_OURS
    ),
)
INBOUND = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
        "path": URL_PATH,
        "query": QUERY,
        "headers": st.lists(st.tuples(HEADER_NAME, LATIN1), max_size=5),
        "body": st.binary(max_size=200),
        "script": st.lists(STEP, min_size=1, max_size=3),
        "advance_s": ADVANCE,
    }
)
PROBLEM_KEYS = {"type", "title", "status", "detail", "upstream"}


def test_installed_app_never_answers_500_for_the_guard():
    """Garbage paths, headers and bodies in, garbage upstream out: 2xx/4xx or a 503 problem."""
    clock = FakeClock()
    upstream = Upstream(ascii_headers=True)  # stale copies are on below
    last_status: list[int] = []
    raised: list[BaseException] = []
    app = FastAPI()

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def relay(rest: str, request: Request) -> JSONResponse:
        body = await request.body()
        forwarded = (b"authorization", b"cookie", b"cache-control")
        headers = [(k, v) for k, v in request.headers.raw if k in forwarded]
        transport = guard.async_transport(httpx.MockTransport(upstream))
        async with httpx.AsyncClient(transport=transport) as client:
            try:
                response = await client.request(
                    request.method,
                    "http://api.spotify.com/v1/" + quote(rest, safe="/"),
                    params=list(request.query_params.multi_items()),
                    headers=headers,
                    content=body or None,
                )
            except Exception as exc:
                raised.append(exc)
                raise
        last_status.append(response.status_code)
        if response.status_code >= 500:
            response.raise_for_status()  # the guard's middleware turns failures into a 503
        status = response.status_code if response.status_code >= 400 else 200
        return JSONResponse({"upstream": response.status_code}, status_code=status)

    settings_ = GuardSettings(
        request_deadline_s=3,
        upstreams={
            "spotify_api": {
                "breaker": {"fail_max": 3, "reset_timeout_s": 20},
                "fallback": {"stale_if_error": True},
            }
        },
    )
    guard = install(app, settings_, clock=clock)
    health = guard.settings.health_path

    with TestClient(app, raise_server_exceptions=False) as client:

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(inbound=INBOUND)
        def run(inbound: dict[str, Any]) -> None:
            try:
                url = httpx.URL("http://testserver/" + inbound["path"]).copy_with(
                    query=raw_query(inbound["query"])
                )
            except httpx.InvalidURL:
                reject()
            if url.path.rstrip("/") == health:
                reject()
            EXAMPLES["inbound requests"] += 1
            clock.advance(inbound["advance_s"])
            upstream.load(inbound["script"])
            last_status.clear()
            raised.clear()
            headers = [(k.encode(), v.encode("latin-1")) for k, v in inbound["headers"]]
            response = client.request(
                inbound["method"], str(url), headers=headers, content=inbound["body"]
            )
            status = response.status_code
            SEEN[f"inbound answered {status}"] += 1
            if status == 503:
                assert response.headers["content-type"] == "application/problem+json"
                assert int(response.headers["retry-after"]) >= 1
                if inbound["method"] != "HEAD":
                    assert response.json().keys() >= PROBLEM_KEYS
            elif status == 500:
                # The route re-raised a 501/505: a client error to the guard, so the app's
                # own error handling applies (documented: other exceptions pass through).
                assert last_status, (inbound, raised, guard.snapshot())
                assert last_status[-1] in (501, 505), (inbound, last_status)
            else:
                assert 200 <= status < 500, (status, response.text)

        run()


@pytest.fixture(scope="module", autouse=True)
def _report_examples() -> Iterator[None]:
    """Print how many inputs each property test tried (visible with -s)."""
    yield
    sys.stdout.write(
        f"\ninputs tried: {dict(EXAMPLES)}\nleading to: {dict(sorted(SEEN.items()))}\n"
    )
