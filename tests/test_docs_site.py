"""The documentation site: built with --strict, complete, offline, and clean in Chromium."""

from __future__ import annotations

import functools
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import upstream_guard
import upstream_guard.testing
from conftest import CHROMIUM, CHROMIUM_ARGS
from upstream_guard import GuardSettings, UpstreamSettings
from upstream_guard._docs import NAME, env_name

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE_MARK = "<!-- docs-example: run -->"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _built(site: Path, page: Path) -> Path:
    """Where mkdocs (directory URLs) puts the HTML of a Markdown page."""
    if page.stem == "index":
        return site / "index.html"
    return site / page.stem / "index.html"


def _text(path: Path) -> str:
    return html.unescape(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once per run from this checkout by mkdocs build --strict."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
    return out


def test_every_page_is_built(site):
    """Each Markdown page of docs/ becomes an HTML page whose title is the page's own."""
    pages = _pages()
    assert {p.stem for p in pages} >= {"index", "getting-started", "settings", "reference"}
    for page in pages:
        built = _built(site, page)
        assert built.exists(), f"{page.name} was not built"
        h1 = re.search(r"<h1[^>]*>(.*?)<a class=\"headerlink\"", built.read_text(encoding="utf-8"))
        assert h1, f"{page.name} has no title"
        source = page.read_text(encoding="utf-8")
        included = re.fullmatch(r'--8<-- "(.+)"\n', source)
        if included:
            source = (ROOT / included.group(1)).read_text(encoding="utf-8")
        title = source.splitlines()[0].removeprefix("# ").replace("`", "")
        assert re.sub(r"<[^>]+>", "", h1.group(1)) == html.escape(title, quote=False), page.name


def _settings_fields() -> Iterator[tuple[tuple[str, ...], str, Any]]:
    """Every settings field with the path of its model: top level, upstream, each group."""
    models: list[tuple[tuple[str, ...], type[BaseModel]]] = [
        ((), GuardSettings),
        (("upstreams", NAME), UpstreamSettings),
    ]
    for name, field in UpstreamSettings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            models.append((("upstreams", NAME, name), annotation))
    for path, model in models:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                continue  # a group: its fields are listed with it
            yield path, name, field


def test_settings_page_documents_every_field(site):
    """Every settings field has a description, and its row is on the built settings page."""
    page = _text(site / "settings" / "index.html")
    fields = list(_settings_fields())
    assert len(fields) >= 35
    for path, name, field in fields:
        assert (field.description or "").strip(), f"{'.'.join(path)}.{name} has no description"
        variable = env_name((*path, name))
        row = re.search(rf"<td><code>{re.escape(variable)}</code></td>.*?</tr>", page, re.DOTALL)
        assert row, f"{variable} is missing from the settings page"
        assert f"<code>{name}</code>" in page
        assert html.unescape(field.description.split("`")[0]).strip() in row.group(0)


def test_benchmarks_page_holds_every_results_file(site):
    """Each benchmarks/results file is on the page as written, anchored by its name."""
    page = _text(site / "benchmarks" / "index.html")
    files = sorted(RESULTS.glob("*.md"))
    assert len(files) >= 8
    for path in files:
        text = path.read_text(encoding="utf-8")
        title = text.splitlines()[0].removeprefix("# ")
        assert re.search(rf'<h2 id="{path.stem}">{re.escape(title)}', page), path.name
        measured = next(line for line in text.splitlines() if line.startswith("Measured "))
        assert measured.split(" on: ")[0] in page, path.name


def test_api_reference_covers_the_public_api(site):
    """Every name in upstream_guard.__all__ and upstream_guard.testing.__all__ is documented."""
    page = (site / "reference" / "index.html").read_text(encoding="utf-8")
    names = [f"upstream_guard.{n}" for n in upstream_guard.__all__]
    names += [f"upstream_guard.testing.{n}" for n in upstream_guard.testing.__all__]
    missing = [n for n in names if f'id="{n}"' not in page]
    assert not missing, f"add these to docs/reference.md: {missing}"
    assert 'id="upstream_guard.Guard.subscribe"' in page  # members come with their class


def test_readme_is_a_front_page_linking_to_the_site():
    """README keeps the two set-up commands and links every page; every link resolves."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme
    assert "make test" in readme
    assert len(readme.splitlines()) < 100
    targets = [t for t in LINK.findall(readme) if "://" not in t]
    for target in targets:
        assert (ROOT / target.split("#")[0]).exists(), f"README links to a missing {target}"
    for page in _pages():
        included = re.fullmatch(r'--8<-- "(.+)"\n', page.read_text(encoding="utf-8"))
        target = included.group(1) if included else f"docs/{page.name}"  # the file itself
        assert target in targets, f"README does not link {target}"


def _examples() -> list[tuple[str, str]]:
    """The Python blocks that the pages mark with EXAMPLE_MARK, with their page's name."""
    found = []
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        for part in text.split(EXAMPLE_MARK)[1:]:
            block = re.match(r"\s*```python\n(.*?)\n```", part, re.DOTALL)
            assert block, f"{page.name}: {EXAMPLE_MARK} must precede a python block"
            found.append((page.name, block.group(1)))
    return found


def test_marked_examples_run(tmp_path):
    """The examples the pages mark as runnable run as written, each in a fresh interpreter."""
    examples = _examples()
    assert examples
    for page, code in examples:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"example in {page} failed:\n{result.stderr}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Keep the test output clean."""


@pytest.fixture
def site_url(site: Path) -> Iterator[str]:
    """The built site served over HTTP on a free loopback port."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_site_in_a_browser(site, site_url, sync_playwright, tmp_path):
    """Every page opens in headless Chromium with no console error and nothing from elsewhere.

    The diagrams are drawn (mermaid runs from the local copy) and search finds a setting.
    """
    expect = sync_playwright.expect
    paths = sorted(
        "/" + p.parent.relative_to(site).as_posix().strip(".") for p in site.rglob("index.html")
    )
    assert len(paths) == len(_pages())
    assert "/call-flow" in paths
    shot = tmp_path / "call-flow.png"
    problems: list[str] = []
    failed: list[str] = []
    requested: list[str] = []
    with sync_playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: problems.append(f"{page.url}: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: problems.append(f"{page.url}: {e}"))
            page.on(
                "response",
                lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None,
            )
            page.on("requestfailed", lambda r: failed.append(f"{r.failure}: {r.url}"))
            page.on("request", lambda r: requested.append(r.url))
            for path in paths:
                page.goto(f"{site_url}{path.rstrip('/')}/", wait_until="load")
                expect(page.locator("article h1").first).to_be_visible()
                if path == "/call-flow":
                    # Material swaps each <pre class="mermaid"> source for a <div> whose
                    # (closed) shadow root holds the drawn SVG: no source left, two drawings.
                    expect(page.locator("pre.mermaid")).to_have_count(0)
                    diagrams = page.locator("div.mermaid")
                    expect(diagrams).to_have_count(2)
                    heights = [diagrams.nth(i).bounding_box()["height"] for i in range(2)]
                    assert min(heights) > 300, heights
                    page.screenshot(path=str(shot))

            page.keyboard.press("/")  # search, on the last page opened
            page.keyboard.type("fail_max")  # search listens to keys: fill() would not do
            expect(page.locator(".md-search-result__meta")).to_have_text(
                re.compile(r"\d+ matching documents?")
            )
            expect(
                page.locator('.md-search-result__item a[href*="/settings/"]').first
            ).to_be_visible()
        finally:
            browser.close()
    shutil.copyfile(shot, "/tmp/docs-call-flow.png")  # noqa: S108 - a fixed path, for review
    assert problems == []
    # A page left before its search worker loaded aborts that load; nothing else may fail.
    assert [f for f in failed if not f.startswith("net::ERR_ABORTED")] == []
    assert requested
    assert all(u.startswith(site_url) for u in requested), [
        u for u in requested if not u.startswith(site_url)
    ]
