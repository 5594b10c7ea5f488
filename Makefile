# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing, install torch 2.13.0 (the CPU build) first so that no
# multi-GB CUDA build is pulled in, then this package with its dev extra. A stamp on the
# dependency list skips the install when nothing changed. --no-compile: pip would byte-compile
# every installed module (torch and Ray hold tens of thousands); Python compiles the ones a
# run imports, once, on first import (about a minute less setup on 2 cores).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint bench clean setup

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sslmm demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The long end-to-end cases (marked slow) that the suite leaves out for time: the simulated
# autoscaling cluster's 2x2 sweep (about 12 minutes on 2 cores).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sslmm_ray tests jobs

bench: $(STAMP)
	$(BIN)/sslmm bench all

clean:
	rm -rf $(VENV) demo_runs .pytest_cache
