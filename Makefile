# One command each: `make demo` (set up + profile the default model), `make test` (set up + all tests),
# `make lint` (ruff, as configured in pyproject.toml).
# Both create their own virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. On this project's machines `pip install torch==2.13.0` takes the CPU wheel from
# local disk; elsewhere on Linux PyPI serves a multi-GB CUDA build, so set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the CPU one (or pick your own TORCH_SPEC).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
# test processes (pytest-xdist): one per core; each takes its share of the OpenMP threads (tests/conftest.py)
TEST_JOBS ?= auto

.PHONY: setup demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/actlab profile --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -n $(TEST_JOBS) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -n $(TEST_JOBS) -m "not real and not browser" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
