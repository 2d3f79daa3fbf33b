"""Both twins initialize from the same distributions (documented in */initializers.py)."""

from __future__ import annotations

import math

import jax
import numpy as np
import torch

import torch_tx
from parity import suite
from parity.config import TransformerConfig

CFG = TransformerConfig(src_vocab_size=300, tgt_vocab_size=200, d_model=64, num_heads=4, num_encoder_layers=1,
                        num_decoder_layers=1, d_ff=256, dropout=0.0)


def _expected(key: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """(kind, std) of the documented initializer for one canonical weight."""
    if key.endswith("_embed.weight"):
        return "normal", CFG.d_model ** -0.5
    if "norm." in key:
        return ("ones" if key.endswith("weight") else "zeros"), 0.0
    if key.endswith("bias"):
        return "zeros", 0.0
    fan_out, fan_in = shape
    return "uniform", math.sqrt(6.0 / (fan_in + fan_out)) / math.sqrt(3.0)


def test_initial_weights_follow_the_documented_distributions_in_both_twins():
    for twin in suite.TWINS:
        weights = suite.init_canonical(CFG, twin, seed=0)
        for key, value in weights.items():
            kind, std = _expected(key, value.shape)
            value = np.asarray(value, dtype=np.float64)
            if kind in ("ones", "zeros"):
                np.testing.assert_array_equal(value, 1.0 if kind == "ones" else 0.0, err_msg=f"{twin} {key}")
                continue
            assert abs(value.mean()) < 0.1 * std, (twin, key)
            assert abs(value.std() / std - 1) < 0.1, (twin, key, value.std(), std)
            if kind == "uniform":
                assert np.abs(value).max() <= std * math.sqrt(3.0) + 1e-7, (twin, key)


def test_initialization_is_seeded():
    torch.manual_seed(3)
    a = torch_tx.Transformer(CFG).state_dict()
    torch.manual_seed(3)
    b = torch_tx.Transformer(CFG).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, y = suite.init_canonical(CFG, "jax", 3), suite.init_canonical(CFG, "jax", 3)
    assert all(np.array_equal(x[k], y[k]) for k in x)
    assert jax.numpy.asarray(x["src_embed.weight"]).dtype == jax.numpy.float32
