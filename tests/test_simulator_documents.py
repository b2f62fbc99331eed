"""Every document the simulator serves loads in tekore's and spotifyaio's models.

Each row is one of the simulator's endpoints and the models that tekore (``Spotify.<method>``)
and spotifyaio (``SpotifyClient.<method>``) parse its answer into, exactly as those clients do
(tekore: ``Model(**json)``, or a list of them under a key; spotifyaio: ``Model.from_json(text)``).
tekore warns about fields it does not know; such a warning fails the test too, so the
documents carry what the models expect and nothing they would drop.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import spotifyaio
from tekore import model as tm

ARTIST = "0OdUWJ0sBjDrqHygGUXeCF"
ALBUM = "6akEvsycLGftJxYudPjmqK"
TRACK = "3n3Ppam7vgaVa1iaRUc9Lp"
PLAYLIST = "37i9dQZF1DXcBWIGoYBM5M"
USER = "smedjan"


def each(model: Any, key: str) -> Callable[[dict[str, Any]], list[Any]]:
    """tekore's ``model_list``: one model per entry under ``key``."""
    return lambda body: [model(**entry) for entry in body[key]]


def search(body: dict[str, Any]) -> tuple[Any, ...]:
    """tekore's ``search_result``: one paging per kind."""
    kinds = {
        "tracks": tm.FullTrackPaging,
        "artists": tm.FullArtistOffsetPaging,
        "albums": tm.SimpleAlbumPaging,
        "playlists": tm.SimplePlaylistPaging,
    }
    return tuple(kinds[key](**body[key]) for key in body)


# (path, tekore's loader, spotifyaio's model (None: spotifyaio has no such call))
DOCUMENTS: list[tuple[str, Callable[[dict[str, Any]], Any], Any]] = [
    (f"/v1/tracks/{TRACK}", lambda b: tm.FullTrack(**b), "Track"),
    (f"/v1/tracks?ids={TRACK},{ALBUM}", each(tm.FullTrack, "tracks"), None),
    (f"/v1/artists/{ARTIST}", lambda b: tm.FullArtist(**b), "Artist"),
    (f"/v1/artists?ids={ARTIST},{TRACK}", each(tm.FullArtist, "artists"), "ArtistResponse"),
    (
        f"/v1/artists/{ARTIST}/albums",
        lambda b: tm.SimpleAlbumPaging(**b),
        "NewReleasesResponseInner",
    ),
    (
        f"/v1/artists/{ARTIST}/top-tracks",
        each(tm.FullTrack, "tracks"),
        "ArtistTopTracksResponse",
    ),
    (f"/v1/albums/{ALBUM}", lambda b: tm.FullAlbum(**b), "Album"),
    (f"/v1/albums?ids={ALBUM},{TRACK}", each(tm.FullAlbum, "albums"), "AlbumsResponse"),
    (f"/v1/albums/{ALBUM}/tracks", lambda b: tm.SimpleTrackPaging(**b), "AlbumTracksResponse"),
    (f"/v1/playlists/{PLAYLIST}", lambda b: tm.FullPlaylist(**b), "Playlist"),
    (
        f"/v1/playlists/{PLAYLIST}/tracks",
        lambda b: tm.PlaylistTrackPaging(**b),
        "PlaylistTrackResponse",
    ),
    (
        f"/v1/playlists/{PLAYLIST}/items?limit=2&offset=1",
        lambda b: tm.PlaylistTrackPaging(**b),
        "PlaylistTrackResponse",
    ),
    ("/v1/me/playlists", lambda b: tm.SimplePlaylistPaging(**b), "PlaylistResponse"),
    (f"/v1/users/{USER}/playlists", lambda b: tm.SimplePlaylistPaging(**b), "PlaylistResponse"),
    ("/v1/search?q=abba&type=track,artist,album,playlist", search, "SearchResult"),
    ("/v1/search?q=abba&type=track&limit=3&offset=2", search, "SearchResult"),
    ("/v1/me", lambda b: tm.PrivateUser(**b), "UserProfile"),
    (f"/v1/users/{USER}", lambda b: tm.PublicUser(**b), "BaseUserProfile"),
    ("/v1/me/player", lambda b: tm.CurrentlyPlayingContext(**b), "PlaybackState"),
    (
        "/v1/me/player/currently-playing",
        lambda b: tm.CurrentlyPlaying(**b),
        "CurrentPlaying",
    ),
    ("/v1/me/player/devices", each(tm.Device, "devices"), "Devices"),
    (
        "/v1/me/player/recently-played",
        lambda b: tm.PlayHistoryPaging(**b),
        "PlayedTrackResponse",
    ),
    ("/v1/me/top/tracks", lambda b: tm.FullTrackPaging(**b), "TopTracksResponse"),
    ("/v1/me/top/artists", lambda b: tm.FullArtistOffsetPaging(**b), "TopArtistsResponse"),
    ("/v1/me/tracks", lambda b: tm.SavedTrackPaging(**b), "SavedTrackResponse"),
    ("/v1/me/albums", lambda b: tm.SavedAlbumPaging(**b), "SavedAlbumResponse"),
    (
        "/v1/me/following?type=artist",
        lambda b: tm.FullArtistCursorPaging(**b["artists"]),
        "FollowedArtistResponse",
    ),
    (
        "/v1/browse/new-releases",
        lambda b: tm.SimpleAlbumPaging(**b["albums"]),
        "NewReleasesResponse",
    ),
]


def _aio_model(model: Any) -> Any:
    return getattr(spotifyaio.models, model) if isinstance(model, str) else model


@pytest.fixture(scope="module")
def client(_sim_server):
    with httpx.Client(base_url=_sim_server[1], timeout=10) as http:
        yield http


@pytest.mark.parametrize(("path", "tekore_load", "aio_model"), DOCUMENTS, ids=lambda p: p)
def test_document_loads_in_tekore_and_spotifyaio(client, path, tekore_load, aio_model):
    """The simulator's answer to a GET parses in both clients' models, with no unknown field."""
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tm.UnknownModelAttributeWarning)
        loaded = tekore_load(response.json())
    assert loaded
    if aio_model is not None:
        parsed = _aio_model(aio_model).from_json(response.text)
        assert parsed is not None


def test_playlist_items_page_through_the_whole_playlist(client):
    """Following ``next`` links visits every item once, as tekore's ``all_items`` does."""
    seen: list[str] = []
    url: str | None = f"/v1/playlists/{PLAYLIST}/items?limit=2"
    while url is not None:
        page = client.get(url).json()
        tm.PlaylistTrackPaging(**page)
        seen += [entry["item"]["id"] for entry in page["items"]]
        url = page["next"]
    assert (
        len(seen)
        == len(set(seen))
        == client.get(f"/v1/playlists/{PLAYLIST}").json()["tracks"]["total"]
    )


def test_snapshot_answers_load(client):
    """Adding items answers a snapshot id, the shape both clients read."""
    response = client.post(
        f"/v1/playlists/{PLAYLIST}/items", json={"uris": [f"spotify:track:{TRACK}"]}
    )
    assert response.status_code == 201
    assert spotifyaio.models.ModifyPlaylistResponse.from_json(response.text).snapshot_id
    assert json.loads(response.text)["snapshot_id"]
