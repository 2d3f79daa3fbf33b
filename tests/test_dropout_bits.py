"""Both twins' dropout from 16-bit draws (issue 21): jax_tx.dropout and torch_tx.dropout, which every dropout
site of each twin uses (the torch twin's attention-weight dropout is SDPA's own)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax
from flax import linen as nn

import torch

import torch_tx.dropout as td
from jax_tx.dropout import Dropout, dropout, keep_mask

SHAPE = (64, 8, 2048)  # 2**20 draws


def keep_probability(rate: float) -> float:
    return round((1 - rate) * 2 ** 16) / 2 ** 16


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9])
def test_keep_rate_is_one_minus_rate(rate):
    """Over 2**20 draws the kept share is within 6 binomial standard deviations of the mask's keep probability,
    which is within 2**-17 of 1 - rate (6 sd: a false failure has probability ~2e-9; the seed is fixed anyway)."""
    p = keep_probability(rate)
    assert abs(p - (1 - rate)) <= 2 ** -17
    mask = np.asarray(keep_mask(jax.random.key(0), rate, SHAPE))
    n = mask.size
    assert abs(mask.mean() - p) <= 6 * math.sqrt(p * (1 - p) / n)
    # the four draws of one threefry evaluation (neighbours on the last axis), and rows, are independent: pairs
    # of neighbours, of entries 4 apart and of rows are both kept with probability p**2
    pairs = [mask[..., 1:] & mask[..., :-1], mask[..., 4:] & mask[..., :-4], mask[1:] & mask[:-1]]
    for both in pairs:
        assert abs(both.mean() - p * p) <= 6 * math.sqrt(p * p * (1 - p * p) / both.size)
    # every position is kept at the same rate (no lane of the 4 is biased)
    lanes = mask.reshape(-1, 4).mean(0)
    assert np.all(np.abs(lanes - p) <= 6 * math.sqrt(p * (1 - p) / (n / 4)))


def test_kept_entries_are_scaled_by_exactly_one_over_keep():
    x = jax.random.normal(jax.random.key(1), (32, 300), jnp.float32)
    y = np.asarray(dropout(x, 0.25, jax.random.key(2)))
    kept = y != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_array_equal(y[kept], np.asarray(x / (1 - 0.25))[kept])
    x64 = np.asarray(x, np.float64)  # tests run with jax_enable_x64 (conftest)
    y64 = np.asarray(dropout(jnp.asarray(x64), 0.25, jax.random.key(2)))
    assert y64.dtype == np.float64
    np.testing.assert_array_equal(y64 != 0, kept)  # the mask depends on the key and shape alone
    # XLA turns the division by a constant into a product with its reciprocal, as in flax's nn.Dropout: the
    # scale is the one x / (1 - rate) gets under jit, within one ulp of the correctly rounded quotient
    np.testing.assert_array_equal(y64[kept], np.asarray(jax.jit(lambda v: v / 0.75)(x64))[kept])
    np.testing.assert_allclose(y64[kept], (x64 / 0.75)[kept], rtol=2.3e-16, atol=0)


def test_same_key_same_mask_and_other_keys_other_masks():
    a = np.asarray(keep_mask(jax.random.key(3), 0.1, (7, 5, 33)))
    np.testing.assert_array_equal(a, np.asarray(keep_mask(jax.random.key(3), 0.1, (7, 5, 33))))
    np.testing.assert_array_equal(a, np.asarray(jax.jit(keep_mask, static_argnums=(1, 2))(jax.random.key(3), 0.1,
                                                                                         (7, 5, 33))))
    assert not np.array_equal(a, np.asarray(keep_mask(jax.random.key(4), 0.1, (7, 5, 33))))
    raw = np.asarray(keep_mask(jax.random.PRNGKey(3), 0.1, (7, 5, 33)))  # a legacy uint32 key: the same threefry data
    np.testing.assert_array_equal(a, raw)


def test_edge_rates_and_shapes():
    x = jnp.ones((3, 5))
    key = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.0, key)), np.ones((3, 5)))
    out = np.asarray(dropout(x, 1.0, key))
    assert np.all(out == 0) and not np.isnan(out).any()
    assert np.asarray(keep_mask(key, 1e-6, (4, 4))).all()  # 1 - rate rounds to 1 at 2**-16
    assert keep_mask(key, 0.5, ()).shape == ()
    assert keep_mask(key, 0.5, (3, 0)).shape == (3, 0)
    assert keep_mask(key, 0.5, (2, 3, 1)).shape == (2, 3, 1)


def test_other_prng_implementations_draw_their_own_bits():
    key = jax.random.key(0, impl="rbg")
    mask = np.asarray(keep_mask(key, 0.5, (256, 256)))
    assert abs(mask.mean() - 0.5) <= 6 * math.sqrt(0.25 / mask.size)
    np.testing.assert_array_equal(mask, np.asarray(keep_mask(key, 0.5, (256, 256))))


def test_module_mirrors_flax_dropout():
    x = jnp.arange(1.0, 101.0).reshape(10, 10)
    mod = Dropout(0.5)
    assert mod.init(jax.random.key(0), x, deterministic=True) == {}  # no params, as nn.Dropout
    np.testing.assert_array_equal(np.asarray(mod.apply({}, x, deterministic=True)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(Dropout(0.0).apply({}, x, deterministic=False)), np.asarray(x))
    y = np.asarray(mod.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(5)}))
    np.testing.assert_array_equal(y, np.asarray(mod.apply({}, x, deterministic=False,
                                                          rngs={"dropout": jax.random.key(5)})))
    assert set(np.unique(y[y != 0] / np.asarray(x)[y != 0])) == {2.0}
    with pytest.raises(flax.errors.InvalidRngError):
        mod.apply({}, x, deterministic=False)
    np.testing.assert_array_equal(np.asarray(Dropout(0.5, deterministic=True).apply({}, x)), np.asarray(x))


# --------------------------------------------------------------------------------------------- torch twin

@pytest.mark.parametrize("rate", [0.1, 0.3, 0.9])
def test_torch_keep_rate_is_one_minus_rate(rate):
    """As the JAX test: the kept share within 6 binomial standard deviations of the keep probability, neighbours
    (quarters of one 64-bit draw) independent, no quarter biased (the seed is fixed)."""
    p = keep_probability(rate)
    torch.manual_seed(0)
    mask = td.keep_mask(rate, SHAPE).numpy()
    n = mask.size
    assert abs(mask.mean() - p) <= 6 * math.sqrt(p * (1 - p) / n)
    for both in (mask[..., 1:] & mask[..., :-1], mask[..., 4:] & mask[..., :-4], mask[1:] & mask[:-1]):
        assert abs(both.mean() - p * p) <= 6 * math.sqrt(p * p * (1 - p * p) / both.size)
    lanes = mask.reshape(-1, 4).mean(0)
    assert np.all(np.abs(lanes - p) <= 6 * math.sqrt(p * (1 - p) / (n / 4)))


def test_torch_dropout_scales_as_nn_dropout_and_follows_the_seed():
    x = torch.randn(32, 301, dtype=torch.float64, requires_grad=True)  # 9,632 entries: not a multiple of 4
    torch.manual_seed(5)
    y = td.dropout(x, 0.25)
    kept = y != 0
    assert 0.6 < kept.double().mean() < 0.9
    assert torch.equal(y[kept], (x * (1 / 0.75))[kept])  # nn.Dropout's scale: x * (1 / (1 - p))
    y.sum().backward()
    assert torch.equal(x.grad, kept.double() / 0.75)
    torch.manual_seed(5)
    assert torch.equal(td.dropout(x, 0.25) != 0, kept)  # the same seed, the same mask
    assert not torch.equal(td.dropout(x, 0.25) != 0, kept)  # the stream moves on


def test_torch_dropout_edges_and_module():
    x = torch.randn(3, 4)
    assert td.dropout(x, 0.0) is x
    assert torch.equal(td.dropout(x, 1.0), torch.zeros(3, 4))
    assert td.keep_mask(1e-6, (5,)).all()  # keep rounds to 2**16: no draw at all
    module = td.Dropout(0.5)
    assert list(module.parameters()) == [] and module.state_dict() == {} and repr(module) == "Dropout(p=0.5)"
    assert module.eval()(x) is x
    assert (module.train()(x) == 0).any()
    with pytest.raises(ValueError, match="dropout probability"):
        td.Dropout(1.5)
