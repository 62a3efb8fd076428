# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# where pip gets torch from: empty uses pip's own configuration; e.g. https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install test lint proto demo bench bench-quick clean

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

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
