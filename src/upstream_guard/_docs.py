"""The settings reference of the documentation, generated from the settings models.

``python -m upstream_guard._docs`` prints it; ``--write docs/settings.md`` puts it between
the ``<!-- settings-reference:start -->`` and ``<!-- settings-reference:end -->`` markers;
``--check docs/settings.md`` exits 1 when the file is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ._settings import ENV_PREFIX, GuardSettings, UpstreamSettings, default_upstreams

if typing.TYPE_CHECKING:
    from pydantic.fields import FieldInfo

START = "<!-- settings-reference:start -->"
END = "<!-- settings-reference:end -->"
NAME = "<NAME>"
_HEADER = "| setting | environment variable | type | default | description |"
_RULE = "|---|---|---|---|---|"


def settings_reference() -> str:
    """The Markdown reference of every setting: type, default, description, env variable."""
    lines = [
        (
            "Every setting can be given in code (`GuardSettings(...)`) or as an environment "
            f"variable: prefix `{ENV_PREFIX}`, nested fields joined by `__`, any case. "
            f"In the names below, `{NAME}` is an upstream's name in capitals "
            "(`SPOTIFY_API`, `SPOTIFY_ACCOUNTS`, or one of your own). Lists and sets are "
            "given as JSON: `'[\"127.0.0.1:8000\"]'`."
        ),
        "",
        "### `GuardSettings`",
        "",
        *_table(GuardSettings, ()),
        "",
        "Built-in upstreams (settings given for them merge over these):",
        "",
        *_builtin_upstreams(),
        "",
        f"### `upstreams.{NAME.lower()}`",
        "",
        _first_line(UpstreamSettings),
        "",
        *_table(UpstreamSettings, ("upstreams", NAME)),
    ]
    for name, field in UpstreamSettings.model_fields.items():
        group = _group(field)
        if group is None:
            continue
        lines += [
            "",
            f"### `upstreams.{NAME.lower()}.{name}`",
            "",
            _first_line(group),
            "",
            *_table(group, ("upstreams", NAME, name)),
        ]
    return "\n".join(lines) + "\n"


def env_name(path: Sequence[str]) -> str:
    """The environment variable of a setting, from its path of field names."""
    return ENV_PREFIX + "__".join(p if p == NAME else p.upper() for p in path)


def _first_line(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().splitlines()[0]


def _table(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    rows = [_HEADER, _RULE]
    for name, field in model.model_fields.items():
        if _group(field) is not None:
            continue  # a group gets its own table
        rows.append(
            "| "
            + " | ".join(
                (
                    f"`{name}`",
                    f"`{env_name((*path, name))}`",
                    _type_cell(field.annotation),
                    _default(field),
                    _cell(field.description or ""),
                )
            )
            + " |"
        )
    return rows


def _builtin_upstreams() -> list[str]:
    lines = []
    for name, fields in default_upstreams().items():
        parts = [f"{key} {_code(json.dumps(list(value)))}" for key, value in fields.items()]
        lines.append(f"- `{name}`: " + ", ".join(parts))
    return lines


def _group(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_cell(annotation: Any) -> str:
    """A field's type for the table, alternatives joined by "or".

    A ``|`` inside a table's code would need escaping, which GitHub and Python-Markdown read
    differently.
    """
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " or ".join(_code(json.dumps(a)) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_code(_type_name(a)) for a in typing.get_args(annotation))
    return _code(_type_name(annotation))


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "none"
    if isinstance(value, dict) and not value:
        return "`spotify_api`, `spotify_accounts`"  # merged in by GuardSettings
    if isinstance(value, bool):
        return _code("true" if value else "false")
    if isinstance(value, frozenset | set):
        value = sorted(value)
    if isinstance(value, list | tuple):
        return _code(json.dumps(list(value)))
    return _code(str(value))


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def replace_reference(text: str, reference: str) -> str:
    """``text`` with everything between the markers replaced by ``reference``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {START} and {END} are missing or out of order")
    return text[: start + len(START)] + "\n" + reference + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, or write it into (or check it in) a Markdown file."""
    parser = argparse.ArgumentParser(prog="python -m upstream_guard._docs")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="FILE", type=Path, help="update FILE in place")
    action.add_argument("--check", metavar="FILE", type=Path, help="exit 1 if FILE is stale")
    args = parser.parse_args(argv)
    reference = settings_reference()
    target: Path | None = args.write or args.check
    if target is None:
        sys.stdout.write(reference)
        return 0
    current = target.read_text(encoding="utf-8")
    updated = replace_reference(current, reference)
    if args.check:
        if updated != current:
            sys.stderr.write(
                f"{target}: the settings reference is out of date; run "
                f"python -m upstream_guard._docs --write {target}\n"
            )
            return 1
        return 0
    if updated != current:
        target.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
