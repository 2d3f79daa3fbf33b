"""Test set-up: Hypothesis profiles, JAX 64-bit mode, and the devices to run on.

JAX runs on the CPU unless torch sees a GPU (then the GPU-parametrized tests use both frameworks' GPU).
Profiles: `ci` (derandomized, no deadline; the default) and `dev` (more examples): HYPOTHESIS_PROFILE=dev.
`make test` runs the suite in pytest-xdist workers (one per core); each worker loads this file.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA compiles the many tiny test programs 3-4x faster without its backend optimizations (measured on the parity
# suite: 9.6 s instead of 42 s of compiling for 8 random configs, with the same float64/float32/bfloat16 errors to
# within rounding). Set here, before JAX starts, so subprocesses inherit it; test_parity.py runs `twin parity` once
# with XLA's default flags (TWIN_TEST_DEFAULT_XLA=1 runs the whole suite with them).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if not os.environ.get("TWIN_TEST_DEFAULT_XLA"):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
if "PYTEST_XDIST_WORKER" in os.environ:  # several workers share a GPU: no worker takes 75% of its memory up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# torch.compile's kernels go to a cache of this process's own, not the machine-wide /tmp/torchinductor_$USER: a
# kernel compiled there by an earlier run under another CPU capability (ATEN_CPU_CAPABILITY=avx2 against AVX-512)
# was loaded without being rebuilt and failed ("tuple args required"). Removed at exit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="twin-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=400,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no GPU visible to torch (torch.cuda.is_available() is False)"
    try:
        jax.devices("gpu")
    except RuntimeError:
        return "torch sees a GPU but jax does not (install jax[cuda12]; JAX_PLATFORMS must allow gpu)"
    return None


GPU_SKIP = _gpu_skip_reason()
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP)))]


def once(tmp_path_factory, name: str, make) -> dict:
    """`make(directory)` (a JSON-able dict) computed once per test session, even when pytest-xdist spreads a
    module's tests over several workers: the first worker computes it under a file lock, the others read it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # the session's directory either way
    directory, result = root / name, root / f"{name}.json"
    with FileLock(str(result) + ".lock"):
        if not result.is_file():
            directory.mkdir(exist_ok=True)
            result.write_text(json.dumps(make(directory)))
        return json.loads(result.read_text())


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """Each test starts from RNG state of its own (torch, numpy's and Python's global generators, seeded from its
    node id), whatever ran before it in its xdist worker: a test that draws without its own seed still draws the
    same numbers on every run and in every order."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread while a module runs (`pytestmark = pytest.mark.usefixtures(...)`): its models
    are small, and under pytest-xdist's two workers on two cores a second spinning torch thread made such modules
    8-15x slower (measured in test_translate_cli and test_hf_translate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
