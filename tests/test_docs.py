"""The settings reference: generated from the models, and the one docs/settings.md shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from upstream_guard import GuardSettings, UpstreamSettings
from upstream_guard._docs import END, NAME, START, main, replace_reference, settings_reference

SETTINGS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
ENV_VAR = re.compile(r"`(UPSTREAM_GUARD_[A-Z0-9_<>]+)`")


def _groups() -> list[tuple[str, type[BaseModel]]]:
    return [
        (name, field.annotation)
        for name, field in UpstreamSettings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    ]


def test_settings_page_holds_the_generated_reference():
    """docs/settings.md has exactly the generated reference between its markers."""
    text = SETTINGS_PAGE.read_text(encoding="utf-8")
    assert text.count(START) == 1
    assert text.count(END) == 1
    between = text[text.index(START) + len(START) : text.index(END)]
    assert between == "\n" + settings_reference(), (
        "docs/settings.md is out of date: run "
        "python -m upstream_guard._docs --write docs/settings.md"
    )


def test_every_field_has_a_row_with_its_env_variable():
    """Each field of GuardSettings, UpstreamSettings and each group has its own row."""
    reference = settings_reference()
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    expected = [f"UPSTREAM_GUARD_{name.upper()}" for name in GuardSettings.model_fields]
    expected += [
        f"UPSTREAM_GUARD_UPSTREAMS__{NAME}__{name.upper()}"
        for name, field in UpstreamSettings.model_fields.items()
        if field.annotation not in {group for _, group in _groups()}
    ]
    for group_name, group in _groups():
        expected += [
            f"UPSTREAM_GUARD_UPSTREAMS__{NAME}__{group_name.upper()}__{name.upper()}"
            for name in group.model_fields
        ]
    assert [ENV_VAR.search(row).group(1) for row in rows] == expected
    assert "UPSTREAM_GUARD_UPSTREAMS__<NAME>__BREAKER__FAIL_MAX" in reference
    assert "`UPSTREAM_GUARD_HEALTH_PATH`" in reference


def test_documented_variables_set_their_fields(monkeypatch):
    """The documented names are the ones pydantic-settings reads, at each nesting level."""
    reference = settings_reference()
    names = {m.group(1).replace(NAME, "SPOTIFY_API") for m in ENV_VAR.finditer(reference)}
    values = {
        "UPSTREAM_GUARD_HEALTH_PATH": "/healthz",
        "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__MAX_CONCURRENCY": "7",
        "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__BREAKER__FAIL_MAX": "3",
        "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__FALLBACK__STALE_IF_ERROR": "true",
        "UPSTREAM_GUARD_UPSTREAMS__SPOTIFY_API__HOSTS": '["127.0.0.1:8123"]',
    }
    for name, value in values.items():
        assert name in names
        monkeypatch.setenv(name, value)
    settings = GuardSettings()
    api = settings.upstreams["spotify_api"]
    assert settings.health_path == "/healthz"
    assert api.max_concurrency == 7
    assert api.breaker.fail_max == 3
    assert api.fallback.stale_if_error is True
    assert api.hosts == ("127.0.0.1:8123",)


def test_write_and_check_a_file(tmp_path, capsys):
    """--write fills the markers, --check passes then, and fails once the text drifts."""
    doc = tmp_path / "README.md"
    doc.write_text(f"# Title\n\n{START}\nold\n{END}\n\nmore\n", encoding="utf-8")
    assert main(["--check", str(doc)]) == 1
    assert main(["--write", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\n")
    assert text.endswith(f"{END}\n\nmore\n")
    assert settings_reference() in text
    assert main(["--check", str(doc)]) == 0
    assert main([]) == 0
    assert capsys.readouterr().out == settings_reference()


def test_missing_markers_are_an_error():
    """Without both markers there is nowhere to put the reference."""
    with pytest.raises(ValueError, match="markers"):
        replace_reference("no markers here", "x")
