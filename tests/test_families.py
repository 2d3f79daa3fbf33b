"""The three families (Transformer, EncoderOnly, DecoderOnly) and packed rows, in both twins.

Literal segment masks, positions and pooling; a packed row gives what its examples give one by one
(each twin on weights converted from the torch twin, float64 <= 1e-10); the families share the same
layers and weight names; bad arguments fail clearly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_tx
import torch_tx
from jax_tx import masks as jmasks
from parity import suite
from parity.config import TransformerConfig
from parity.convert import canonical_to_flax, to_torch
from strategies import configs
from torch_tx import masks as tmasks

T, F = True, False
CFG = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, d_ff=16, dropout=0.0, max_len=16)


def test_literal_segment_masks_and_positions_in_both_twins():
    segments = np.array([[1, 1, 2, 2, 2, 0]])
    expected = [[T, T, F, F, F, F], [T, T, F, F, F, F], [F, F, T, T, T, F], [F, F, T, T, T, F],
                [F, F, T, T, T, F], [F, F, F, F, F, F]]
    assert tmasks.segment_mask(torch.from_numpy(segments), torch.from_numpy(segments))[0, 0].tolist() == expected
    assert np.asarray(jmasks.segment_mask(jnp.asarray(segments), jnp.asarray(segments)))[0, 0].tolist() == expected
    positions = [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 0, 1]]
    rows = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 3, 3]])
    assert tmasks.segment_positions(torch.from_numpy(rows)).tolist() == positions
    assert np.asarray(jmasks.segment_positions(jnp.asarray(rows))).tolist() == positions
    cross = [[T, F, F], [F, T, T], [F, F, F]]  # target segments [1, 2, 0] against source [1, 2, 2]
    tgt, src = np.array([[1, 2, 0]]), np.array([[1, 2, 2]])
    assert tmasks.segment_mask(torch.from_numpy(tgt), torch.from_numpy(src))[0, 0].tolist() == cross
    assert np.asarray(jmasks.segment_mask(jnp.asarray(tgt), jnp.asarray(src)))[0, 0].tolist() == cross


def test_literal_mean_pooling_in_both_twins():
    hidden = np.arange(12, dtype=np.float64).reshape(1, 4, 3)  # rows [0 1 2] [3 4 5] [6 7 8] [9 10 11]
    pad = np.array([[T, T, T, F]])
    segments = np.array([[1, 2, 2, 0]])
    plain = [[3.0, 4.0, 5.0]]
    packed = [[[0.0, 1.0, 2.0], [4.5, 5.5, 6.5], [4.5, 5.5, 6.5], [0.0, 0.0, 0.0]]]
    h_t, p_t, s_t = torch.from_numpy(hidden), torch.from_numpy(pad), torch.from_numpy(segments)
    assert torch_tx.model.mean_pool(h_t, p_t).tolist() == plain
    assert torch_tx.model.mean_pool(h_t, p_t, s_t).tolist() == packed
    h_j, p_j, s_j = jnp.asarray(hidden), jnp.asarray(pad), jnp.asarray(segments)
    assert np.asarray(jax_tx.model.mean_pool(h_j, p_j)).tolist() == plain
    assert np.asarray(jax_tx.model.mean_pool(h_j, p_j, s_j)).tolist() == packed


class Twins:
    """Both twins of one config on the same canonical float64 weights (converted for Flax)."""

    def __init__(self, cfg: TransformerConfig, weights: dict[str, np.ndarray]):
        self.cfg = cfg
        weights = {k: np.asarray(v, np.float64) for k, v in weights.items()}
        self.torch_model = torch_tx.model_for(cfg).double().eval()
        self.torch_model.load_state_dict({k: to_torch(v) for k, v in weights.items()}, strict=True)
        self.flax_model = jax_tx.model_for(cfg)
        self.params = {"params": canonical_to_flax(weights, cfg)}

    def __call__(self, twin: str, **inputs: np.ndarray) -> list[np.ndarray]:
        """The model's outputs (a list: logits, or hidden [and class logits]) as float64 numpy arrays."""
        if twin == "torch":
            with torch.no_grad():
                out = self.torch_model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
            out = out if isinstance(out, tuple) else (out,)
            return [o.numpy() for o in out]
        out = self.flax_model.apply(self.params, **{k: jnp.asarray(v) for k, v in inputs.items()})
        return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]


