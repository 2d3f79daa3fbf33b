# `make demo`: set up .venv and run the main job (the cross-framework parity check on random configs).
# `make test`: set up .venv and run the test suite (Hypothesis profile `ci`; HYPOTHESIS_PROFILE=dev for more).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-dev bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/twin parity --configs 4

test: setup
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m pytest -q tests

test-dev: setup
	HYPOTHESIS_PROFILE=dev $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
