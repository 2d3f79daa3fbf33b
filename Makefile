# `make demo`: set up .venv and run the main job: train the small model on the embedded English -> French
#   numbers corpus (PyTorch; DEMO_FRAMEWORK=jax for JAX), then translate the test split (exact match).
# `make test`: set up .venv and run the test suite (Hypothesis profile `ci`; HYPOTHESIS_PROFILE=dev for more),
#   in parallel: one pytest-xdist worker per core (TEST_WORKERS=N for N, TEST_WORKERS=0 for one process).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-args test test-dev bench native clean device-check

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

DEMO_FRAMEWORK ?= torch
DEMO_OUT ?= runs/demo
# Packed rows of 4,096-token batches, 100 steps of warmup; torch on a CPU with AVX512-BF16 400 steps in bfloat16
# mixed precision, else 500 steps in float32: chosen from time-to-98%-exact-match runs of both frameworks
# (README, "make demo's defaults"); bucketed 1,200 steps took 1.8-2.1x as long. `make demo-args` prints them.
BF16_CPU := $(shell grep -m1 -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && echo yes)
DEMO_ARGS ?= --pack --warmup 100 $(if $(and $(filter torch,$(DEMO_FRAMEWORK)),$(BF16_CPU)),--steps 400 --dtype bfloat16,--steps 500)

demo: setup
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/twin train --framework $(DEMO_FRAMEWORK) --data builtin --config small $(DEMO_ARGS) --out $(DEMO_OUT)

demo-args:
	@echo --data builtin --config small $(DEMO_ARGS)

TEST_WORKERS ?= auto
TEST_ARGS := -n $(TEST_WORKERS) --dist worksteal --durations=25

test: setup
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m pytest -q $(TEST_ARGS) tests

test-dev: setup
	HYPOTHESIS_PROFILE=dev $(PY) -m pytest -q $(TEST_ARGS) tests

# On AMD CPUs `make bench` runs with native/mkl_intel_cpu.c preloaded (MKL's AVX-512 kernels for torch);
# BENCH_PRELOAD= (empty) measures MKL's own dispatch instead.
MKL_SHIM := $(VENV)/lib/libmkl_intel_cpu.so
BENCH_PRELOAD ?= $(if $(shell grep -m1 -q AuthenticAMD /proc/cpuinfo 2>/dev/null && echo amd),$(MKL_SHIM))

native: $(MKL_SHIM)

$(MKL_SHIM): native/mkl_intel_cpu.c $(STAMP)
	$${CC:-cc} -O2 -shared -fPIC -o $@ $<

bench: setup $(if $(BENCH_PRELOAD),native)
	LD_PRELOAD=$(BENCH_PRELOAD) $(VENV)/bin/twin bench

# `make device-check`: issue 22's device check (scripts/device_check.sh) with python3 as it is, PYTHONPATH=., no install
#   step; DEVICE=cuda by default; report.json and summary.md in $OUT (device_report/). Here: DEVICE=cpu PYTHON=.venv/bin/python.
device-check:
	PYTHON=$(PYTHON) scripts/device_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
