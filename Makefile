# The two commands of the README: `make run` and `make test`, on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
DATA_DIR ?= relay-data
# pytest-xdist: 4 workers, as the e2e tests mostly wait on their processes. worksteal hands
# each worker a block of the collection, and tests/conftest.py builds each block to start with
# its share of the tests marked slow (tens of seconds each); idle workers steal the rest.
# `make test PARALLEL=` runs it in one process.
PARALLEL ?= -n 4 --dist worksteal

.PHONY: run test lint unit e2e bench bench-compiled clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "relay needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install: what `make run` needs.
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Test install: the package plus pytest (with xdist), hypothesis, ruff and mypy.
$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(BIN)/relay-server serve --dev --port $(PORT) --data-dir $(DATA_DIR)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check relay_protocol relay_web relay_server relay_agent tests bench setup.py
	$(BIN)/mypy relay_protocol relay_web relay_server relay_agent bench setup.py

test: lint
	$(BIN)/pytest -q $(PARALLEL)

unit: $(VENV)/.test-installed
	$(BIN)/pytest -q $(PARALLEL) tests --ignore=tests/e2e

e2e: $(VENV)/.test-installed
	$(BIN)/pytest -q $(PARALLEL) tests/e2e

# The benchmarks (bench/README.md): a few minutes, every figure beside a direct baseline
# measured in the same run; the table is printed, the JSON goes to bench/results/latest.json.
# Options: make bench BENCH_ARGS='--agents 10000' (python -m bench --help).
BENCH_ARGS ?=
bench: $(VENV)/.run-installed
	$(BIN)/python -m bench $(BENCH_ARGS)

# The same benchmarks against the compiled build (setup.py, RELAY_MYPYC=1), installed in a
# venv of its own (needs gcc and Python's headers; about a minute and a half to build).
COMPILED_VENV ?= .venv-compiled
$(COMPILED_VENV)/.installed: pyproject.toml setup.py $(wildcard relay_*/*.py relay_*/*/*.py)
	$(PYTHON) -m venv $(COMPILED_VENV)
	$(COMPILED_VENV)/bin/python -m pip install -q --upgrade pip
	RELAY_MYPYC=1 $(COMPILED_VENV)/bin/pip install -q .
	rm -rf build
	touch $@

bench-compiled: $(COMPILED_VENV)/.installed
	$(COMPILED_VENV)/bin/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(COMPILED_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
