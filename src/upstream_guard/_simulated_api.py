"""The simulator's Web API documents: what Spotify answers, as tekore and spotifyaio parse it.

Objects are made up but shaped like Spotify's (ids are stable base62 strings derived from
their seeds), and every link in them (``href``, ``next``) leads back to the host that was
called. ``tests/test_simulator_documents.py`` loads each one through both libraries' models.
"""

from __future__ import annotations

import random
from collections.abc import Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Body = dict[str, Any]

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ARTIST = ("0OdUWJ0sBjDrqHygGUXeCF", "Band of Horses")
_ALBUM = ("6akEvsycLGftJxYudPjmqK", "Everything All the Time")
_PLAYLIST = "37i9dQZF1DXcBWIGoYBM5M"
_NOW_PLAYING = "11dFghVXANMlKmJXsNCbNl"
_MARKETS = ["CA", "DE", "GB", "SE", "US"]
_SEARCHABLE = ("album", "artist", "playlist", "track")


def _sid(seed: str) -> str:
    """A stable 22-character base62 Spotify ID derived from ``seed``."""
    rng = random.Random(seed)  # noqa: S311 - ids, not crypto
    return "".join(rng.choices(_B62, k=22))


def _api(scope: Scope) -> str:
    """The simulator's own ``scheme://host/v1``, so hrefs lead back to it."""
    host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
    if not host and scope.get("server"):
        name, port = scope["server"]
        name = f"[{name}]" if ":" in name else name
        host = f"{name}:{port}" if port else name
    return f"{scope.get('scheme', 'http')}://{host or 'api.spotify.com'}/v1"


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl  # noqa: PLC0415 - only response bodies need it

    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


def _now_ms() -> int:
    import time  # noqa: PLC0415 - only response bodies need it

    return int(time.time() * 1000)


def _images(seed: str) -> list[Body]:
    return [
        {"url": f"https://i.scdn.co/image/{_sid(f'{seed}:{px}')}", "height": px, "width": px}
        for px in (640, 300, 64)
    ]


def _item(api: str, kind: str, item_id: str, **fields: Any) -> Body:
    """The fields every Spotify object shares, plus its own."""
    return {
        "external_urls": {"spotify": f"https://open.spotify.com/{kind}/{item_id}"},
        "href": f"{api}/{kind}s/{item_id}",
        "id": item_id,
        "type": kind,
        "uri": f"spotify:{kind}:{item_id}",
        **fields,
    }


def _page(href: str, query: dict[str, str], total: int, make: Callable[[int], Body]) -> Body:
    """An offset paging object over ``make(0) .. make(total - 1)``, honouring limit/offset."""
    from urllib.parse import quote, urlencode  # noqa: PLC0415 - only response bodies need it

    limit = max(1, int(query["limit"])) if query.get("limit", "").isdigit() else 20
    offset = int(query["offset"]) if query.get("offset", "").isdigit() else 0

    def link(at: int) -> str:
        params = urlencode({**query, "offset": at, "limit": limit})
        return f"{quote(href, safe=':/[]@')}?{params}"

    return {
        "href": link(offset),
        "items": [make(i) for i in range(offset, min(offset + limit, total))],
        "limit": limit,
        "next": link(offset + limit) if offset + limit < total else None,
        "offset": offset,
        "previous": link(max(0, offset - limit)) if offset else None,
        "total": total,
    }


def _user(api: str, private: bool = False, user_id: str | None = None) -> Body:
    """The listener (``private``: as ``/me`` shows them), another user, or an owner."""
    user_id = user_id or _sid("simulated-user")
    name = "Simulated User" if user_id == _sid("simulated-user") else f"User {user_id}"
    user = _item(api, "user", user_id, display_name=name)
    if private or user_id != _sid("simulated-user"):
        user |= {"followers": {"href": None, "total": 42}, "images": _images(user_id)}
    if private:
        user |= {
            "account_id": user_id,
            "country": "SE",
            "email": "simulated.user@example.com",
            "explicit_content": {"filter_enabled": False, "filter_locked": False},
            "product": "premium",
        }
    return user


def _artist(api: str, artist_id: str = _ARTIST[0], full: bool = False) -> Body:
    name = _ARTIST[1] if artist_id == _ARTIST[0] else f"Artist {artist_id}"
    artist = _item(api, "artist", artist_id, name=name)
    if full:
        artist |= {
            "followers": {"href": None, "total": 1_234_567},
            "genres": ["indie rock"],
            "images": _images(artist_id),
            "popularity": 68,
        }
    return artist


_ALBUM_TRACKS = 10


