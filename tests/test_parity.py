"""The cross-framework parity suite: weights from one twin, converted into the other, same function.

Every example converts weights out of one twin's own initializer into the other twin, runs both on
the same batch and compares the outputs of its arch (seq2seq: encoder memory and logits; encoder-only:
hidden states and class logits; decoder-only: logits) and every parameter's gradient (float64 <= 1e-10,
float32 <= 1e-5 relative; bfloat16 forward <= 2e-2). Batches are plain or packed (segment ids).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_tx
import torch_tx
from conftest import DEVICES
from parity import convert, suite
from strategies import configs, inputs


def _assert_all_pass(rows: list[suite.Check]) -> None:
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(f"{r.what} {r.dtype}: max abs {r.max_abs:.3e}, rel {r.rel:.3e} > {r.tol:.0e}"
                                 for r in failed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", suite.ARCHS)  # one test per arch: 20 examples each in ci, 66 in dev
@settings(max_examples=max(20, settings().max_examples // 6))
@given(data=st.data(), source=st.sampled_from(suite.TWINS), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**31 - 1), packed=st.booleans())
def test_twins_compute_the_same_function(device, arch, data, source, dtype, seed, packed):
    cfg = data.draw(configs(archs=(arch,)), label="cfg")
    batch = data.draw(inputs(cfg, packed=packed))
    weights = suite.init_canonical(cfg, source, seed)
    rows = suite.compare_twins(cfg, weights, batch, dtype, source, device)
    outputs = len(suite.OUTPUTS[cfg.arch]) - (cfg.arch == "encoder" and cfg.num_classes is None)
    assert len(rows) == outputs + 1
    _assert_all_pass(rows)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=8)
@given(data=st.data(), cfg=configs(archs=suite.ARCHS), source=st.sampled_from(suite.TWINS),
       seed=st.integers(0, 2**31 - 1))
def test_bfloat16_forward(device, data, cfg, source, seed):
    batch = data.draw(inputs(cfg, allow_empty_source=False))
    _assert_all_pass(suite.compare_twins(cfg, suite.init_canonical(cfg, source, seed), batch, "bfloat16",
                                         source, device))


@settings(max_examples=50)
@given(cfg=configs(archs=suite.ARCHS), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(["float32", "float64"]))
def test_round_trips_are_lossless(cfg, seed, dtype):
    torch.manual_seed(seed)
    model = torch_tx.model_for(cfg).to(getattr(torch, dtype))
    state_dict = model.state_dict()
    back = convert.flax_to_torch(convert.torch_to_flax(state_dict, cfg), cfg)
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    model.load_state_dict(back, strict=True)

    params = jax_tx.model_for(cfg).init(jax.random.key(seed), *jax_tx.model.init_inputs(cfg))["params"]
    params_back = convert.torch_to_flax(convert.flax_to_torch(params, cfg), cfg)
    flat, flat_back = (jax.tree_util.tree_flatten_with_path(p) for p in (params, params_back))
    assert [path for path, _ in flat[0]] == [path for path, _ in flat_back[0]]
    for (path, a), (_, b) in zip(flat[0], flat_back[0]):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


@settings(max_examples=30)
@given(cfg=configs(archs=suite.ARCHS))
def test_key_sets_and_shapes_match_the_canonical_names(cfg):
    from parity.names import canonical_shapes

    expected = canonical_shapes(cfg)
    state_dict = torch_tx.model_for(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == expected
    shapes = jax.eval_shape(jax_tx.model_for(cfg).init, jax.random.key(0), *jax_tx.model.init_inputs(cfg))["params"]
    flat = {"/".join(k.key for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    key_map = convert.flax_key_map(cfg)
    assert set(flat) == {"/".join(p) for p in key_map}
    for path, (key, transpose) in key_map.items():
        assert flat["/".join(path)] == (expected[key][::-1] if transpose else expected[key])


def test_twin_parity_passes_with_xla_default_flags():
    """The suite compiles with FAST_COMPILE (conftest); users' XLA does not. `twin parity` in a fresh process with
    XLA's default flags: 3 random configs (an encoder, a decoder, a seq2seq), both directions, every dtype."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import FAST_COMPILE

    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE, "").strip(),
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "parity.cli", "parity", "--configs", "3", "--seed", "0",
                             "--dtypes", "float64,float32,bfloat16"], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " 0 failed" in result.stdout
