"""Hand-checkable cases, in both twins: literal masks, the sinusoidal table's known entries, attention
with hand-set weights, and a whole 1-layer d_model=4 model whose logits are worked out by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_tx
import torch_tx
from jax_tx import masks as jmasks
from parity import convert
from parity.config import TransformerConfig
from parity.names import canonical_shapes
from parity.numerics import sinusoidal_table
from torch_tx import masks as tmasks

T, F = True, False


def test_literal_masks_in_both_twins():
    ids = np.array([[5, 3, 0, 0], [2, 0, 0, 0]])
    pad = [[T, T, F, F], [T, F, F, F]]
    causal = [[T, F, F], [T, T, F], [T, T, T]]
    self_mask = [[T, F, F], [T, T, F], [T, T, F]]  # target [7, 4, pad]: key 2 is padding
    assert tmasks.padding_mask(torch.from_numpy(ids), 0).tolist() == pad
    assert np.asarray(jmasks.padding_mask(jnp.asarray(ids), 0)).tolist() == pad
    assert tmasks.causal_mask(3)[0, 0].tolist() == causal
    assert np.asarray(jmasks.causal_mask(3))[0, 0].tolist() == causal
    tgt_pad = [[T, T, F]]
    assert tmasks.decoder_self_mask(torch.tensor(tgt_pad))[0, 0].tolist() == self_mask
    assert np.asarray(jmasks.decoder_self_mask(jnp.asarray(tgt_pad)))[0, 0].tolist() == self_mask
    assert tmasks.key_mask(torch.tensor(pad)).shape == (2, 1, 1, 4)
    assert jmasks.key_mask(jnp.asarray(pad)).shape == (2, 1, 1, 4)


def test_sinusoidal_table_known_entries_in_both_twins():
    table = sinusoidal_table(3, 4)
    expected = [[0.0, 1.0, 0.0, 1.0],
                [math.sin(1.0), math.cos(1.0), math.sin(0.01), math.cos(0.01)],
                [math.sin(2.0), math.cos(2.0), math.sin(0.02), math.cos(0.02)]]
    np.testing.assert_allclose(table, expected, rtol=0, atol=1e-15)
    assert table[1, 0] == pytest.approx(0.8414709848078965) and table[2, 0] == pytest.approx(0.9092974268256817)
    zeros = np.zeros((1, 3, 4))
    pe_t = torch_tx.PositionalEncoding(4, 3, 0.0)(torch.from_numpy(zeros))
    pe_j = jax_tx.PositionalEncoding(4, 3, 0.0).apply({}, jnp.asarray(zeros))
    np.testing.assert_array_equal(pe_t[0].numpy(), table)
    np.testing.assert_array_equal(np.asarray(pe_j)[0], table)


def _attention_weights(q: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Canonical-style weights for one MultiHeadAttention(d_model=4): q/k projections = `q`, v = `v`, out = I."""
    eye, zero = np.eye(4), np.zeros(4)
    return {"q_proj.weight": q, "q_proj.bias": zero, "k_proj.weight": np.eye(4), "k_proj.bias": zero,
            "v_proj.weight": v, "v_proj.bias": zero, "out_proj.weight": eye, "out_proj.bias": zero}


def _run_attention(weights, num_heads, query, key_value, mask):
    tm = torch_tx.MultiHeadAttention(4, num_heads, 0.0).double()
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    out_t = tm(torch.from_numpy(query), torch.from_numpy(key_value), torch.from_numpy(mask)).detach().numpy()
    params = convert.rename_to_flax(weights)
    out_j = jax_tx.MultiHeadAttention(4, num_heads, 0.0).apply({"params": params}, jnp.asarray(query),
                                                                jnp.asarray(key_value), jnp.asarray(mask))
    return out_t, np.asarray(out_j)


