"""Import from and export to torch.nn.Transformer, on random configs, checked against nn.Transformer itself.

nn.Transformer has no embeddings or output layer, so the comparison is of the stacks: the same
embedded inputs (B, S, D) / (B, T, D) and masks through nn.Transformer, through the torch twin's
encoder/decoder, and through the Flax twin's (weights converted torch -> Flax), in float64.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import jax_tx
import torch_tx
from parity import convert
from parity.suite import errors
from strategies import inputs

TOL = 1e-10


@pytest.fixture(autouse=True)
def _no_fastpath():
    """nn.Transformer's inference fast path zeroes padded positions; the reference here is the math path."""
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(True)


@st.composite
def nn_transformers(draw: st.DrawFn) -> nn.Transformer:
    d_model = draw(st.sampled_from([8, 16, 32]))
    kw = dict(d_model=d_model, nhead=draw(st.sampled_from([h for h in (1, 2, 4) if d_model % h == 0])),
              dim_feedforward=draw(st.sampled_from([16, 64])), dropout=draw(st.sampled_from([0.0, 0.1])),
              activation=draw(st.sampled_from(["relu", "gelu"])),
              layer_norm_eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3])),
              batch_first=draw(st.booleans()), norm_first=draw(st.booleans()))
    n_enc, n_dec = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        return nn.Transformer(num_encoder_layers=n_enc, num_decoder_layers=n_dec, **kw).double().eval()
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), n_enc, enable_nested_tensor=False)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**kw), n_dec)
    return nn.Transformer(custom_encoder=encoder, custom_decoder=decoder, **kw).double().eval()


def _reference(module: nn.Transformer, x: torch.Tensor, y: torch.Tensor, src_mask, tgt_mask) -> torch.Tensor:
    """nn.Transformer on batch-first inputs, with its own mask conventions (True = padding)."""
    t = y.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)  # [T, T], True = masked
    if not module.batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)  # [S, B, D], [T, B, D]
    out = module(x, y, tgt_mask=causal, src_key_padding_mask=~src_mask, tgt_key_padding_mask=~tgt_mask,
                 memory_key_padding_mask=~src_mask)
    return out if module.batch_first else out.transpose(0, 1)  # [B, T, D]


@settings(max_examples=60)
@given(data=st.data(), module=nn_transformers(), tie=st.booleans())
def test_import_reproduces_nn_transformer_in_both_twins(data, module, tie):
    cfg, stacks = convert.from_nn_transformer(module, src_vocab_size=11, tgt_vocab_size=11, tie_output=tie)
    cfg = cfg.replace(dropout=0.0)
    batch = data.draw(inputs(cfg, allow_empty_source=False))
    src_mask, tgt_mask = torch.from_numpy(batch.src_mask), torch.from_numpy(batch.tgt_mask)
    b, s, t = batch.src.shape + batch.tgt.shape[1:]
    x = torch.randn(b, s, cfg.d_model, dtype=torch.float64)  # [B, S, D]
    y = torch.randn(b, t, cfg.d_model, dtype=torch.float64)  # [B, T, D]
    ref = _reference(module, x, y, src_mask, tgt_mask).detach().numpy()

    model = torch_tx.Transformer(cfg).double().eval()
    result = model.load_state_dict(stacks, strict=False)
    assert set(result.missing_keys) == {"src_embed.weight", "tgt_embed.weight", "generator.weight",
                                        "generator.bias"}
    assert not result.unexpected_keys
    self_mask = torch_tx.masks.decoder_self_mask(tgt_mask)  # [B, 1, T, T]
    cross_mask = torch_tx.masks.key_mask(src_mask)  # [B, 1, 1, S]
    memory = model.encoder(x, cross_mask)  # [B, S, D]
    out = model.decoder(y, memory, self_mask, cross_mask).detach().numpy()  # [B, T, D]
    assert errors(out, ref)[1] <= TOL

    params = convert.torch_to_flax(model.state_dict(), cfg)
    fm = jax_tx.Transformer(cfg)

    def stacks_fn(m, x, y, src_mask, tgt_mask):
        cross = jax_tx.masks.key_mask(src_mask)  # [B, 1, 1, S]
        return m.decoder(y, m.encoder(x, cross), jax_tx.masks.decoder_self_mask(tgt_mask), cross)

    flax_out = fm.apply({"params": params}, jnp.asarray(x.numpy()), jnp.asarray(y.numpy()),
                        jnp.asarray(batch.src_mask), jnp.asarray(batch.tgt_mask), method=stacks_fn)
    assert errors(np.asarray(flax_out), ref)[1] <= TOL


@settings(max_examples=40)
@given(data=st.data(), module=nn_transformers())
def test_export_round_trips_through_nn_transformer(data, module):
    cfg, stacks = convert.from_nn_transformer(module, src_vocab_size=9, tgt_vocab_size=9)
    exported = convert.to_nn_transformer(stacks, cfg).eval()
    assert exported.batch_first
    _, again = convert.from_nn_transformer(exported, src_vocab_size=9, tgt_vocab_size=9)
    assert list(again) == list(stacks)
    for key in stacks:
        assert torch.equal(again[key], stacks[key]), key
    batch = data.draw(inputs(cfg.replace(dropout=0.0), allow_empty_source=False))
    src_mask, tgt_mask = torch.from_numpy(batch.src_mask), torch.from_numpy(batch.tgt_mask)
    x = torch.randn(*batch.src.shape, cfg.d_model, dtype=torch.float64)  # [B, S, D]
    y = torch.randn(*batch.tgt.shape, cfg.d_model, dtype=torch.float64)  # [B, T, D]
    ref = _reference(module, x, y, src_mask, tgt_mask).detach().numpy()
    out = _reference(exported, x, y, src_mask, tgt_mask).detach().numpy()
    assert errors(out, ref)[1] <= TOL


def test_export_of_a_full_twin_checkpoint_without_final_norm():
    from parity.config import TransformerConfig

    cfg = TransformerConfig(10, 12, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, d_ff=16,
                            final_norm=False, dropout=0.0)
    state_dict = torch_tx.Transformer(cfg).double().state_dict()
    exported = convert.to_nn_transformer(state_dict, cfg)
    assert exported.encoder.norm is None and exported.decoder.norm is None
    cfg2, stacks = convert.from_nn_transformer(exported, src_vocab_size=10, tgt_vocab_size=12)
    assert cfg2 == cfg
    for key, value in stacks.items():
        assert torch.equal(value, state_dict[key]), key


def test_unsupported_nn_transformers_are_refused_by_name():
    no_bias = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                             bias=False)
    with pytest.raises(convert.ConversionError, match="bias=True"):
        convert.from_nn_transformer(no_bias, src_vocab_size=5, tgt_vocab_size=5)
    odd = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                         activation=nn.SiLU())
    with pytest.raises(convert.ConversionError, match="activation"):
        convert.from_nn_transformer(odd, src_vocab_size=5, tgt_vocab_size=5)
    half = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16)
    half.decoder.norm = None
    with pytest.raises(convert.ConversionError, match="final norm"):
        convert.from_nn_transformer(half, src_vocab_size=5, tgt_vocab_size=5)