def _pack(examples: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples (1-d id arrays) -> one row (1, length) of ids and its segment ids, padded with 0."""
    ids, segments = np.zeros((1, length), np.int64), np.zeros((1, length), np.int64)
    start = 0
    for i, ex in enumerate(examples):
        ids[0, start:start + len(ex)], segments[0, start:start + len(ex)] = ex, i + 1
        start += len(ex)
    return ids, segments


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.linalg.norm(got - ref) <= 1e-10 * np.linalg.norm(ref), np.abs(got - ref).max()


@settings(max_examples=12)
@given(cfg=configs(archs=suite.ARCHS), twin=st.sampled_from(suite.TWINS), seed=st.integers(0, 2**31 - 1),
       lengths=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3))
def test_a_packed_row_equals_its_examples_one_by_one(cfg, twin, seed, lengths):
    rng = np.random.default_rng(seed)
    twins = Twins(cfg, suite.init_canonical(cfg, "torch", seed))
    srcs = [rng.integers(1, cfg.src_vocab_size, n) for n, _ in lengths]
    tgts = [rng.integers(1, cfg.tgt_vocab_size, n) for _, n in lengths]
    src, src_segments = _pack(srcs, 13)
    tgt, tgt_segments = _pack(tgts, 13)
    packed = {"seq2seq": dict(src=src, tgt=tgt, src_segments=src_segments, tgt_segments=tgt_segments),
              "encoder": dict(src=src, src_segments=src_segments),
              "decoder": dict(tgt=tgt, tgt_segments=tgt_segments)}[cfg.arch]
    outputs = twins(twin, **packed)
    starts = {"src": np.cumsum([0] + [len(s) for s in srcs]), "tgt": np.cumsum([0] + [len(t) for t in tgts])}
    side = "src" if cfg.arch == "encoder" else "tgt"
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        alone = {"seq2seq": dict(src=s[None], tgt=t[None]), "encoder": dict(src=s[None]),
                 "decoder": dict(tgt=t[None])}[cfg.arch]
        lo, hi = starts[side][i], starts[side][i + 1]
        for got, ref in zip(outputs, twins(twin, **alone)):
            if ref.ndim == 2:  # class logits (1, C): every token of the segment carries them
                for pos in range(lo, hi):
                    _close(got[0, pos], ref[0])
            else:
                _close(got[0, lo:hi], ref[0])


def test_encoder_only_and_decoder_only_reuse_the_transformer_s_stacks():
    torch.manual_seed(0)
    full = torch_tx.Transformer(CFG).double().eval()
    encoder_only, decoder_only = torch_tx.EncoderOnly(CFG).double().eval(), torch_tx.DecoderOnly(CFG).double().eval()
    state = full.state_dict()
    encoder_only.load_state_dict({k: v for k, v in state.items() if k in encoder_only.state_dict()}, strict=True)
    src = torch.tensor([[3, 4, 5, 0]])
    torch.testing.assert_close(encoder_only(src), full.encode(src), rtol=0, atol=0)  # the same modules and ops: bits
    assert type(decoder_only.decoder) is type(full.decoder)
    assert all(not hasattr(layer, "cross_attn") for layer in decoder_only.decoder.layers)
    assert set(decoder_only.state_dict()) < set(state)


def test_the_stored_config_names_the_family():
    assert torch_tx.EncoderOnly(CFG, num_classes=3).cfg == CFG.replace(arch="encoder", num_classes=3)
    assert jax_tx.EncoderOnly(CFG, num_classes=3).cfg == CFG.replace(arch="encoder", num_classes=3)
    assert jax_tx.EncoderOnly(CFG, num_classes=3).num_classes == 3
    assert torch_tx.DecoderOnly(CFG.replace(tie_output=True)).cfg.tie_output
    assert not torch_tx.EncoderOnly(CFG.replace(tie_output=True)).cfg.tie_output
    assert isinstance(torch_tx.model_for(CFG.for_arch("encoder", 2)), torch_tx.EncoderOnly)
    assert isinstance(jax_tx.model_for(CFG.for_arch("decoder")), jax_tx.DecoderOnly)


@pytest.mark.parametrize("make, message", [
    (lambda: torch_tx.Transformer(CFG.for_arch("encoder")), "arch 'encoder', not 'seq2seq'"),
    (lambda: jax_tx.DecoderOnly(CFG.for_arch("encoder", 2)), "arch 'encoder', not 'decoder'"),
    (lambda: torch_tx.EncoderOnly(CFG.for_arch("encoder", 2), num_classes=3), "disagrees"),
    (lambda: CFG.replace(arch="decoder", num_classes=2), "encoder's classification head"),
    (lambda: CFG.replace(arch="bert"), "arch must be one of"),
    (lambda: CFG.replace(arch="encoder", num_classes=0), "positive int"),
    (lambda: CFG.replace(arch="decoder", share_embeddings=True, src_vocab_size=13), "share_embeddings needs both"),
])
def test_bad_families_fail_clearly(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("twin", suite.TWINS)
@pytest.mark.parametrize("call, error, message", [
    (lambda m: m("seq2seq", src=[[1, 2]], tgt=[[1, 2]], src_segments=[[1, 1]]), ValueError, "both src_segments"),
    (lambda m: m("encoder", src=[[1, 2]], src_segments=[[1, 1, 1]]), ValueError, r"src_segments must have shape"),
    (lambda m: m("encoder", src=[[1, 2]], src_segments=[[1, -1]]), ValueError, "must be >= 0"),
    (lambda m: m("decoder", tgt=[[1, 2]], tgt_segments=np.array([[1.0, 1.0]])), TypeError, "integer"),
    (lambda m: m("decoder", tgt=[[1, 2]], tgt_positions=[[0, 16]]), ValueError, r"positions must be in \[0, max_len=16\)"),
    (lambda m: m("encoder_head", src=[[1, 2]], classify=True), ValueError, "no classification head"),
])
def test_bad_packing_arguments_fail_clearly(twin, call, error, message):
    def run(arch, classify=False, **inputs):
        cfg = CFG.for_arch(arch) if arch != "encoder_head" else CFG.for_arch("encoder")
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        if twin == "torch":
            model = torch_tx.model_for(cfg)
            tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
            if classify:
                return model.classify(model(**tensors), tensors["src"] != 0)
            return model(**tensors)
        model = jax_tx.model_for(cfg)
        variables = model.init(jax.random.key(0), *jax_tx.model.init_inputs(cfg))
        arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
        if classify:
            hidden = model.apply(variables, **arrays)
            return model.apply(variables, hidden, arrays["src"] != 0, method=model.classify)
        return model.apply(variables, **arrays)

    with pytest.raises(error, match=message):
        call(run)
