# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# where pip gets torch from: empty uses pip's own configuration; e.g. https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install test lint proto demo bench bench-quick fuzz soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned torch first, so that nothing below pulls another build
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check swarm tests benchmarks scripts examples
	$(VENV)/bin/ruff format --check swarm tests benchmarks scripts examples

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

demo: $(STAMP)
	$(VENV)/bin/swarm demo

# 10,000 hostile requests (2,000 per handler group) with fresh random seeds, and the counts of outcomes
fuzz: $(STAMP)
	SWARM_FUZZ_EXAMPLES=2000 SWARM_FUZZ_RANDOM=1 $(PY) -m pytest -s --timeout 3600 tests/fuzz $(PYTEST_ARGS)

# 5 minutes of churn: a node SIGKILLed every 10 s under 2 generating clients
soak: $(STAMP)
	$(PY) -m benchmarks.soak --duration 300

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
