"""Decoding: the KV cache against the full forward pass, and `generate` (greedy, beam, sampling) across the twins.

Weights come from one twin's initializer (or the trained tests/data/tiny_run) and are converted into
the other; greedy and beam search must give the same tokens in both, float64 on random models and
float32 on the trained one. Beam search is also checked against an exhaustive search on a tiny vocabulary.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_tx
import torch_tx
from parity import suite
from parity.checkpoint import load_checkpoint
from parity.config import TransformerConfig
from parity.convert import canonical_to_flax, to_torch
from parity.decoding import length_penalty
from parity.tokenizer import Tokenizer
from strategies import configs, inputs

TINY_RUN = Path(__file__).parent / "data" / "tiny_run"
BOS, EOS = 1, 2


class Twins:
    """Both twins on the same canonical weights, in one dtype."""

    def __init__(self, cfg: TransformerConfig, weights, dtype: str = "float64"):
        self.cfg = cfg
        self.torch = torch_tx.Transformer(cfg).to(getattr(torch, dtype)).eval()
        self.torch.load_state_dict({k: to_torch(np.asarray(v)) for k, v in weights.items()})
        self.flax = jax_tx.Transformer(cfg)
        self.params = jax.tree.map(lambda a: jnp.asarray(a, dtype), canonical_to_flax(weights, cfg))

    @classmethod
    def random(cls, cfg: TransformerConfig, source: str = "torch", seed: int = 0, dtype: str = "float64") -> "Twins":
        return cls(cfg, suite.init_canonical(cfg, source, seed), dtype)

    def generate(self, src: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
        """(torch tokens, jax tokens) as numpy."""
        kw = {"bos_id": BOS, "eos_id": EOS, **kw}
        tokens_t = torch_tx.generate(self.torch, torch.from_numpy(src).long(), **kw).numpy()
        tokens_j = np.asarray(jax_tx.generate(self.flax, self.params, jnp.asarray(src, jnp.int32), **kw))
        return tokens_t, tokens_j


def _rel(got, ref) -> float:
    return suite.errors(np.asarray(got), np.asarray(ref))[1]


def _sources(cfg: TransformerConfig, rng: np.random.Generator, batch: int = 3, length: int = 6) -> np.ndarray:
    lengths = rng.integers(1, length + 1, size=batch)  # [B]
    ids = rng.integers(1, cfg.src_vocab_size, size=(batch, length))  # [B, S]
    return np.where(np.arange(length)[None, :] < lengths[:, None], ids, cfg.pad_id).astype(np.int64)


# ------------------------------------------------------------------------------------------ the KV cache

@settings(max_examples=8)
@given(data=st.data(), cfg=configs(), seed=st.integers(0, 2**31 - 1))
def test_cached_decoding_equals_the_full_forward_pass(data, cfg, seed):
    """Feeding the target in chunks through the cache gives the full pass's logits (float64 <= 1e-10), in both
    twins, and the Flax twin's cached logits equal the torch twin's full pass."""
    batch = data.draw(inputs(cfg, allow_empty_source=False))
    twins = Twins.random(cfg, data.draw(st.sampled_from(suite.TWINS)), seed)
    t_len = batch.tgt.shape[1]
    cuts = sorted(data.draw(st.sets(st.integers(1, t_len - 1), max_size=3)) if t_len > 1 else [])
    chunks = list(zip([0, *cuts], [*cuts, t_len]))

    src, tgt = torch.from_numpy(batch.src), torch.from_numpy(batch.tgt)
    src_mask, tgt_mask = torch.from_numpy(batch.src_mask), torch.from_numpy(batch.tgt_mask)
    full = twins.torch(src, tgt, src_mask, tgt_mask).detach().numpy()  # [B, T, V]
    cache = twins.torch.init_cache(twins.torch.encode(src, src_mask), src_mask, length=cfg.max_len)
    steps_t = []
    for a, b in chunks:
        logits, cache = twins.torch.decode(tgt[:, a:b], None, tgt_mask=tgt_mask[:, a:b], cache=cache)  # [B, b-a, V]
        steps_t.append(logits.detach().numpy())
    assert cache["index"] == t_len

    fm = twins.flax

    @jax.jit
    def cached(params, src, src_mask, tgt, tgt_mask):  # one compiled program, as in generate
        variables = {"params": params}
        memory = fm.apply(variables, src, src_mask, method=fm.encode)  # [B, S, D]
        jcache = fm.apply(variables, memory, src_mask, cfg.max_len, method=fm.init_cache)
        steps = []
        for a, b in chunks:
            logits, jcache = fm.apply(variables, tgt[:, a:b], None, None, tgt_mask[:, a:b], jcache,
                                      method=fm.decode)  # [B, b-a, V]
            steps.append(logits)
        return jnp.concatenate(steps, 1), jcache["index"]  # [B, T, V]

    jsrc, jsrc_mask, jtgt, jtgt_mask = (jnp.asarray(a) for a in (batch.src, batch.src_mask, batch.tgt, batch.tgt_mask))
    steps_j, index = cached(twins.params, jsrc, jsrc_mask, jtgt, jtgt_mask)
    assert int(index) == t_len
    full_j = np.asarray(jax.jit(fm.apply)({"params": twins.params}, jsrc, jtgt, jsrc_mask, jtgt_mask))  # [B, T, V]
    steps_j = np.asarray(steps_j)

    assert _rel(np.concatenate(steps_t, 1), full) <= 1e-10
    assert _rel(steps_j, full_j) <= 1e-10
    assert _rel(steps_j, full) <= 1e-10


def test_init_cache_layout_and_cross_attention_computed_once():
    cfg = TransformerConfig(11, 13, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, d_ff=16,
                            dropout=0.0, max_len=10)
    twins = Twins.random(cfg)
    src = torch.tensor([[4, 5, 6, 0]])
    memory = twins.torch.encode(src, src != 0)  # [1, 4, 8]
    cache = twins.torch.init_cache(memory, src != 0, length=5)
    assert cache["index"] == 0 and cache["tgt_mask"].shape == (1, 5) and cache["src_mask"].tolist() == [[1, 1, 1, 0]]
    assert len(cache["layers"]) == 2
    layer = cache["layers"][0]
    assert layer["self_k"].shape == (1, 2, 5, 4) and layer["cross_k"].shape == (1, 2, 4, 4)
    k, v = twins.torch.decoder.layers[0].cross_attn.project_kv(memory)
    assert torch.equal(layer["cross_k"], k) and torch.equal(layer["cross_v"], v)
    calls = []
    hook = twins.torch.decoder.layers[0].cross_attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    for token in (BOS, 7, 8):
        _, cache = twins.torch.decode(torch.tensor([[token]]), None, cache=cache)
    hook.remove()
    assert calls == [] and cache["index"] == 3
    assert cache["tgt_mask"].tolist() == [[True, True, True, False, False]]


def test_jax_cache_is_a_pure_pytree():
    cfg = TransformerConfig(11, 13, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=16,
                            dropout=0.0, max_len=10)
    twins = Twins.random(cfg)
    fm, variables = twins.flax, {"params": twins.params}
    src = jnp.asarray([[4, 5, 6]])
    cache = fm.apply(variables, fm.apply(variables, src, method=fm.encode), method=fm.init_cache)
    before = jax.tree.map(np.array, cache)
    logits_a, after = fm.apply(variables, jnp.asarray([[BOS]]), None, cache=cache, method=fm.decode)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, cache))
    logits_b, _ = fm.apply(variables, jnp.asarray([[BOS]]), None, cache=cache, method=fm.decode)
    np.testing.assert_array_equal(np.asarray(logits_a), np.asarray(logits_b))
    assert int(after["index"]) == 1 and jax.tree.structure(after) == jax.tree.structure(cache)


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_cache_misuse_is_a_clear_error(twin):
    cfg = TransformerConfig(11, 13, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=16,
                            dropout=0.0, max_len=10)
    twins = Twins.random(cfg)
    if twin == "torch":
        m = twins.torch
        memory = m.encode(torch.tensor([[4, 5]]))

        def init(length):
            return m.init_cache(memory, length=length)

        def decode(tgt, cache, mem=None):
            return m.decode(torch.tensor(tgt), mem, cache=cache)
    else:
        fm, variables = twins.flax, {"params": twins.params}
        memory = fm.apply(variables, jnp.asarray([[4, 5]]), method=fm.encode)

        def init(length):
            return fm.apply(variables, memory, None, length, method=fm.init_cache)

        def decode(tgt, cache, mem=None):
            return fm.apply(variables, jnp.asarray(tgt), mem, cache=cache, method=fm.decode)
    with pytest.raises(ValueError, match="cache length must be in"):
        init(11)
    cache = init(2)
    with pytest.raises(ValueError, match="pass memory=None"):
        decode([[BOS]], cache, memory)
    with pytest.raises(ValueError, match="batch size 2, the cache 1"):
        decode([[BOS], [BOS]], cache)
    _, cache = decode([[BOS, 5]], cache)
    with pytest.raises(ValueError, match="the cache holds 2 positions and 2 are used"):
        decode([[6]], cache)


# ----------------------------------------------------------------------------------- greedy and beams

@settings(max_examples=10)
@given(cfg=configs(), source=st.sampled_from(suite.TWINS), seed=st.integers(0, 2**31 - 1),
       beam_size=st.sampled_from([1, 2, 3]), alpha=st.sampled_from([0.0, 0.6, 1.5]), eos=st.integers(2, 6))
def test_greedy_and_beam_tokens_match_across_twins(cfg, source, seed, beam_size, alpha, eos):
    twins = Twins.random(cfg, source, seed)
    src = _sources(cfg, np.random.default_rng(seed))
    tokens_t, tokens_j = twins.generate(src, max_new_tokens=8, beam_size=beam_size, length_penalty=alpha, eos_id=eos)
    np.testing.assert_array_equal(tokens_t, tokens_j)
    ended = tokens_t == eos  # [B, n]
    after_eos = np.cumsum(ended, 1) - ended > 0  # [B, n]: positions after the first EOS
    assert (tokens_t[after_eos] == cfg.pad_id).all()
    if tokens_t.shape[1] < 8:  # the loop stopped early only because every row had finished
        assert ended.any(1).all()


@settings(max_examples=12)
@given(cfg=configs(), source=st.sampled_from(suite.TWINS), seed=st.integers(0, 2**31 - 1),
       beam_size=st.sampled_from([1, 2, 3]), alpha=st.sampled_from([0.0, 1.0, 2.0]), eos=st.integers(2, 6),
       forced_eos=st.booleans(), rule=st.sampled_from(["hf", "ctranslate2"]))
def test_pooled_beam_rules_and_forced_eos_match_across_twins(cfg, source, seed, beam_size, alpha, eos, forced_eos,
                                                            rule):
    """beam_rule "hf" (transformers' scoring, pool and stopping) and "ctranslate2" (CTranslate2's), with or without
    forced_eos, give the same tokens in both twins; with forced_eos every row that runs to max_new_tokens ends in
    EOS."""
    twins = Twins.random(cfg, source, seed)
    src = _sources(cfg, np.random.default_rng(seed))
    kw = dict(max_new_tokens=6, beam_size=beam_size, length_penalty=alpha, eos_id=eos, forced_eos=forced_eos)
    tokens_t, tokens_j = twins.generate(src, beam_rule=rule, **kw)
    np.testing.assert_array_equal(tokens_t, tokens_j)
    if forced_eos:
        assert tokens_t.shape[1] <= 6 and (tokens_t == eos).any(1).all()


def test_forced_eos_by_hand(small_twins):
    """Greedy: forced_eos changes only the last step: the first max_new_tokens - 1 tokens are the unforced
    search's, and the last is EOS in every row that had not ended (pad in those that had). (In a beam search the
    forced EOS, scoring 0, can also let a longer hypothesis overtake one that ended early.)"""
    src = np.array([[3, 4, 5, 6], [7, 8, 0, 0], [4, 4, 4, 0]])
    pad = small_twins.cfg.pad_id
    for steps in (2, 4, 7):
        free = small_twins.generate(src, max_new_tokens=steps)
        forced = small_twins.generate(src, max_new_tokens=steps, forced_eos=True)
        for got, unforced in zip(forced, free):
            unforced = np.pad(unforced, ((0, 0), (0, steps - unforced.shape[1])), constant_values=pad)
            unforced = unforced[:, :steps - 1]  # [B, steps - 1]
            ended = (unforced == EOS).any(1)  # [B]
            expected = np.concatenate([unforced, np.where(ended, pad, EOS)[:, None]], 1)  # [B, steps]
            np.testing.assert_array_equal(np.pad(got, ((0, 0), (0, steps - got.shape[1])), constant_values=pad),
                                          expected)
    assert (expected[:, -1] == EOS).any() and ended.any()  # both kinds of row, at 7 steps


def _greedy_by_prefix_recomputation(model: torch_tx.Transformer, src: torch.Tensor, steps: int,
                                    eos_id: int) -> np.ndarray:
    """The textbook loop: re-run the decoder on the whole prefix at every step (its padding mask derived from
    the pad id), no cache, and take the argmax over every id but pad and BOS."""
    src_mask = src != model.cfg.pad_id
    memory = model.encode(src, src_mask)
    out, banned = torch.full((src.shape[0], 1), BOS), sorted({model.cfg.pad_id, BOS} - {eos_id})
    for _ in range(steps):
        logits = model.decode(out, memory, src_mask)[:, -1].detach()  # [B, V]
        logits[:, banned] = -torch.inf
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)  # [B, t + 1]
    return out[:, 1:].numpy()


@pytest.fixture(scope="module")
def trained():
    cfg, weights = load_checkpoint(TINY_RUN)
    tokenizer = Tokenizer.load(TINY_RUN)
    from parity.data import load_corpus

    pairs = load_corpus("builtin").test[:48]
    encoded = [np.append(ids, tokenizer.eos_id) for ids in tokenizer.encode([p[0] for p in pairs])]
    src = np.zeros((len(encoded), 32), dtype=np.int64)
    for row, ids in enumerate(encoded):
        src[row, :len(ids)] = ids
    return Twins(cfg, weights, "float32"), tokenizer, src, [p[1] for p in pairs]


@pytest.mark.parametrize("beam_size", [1, 4])
def test_trained_checkpoint_float32_same_tokens_in_both_twins(trained, beam_size):
    twins, tokenizer, src, references = trained
    tokens_t, tokens_j = twins.generate(src, max_new_tokens=48, beam_size=beam_size, eos_id=tokenizer.eos_id)
    np.testing.assert_array_equal(tokens_t, tokens_j)
    assert tokens_t.shape[1] < 48  # every sentence ended: the loop stopped early
    for row in tokens_t:
        ended = np.flatnonzero(row == tokenizer.eos_id)
        assert ended.size and (row[ended[0] + 1:] == tokenizer.pad_id).all()
    hypotheses = [tokenizer.decode(row) for row in tokens_t]
    assert np.mean([h == r for h, r in zip(hypotheses, references)]) >= 0.9


def test_cached_greedy_equals_prefix_recomputation_on_the_trained_checkpoint(trained):
    twins, tokenizer, src, _ = trained
    tokens = torch_tx.generate(twins.torch, torch.from_numpy(src), max_new_tokens=48, bos_id=BOS,
                               eos_id=tokenizer.eos_id).numpy()
    reference = _greedy_by_prefix_recomputation(twins.torch, torch.from_numpy(src), tokens.shape[1], tokenizer.eos_id)
    for row, ref in zip(tokens, reference):
        end = np.flatnonzero(ref == tokenizer.eos_id)
        stop = end[0] + 1 if end.size else len(ref)
        np.testing.assert_array_equal(row[:stop], ref[:stop])
        assert (row[stop:] == tokenizer.pad_id).all()


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("seed", range(6))
def test_beam_search_finds_the_exhaustive_optimum(seed, alpha):
    """Vocabulary 6 with pad 0 and BOS 1 forbidden, 3 new tokens: with 18 beams nothing is pruned (at most
    9 live hypotheses x 4 allowed tokens = 2 x 18 extensions a step), so beam search must return the best
    finished hypothesis of all 1 + 3 + 9 made of allowed tokens and ending in EOS (score log p under the
    model, not renormalised, / ((5 + len) / 6) ** alpha)."""
    cfg = TransformerConfig(9, 6, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=32,
                            dropout=0.0, max_len=8)
    twins = Twins.random(cfg, "torch", seed)
    twins.torch.generator.weight.data *= 8.0  # peakier distributions: EOS is sometimes likely, sometimes not
    twins.torch.generator.bias.data[[cfg.pad_id, BOS]] += 4.0  # the unrestricted optimum often holds pad or BOS
    twins = Twins(cfg, {k: v.numpy() for k, v in twins.torch.state_dict().items()})
    src = np.array([[3, 4, 5, 6]])
    memory = twins.torch.encode(torch.from_numpy(src))
    best, best_score = None, -np.inf
    for length in (1, 2, 3):
        for body in itertools.product([t for t in range(6) if t not in (cfg.pad_id, BOS, EOS)], repeat=length - 1):
            seq = [*body, EOS]
            tgt = torch.tensor([[BOS, *seq[:-1]]])
            logp = torch.log_softmax(twins.torch.decode(tgt, memory, tgt_mask=torch.ones_like(tgt, dtype=torch.bool)), -1)
            score = float(logp[0, torch.arange(length), torch.tensor(seq)].sum().detach()) / length_penalty(length, alpha)
            if score > best_score:
                best, best_score = seq, score
    tokens_t, tokens_j = twins.generate(src, max_new_tokens=3, beam_size=18, length_penalty=alpha)
    assert tokens_t[0, :len(best)].tolist() == best and (tokens_t[0, len(best):] == cfg.pad_id).all()
    np.testing.assert_array_equal(tokens_t, tokens_j)


def test_top_k_breaks_ties_by_the_lower_index_as_lax_top_k():
    floor = np.finfo(np.float32).min
    x = np.array([[0.0, -1.0, 0.0, 2.0, -0.0, floor, floor], [floor, floor, floor, -3.0, floor, -3.0, 5.0]], np.float32)
    for dtype in (torch.float32, torch.float64):  # the int64-key topk, and the stable sort
        values, indices = torch_tx.decoding._top_k(torch.from_numpy(x).to(dtype), 5)
        assert indices.tolist() == [[3, 0, 2, 4, 1], [6, 3, 5, 0, 1]]
        assert values.tolist() == x[np.arange(2)[:, None], indices.numpy()].tolist()
    jax_values, jax_indices = jax.lax.top_k(jnp.asarray(x), 5)
    assert np.asarray(jax_indices).tolist() == [[3, 0, 2, 4, 1], [6, 3, 5, 0, 1]]


@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 4, 8]))
@settings(max_examples=30)
def test_top_k_equals_a_stable_sort_on_tie_heavy_rows(seed, k):
    rng = np.random.default_rng(seed)
    levels = np.array([0.0, -0.0, -1.5, 3.0, -1e9, np.finfo(np.float32).min], np.float32)
    x = torch.from_numpy(rng.choice(levels, size=(3, 40)) + rng.choice([0, 0, 0, 1e-3], size=(3, 40)).astype(np.float32))
    values, indices = torch_tx.decoding._top_k(x, k)
    ref_values, ref_indices = x.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(indices, ref_indices[:, :k]) and torch.equal(values, ref_values[:, :k])


@torch.no_grad()
def test_beams_share_their_sources_cross_attention_cache():
    """The beam cache keeps B sources' cross keys for B*G rows: the same logits as the keys repeated per row."""
    cfg = TransformerConfig(11, 13, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, d_ff=16,
                            dropout=0.0, max_len=10)
    twins = Twins.random(cfg)
    src = np.array([[4, 5, 6, 0], [7, 8, 0, 0]])
    steps = (np.full((6, 1), BOS), np.arange(3, 9)[:, None])  # 3 hypotheses per source

    def repeat_all(cache, repeat):
        return {**cache, "src_mask": repeat(cache["src_mask"]), "tgt_mask": repeat(cache["tgt_mask"]),
                "layers": [{name: repeat(x) for name, x in layer.items()} for layer in cache["layers"]]}

    memory = twins.torch.encode(torch.from_numpy(src), torch.from_numpy(src != 0))  # [2, 4, 8]
    shared = twins.torch.init_cache(memory, torch.from_numpy(src != 0), length=3)
    repeat_t = lambda x: x.repeat_interleave(3, 0)  # noqa: E731
    repeated = repeat_all(shared, repeat_t)
    shared = torch_tx.decoding._map_cache(shared, repeat_t)
    memory_j = twins.flax.apply({"params": twins.params}, jnp.asarray(src), jnp.asarray(src != 0),
                                method=jax_tx.Transformer.encode)  # [2, 4, 8]
    shared_j = twins.flax.apply({"params": twins.params}, memory_j, jnp.asarray(src != 0), 3,
                                method=jax_tx.Transformer.init_cache)
    repeat_j = lambda x: jnp.repeat(x, 3, axis=0)  # noqa: E731
    repeated_j = repeat_all(shared_j, repeat_j)
    shared_j = jax_tx.decoding._map_cache(shared_j, repeat_j)
    for step in steps:
        a, shared = twins.torch.decode(torch.from_numpy(step), None, cache=shared)  # [6, 1, V]
        b, repeated = twins.torch.decode(torch.from_numpy(step), None, cache=repeated)
        a_j, shared_j = twins.flax.apply({"params": twins.params}, jnp.asarray(step), None, cache=shared_j,
                                         method=jax_tx.Transformer.decode)
        b_j, repeated_j = twins.flax.apply({"params": twins.params}, jnp.asarray(step), None, cache=repeated_j,
                                           method=jax_tx.Transformer.decode)
        assert _rel(a, b) <= 1e-12 and _rel(a_j, b_j) <= 1e-12 and _rel(a_j, a) <= 1e-10  # float64
    assert shared["layers"][0]["cross_k"].shape[0] == shared_j["layers"][0]["cross_k"].shape[0] == 2
    assert shared["layers"][0]["self_k"].shape[0] == shared_j["layers"][0]["self_k"].shape[0] == 6


