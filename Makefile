# Everything bootstraps from Python 3.11+ and pip: no other tool is assumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint bench demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples checks
	$(BIN)/ruff format --check src tests benchmarks examples checks
	$(BIN)/mypy --strict tests/typing
	$(BIN)/mypy --strict src

# All benchmarks, about 25 minutes on two cores; each writes benchmarks/results/<name>.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_middleware.py
	$(BIN)/python benchmarks/bench_telemetry.py
	$(BIN)/python benchmarks/bench_alternatives.py
	$(BIN)/python benchmarks/bench_amplification.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_outage_drill.py
	$(BIN)/python benchmarks/bench_redis.py
	$(BIN)/python benchmarks/bench_quota.py

demo: $(STAMP)
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
