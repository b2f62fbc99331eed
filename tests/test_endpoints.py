"""Endpoint templates: concrete paths map to low-cardinality templates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from upstream_guard._endpoints import UNMATCHED, TemplateMatcher, spotify_templates


@pytest.fixture(scope="module")
def matcher() -> TemplateMatcher:
    return TemplateMatcher(["@spotify", "/v1/custom/{thing}/detail"])


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp", "/v1/tracks/{id}"),
        ("/v1/tracks", "/v1/tracks"),
        ("/v1/tracks/", "/v1/tracks"),
        ("/v1/me/", "/v1/me"),
        ("/v1/me/top/artists", "/v1/me/top/artists"),
        ("/v1/me/top/tracks", "/v1/me/top/tracks"),
        ("/v1/me/top/genres", "/v1/me/top/{type}"),
        ("/v1/users/some%20user/playlists", "/v1/users/{user_id}/playlists"),
        ("/v1/users/a%2Fb/playlists", "/v1/users/{user_id}/playlists"),
        ("/v1/%6De", "/v1/me"),
        (
            "/v1/users/bob/playlists/37i9dQZF1DXcBWIGoYBM5M/tracks",
            "/v1/users/{user_id}/playlists/{playlist_id}/tracks",
        ),
        ("/v1/playlists/37i9dQZF1DXcBWIGoYBM5M/items", "/v1/playlists/{playlist_id}/items"),
        ("/v1/custom/abc/detail", "/v1/custom/{thing}/detail"),
        ("/v1/unknown/abc", UNMATCHED),
        ("/", UNMATCHED),
        ("/" + "a/" * 100, UNMATCHED),
    ],
)
def test_matches(matcher, path, template):
    """Literals win over placeholders; trailing slashes are ignored; unknown paths get one name."""
    assert matcher.match(path) == template


def test_table_is_shipped_with_the_package():
    """The Spotify table (100 method+path rows) is package data."""
    templates = spotify_templates()
    assert "/v1/tracks/{id}" in templates
    assert "/v1/users/{user_id}/starred" in templates
    assert len(templates) >= 70


@given(st.lists(st.text(alphabet="abcXYZ019%-_.", min_size=1, max_size=12), max_size=8))
def test_any_path_maps_to_a_known_template_or_unmatched(segments):
    """Whatever the path, the name is a template or UNMATCHED: never the raw path."""
    m = TemplateMatcher(["@spotify"])
    result = m.match("/" + "/".join(segments))
    assert result == UNMATCHED or result in spotify_templates()


def test_distinct_ids_do_not_grow_the_memo_without_bound():
    """A million distinct ids would not make the matcher's memory grow past its cap."""
    m = TemplateMatcher(["@spotify"])
    for i in range(10_000):
        assert m.match(f"/v1/tracks/{i:022d}") == "/v1/tracks/{id}"
    assert len(m._memo) <= 4096
