# The two commands of the README: `make demo` and `make test`. Each installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench faults clean

$(STAMP): pyproject.toml setup.py replicator/cdc/_pgoutput.c replicator/staging/_rows.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

deps: $(STAMP)
	bash scripts/ensure-services.sh

demo: $(STAMP)
	$(BIN)/python -m replicator.demo

test: deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check replicator tests bench sync_daemon.py
	$(BIN)/ruff format --check replicator tests bench sync_daemon.py

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/logical_replication.py

# The full fault suite (about 15 minutes); it rewrites docs/RELIABILITY.md with what it measured.
faults: deps
	SYNC_FAULTS_FULL=1 $(BIN)/python -m pytest tests/faults --reliability-report -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