def _album(api: str, album_id: str = _ALBUM[0], full: bool = False) -> Body:
    """A simplified album, or a full one with its first page of tracks."""
    name = _ALBUM[1] if album_id == _ALBUM[0] else f"Album {album_id}"
    album = _item(
        api,
        "album",
        album_id,
        album_type="album",
        artists=[_artist(api)],
        available_markets=_MARKETS,
        images=_images(album_id),
        name=name,
        release_date="2006-03-21",
        release_date_precision="day",
        total_tracks=_ALBUM_TRACKS,
    )
    if full:
        album |= {
            "copyrights": [{"text": "(P) 2006 Sub Pop Records", "type": "P"}],
            "external_ids": {"upc": "098787069523"},
            "genres": [],
            "label": "Sub Pop Records",
            "popularity": 57,
            "tracks": _album_tracks(api, album_id, {"limit": "50"}),
        }
    return album


def _album_tracks(api: str, album_id: str, query: dict[str, str]) -> Body:
    def make(i: int) -> Body:
        return _track(api, _sid(f"{album_id}:{i}"), simplified=True, track_number=i + 1)

    return _page(f"{api}/albums/{album_id}/tracks", query, _ALBUM_TRACKS, make)


def _track(api: str, track_id: str, *, simplified: bool = False, **extra: Any) -> Body:
    """A full track object (or a simplified one: no album, ids, popularity), plus ``extra``."""
    number = sum(map(ord, track_id))
    track = _item(
        api,
        "track",
        track_id,
        artists=[_artist(api)],
        available_markets=_MARKETS,
        disc_number=1,
        duration_ms=180_000 + number * 97 % 120_000,
        explicit=False,
        is_local=False,
        name=f"Track {track_id}",
        preview_url=None,
        track_number=number % 10 + 1,
    )
    if not simplified:
        track |= {
            "album": _album(api),
            "external_ids": {"isrc": f"USSUB06{number % 100_000:05d}"},
            "is_playable": True,
            "popularity": 61,
        }
    return track | extra


def _playlist(api: str, playlist_id: str, full: bool = False) -> Body:
    """A full playlist (with its first page of items) or a simplified one."""
    total = 3
    playlist = _item(
        api,
        "playlist",
        playlist_id,
        collaborative=False,
        description="A playlist served by the simulator",
        images=_images(playlist_id),
        name=f"Playlist {playlist_id}",
        owner=_user(api),
        primary_color=None,
        public=True,
        snapshot_id=f"AAAA{_sid(f'snapshot:{playlist_id}')}",
    )
    if full:
        items = _playlist_items(api, playlist_id, {"limit": "100"}, total)
        return playlist | {
            "followers": {"href": None, "total": 1_000},
            "tracks": items,
            "items": items,
        }
    refs = {
        key: {"href": f"{api}/playlists/{playlist_id}/{key}", "total": total}
        for key in ("tracks", "items")
    }
    return playlist | refs


def _playlist_items(
    api: str, playlist_id: str, query: dict[str, str], total: int = 3, key: str = "items"
) -> Body:
    def entry(i: int) -> Body:
        track = _track(api, _sid(f"{playlist_id}:{i}"), episode=False, track=True)
        return {
            "added_at": "2024-05-03T10:15:30Z",
            "added_by": _user(api),
            "is_local": False,
            "item": track,
            "primary_color": None,
            "track": track,
            "video_thumbnail": {"url": None},
        }

    return _page(f"{api}/playlists/{playlist_id}/{key}", query, total, entry)


def _cursor_page(href: str, query: dict[str, str], items: list[Body], **extra: Any) -> Body:
    """A cursor paging object (``/me/following``, ``/me/player/recently-played``)."""
    from urllib.parse import urlencode  # noqa: PLC0415 - only response bodies need it

    limit = max(1, int(query["limit"])) if query.get("limit", "").isdigit() else 20
    return {
        "href": f"{href}?{urlencode({**query, 'limit': limit})}",
        "items": items[:limit],
        "limit": limit,
        "next": None,
        **extra,
    }


_DEVICE = {
    "id": "0d1841b0976bae2a3a310dd74c0f3df354899bc8",
    "is_active": True,
    "is_private_session": False,
    "is_restricted": False,
    "name": "Simulated speaker",
    "supports_volume": True,
    "type": "Computer",
    "volume_percent": 64,
}


def _playback(api: str, with_device: bool = False) -> Body:
    context = _item(api, "playlist", _PLAYLIST)
    body = {
        "actions": {"disallows": {"resuming": True}},
        "context": {key: context[key] for key in ("external_urls", "href", "type", "uri")},
        "currently_playing_type": "track",
        "is_playing": True,
        "item": _track(api, _NOW_PLAYING),
        "progress_ms": 42_000,
        "timestamp": _now_ms(),
    }
    if with_device:
        body["device"] = dict(_DEVICE)
        body |= {"repeat_state": "off", "shuffle_state": False, "smart_shuffle": False}
    return body


def _catalog(api: str, kind: str, seed: str) -> Callable[[int], Body]:
    """Makes the ``i``-th made-up ``kind`` object of a listing named ``seed``."""

    def make(i: int) -> Body:
        item_id = _sid(f"{kind}:{seed}:{i}")
        if kind == "artist":
            return _artist(api, item_id, full=True)
        if kind == "album":
            return _album(api, item_id)
        if kind == "playlist":
            return _playlist(api, item_id)
        return _track(api, item_id)

    return make


