# Everything bootstraps from Python 3.11+ and pip: no other tool is assumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint bench demo docs dist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench,demo,docs]'
	touch $(STAMP)

# Two processes (pytest-xdist). worksteal hands each half of the suite, in file order, to
# one process (so a file's module fixtures, the docs build and the wheel, are built once)
# and lets the first to finish take tests from the other's tail: both end together
# (loadfile left one idle for 30 s). PYTEST_ARGS=-n0 runs it in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples checks docs/hooks.py
	$(BIN)/ruff format --check src tests benchmarks examples checks docs/hooks.py
	$(BIN)/mypy --strict tests/typing
	$(BIN)/mypy --strict src

# All benchmarks, about 30 minutes on two cores; each writes benchmarks/results/<name>.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_middleware.py
	$(BIN)/python benchmarks/bench_telemetry.py
	$(BIN)/python benchmarks/bench_alternatives.py
	$(BIN)/python benchmarks/bench_amplification.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_outage_drill.py
	$(BIN)/python benchmarks/bench_redis.py
	$(BIN)/python benchmarks/bench_herd.py
	$(BIN)/python benchmarks/bench_aiohttp.py
	$(BIN)/python benchmarks/bench_quota.py

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The documentation site, into site/ (open site/index.html, or `$(BIN)/mkdocs serve`).
docs: $(STAMP)
	$(BIN)/python -m upstream_guard._docs --check docs/settings.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The wheel and the sdist, into dist/, checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --no-isolation
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site dist
