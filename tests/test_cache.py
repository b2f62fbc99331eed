"""The stale cache: bounded by entries and bytes, keyed by identity hashes, aged out."""

from __future__ import annotations

from upstream_guard._cache import StaleCache, cache_key, stale_headers
from upstream_guard.testing import FakeClock


def test_bounded_by_entries_and_bytes():
    """Least recently used entries go first when either bound is passed."""
    cache = StaleCache(max_entries=3, max_bytes=2000, max_age_s=60, clock=FakeClock())
    for i in range(5):
        cache.put(f"k{i}", 200, [("content-type", "application/json")], b"x" * 10)
    assert len(cache) == 3
    assert cache.get("k0") is None
    assert cache.get("k4") is not None
    cache.put("big", 200, [], b"y" * 1200)
    assert cache.bytes <= 2000
    assert cache.get("big") is not None
    assert len(cache) < 3  # the bytes bound evicted older entries
    cache.put("huge", 200, [], b"z" * 2001)  # larger than the whole cache: never kept
    assert cache.get("huge") is None


def test_bytes_count_keys_and_headers_not_only_bodies():
    """Small bodies with big headers still fill the byte bound: memory is what is counted."""
    cache = StaleCache(max_entries=10_000, max_bytes=50_000, max_age_s=60, clock=FakeClock())
    headers = [(f"x-header-{i}", "v" * 40) for i in range(10)]
    for i in range(1000):
        cache.put(f"{i:064d}", 200, headers, b"{}")
    assert cache.bytes <= 50_000
    assert len(cache) < 100


def test_entries_age_out():
    """A copy older than stale_max_age_s is never served."""
    clock = FakeClock()
    cache = StaleCache(max_entries=10, max_bytes=10_000, max_age_s=30, clock=clock)
    cache.put("k", 200, [("content-type", "application/json")], b"{}")
    clock.advance(10)
    found = cache.get("k")
    assert found is not None
    assert found[1] == 10
    clock.advance(21)
    assert cache.get("k") is None


def test_keys_hash_identity_and_never_hold_secrets():
    """Different tokens give different keys; no key contains the token or URL in clear."""
    url = "https://api.spotify.com/v1/me?access_token=s3cr3t"
    alice = cache_key("spotify_api", url, {"authorization": "Bearer alice-token"}.get)
    bob = cache_key("spotify_api", url, {"authorization": "Bearer bob-token"}.get)
    cookie = cache_key("spotify_api", url, {"cookie": "session=abc"}.get)
    assert len({alice, bob, cookie}) == 3
    for key in (alice, bob, cookie):
        assert "alice" not in key
        assert "s3cr3t" not in key
        assert len(key) == 64


def test_stale_headers_mark_the_copy():
    """A stale copy says its age and that the guard served it, without stale length headers."""
    cache = StaleCache(max_entries=1, max_bytes=10_000, max_age_s=60, clock=FakeClock())
    cache.put(
        "k", 200, [("content-length", "2"), ("content-encoding", "gzip"), ("etag", "x")], b"{}"
    )
    found = cache.get("k")
    assert found is not None
    headers = dict(stale_headers(*found))
    assert headers == {"etag": "x", "age": "0", "x-upstream-guard": "stale"}