def test_attention_with_hand_set_weights_in_both_twins():
    # Zero query projection: every allowed key scores the same, so each row is the mean of its values.
    key_value = np.array([[[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0]]])  # [1, S=3, D=4]
    query = np.ones((1, 2, 4))  # [1, T=2, D]
    mask = np.array([[[[T, T, F], [F, F, F]]]])  # [1, 1, T, S]: row 1 sees no key
    expected = [[[0.5, 1.0, 0, 0], [0, 0, 0, 0]]]
    for out in _run_attention(_attention_weights(np.zeros((4, 4)), np.eye(4)), 2, query, key_value, mask):
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)

    # One head, K=4: logits = q.k / 2 = [ln 3, 0], so the weights are [3/4, 1/4]. v_proj maps key 0 to
    # [4, 0, 0, 0] and key 1 to [0, 8, 0, 0]: the output is 3/4 * [4, 0, 0, 0] + 1/4 * [0, 8, 0, 0] = [3, 2, 0, 0].
    query = np.array([[[2 * math.log(3.0), 0, 0, 0]]])  # [1, T=1, D]
    key_value = np.array([[[1.0, 0, 0, 0], [0, 0, 0, 1.0]]])  # [1, S=2, D]
    v = np.zeros((4, 4))
    v[0, 0], v[1, 3] = 4.0, 8.0
    mask = np.ones((1, 1, 1, 2), dtype=bool)
    for out in _run_attention(_attention_weights(np.eye(4), v), 1, query, key_value, mask):
        np.testing.assert_allclose(out[0, 0], [3.0, 2.0, 0, 0], rtol=0, atol=1e-14)


def _hand_model() -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """1+1 layers, d_model=4, post-LN. Attention out_proj = 0, so attention adds nothing; FF = 0.5*relu(x);
    final norms scale 2, bias 1; generator = identity + bias [0, 0, 0, 10]."""
    cfg = TransformerConfig(src_vocab_size=4, tgt_vocab_size=4, d_model=4, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=4, dropout=0.0, layer_norm_eps=1e-5)
    weights = {}
    for key, shape in canonical_shapes(cfg).items():
        weights[key] = np.ones(shape) if key.endswith("norm.weight") else np.zeros(shape)
    for stack in ("encoder", "decoder"):
        weights[f"{stack}.layers.0.ff.linear1.weight"] = np.eye(4)
        weights[f"{stack}.layers.0.ff.linear2.weight"] = 0.5 * np.eye(4)
        weights[f"{stack}.norm.weight"], weights[f"{stack}.norm.bias"] = np.full(4, 2.0), np.ones(4)
    weights["src_embed.weight"] = np.full((4, 4), 0.25)
    weights["tgt_embed.weight"] = np.array([[0.0] * 4, [0.5, -0.5, 0.5, -0.5], [0.0] * 4, [0.0] * 4])
    weights["generator.weight"] = np.eye(4)
    weights["generator.bias"] = np.array([0.0, 0.0, 0.0, 10.0])
    return cfg, weights


def test_one_layer_model_with_hand_set_weights_in_both_twins():
    cfg, weights = _hand_model()
    eps = cfg.layer_norm_eps
    # Target token 1 at position 0: y0 = 2 * [.5, -.5, .5, -.5] + PE[0] = [1, 0, 1, 0].
    a = 0.5 / math.sqrt(0.25 + eps)  # LN after self-attention: [a, -a, a, -a]
    b = a / math.sqrt(a * a + eps)  # LN after cross-attention: [b, -b, b, -b]
    # FF adds 0.5*relu: [1.5b, -b, 1.5b, -b]; mean 0.25b, deviations +-1.25b.
    c = 1.25 * b / math.sqrt((1.25 * b) ** 2 + eps)
    d = c / math.sqrt(c * c + eps)  # final LN, then scale 2 and bias 1
    expected = [2 * d + 1, -2 * d + 1, 2 * d + 1, -2 * d + 1 + 10]
    np.testing.assert_allclose(expected, [3.0, -1.0, 3.0, 9.0], atol=1e-3)

    src, tgt = np.array([[2, 3, 1]]), np.array([[1]])
    model = torch_tx.Transformer(cfg).double()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    logits_t = model(torch.from_numpy(src), torch.from_numpy(tgt)).detach().numpy()
    fm = jax_tx.Transformer(cfg)
    logits_j = np.asarray(fm.apply({"params": jax.tree_util.tree_map(jnp.asarray,
                                                                     convert.canonical_to_flax(weights, cfg))},
                                   jnp.asarray(src), jnp.asarray(tgt)))
    for logits in (logits_t, logits_j):
        np.testing.assert_allclose(logits[0, 0], expected, rtol=0, atol=1e-12)
