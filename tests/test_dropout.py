"""Dropout in training mode, both twins: active, off in eval, reproducible from the "dropout" rng in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jax_tx
import torch_tx
from parity import convert
from parity.config import TransformerConfig

CFG = TransformerConfig(src_vocab_size=11, tgt_vocab_size=11, d_model=16, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, d_ff=32, dropout=0.3)
SRC = np.array([[1, 2, 3, 4, 0]])
TGT = np.array([[5, 6, 7]])


def test_torch_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    model = torch_tx.Transformer(CFG)
    src, tgt = torch.from_numpy(SRC), torch.from_numpy(TGT)
    model.train()
    a, b = model(src, tgt), model(src, tgt)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(src, tgt), model(src, tgt), rtol=0, atol=0)  # same ops on the same input: bits


def test_jax_dropout_draws_from_the_dropout_stream():
    model = jax_tx.Transformer(CFG)
    params = convert.torch_to_flax(torch_tx.Transformer(CFG).state_dict(), CFG)
    src, tgt = jnp.asarray(SRC), jnp.asarray(TGT)

    def run(key=None):
        if key is None:
            return np.asarray(model.apply({"params": params}, src, tgt, deterministic=True))
        return np.asarray(model.apply({"params": params}, src, tgt, deterministic=False, rngs={"dropout": key}))

    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(run(k1), run(k1))
    assert not np.allclose(run(k1), run(k2))
    assert not np.allclose(run(k1), run())
    np.testing.assert_array_equal(run(), run())
