"""Endpoint templates: map a concrete path to a low-cardinality template in O(path segments)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from urllib.parse import unquote

from ._settings import SPOTIFY_TEMPLATES

UNMATCHED = "/*"
"""The name of every path that matches no template (one name, so cardinality stays bounded)."""

_MAX_SEGMENTS = 32


class _Node:
    __slots__ = ("literal", "placeholder", "template")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.placeholder: _Node | None = None
        self.template: str | None = None


@cache
def spotify_templates() -> tuple[str, ...]:
    """The Spotify Web API path templates shipped with the package (data/spotify_endpoints.tsv)."""
    text = resources.files("upstream_guard").joinpath("data/spotify_endpoints.tsv").read_text()
    seen: dict[str, None] = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", "method\t")):
            continue
        _method, template, *_ = line.split("\t")
        seen[template] = None
    return tuple(seen)


def _segments(path: str) -> list[str]:
    # Decoded after the split, so that an encoded slash (%2F) stays inside its segment.
    return [unquote(s) if "%" in s else s for s in path.split("/") if s]


class TemplateMatcher:
    """A segment trie of templates; literal segments win over placeholders."""

    __slots__ = ("_memo", "_root")

    def __init__(self, templates: tuple[str, ...] | list[str]) -> None:
        """Build from templates like ``/v1/tracks/{id}``; ``@spotify`` adds Spotify's table."""
        self._root = _Node()
        # Paths seen before: bounded, so a flood of distinct ids cannot grow it without end.
        self._memo: dict[str, str] = {}
        for template in templates:
            if template == SPOTIFY_TEMPLATES:
                for spotify in spotify_templates():
                    self._add(spotify)
            else:
                self._add(template)

    def _add(self, template: str) -> None:
        node = self._root
        for seg in _segments(template):
            if seg.startswith("{") and seg.endswith("}"):
                node.placeholder = node.placeholder or _Node()
                node = node.placeholder
            else:
                node = node.literal.setdefault(seg, _Node())
        node.template = "/" + "/".join(_segments(template))

    def match(self, path: str) -> str:
        """The template for a path (query string excluded; percent-encoded or not)."""
        found = self._memo.get(path)
        if found is not None:
            return found
        segments = _segments(path)
        found = UNMATCHED
        if len(segments) <= _MAX_SEGMENTS:
            found = _walk(self._root, segments, 0) or UNMATCHED
        if len(self._memo) < 4096:
            self._memo[path] = found
        return found


def _walk(node: _Node, segments: list[str], i: int) -> str | None:
    if i == len(segments):
        return node.template
    child = node.literal.get(segments[i])
    if child is not None:
        found = _walk(child, segments, i + 1)
        if found is not None:
            return found
    if node.placeholder is not None:
        return _walk(node.placeholder, segments, i + 1)
    return None