# --------------------------------------------------------------------------------------------- sampling

def test_filter_logits_by_hand():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    for filter_logits, convert in ((torch_tx.decoding.filter_logits, torch.from_numpy),
                                   (jax_tx.decoding.filter_logits, jnp.asarray)):
        def kept(top_k, top_p):
            out = np.asarray(filter_logits(convert(logits), top_k, top_p))
            return (out > np.finfo(out.dtype).min).astype(int)[0].tolist()

        assert kept(0, 1.0) == [1, 1, 1, 1]
        assert kept(2, 1.0) == [1, 1, 0, 0]
        assert kept(0, 0.5) == [1, 0, 0, 0]
        assert kept(0, 0.51) == [1, 1, 0, 0]
        assert kept(0, 0.9) == [1, 1, 1, 0]
        assert kept(3, 0.6) == [1, 1, 0, 0]
        assert kept(1, 1e-9) == [1, 0, 0, 0]


@given(seed=st.integers(0, 2**31 - 1), top_k=st.sampled_from([0, 1, 3, 7]), top_p=st.sampled_from([1.0, 0.9, 0.3]))
def test_filter_logits_match_across_twins(seed, top_k, top_p):
    logits = np.random.default_rng(seed).standard_normal((4, 13)) * 3  # [B, V]
    out_t = torch_tx.decoding.filter_logits(torch.from_numpy(logits), top_k, top_p).numpy()
    out_j = np.asarray(jax_tx.decoding.filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(out_t, out_j)


@pytest.fixture(scope="module")
def small_twins():
    cfg = TransformerConfig(11, 9, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=32,
                            dropout=0.0, max_len=12)
    return Twins.random(cfg, "torch", 7)


def test_sampling_is_reproducible_from_the_seed(small_twins):
    src = _sources(small_twins.cfg, np.random.default_rng(0), batch=4)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0)
    t1, j1 = small_twins.generate(src, seed=5, **kw)
    t2, j2 = small_twins.generate(src, seed=5, **kw)
    t3, j3 = small_twins.generate(src, seed=6, **kw)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(j1, j2)
    assert not np.array_equal(t1, t3) and not np.array_equal(j1, j3)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-9), dict(temperature=1e-4)], ids=str)
