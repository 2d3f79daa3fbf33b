# `make demo`: set up .venv and run the main job: train the small model on the embedded English -> French
#   numbers corpus (PyTorch; DEMO_FRAMEWORK=jax for JAX), then translate the test split (exact match).
# `make test`: set up .venv and run the test suite (Hypothesis profile `ci`; HYPOTHESIS_PROFILE=dev for more),
#   in parallel: one pytest-xdist worker per core (TEST_WORKERS=N for N, TEST_WORKERS=0 for one process).
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

DEMO_FRAMEWORK ?= torch
DEMO_OUT ?= runs/demo

demo: setup
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/twin train --framework $(DEMO_FRAMEWORK) --data builtin --config small --out $(DEMO_OUT)

TEST_WORKERS ?= auto
TEST_ARGS := -n $(TEST_WORKERS) --dist worksteal

test: setup
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m pytest -q $(TEST_ARGS) tests

test-dev: setup
	HYPOTHESIS_PROFILE=dev $(PY) -m pytest -q $(TEST_ARGS) tests

bench: setup
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