def _search(api: str, query: dict[str, str]) -> Body:
    q = query.get("q", "")
    kinds = [k for k in query.get("type", "track").split(",") if k in _SEARCHABLE]
    return {
        f"{k}s": _page(f"{api}/search", query | {"type": k}, 5, _catalog(api, k, q)) for k in kinds
    }


def _ids(query: dict[str, str]) -> list[str]:
    return [i for i in query.get("ids", "").split(",") if i]


def body_for(scope: Scope) -> Body:  # noqa: C901, PLR0911, PLR0912 - one case per endpoint
    """The JSON document for a healthy GET (or a write's answer) at ``scope``'s path."""
    path: str = scope["path"].rstrip("/")
    api, query = _api(scope), _query(scope)
    match [p for p in path.split("/") if p]:
        case ["v1", "tracks", track_id]:
            return _track(api, track_id)
        case ["v1", "tracks"]:
            return {"tracks": [_track(api, i) for i in _ids(query)]}
        case ["v1", "artists", artist_id]:
            return _artist(api, artist_id, full=True)
        case ["v1", "artists"]:
            return {"artists": [_artist(api, i, full=True) for i in _ids(query)]}
        case ["v1", "artists", artist_id, "albums"]:
            make = _catalog(api, "album", artist_id)
            page = _page(f"{api}/artists/{artist_id}/albums", query, 4, make)
            page["items"] = [album | {"album_group": "album"} for album in page["items"]]
            return page
        case ["v1", "artists", artist_id, "top-tracks"]:
            return {"tracks": [_catalog(api, "track", artist_id)(i) for i in range(10)]}
        case ["v1", "albums", album_id]:
            return _album(api, album_id, full=True)
        case ["v1", "albums"]:
            return {"albums": [_album(api, i, full=True) for i in _ids(query)]}
        case ["v1", "albums", album_id, "tracks"]:
            return _album_tracks(api, album_id, query)
        case ["v1", "search"]:
            return _search(api, query)
        case ["v1", "me"]:
            return _user(api, private=True)
        case ["v1", "users", user_id]:
            return _user(api, user_id=user_id)
        case ["v1", "me", "player", *rest] if rest in ([], ["currently-playing"]):
            return _playback(api, with_device=not rest)
        case ["v1", "me", "player", "devices"]:
            return {"devices": [dict(_DEVICE)]}
        case ["v1", "me", "player", "recently-played"]:
            played = [
                {"track": _catalog(api, "track", "played")(i), "played_at": _PLAYED_AT[i]}
                | {"context": None}
                for i in range(len(_PLAYED_AT))
            ]
            cursors = {"after": "1714731330000", "before": "1714730130000"}
            return _cursor_page(f"{api}/me/player/recently-played", query, played, cursors=cursors)
        case ["v1", "me", "top", "tracks" | "artists" as kinds]:
            return _page(f"{api}/me/top/{kinds}", query, 10, _catalog(api, kinds[:-1], "top"))
        case ["v1", "me", "tracks" | "albums" as kinds]:
            return _page(f"{api}/me/{kinds}", query, 3, _saved(api, kinds[:-1]))
        case ["v1", "me", "following"]:
            artists = [_catalog(api, "artist", "followed")(i) for i in range(3)]
            page = _cursor_page(f"{api}/me/following", query, artists, total=len(artists))
            return {"artists": page | {"cursors": {"after": None}}}
        case ["v1", "browse", "new-releases"]:
            return {
                "albums": _page(
                    f"{api}/browse/new-releases", query, 6, _catalog(api, "album", "new")
                )
            }
        case ["v1", "me", "playlists"] | ["v1", "users", _, "playlists"]:
            mine = _catalog(api, "playlist", path)
            return _page(f"{api}{path.removeprefix('/v1')}", query, 2, mine)
        case ["v1", "playlists", playlist_id]:
            return _playlist(api, playlist_id, full=True)
        case ["v1", "playlists", playlist_id, "tracks" | "items" as key]:
            if scope["method"] != "GET":
                return {"snapshot_id": f"AAAB{_sid(f'snapshot:{playlist_id}:{_now_ms()}')}"}
            return _playlist_items(api, playlist_id, query, key=key)
    return {"ok": True, "path": path}


_PLAYED_AT = ("2024-05-03T10:15:30.000Z", "2024-05-03T10:12:10.000Z", "2024-05-03T10:08:51.000Z")


def _saved(api: str, kind: str) -> Callable[[int], Body]:
    """The ``i``-th saved track or album of the listener's library."""

    def make(i: int) -> Body:
        item_id = _sid(f"saved-{kind}:{i}")
        item = _track(api, item_id) if kind == "track" else _album(api, item_id, full=True)
        return {"added_at": "2024-05-03T10:15:30Z", kind: item}

    return make
