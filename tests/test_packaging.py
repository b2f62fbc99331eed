"""The wheel and the sdist: they build, pass twine check, and the wheel works on its own."""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import upstream_guard

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "upstream_guard"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, check=False, **kwargs
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it, by python -m build (offline: no isolation)."""
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT, cwd=ROOT)
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("*.whl")
    return wheel


def test_version_lives_in_one_place(dist):
    """pyproject takes the version from __version__; both files carry it; the changelog too."""
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    version = upstream_guard.__version__
    assert _wheel(dist).name == f"upstream_guard-{version}-py3-none-any.whl"
    assert (dist / f"upstream_guard-{version}.tar.gz").exists()
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        metadata = wheel.read(f"upstream_guard-{version}.dist-info/METADATA").decode()
    assert email.parser.Parser().parsestr(metadata)["Version"] == version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## Unreleased" in changelog
    assert f"## {version} - " in changelog


def test_twine_check_passes(dist):
    """Both distributions pass twine check --strict (metadata, README rendering)."""
    files = sorted(dist.iterdir())
    assert len(files) == 2
    result = _run(sys.executable, "-m", "twine", "check", "--strict", *files)
    assert result.stdout.count("PASSED") == 2


def test_wheel_holds_every_file_of_the_package(dist):
    """Every module and data file under src/upstream_guard is in the wheel, py.typed too."""
    expected = {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {"upstream_guard/py.typed", "upstream_guard/data/spotify_endpoints.tsv"} <= expected
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        names = set(wheel.namelist())
    assert expected <= names
    assert not [n for n in names if n.endswith(".pyc")]


def test_sdist_holds_the_sources_tests_and_docs(dist):
    """The sdist can rebuild the wheel and run the tests: sources, tests, docs, changelog."""
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for name in (
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        "mkdocs.yml",
        "docs/index.md",
        "src/upstream_guard/__init__.py",
        "src/upstream_guard/data/spotify_endpoints.tsv",
        "tests/conftest.py",
    ):
        assert name in names, name


def test_entry_points_are_the_declared_scripts(dist):
    """The wheel's console scripts are exactly those pyproject declares."""
    declared = PYPROJECT["project"].get("scripts", {})
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        entry_points = f"upstream_guard-{upstream_guard.__version__}.dist-info/entry_points.txt"
        text = wheel.read(entry_points).decode() if entry_points in wheel.namelist() else ""
    found = {
        name.strip(): target.strip()
        for line in text.split("[console_scripts]", 1)[-1].splitlines()
        if "=" in line and not line.startswith("[")
        for name, target in [line.split("=", 1)]
    }
    assert found == declared


SMOKE = textwrap.dedent(
    """
    import importlib.metadata
    import sys
    from pathlib import Path

    import httpx

    import upstream_guard
    from upstream_guard import Guard, GuardSettings, install
    from starlette.applications import Starlette
    from upstream_guard.testing import FakeClock, SpotifySimulator

    # The installed wheel, not the checkout.
    assert Path(upstream_guard.__file__).is_relative_to(sys.prefix), upstream_guard.__file__
    assert not [p for p in sys.path if p.endswith("/src")], sys.path
    assert importlib.metadata.version("upstream-guard") == upstream_guard.__version__
    for name in upstream_guard.__all__:
        getattr(upstream_guard, name)

    # A guarded call: the Spotify endpoint table (a data file) names its endpoint.
    guard = Guard(GuardSettings(), clock=FakeClock())
    events = []
    guard.subscribe(events.append)
    with httpx.Client(transport=guard.sync_transport(httpx.MockTransport(
        lambda request: httpx.Response(200, json={"id": "x"})
    ))) as client:
        response = client.get("https://api.spotify.com/v1/tracks/3n3Ppam7vgaVa1iaRUc9Lp")
    assert response.json() == {"id": "x"}
    assert [(e.upstream, e.endpoint, e.outcome) for e in events] == [
        ("spotify_api", "/v1/tracks/{id}", "success")
    ], events

    # The one line, and the test kit.
    app = Starlette()
    assert install(app, GuardSettings()) is app.state.upstream_guard
    assert callable(SpotifySimulator())
    print("ok", upstream_guard.__version__)
    """
)


def test_wheel_works_alone_in_a_clean_venv(dist, tmp_path):
    """Installed alone into a new venv, the wheel imports, guards a call, and runs its scripts.

    The venv gets only the wheel (no source tree on its path); its dependencies come from the
    running environment's site-packages, added as a plain path, whose .pth files (the
    editable install of the checkout among them) are therefore not read.
    """
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        _wheel(dist),
    )
    site_packages = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    )
    (site_packages / "zz_dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n", encoding="utf-8"
    )
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = _run(python, "-c", SMOKE, cwd=tmp_path, env=clean_env)
    assert result.stdout.strip() == f"ok {upstream_guard.__version__}"
    for script in PYPROJECT["project"].get("scripts", {}):
        executable = env_dir / "bin" / script
        assert executable.exists(), f"{script} was not installed"
        helped = _run(executable, "--help", cwd=tmp_path, env=clean_env)
        assert script in helped.stdout
        assert "usage" in helped.stdout.lower()
