"""Settings: defaults, deep merging of env variables, and clear errors for bad values."""

from __future__ import annotations

import pytest

from upstream_guard import GuardSettings, SettingsError, UpstreamSettings
from upstream_guard._settings import BreakerSettings


def test_defaults_have_both_spotify_upstreams():
    """Two upstreams exist by default, with Spotify's hosts and templates."""
    s = GuardSettings()
    assert s.upstreams["spotify_api"].hosts == ("api.spotify.com",)
    assert s.upstreams["spotify_accounts"].hosts == ("accounts.spotify.com",)
    assert s.upstreams["spotify_api"].templates == ("@spotify",)
    assert s.health_path == "/_upstream_guard/health"
    assert s.redis_url is None
    assert "POST" not in s.upstreams["spotify_api"].retry.methods


def test_env_merges_deeply_over_defaults(monkeypatch):
    """One env field changes that field only: hosts, other fields and upstreams stay."""
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__FAIL_MAX", "3")
    s = GuardSettings()
    api = s.upstreams["spotify_api"]
    assert api.breaker.fail_max == 3
    assert api.hosts == ("api.spotify.com",)
    assert api.breaker.reset_timeout_s == 30.0
    assert "spotify_accounts" in s.upstreams


def test_env_hosts_as_json_list_and_new_upstream(monkeypatch):
    """Hosts come as a JSON list; a new upstream can be declared entirely from the env."""
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS", '["127.0.0.1:8123"]')
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__LASTFM__HOSTS", '["ws.audioscrobbler.com"]')
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__LASTFM__RETRY__METHODS", '["get", "post"]')
    s = GuardSettings()
    assert s.upstreams["spotify_api"].hosts == ("127.0.0.1:8123",)
    assert s.upstreams["spotify_api"].templates == ("@spotify",)
    assert s.upstreams["lastfm"].retry.methods == frozenset({"GET", "POST"})


def test_code_overrides_merge_too():
    """Code-given dicts merge the same way as env variables."""
    s = GuardSettings(upstreams={"spotify_api": {"retry": {"attempts": 5}}})
    assert s.upstreams["spotify_api"].retry.attempts == 5
    assert s.upstreams["spotify_api"].hosts == ("api.spotify.com",)


@pytest.mark.parametrize(
    ("overrides", "field", "env"),
    [
        (
            {"spotify_api": {"breaker": {"fail_max": 0}}},
            "upstreams.spotify_api.breaker.fail_max",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__FAIL_MAX",
        ),
        (
            {"spotify_api": {"breaker": {"reset_timeout_s": -1}}},
            "upstreams.spotify_api.breaker.reset_timeout_s",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__RESET_TIMEOUT_S",
        ),
        (
            {"spotify_api": {"timeout": {"attempt_s": 20, "total_s": 10}}},
            "upstreams.spotify_api.timeout.total_s",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__TIMEOUT__TOTAL_S",
        ),
        (
            {"spotify_api": {"retry": {"attemps": 2}}},
            "upstreams.spotify_api.retry.attemps",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__ATTEMPS",
        ),
        (
            {"spotify_api": {"coalesce": {"detach_leaders": "sometimes"}}},
            "upstreams.spotify_api.coalesce.detach_leaders",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__COALESCE__DETACH_LEADERS",
        ),
        (
            {"spotify_api": {"coalesce": {"hot_s": 0}}},
            "upstreams.spotify_api.coalesce.hot_s",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__COALESCE__HOT_S",
        ),
        (
            {"spotify_api": {"coalesce": {"hot_s": float("inf")}}},
            "upstreams.spotify_api.coalesce.hot_s",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__COALESCE__HOT_S",
        ),
        (
            {"mine": {"hosts": []}},
            "upstreams.mine.hosts",
            "UPSTREAM_GUARD_UPSTREAMS__MINE__HOSTS",
        ),
        (
            {"spotify_api": {"hosts": ["https://api.spotify.com/v1"]}},
            "upstreams.spotify_api.hosts",
            "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS",
        ),
    ],
)
def test_invalid_values_name_field_and_env_variable(overrides, field, env):
    """Each bad value fails at construction, naming the field and its env variable."""
    with pytest.raises(SettingsError) as info:
        GuardSettings(upstreams=overrides)
    assert field in str(info.value)
    assert env in str(info.value)


def test_invalid_env_value_fails_clearly(monkeypatch):
    """A bad env value fails the same way, naming the variable that holds it."""
    monkeypatch.setenv("UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__ATTEMPTS", "0")
    with pytest.raises(
        SettingsError, match="UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__RETRY__ATTEMPTS"
    ):
        GuardSettings()


def test_unknown_top_level_field_is_refused():
    """A misspelt top-level setting is an error, not silently ignored."""
    with pytest.raises(SettingsError, match="helth_path"):
        GuardSettings(helth_path="/x")


def test_groups_built_in_code_say_where_they_go():
    """A group built on its own names the env variable pattern it belongs to."""
    with pytest.raises(SettingsError, match=r"UPSTREAM_GUARD_UPSTREAMS__<NAME>__BREAKER__FAIL_MAX"):
        BreakerSettings(fail_max=0)


def test_hosts_accept_host_port_and_ipv6():
    """Hosts are host or host:port, IPv6 in brackets; case is ignored."""
    up = UpstreamSettings(hosts=["API.Spotify.com", "127.0.0.1:8000", "[::1]:9000"])
    assert up.hosts == ("api.spotify.com", "127.0.0.1:8000", "[::1]:9000")


def test_a_host_cannot_belong_to_two_upstreams():
    """Two upstreams claiming one host would make guarding ambiguous."""
    with pytest.raises(SettingsError, match=r"is also in upstreams\.spotify_api\.hosts"):
        GuardSettings(upstreams={"other": {"hosts": ["api.spotify.com"]}})


@pytest.mark.parametrize(
    "pair", [("bücher.de", "xn--bcher-kva.de"), ("straße.de:8443", "xn--strae-oqa.de:8443")]
)
def test_an_international_host_and_its_punycode_are_one_host(pair):
    """Clients send the punycode: an upstream cannot take another's host in its other form."""
    unicode, ascii_form = pair
    with pytest.raises(SettingsError, match="is also in upstreams"):
        GuardSettings(upstreams={"a": {"hosts": [unicode]}, "b": {"hosts": [ascii_form]}})