def test_sampling_that_can_only_pick_the_argmax_is_greedy(small_twins, kw):
    src = _sources(small_twins.cfg, np.random.default_rng(1), batch=4)
    greedy_t, greedy_j = small_twins.generate(src, max_new_tokens=10)
    sampled_t, sampled_j = small_twins.generate(src, max_new_tokens=10, seed=3, **{"temperature": 1.0, **kw})
    np.testing.assert_array_equal(sampled_t, greedy_t)
    np.testing.assert_array_equal(sampled_j, greedy_j)


def test_sampled_first_tokens_follow_the_model_distribution(small_twins):
    """2,000 draws of the first token (temperature 2, top-k 4) against the softmax over the 4 most likely ids
    other than pad and BOS."""
    twins, n = small_twins, 2000
    src = np.tile(np.array([[3, 4, 5, 6]]), (n, 1))
    memory = twins.torch.encode(torch.from_numpy(src[:1]))
    logits = twins.torch.decode(torch.tensor([[BOS]]), memory)[0, -1].detach().numpy() / 2.0  # [V]
    logits[[twins.cfg.pad_id, BOS]] = -np.inf
    kept = np.argsort(logits)[-4:]  # the top 4 of the allowed ids
    weights = np.exp(logits[kept] - logits[kept].max())  # [4]
    expected = np.zeros_like(logits)  # [V]
    expected[kept] = weights / weights.sum()
    for tokens in small_twins.generate(src, max_new_tokens=1, temperature=2.0, top_k=4, seed=0):
        observed = np.bincount(tokens[:, 0], minlength=twins.cfg.tgt_vocab_size) / n
        assert (observed[expected == 0] == 0).all()
        assert np.abs(observed - expected).max() < 0.04  # 4 standard errors at p = 0.5


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kw,message", [
    (dict(beam_size=0), "beam_size must be at least 1"),
    (dict(max_new_tokens=0), r"max_new_tokens must be in \[1, max_len=12\]"),
    (dict(max_new_tokens=13), r"max_new_tokens must be in \[1, max_len=12\]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(length_penalty=-0.5), "length_penalty must be a finite number >= 0"),
    (dict(beam_size=2, temperature=0.5), "beam search is deterministic"),
    (dict(eos_id=9), r"eos_id must be a target token id in \[0, 9\)"),
    (dict(beam_size=2.0), "beam_size must be an int"),
    (dict(beam_size=2, beam_rule="fairseq"), "beam_rule must be one of twin, hf, ctranslate2, got 'fairseq'"),
    (dict(forced_eos=1), "forced_eos must be a bool, got 1"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_bad_arguments_are_clear_errors(small_twins, twin, kw, message):
    src = np.array([[3, 4]])
    args = {"max_new_tokens": 5, "bos_id": BOS, "eos_id": EOS, **kw}
    with pytest.raises(ValueError, match=message):
        if twin == "torch":
            torch_tx.generate(small_twins.torch, torch.from_numpy(src), **args)
        else:
            jax_tx.generate(small_twins.flax, small_twins.params, jnp.asarray(src), **args)


@pytest.mark.parametrize("twin", ["torch", "jax"])
@pytest.mark.parametrize("src,message", [
    (np.full((1, 13), 3), "sequence length 13 exceeds max_len 12"),
    (np.array([[3, 11]]), r"token ids must be in \[0, 11\)"),
    (np.array([3, 4]), r"must have shape \(B, L\)"),
])
def test_bad_sources_are_clear_errors(small_twins, twin, src, message):
    args = {"max_new_tokens": 5, "bos_id": BOS, "eos_id": EOS}
    with pytest.raises(ValueError, match=message):
        if twin == "torch":
            torch_tx.generate(small_twins.torch, torch.from_numpy(src), **args)
        else:
            jax_tx.generate(small_twins.flax, small_twins.params, jnp.asarray(src), **args)


def test_generate_restores_training_mode(small_twins):
    small_twins.torch.train()
    torch_tx.generate(small_twins.torch, torch.tensor([[3, 4]]), max_new_tokens=2, bos_id=BOS, eos_id=EOS)
    assert small_twins.torch.training
    small_twins.torch.eval()


def test_cross_attention_weights_match_across_twins(small_twins):
    src = _sources(small_twins.cfg, np.random.default_rng(2), batch=3)
    tgt = np.array([[BOS, 3, 4], [BOS, 5, 5], [BOS, 6, 7]])
    w_t = torch_tx.decoding.cross_attention_weights(small_twins.torch, torch.from_numpy(src), torch.from_numpy(tgt))
    w_j = jax_tx.decoding.cross_attention_weights(small_twins.flax, small_twins.params, jnp.asarray(src),
                                                  jnp.asarray(tgt))
    assert w_t.shape == (1, 3, 2, 3, src.shape[1])
    assert _rel(np.asarray(w_j), w_t.numpy()) <= 1e-10
    np.testing.assert_allclose(w_t.sum(-1).numpy(), 1.0, rtol=1e-12)  # float64 softmax rows: a few ulps off 1
    padded = np.broadcast_to((src == 0)[None, :, None, None, :], w_t.shape)
    assert (w_t.numpy()[padded] == 0).all()
