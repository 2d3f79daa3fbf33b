"""Edge cases, each in both twins: fully masked rows, out-of-range ids, over-long sequences, bad masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_tx
import torch_tx
from conftest import DEVICES
from jax_tx.attention import dot_product_attention
from parity import convert
from parity.config import TransformerConfig

CFG = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, d_ff=16, dropout=0.0, max_len=6)
SRC = np.array([[1, 2, 3, 0], [0, 0, 0, 0]])  # row 1: an empty source
TGT = np.array([[1, 2, 0], [3, 4, 5]])


class Twins:
    """Both twins on the same weights (torch init, converted)."""

    def __init__(self, cfg: TransformerConfig = CFG):
        torch.manual_seed(0)
        self.cfg = cfg
        self.torch = torch_tx.Transformer(cfg).eval()
        self.flax = jax_tx.Transformer(cfg)
        self.variables = {"params": convert.torch_to_flax(self.torch.state_dict(), cfg)}

    def torch_logits(self, src, tgt, **kw):
        kw = {k: torch.from_numpy(np.asarray(v)) for k, v in kw.items()}
        return self.torch(torch.from_numpy(np.asarray(src)), torch.from_numpy(np.asarray(tgt)), **kw)

    def jax_logits(self, src, tgt, **kw):
        kw = {k: jnp.asarray(v) for k, v in kw.items()}
        return self.flax.apply(self.variables, jnp.asarray(src), jnp.asarray(tgt), **kw)


@pytest.fixture(scope="module")
def twins() -> Twins:
    return Twins()


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_give_zeros_not_nan(device):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 3, 4)) for _ in range(3))  # [B, H, L, K]
    mask = np.ones((2, 1, 3, 3), dtype=bool)
    mask[0, :, 1, :] = False  # one query row with no key
    mask[1] = False  # a whole batch row with no key
    out_t = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a).to(device) for a in (q, k, v)), attn_mask=torch.from_numpy(mask).to(device))
    torch_mha = torch_tx.MultiHeadAttention(8, 2, 0.0).double().to(device)
    x = torch.from_numpy(rng.standard_normal((2, 3, 8))).to(device)  # [B, L, D]
    mha_t = torch_mha(x, x, torch.from_numpy(mask).to(device))
    jparams = convert.rename_to_flax(torch_mha.state_dict())
    jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    with jax.default_device(jax_device):
        out_j = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
        mha_j = jax_tx.MultiHeadAttention(8, 2, 0.0).apply({"params": jparams}, jnp.asarray(x.cpu().numpy()),
                                                           jnp.asarray(x.cpu().numpy()), jnp.asarray(mask))
    for out in (out_t.cpu().numpy(), np.asarray(out_j)):
        assert not np.isnan(out).any()
        np.testing.assert_array_equal(out[0, :, 1], 0.0)
        np.testing.assert_array_equal(out[1], 0.0)
        assert np.abs(out[0, :, 0]).min() > 0
    for out in (mha_t.detach().cpu().numpy(), np.asarray(mha_j)):  # out_proj bias is zero at init
        np.testing.assert_array_equal(out[1], 0.0)
        np.testing.assert_array_equal(out[0, 1], 0.0)


def test_empty_source_row_gives_finite_logits_and_grads(twins):
    logits_t = twins.torch_logits(SRC, TGT)
    logits_t.sum().backward()
    assert torch.isfinite(logits_t).all()
    assert all(torch.isfinite(p.grad).all() for p in twins.torch.parameters())
    grads = jax.grad(lambda p: twins.flax.apply({"params": p}, jnp.asarray(SRC), jnp.asarray(TGT)).sum())(
        twins.variables["params"])
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert np.isfinite(np.asarray(twins.jax_logits(SRC, TGT))).all()


@pytest.mark.parametrize("which, bad", [("src", 11), ("src", -1), ("tgt", 13), ("tgt", -2)])
def test_out_of_range_ids_raise_in_both_twins(twins, which, bad):
    src, tgt = SRC.copy(), TGT.copy()
    (src if which == "src" else tgt)[0, 1] = bad
    vocab = 11 if which == "src" else 13
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\)"):
        twins.torch_logits(src, tgt)
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\)"):
        twins.jax_logits(src, tgt)
    if which == "src":
        with pytest.raises(ValueError, match="token ids"):
            twins.torch.encode(torch.from_numpy(src))
        with pytest.raises(ValueError, match="token ids"):
            twins.flax.apply(twins.variables, jnp.asarray(src), method=twins.flax.encode)


def test_out_of_range_ids_under_jit_give_nan_not_a_clamped_row(twins):
    tgt = TGT.copy()
    tgt[0, 1] = 99
    logits = jax.jit(lambda v, s, t: twins.flax.apply(v, s, t))(twins.variables, jnp.asarray(SRC), jnp.asarray(tgt))
    assert np.isnan(np.asarray(logits)[0, 1:]).all()
    assert np.isfinite(np.asarray(logits)[1]).all()


def test_sequences_longer_than_max_len_raise_in_both_twins(twins):
    long = np.ones((2, CFG.max_len + 1), dtype=np.int64)
    for src, tgt in ((long, TGT), (SRC, long)):
        with pytest.raises(ValueError, match="exceeds max_len 6"):
            twins.torch_logits(src, tgt)
        with pytest.raises(ValueError, match="exceeds max_len 6"):
            twins.jax_logits(src, tgt)


@pytest.mark.parametrize("name, shape, expected", [("src_mask", (2, 5), r"\(2, 4\)"), ("tgt_mask", (3, 3), r"\(2, 3\)"),
                                                   ("src_mask", (2, 4, 1), r"\(2, 4\)")])
def test_masks_of_the_wrong_shape_raise_naming_the_expected_shape(twins, name, shape, expected):
    kw = {name: np.ones(shape, dtype=bool)}
    with pytest.raises(ValueError, match=rf"{name} must have shape \(B, L\) = {expected}"):
        twins.torch_logits(SRC, TGT, **kw)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(B, L\) = {expected}"):
        twins.jax_logits(SRC, TGT, **kw)


def test_non_boolean_masks_and_bad_ranks_raise(twins):
    with pytest.raises(TypeError, match="boolean"):
        twins.torch_logits(SRC, TGT, src_mask=np.ones((2, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="boolean"):
        twins.jax_logits(SRC, TGT, src_mask=np.ones((2, 4), dtype=np.int32))
    with pytest.raises(ValueError, match=r"src must have shape \(B, L\)"):
        twins.torch_logits(SRC[0], TGT)
    with pytest.raises(ValueError, match=r"src must have shape \(B, L\)"):
        twins.jax_logits(SRC[0], TGT)
    with pytest.raises(TypeError, match="integer"):
        twins.torch_logits(SRC.astype(np.float32), TGT)
    with pytest.raises(TypeError, match="integer"):
        twins.jax_logits(SRC.astype(np.float32), TGT)
    memory = np.zeros((2, 4, 5))
    with pytest.raises(ValueError, match=r"memory must have shape \(B, S, D\)"):
        twins.torch.decode(torch.from_numpy(TGT), torch.from_numpy(memory))
    with pytest.raises(ValueError, match=r"memory must have shape \(B, S, D\)"):
        twins.flax.apply(twins.variables, jnp.asarray(TGT), jnp.asarray(memory), method=twins.flax.decode)


def test_explicit_masks_equal_derived_ones_and_decode_takes_the_source_mask(twins):
    pad = SRC != 0
    np.testing.assert_array_equal(twins.torch_logits(SRC, TGT).detach().numpy(),
                                  twins.torch_logits(SRC, TGT, src_mask=pad, tgt_mask=TGT != 0).detach().numpy())
    memory = twins.torch.encode(torch.from_numpy(SRC))
    with_mask = twins.torch.decode(torch.from_numpy(TGT), memory, torch.from_numpy(pad))
    without = twins.torch.decode(torch.from_numpy(TGT), memory)
    np.testing.assert_array_equal(with_mask.detach().numpy(), twins.torch_logits(SRC, TGT).detach().numpy())
    assert not torch.allclose(with_mask, without)
