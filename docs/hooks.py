"""MkDocs hooks: the benchmarks page is built from ``benchmarks/results/*.md`` as they are.

The benchmark scripts write those files; the page holds a marker, and this hook puts every
results file in its place at build time, so the site can never show figures older than the
files beside the scripts. Each file's headings move one level down (its title becomes a
section of the page) and its title gets the file's name as anchor (``#overhead``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MARKER = "<!-- benchmark-results -->"
# The order of `make bench`; a results file not named here follows, by name.
ORDER = (
    "overhead",
    "middleware",
    "telemetry",
    "alternatives",
    "amplification",
    "scale",
    "outage_drill",
    "redis",
)
_HEADING = re.compile(r"^(#{1,5}) ")


def results_files() -> list[Path]:
    """The results files, in the order of ``make bench``, then any other by name."""
    files = sorted(RESULTS.glob("*.md"))
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(files, key=lambda path: (rank.get(path.stem, len(ORDER)), path.stem))


def results_markdown() -> str:
    """Every results file, its headings one level down, its title anchored by its name."""
    parts = []
    for path in results_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        titled = False
        for i, line in enumerate(lines):
            if _HEADING.match(line):
                anchor = "" if titled else f" {{ #{path.stem} }}"
                lines[i] = f"#{line}{anchor}"
                titled = True
        if not titled:
            lines.insert(0, f"## {path.stem} {{ #{path.stem} }}\n")
        parts.append("\n".join(lines).strip() + "\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace the marker with the results files."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, results_markdown())


def on_serve(server: Any, **_: Any) -> Any:
    """``mkdocs serve`` rebuilds when a benchmark writes new results."""
    server.watch(str(RESULTS))
    return server
