"""The config fields that express Hugging Face Marian and FSMT checkpoints, in both twins: the position tables
(bit for bit transformers' own), silu, unscaled embeddings, the three dropout rates, and the encoder-decoder's
first decoder position, which is never padding (Marian starts decoding from the pad id)."""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_tx
import torch_tx
from parity import convert, suite
from parity.config import TransformerConfig
from parity.decoding import forbidden_ids
from parity.numerics import position_table, sinusoidal_table

V, PAD = 13, 12  # Marian's layout: pad (= the decoder start) is the last id
EOS = 0
CFG = TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=8, num_heads=2, num_encoder_layers=2,
                        num_decoder_layers=2, d_ff=16, dropout=0.0, max_len=12, pad_id=PAD)
SRC = np.array([[3, 4, 5, 6, 1, PAD], [7, 2, 9, PAD, PAD, PAD]])
TGT = np.array([[PAD, 3, 4, 5], [PAD, 8, 1, PAD]])  # both rows start from the decoder start = pad
EPS32 = float(np.finfo(np.float32).eps)


def _flax(cfg: TransformerConfig, model: torch.nn.Module):
    """The Flax twin of `cfg` on the torch model's weights (converted, same dtype)."""
    return jax_tx.model_for(cfg), {"params": convert.torch_to_flax(model.state_dict(), cfg)}


def _rel(got, ref) -> float:
    return suite.errors(np.asarray(got), np.asarray(ref))[1]


@pytest.mark.parametrize("max_len,d_model", [(64, 16), (9, 4), (130, 64)])
def test_marian_table_is_transformers_create_weight_bit_for_bit(max_len, d_model):
    marian = pytest.importorskip("transformers.models.marian.modeling_marian")
    reference = marian.MarianSinusoidalPositionalEmbedding(max_len, d_model).create_weight()  # float32
    table = position_table("marian", max_len, d_model)
    assert table.dtype == np.float64 and table.shape == (max_len, d_model)
    np.testing.assert_array_equal(table, reference.numpy().astype(np.float64))
    np.testing.assert_array_equal(table, reference.double().numpy())  # what a .double() Marian keeps
    np.testing.assert_array_equal(table.astype(np.float32).astype(np.float64), table)  # float32 values


@pytest.mark.parametrize("max_len,d_model,pad_id", [(64, 16, 1), (9, 4, 0), (130, 64, 58)])
def test_fairseq_table_is_fsmt_get_embedding_bit_for_bit(max_len, d_model, pad_id):
    fsmt = pytest.importorskip("transformers.models.fsmt.modeling_fsmt")
    full = fsmt.SinusoidalPositionalEmbedding.get_embedding(max_len + pad_id + 1, d_model, pad_id)
    table = position_table("fairseq", max_len, d_model, pad_id)
    assert table.dtype == np.float64 and table.shape == (max_len, d_model)
    np.testing.assert_array_equal(table, full[pad_id + 1:].numpy().astype(np.float64))


