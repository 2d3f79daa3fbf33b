"""Import from and export to torch.nn.Transformer (random configs) and torch.nn.TransformerEncoder (into
EncoderOnly), checked against the torch.nn modules themselves.

They have no embeddings or output layer, so the comparison is of the stacks: the same embedded inputs
(B, S, D) / (B, T, D) and masks through the torch.nn module, through the torch twin's encoder/decoder,
and through the Flax twin's (weights converted torch -> Flax), in float64.
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


def _nn_encoder(norm_first: bool, activation: str, final_norm: bool, batch_first: bool, eps: float = 1e-6,
                seed: int = 0) -> nn.TransformerEncoder:
    """A torch.nn.TransformerEncoder (d_model 8, 2 heads, 2 layers) with every parameter random."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.1, activation=activation,
                                       layer_norm_eps=eps, batch_first=batch_first, norm_first=norm_first)
    module = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8, eps=eps) if final_norm else None,
                                   enable_nested_tensor=False).double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
    return module


@pytest.mark.parametrize("norm_first,activation,final_norm,batch_first", [
    (False, "relu", True, False), (True, "gelu", False, True), (True, "relu", True, True),
    (False, "gelu", False, False)])
def test_nn_transformer_encoder_imports_into_encoder_only_in_both_twins(norm_first, activation, final_norm,
                                                                         batch_first):
    module = _nn_encoder(norm_first, activation, final_norm, batch_first)
    cfg, stack = convert.from_nn_encoder(module, src_vocab_size=11, num_classes=3, max_len=16)
    assert (cfg.arch, cfg.num_classes, cfg.num_encoder_layers, cfg.norm_first, cfg.activation, cfg.final_norm,
            cfg.layer_norm_eps) == ("encoder", 3, 2, norm_first, activation, final_norm, 1e-6)
    cfg = cfg.replace(dropout=0.0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((3, 5, 8)))  # [B, S, D]
    src_mask = torch.from_numpy(np.arange(5)[None, :] < np.array([[5], [2], [4]]))  # [B, S]
    ref = module(x if batch_first else x.transpose(0, 1), src_key_padding_mask=~src_mask)
    ref = (ref if batch_first else ref.transpose(0, 1)).detach().numpy()  # [B, S, D]

    model = torch_tx.EncoderOnly(cfg).double().eval()
    result = model.load_state_dict(stack, strict=False)
    assert set(result.missing_keys) == {"src_embed.weight", "pooler.weight", "pooler.bias", "classifier.weight",
                                        "classifier.bias"}
    assert not result.unexpected_keys
    out = model.encoder(x, torch_tx.masks.key_mask(src_mask)).detach().numpy()  # [B, S, D]
    assert errors(out, ref)[1] <= TOL

    params = convert.torch_to_flax(model.state_dict(), cfg)
    flax_out = jax_tx.EncoderOnly(cfg).apply({"params": params}, jnp.asarray(x.numpy()), jnp.asarray(src_mask.numpy()),
                                              method=lambda m, x, mask: m.encoder(x, jax_tx.masks.key_mask(mask)))
    assert errors(np.asarray(flax_out), ref)[1] <= TOL

    exported = convert.to_nn_transformer(stack, cfg)
    assert isinstance(exported, nn.TransformerEncoder) and list(exported.state_dict()) == list(module.state_dict())
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in module.state_dict().items())


def test_nn_encoder_key_map_is_the_modules_own_state_dict():
    module = _nn_encoder(False, "relu", True, True)
    cfg, _ = convert.from_nn_encoder(module, src_vocab_size=5)
    assert list(convert.nn_key_map(cfg)) == list(module.state_dict())
    q = convert.from_nn_state_dict(module.state_dict(), cfg)["encoder.layers.1.self_attn.q_proj.weight"]
    assert np.shares_memory(q, module.layers[1].self_attn.in_proj_weight.detach().numpy())  # a view, not a copy


def test_bad_nn_encoders_are_refused_by_name():
    module = _nn_encoder(False, "relu", True, True)
    with pytest.raises(convert.ConversionError, match="d_model=16 disagrees with the module, which has d_model=8"):
        convert.from_nn_encoder(module, src_vocab_size=5, d_model=16)
    with pytest.raises(convert.ConversionError, match="expected a torch.nn.TransformerEncoder, got Transformer"):
        convert.from_nn_encoder(nn.Transformer(d_model=8, nhead=2, dim_feedforward=16), src_vocab_size=5)
    wide = _nn_encoder(False, "relu", True, True)
    wide.norm = nn.LayerNorm(16, eps=1e-6)
    with pytest.raises(convert.ConversionError, match=r"shape mismatch for 'norm.weight': expected \(8,\), "
                                                      r"got \(16,\)"):
        convert.from_nn_encoder(wide, src_vocab_size=5)
    loose = _nn_encoder(False, "relu", True, True)
    loose.norm = nn.LayerNorm(8, eps=1e-3)
    with pytest.raises(convert.ConversionError, match="final norm's eps"):
        convert.from_nn_encoder(loose, src_vocab_size=5)
    cfg, _ = convert.from_nn_encoder(module, src_vocab_size=5)
    sd = dict(module.state_dict())
    del sd["layers.1.linear2.bias"]
    with pytest.raises(convert.ConversionError, match=r"nn.TransformerEncoder state dict does not match the config: "
                                                      r"missing key\(s\) 'layers.1.linear2.bias'"):
        convert.from_nn_state_dict(sd, cfg)
    sd = {**module.state_dict(), "layers.2.linear1.weight": torch.zeros(16, 8)}
    with pytest.raises(convert.ConversionError, match=r"unexpected nn.TransformerEncoder key\(s\) 'layers.2.linear1"):
        convert.from_nn_state_dict(sd, cfg)
    with pytest.raises(convert.ConversionError, match="arch 'decoder' .* has no torch.nn counterpart"):
        convert.nn_key_map(cfg.for_arch("decoder"))