def test_fairseq_table_without_torch_is_the_numpy_emulation(monkeypatch):
    with_torch = position_table("fairseq", 64, 16, 1)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` inside position_table raises ImportError
    without = position_table("fairseq", 64, 16, 1)
    # Rounding differences of exp and of the float32 angle (<= 66 here) carry into sin/cos: within a few ulp of
    # the largest angle, not bit for bit.
    np.testing.assert_allclose(without, with_torch, rtol=0, atol=4 * 66 * EPS32)
    assert without.dtype == np.float64


def test_table_literal_entries():
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    # Marian, D=4: frequencies 1 and 1/100; [sin p, sin p/100 | cos p, cos p/100], float32, from position 0.
    marian = position_table("marian", 3, 4)
    assert marian[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert marian[1].tolist() == [f32(math.sin(1.0)), f32(math.sin(0.01)), f32(math.cos(1.0)), f32(math.cos(0.01))]
    assert marian[2, 0] == f32(0.9092974268256817)
    # The paper's table is Marian's with its columns interleaved, up to Marian's float32 rounding...
    paper = sinusoidal_table(3, 4)
    np.testing.assert_allclose(marian[:, [0, 2, 1, 3]], paper, rtol=0, atol=EPS32)
    # ...but fairseq's frequencies are 10000^(-i/(D/2 - 1)): 1 and 1e-4 for D=4, not 1e-2 (no permutation of the
    # paper's table gives them). Row t is fairseq's position pad_id + 1 + t.
    fairseq = position_table("fairseq", 2, 4, pad_id=1)
    np.testing.assert_allclose(fairseq[0], [math.sin(2.0), math.sin(2e-4), math.cos(2.0), math.cos(2e-4)],
                               rtol=2 * EPS32, atol=0)
    np.testing.assert_allclose(fairseq[1], [math.sin(3.0), math.sin(3e-4), math.cos(3.0), math.cos(3e-4)],
                               rtol=2 * EPS32, atol=0)
    with pytest.raises(ValueError, match="unknown positions"):
        position_table("rotary", 3, 4)


@pytest.mark.parametrize("changes", [dict(activation="silu"), dict(positions="marian"),
                                     dict(positions="fairseq", scale_embedding=False),
                                     dict(activation="silu", positions="marian", scale_embedding=False),
                                     dict(scale_embedding=False, norm_first=True, positions="fairseq", pad_id=0)],
                         ids=["silu", "marian", "fairseq-unscaled", "marian-silu-unscaled", "fairseq-pad0-prenorm"])
def test_twins_agree_on_the_new_fields(changes):
    cfg = CFG.replace(**changes)
    torch.manual_seed(0)
    model = torch_tx.Transformer(cfg).double().eval()
    fm, variables = _flax(cfg, model)
    logits_t = model(torch.from_numpy(SRC), torch.from_numpy(TGT)).detach().numpy()
    logits_j = np.asarray(fm.apply(variables, jnp.asarray(SRC), jnp.asarray(TGT)))
    assert _rel(logits_j, logits_t) <= 1e-10  # float64: the same algorithm
    cfg_lm = cfg.for_arch("decoder")
    torch.manual_seed(1)
    lm = torch_tx.DecoderOnly(cfg_lm).double().eval()
    fm_lm, variables_lm = _flax(cfg_lm, lm)
    assert _rel(fm_lm.apply(variables_lm, jnp.asarray(TGT)), lm(torch.from_numpy(TGT)).detach().numpy()) <= 1e-10


def test_the_fields_change_the_function():
    """Each field is honoured (not silently ignored): the same weights give other logits."""
    torch.manual_seed(0)
    base = torch_tx.Transformer(CFG).double().eval()
    ref = base(torch.from_numpy(SRC), torch.from_numpy(TGT)).detach()
    for changes in (dict(activation="silu"), dict(positions="marian"), dict(positions="fairseq"),
                    dict(scale_embedding=False)):
        model = torch_tx.Transformer(CFG.replace(**changes)).double().eval()
        model.load_state_dict(base.state_dict())
        assert not torch.allclose(model(torch.from_numpy(SRC), torch.from_numpy(TGT)), ref), changes


def test_unscaled_embedding_is_the_raw_row_in_both_twins():
    weight = np.arange(4 * 6, dtype=np.float64).reshape(6, 4) / 7
    ids = np.array([[5, 0, 2]])
    for scale, factor in ((True, 2.0), (False, 1.0)):  # sqrt(d_model = 4) = 2
        emb_t = torch_tx.TokenEmbedding(6, 4, scale).double()
        emb_t.weight.data = torch.from_numpy(weight)
        out_j = jax_tx.TokenEmbedding(6, 4, scale).apply({"params": {"embedding": jnp.asarray(weight)}},
                                                         jnp.asarray(ids))
        np.testing.assert_array_equal(emb_t(torch.from_numpy(ids)).detach().numpy(), weight[ids] * factor)
        np.testing.assert_array_equal(np.asarray(out_j), weight[ids] * factor)


def test_silu_feed_forward_in_both_twins():
    x = np.linspace(-3, 3, 8).reshape(1, 2, 4)
    ff_t = torch_tx.FeedForward(4, 4, 0.0, "silu").double()
    with torch.no_grad():
        ff_t.linear1.weight.copy_(torch.eye(4, dtype=torch.float64))
        ff_t.linear1.bias.zero_()
        ff_t.linear2.weight.copy_(torch.eye(4, dtype=torch.float64))
        ff_t.linear2.bias.zero_()
    params = convert.rename_to_flax({k: v.numpy() for k, v in ff_t.state_dict().items()})
    expected = x / (1 + np.exp(-x))  # x * sigmoid(x)
    np.testing.assert_allclose(ff_t(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-15, atol=0)
    np.testing.assert_allclose(np.asarray(jax_tx.FeedForward(4, 4, 0.0, "silu").apply({"params": params},
                                                                                     jnp.asarray(x))),
                               expected, rtol=1e-15, atol=0)


# One rate at a time: each of the three is wired where Marian uses it, and to nothing else.
ONE_RATE = {"dropout": dict(dropout=0.4, attention_dropout=0.0, activation_dropout=0.0),
            "attention": dict(dropout=0.0, attention_dropout=0.4, activation_dropout=0.0),
            "activation": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.4)}


def _torch_rates(model: torch_tx.Transformer) -> dict[str, set[float]]:
    layers = list(model.encoder.layers) + list(model.decoder.layers)
    return {"dropout": {model.pos_encoding.drop.p} | {layer.drop.p for layer in layers},
            "attention": {layer.self_attn.dropout for layer in layers}
                         | {layer.cross_attn.dropout for layer in model.decoder.layers},
            "activation": {layer.ff.drop.p for layer in layers}}


def _jax_rates(model: jax_tx.Transformer, variables) -> dict[str, set[float]]:
    bound = model.bind(variables)
    layers = list(bound.encoder.layers) + list(bound.decoder.layers)
    return {"dropout": {bound.pos_encoding.dropout} | {layer.drop.rate for layer in layers},
            "attention": {layer.self_attn.dropout for layer in layers}
                         | {layer.cross_attn.dropout for layer in bound.decoder.layers},
            "activation": {layer.ff.drop.rate for layer in layers}}


@pytest.mark.parametrize("which", list(ONE_RATE))
def test_each_dropout_rate_acts_alone_in_both_twins(which):
    cfg = CFG.replace(**ONE_RATE[which])
    torch.manual_seed(0)
    model = torch_tx.Transformer(cfg).double()
    fm, variables = _flax(cfg, model)
    expected = {name: {0.4 if name == which else 0.0} for name in ONE_RATE}
    assert _torch_rates(model) == expected
    assert _jax_rates(fm, variables) == expected
    src, tgt = torch.from_numpy(SRC), torch.from_numpy(TGT)
    model.eval()
    eval_t = model(src, tgt)
    model.train()
    assert not torch.allclose(model(src, tgt), eval_t)
    src_j, tgt_j = jnp.asarray(SRC), jnp.asarray(TGT)
    eval_j = np.asarray(fm.apply(variables, src_j, tgt_j))
    train_j = np.asarray(fm.apply(variables, src_j, tgt_j, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    assert not np.allclose(train_j, eval_j)


def test_unset_rates_are_dropout_and_without_dropout_zeroes_all_three():
    torch.manual_seed(0)
    default = torch_tx.Transformer(CFG.replace(dropout=0.3)).double()
    assert _torch_rates(default) == {name: {0.3} for name in ONE_RATE}  # None = dropout: today's behaviour
    cfg = CFG.replace(dropout=0.3, attention_dropout=0.2, activation_dropout=0.1).without_dropout()
    model = torch_tx.Transformer(cfg).double()
    fm, variables = _flax(cfg, model)
    assert _torch_rates(model) == _jax_rates(fm, variables) == {name: {0.0} for name in ONE_RATE}
    src, tgt = torch.from_numpy(SRC), torch.from_numpy(TGT)
    model.train()
    train_t = model(src, tgt)
    model.eval()
    torch.testing.assert_close(train_t, model(src, tgt), rtol=0, atol=0)  # no dropout: the same ops, the same bits
    src_j, tgt_j = jnp.asarray(SRC), jnp.asarray(TGT)
    np.testing.assert_array_equal(
        np.asarray(fm.apply(variables, src_j, tgt_j, deterministic=False, rngs={"dropout": jax.random.key(0)})),
        np.asarray(fm.apply(variables, src_j, tgt_j)))


def test_first_decoder_position_is_real_in_both_twins():
    """tgt [pad, a, b]: a derived mask keeps column 0 (the decoder start) real, like an explicit all-True mask;
    later pads stay padding, and a mask the caller gives is used as given."""
    torch.manual_seed(0)
    model = torch_tx.Transformer(CFG).double().eval()
    fm, variables = _flax(CFG, model)
    src = SRC[:1]
    tgt = np.array([[PAD, 3, 4], [PAD, 5, PAD]])
    src = np.repeat(src, 2, axis=0)
    meant = tgt != PAD
    meant[:, 0] = True  # [[T, T, T], [T, T, F]]
    old = tgt != PAD  # what a plain pad-id mask says: the decoder start would be padding
    src_t, tgt_t = torch.from_numpy(src), torch.from_numpy(tgt)
    derived_t = model(src_t, tgt_t).detach().numpy()
    np.testing.assert_array_equal(derived_t, model(src_t, tgt_t, tgt_mask=torch.from_numpy(meant)).detach().numpy())
    assert not np.allclose(derived_t, model(src_t, tgt_t, tgt_mask=torch.from_numpy(old)).detach().numpy())
    derived_j = np.asarray(fm.apply(variables, jnp.asarray(src), jnp.asarray(tgt)))
    np.testing.assert_array_equal(derived_j, np.asarray(fm.apply(variables, jnp.asarray(src), jnp.asarray(tgt),
                                                                 tgt_mask=jnp.asarray(meant))))
    assert not np.allclose(derived_j, np.asarray(fm.apply(variables, jnp.asarray(src), jnp.asarray(tgt),
                                                          tgt_mask=jnp.asarray(old))))
    assert _rel(derived_j, derived_t) <= 1e-10


def test_decoder_only_left_padding_stays_padding_in_both_twins():
    """DecoderOnly's left-padded prompts may start with pad: column 0 is masked there as before."""
    cfg = CFG.for_arch("decoder")
    torch.manual_seed(0)
    lm = torch_tx.DecoderOnly(cfg).double().eval()
    fm, variables = _flax(cfg, lm)
    tgt = np.array([[PAD, 3, 4]])
    mask = np.array([[False, True, True]])
    out_t = lm(torch.from_numpy(tgt)).detach().numpy()
    np.testing.assert_array_equal(out_t, lm(torch.from_numpy(tgt), torch.from_numpy(mask)).detach().numpy())
    out_j = np.asarray(fm.apply(variables, jnp.asarray(tgt)))
    np.testing.assert_array_equal(out_j, np.asarray(fm.apply(variables, jnp.asarray(tgt), jnp.asarray(mask))))


def _argmax_loop_torch(model: torch_tx.Transformer, src: np.ndarray, steps: int) -> np.ndarray:
    """Greedy by full forward passes from tgt [pad] (no cache, masks derived), pad after EOS."""
    banned = list(forbidden_ids(model.cfg, PAD, EOS))
    tgt = torch.full((src.shape[0], 1), PAD, dtype=torch.long)
    done = torch.zeros(src.shape[0], dtype=torch.bool)
    for _ in range(steps):
        logits = model(torch.from_numpy(src), tgt)[:, -1].detach()  # [B, V]
        logits[:, banned] = -torch.inf
        token = logits.argmax(-1).masked_fill(done, PAD)  # [B]
        tgt = torch.cat([tgt, token[:, None]], 1)
        done |= token == EOS
        if bool(done.all()):
            break
    return tgt[:, 1:].numpy()


def _argmax_loop_jax(fm, variables, src: np.ndarray, steps: int) -> np.ndarray:
    banned = list(forbidden_ids(fm.cfg, PAD, EOS))
    tgt = np.full((src.shape[0], 1), PAD)
    done = np.zeros(src.shape[0], dtype=bool)
    for _ in range(steps):
        logits = np.array(fm.apply(variables, jnp.asarray(src), jnp.asarray(tgt))[:, -1])  # [B, V]
        logits[:, banned] = -np.inf
        token = np.where(done, PAD, logits.argmax(-1))  # [B]
        tgt = np.concatenate([tgt, token[:, None]], 1)
        done |= token == EOS
        if done.all():
            break
    return tgt[:, 1:]


def _cached_loop_torch(model: torch_tx.Transformer, src: np.ndarray, steps: int) -> np.ndarray:
    """Greedy through the cache with tgt_mask None at every step (index 0 reads the pad start)."""
    src_t = torch.from_numpy(src)
    src_mask = src_t != PAD
    cache = model.init_cache(model.encode(src_t, src_mask), src_mask, steps)
    banned = list(forbidden_ids(model.cfg, PAD, EOS))
    token, out = torch.full((src.shape[0], 1), PAD, dtype=torch.long), []
    for _ in range(steps):
        logits, cache = model.decode(token, None, cache=cache)  # [B, 1, V]
        logits = logits[:, -1].detach()
        logits[:, banned] = -torch.inf
        token = logits.argmax(-1, keepdim=True)  # [B, 1]
        out.append(token)
    assert bool(cache["tgt_mask"][:, 0].all())  # the pad start is a real key
    return torch.cat(out, 1).numpy()


def _cached_loop_jax(fm, variables, src: np.ndarray, steps: int) -> np.ndarray:
    src_j = jnp.asarray(src)
    src_mask = src_j != PAD
    memory = fm.apply(variables, src_j, src_mask, method=fm.encode)
    cache = fm.apply(variables, memory, src_mask, steps, method=fm.init_cache)
    banned = list(forbidden_ids(fm.cfg, PAD, EOS))
    token, out = jnp.full((src.shape[0], 1), PAD), []
    for _ in range(steps):
        logits, cache = fm.apply(variables, token, None, None, None, cache, method=fm.decode)  # [B, 1, V]
        logits = np.array(logits[:, -1])
        logits[:, banned] = -np.inf
        token = jnp.asarray(logits.argmax(-1)[:, None])  # [B, 1]
        out.append(np.asarray(token))
    assert bool(np.asarray(cache["tgt_mask"])[:, 0].all())
    return np.concatenate(out, 1)


def test_greedy_from_the_pad_start_is_the_full_pass_argmax_loop_in_both_twins():
    steps = 6
    torch.manual_seed(3)
    model = torch_tx.Transformer(CFG).double().eval()
    fm, variables = _flax(CFG, model)
    full_t = _argmax_loop_torch(model, SRC, steps)
    full_j = _argmax_loop_jax(fm, variables, SRC, steps)
    np.testing.assert_array_equal(full_j, full_t)
    gen_t = torch_tx.generate(model, torch.from_numpy(SRC), max_new_tokens=steps, bos_id=PAD, eos_id=EOS).numpy()
    gen_j = np.asarray(jax_tx.generate(fm, variables, jnp.asarray(SRC), max_new_tokens=steps, bos_id=PAD,
                                       eos_id=EOS))
    np.testing.assert_array_equal(gen_t, full_t[:, :gen_t.shape[1]])
    np.testing.assert_array_equal(gen_j, gen_t)
    # The cached step with a derived mask (tgt_mask None) agrees too, up to each row's EOS.
    for cached in (_cached_loop_torch(model, SRC, steps), _cached_loop_jax(fm, variables, SRC, steps)):
        for row, ref in zip(cached, full_t):
            n = int(np.argmax(ref == EOS)) + 1 if (ref == EOS).any() else len(ref)
            np.testing.assert_array_equal(row[:n], ref[:n])
    beams_t = torch_tx.generate(model, torch.from_numpy(SRC), max_new_tokens=steps, bos_id=PAD, eos_id=EOS,
                                beam_size=3).numpy()
    beams_j = np.asarray(jax_tx.generate(fm, variables, jnp.asarray(SRC), max_new_tokens=steps, bos_id=PAD,
                                         eos_id=EOS, beam_size=3))
    np.testing.assert_array_equal(beams_j, beams_t)
