"""`generate` never emits the pad id or BOS before EOS (issue 18), in greedy, beam search and sampling, in both
twins and both families that decode, on float64 models whose output bias pushes pad and BOS to the top.

The rule (`parity.decoding.forbidden_ids`): {pad_id, bos_id} less {eos_id}. Inside the search their scores
are floored (`forbid`): greedy takes the argmax over the other ids, sampling draws from the softmax
renormalised over them (before top-k and top-p), beam search floors their log-probabilities. Then the
cached greedy output equals the argmax loop over plain full forward passes (whose padding masks come from
the pad id) token for token, and the torch and Flax twins give the same greedy and beam tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_tx
import torch_tx
from parity.config import TransformerConfig
from parity.convert import canonical_to_flax, to_torch
from parity.suite import init_canonical

TWINS = ("torch", "jax")
BIAS = 10.0
"""Added to the forbidden ids' output bias. Over 100 torch initializations of these configs one row of logits
spans at most 6.7, so the unrestricted argmax is pad or BOS at (nearly) every step."""

SPECIALS = {  # name: (config changes, bos_id, eos_id)
    "pad0-bos1-eos2": ({}, 1, 2),
    "pad3": (dict(pad_id=3), 1, 2),
    "marian-eos0-pad=bos=10": (dict(pad_id=10), 10, 0),  # Hugging Face Marian: decoder start = pad = last id
    "eos=pad=0": ({}, 1, 0),
}
MODES = {  # name: generate arguments
    "greedy": {},
    "beam": dict(beam_size=3),
    "sample": dict(temperature=1.0, seed=0),
    "sample-top-k-top-p": dict(temperature=0.7, top_k=3, top_p=0.9, seed=1),
}


def _banned(cfg: TransformerConfig, bos_id: int, eos_id: int) -> list[int]:
    """The forbidden ids, written out independently of the code under test."""
    return sorted({cfg.pad_id, bos_id} - {eos_id})


def _config(arch: str, vocab: int = 11, **changes) -> TransformerConfig:
    return TransformerConfig(vocab, vocab, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                             d_ff=32, dropout=0.0, max_len=12, arch=arch, **changes)


class Biased:
    """A float64 Transformer or DecoderOnly in both twins on the same weights (from `source`'s initializer), with
    `bias` added to the output bias of the forbidden ids."""

    def __init__(self, cfg: TransformerConfig, bos_id: int, eos_id: int, source: str, seed: int, bias: float = BIAS):
        self.cfg, self.bos, self.eos = cfg, bos_id, eos_id
        self.banned = _banned(cfg, bos_id, eos_id)
        weights = {k: np.asarray(v, np.float64) for k, v in init_canonical(cfg, source, seed).items()}
        weights["generator.bias"][self.banned] += bias
        self.torch = torch_tx.model_for(cfg).double().eval()
        self.torch.load_state_dict({k: to_torch(v) for k, v in weights.items()})
        self.flax = jax_tx.model_for(cfg)
        self.params = jax.tree.map(jnp.asarray, canonical_to_flax(weights, cfg))

    def generate(self, twin: str, src: np.ndarray, **kw) -> np.ndarray:
        kw = {"bos_id": self.bos, "eos_id": self.eos, **kw}
        if twin == "torch":
            return torch_tx.generate(self.torch, torch.from_numpy(src), **kw).numpy()
        return np.asarray(jax_tx.generate(self.flax, self.params, jnp.asarray(src), **kw))

    def full(self, twin: str, src: np.ndarray | None, tgt: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of the plain forward pass over tgt (B, T) = BOS + tokens, no cache: the padding masks
        come from the pad id, except that BOS (column 0) is attended where it is the pad id (Marian)."""
        tgt_mask = (tgt != self.cfg.pad_id) | (np.arange(tgt.shape[1]) == 0)  # [B, T]
        inputs = (tgt,) if src is None else (src, tgt)
        if twin == "torch":
            return self.torch(*(torch.from_numpy(a) for a in inputs),
                              tgt_mask=torch.from_numpy(tgt_mask)).detach().numpy()  # [B, T, V]
        return np.array(_flax_full(self.flax, self.params, tuple(jnp.asarray(a) for a in inputs),
                                   jnp.asarray(tgt_mask)))  # [B, T, V]


@functools.partial(jax.jit, static_argnums=0)
def _flax_full(module, params, inputs: tuple, tgt_mask: jnp.ndarray) -> jnp.ndarray:
    """The Flax twin's forward pass, compiled once per config and shapes (modules of equal configs are equal)."""
    return module.apply({"params": params}, *inputs, tgt_mask=tgt_mask)  # [B, T, V]


@functools.lru_cache(maxsize=None)
def biased(arch: str, special: str, source: str = "torch", seed: int = 0) -> Biased:
    changes, bos_id, eos_id = SPECIALS[special]
    return Biased(_config(arch, **changes), bos_id, eos_id, source, seed)


def _inputs(model: Biased, rng: np.random.Generator) -> np.ndarray:
    """Sources (3, 6) for a Transformer, prompts (3, 4) for a DecoderOnly: ordinary ids (no pad, BOS, EOS or
    0-2), right-padded with the pad id to lengths 6, 1, 3 (sources) or 4, 0, 2 (prompts)."""
    cfg = model.cfg
    ordinary = [i for i in range(cfg.tgt_vocab_size) if i not in {0, 1, 2, cfg.pad_id, model.bos, model.eos}]
    width, lengths = (4, [4, 0, 2]) if cfg.arch == "decoder" else (6, [6, 1, 3])
    ids = rng.choice(ordinary, size=(3, width))  # [B, W]
    return np.where(np.arange(width)[None, :] < np.asarray(lengths)[:, None], ids, cfg.pad_id)  # [B, W]


def _max_new_tokens(model: Biased) -> int:
    return 8 if model.cfg.arch == "decoder" else 10  # a DecoderOnly: prompt width 4 + 8 = max_len


def _assert_output_contract(model: Biased, tokens: np.ndarray) -> None:
    """No forbidden id before the first EOS; pad after it."""
    ended = tokens == model.eos  # [B, n]
    before = np.cumsum(ended, 1) - ended == 0  # [B, n]: up to and including the first EOS
    assert not np.isin(tokens[before], model.banned).any(), tokens
    assert (tokens[~before] == model.cfg.pad_id).all(), tokens


# ------------------------------------------------------------------------------------------ by hand

def test_forbidden_ids_by_hand():
    from parity.decoding import forbidden_ids

    cfg = _config("seq2seq")
    assert forbidden_ids(cfg, 1, 2) == (0, 1)
    assert forbidden_ids(cfg.replace(pad_id=3), 1, 2) == (1, 3)
    assert forbidden_ids(cfg.replace(pad_id=10), 10, 0) == (10,)  # Marian: BOS is pad, EOS is 0
    assert forbidden_ids(cfg, 1, 0) == (1,)  # EOS is the pad id: never forbidden
    assert forbidden_ids(cfg, 2, 2) == (0,)  # EOS is BOS
    assert forbidden_ids(cfg, 0, 0) == ()  # pad, BOS and EOS one id: nothing left to forbid


# Two rows of literal probabilities, pad 0 and BOS 1 forbidden. Row 0: the argmax is pad; over the rest, ids 2
# and 3 have probability 0.2 / 0.3 = 2/3 and 1/3 (temperature 0.5: 0.2^2 : 0.1^2 = 0.8 : 0.2). Row 1: the
# argmax is BOS, the best allowed id 3.
PROBS = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.1, 0.3]])
FORBIDDEN = (0, 1)


@pytest.mark.parametrize("twin", TWINS)
def test_forbid_and_next_token_by_hand(twin):
    decoding, convert = (torch_tx.decoding, torch.from_numpy) if twin == "torch" else (jax_tx.decoding, jnp.asarray)
    logits = np.log(PROBS)  # [2, 4]
    floor = np.finfo(np.float64).min
    floored = np.asarray(decoding.forbid(convert(logits), FORBIDDEN))  # [2, 4]
    np.testing.assert_array_equal(floored[:, :2], floor)  # finite, the floor filter_logits uses
    np.testing.assert_array_equal(floored[:, 2:], logits[:, 2:])
    np.testing.assert_array_equal(np.asarray(decoding.forbid(convert(logits), ())), logits)
    greedy = decoding.next_token(convert(logits), 0.0, 0, 1.0, None, FORBIDDEN)
    assert np.asarray(greedy).tolist() == [2, 3]
    assert np.asarray(decoding.next_token(convert(logits), 0.0, 0, 1.0, None)).tolist() == [0, 1]  # no ban

    def kept(top_k, top_p):  # the ids left after the ban, then top-k and top-p, in row 0
        out = np.asarray(decoding.filter_logits(decoding.forbid(convert(logits), FORBIDDEN), top_k, top_p))
        return (out > floor).astype(int)[0].tolist()

    assert kept(0, 1.0) == [0, 0, 1, 1]
    assert kept(1, 1.0) == [0, 0, 1, 0]
    assert kept(0, 0.6) == [0, 0, 1, 0]  # the nucleus of the renormalised 2/3, 1/3 (not of 0.4, 0.3: ids 0, 1)
    assert kept(0, 0.7) == [0, 0, 1, 1]


@pytest.mark.parametrize("temperature,expected", [(1.0, [0, 0, 2 / 3, 1 / 3]), (0.5, [0, 0, 0.8, 0.2])])
@pytest.mark.parametrize("twin", TWINS)
def test_sampling_literal_logits_follows_the_renormalised_softmax(twin, temperature, expected):
    """20,000 seeded draws from row 0 of PROBS: never pad or BOS, and each frequency within 4 standard errors
    at p = 0.5 (4 * sqrt(0.25 / 20000) = 0.014) of the probability renormalised over ids 2 and 3 by hand."""
    n = 20000
    logits = np.tile(np.log(PROBS[:1]), (n, 1))  # [n, 4]
    if twin == "torch":
        generator = torch.Generator().manual_seed(0)
        draws = torch_tx.decoding.next_token(torch.from_numpy(logits), temperature, 0, 1.0, generator, FORBIDDEN)
    else:
        draws = jax_tx.decoding.next_token(jnp.asarray(logits), temperature, 0, 1.0, jax.random.key(0), FORBIDDEN)
    observed = np.bincount(np.asarray(draws), minlength=4) / n
    assert observed[0] == observed[1] == 0
    assert np.abs(observed - expected).max() < 4 * np.sqrt(0.25 / n)


# ------------------------------------------------------------------------------------------ generate

SEARCHES = [(arch, special, mode) for arch in ("seq2seq", "decoder") for special in SPECIALS for mode in MODES
            if not (arch == "decoder" and mode == "beam")]


@settings(max_examples=2)
@given(source=st.sampled_from(TWINS), seed=st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("arch,special,mode", SEARCHES)
def test_no_search_emits_pad_or_bos_before_eos(arch, special, mode, source, seed):
    """Both twins, on models whose unrestricted argmax is pad or BOS: the output contract holds, and greedy and
    beam search give the same tokens in both twins."""
    model = biased(arch, special, source, seed)
    src = _inputs(model, np.random.default_rng(seed))
    kw = dict(max_new_tokens=_max_new_tokens(model), **MODES[mode])
    tokens = {twin: model.generate(twin, src, **kw) for twin in TWINS}
    for out in tokens.values():
        _assert_output_contract(model, out)
    if "temperature" not in kw:
        np.testing.assert_array_equal(tokens["torch"], tokens["jax"])


def _argmax_loop(model: Biased, twin: str, src: np.ndarray, steps: int) -> tuple[np.ndarray, int]:
    """The textbook greedy loop, no cache: the plain full forward pass over BOS + the tokens so far at every step
    (each prompt row alone, unpadded, for a DecoderOnly), the argmax over the ids not forbidden, pad after EOS
    -> (tokens (B, n), at how many steps the unrestricted argmax was forbidden)."""
    cfg, hits, rows = model.cfg, 0, []
    for row in src:
        prompt = [int(t) for t in row if t != cfg.pad_id] if cfg.arch == "decoder" else []
        seq, out = [model.bos, *prompt], []
        for _ in range(steps):
            logits = model.full(twin, None if cfg.arch == "decoder" else row[None], np.asarray([seq]))[0, -1]  # [V]
            hits += int(logits.argmax()) in model.banned
            logits[model.banned] = -np.inf
            out.append(int(logits.argmax()))
            seq.append(out[-1])
            if out[-1] == model.eos:
                break
        rows.append(out)
    n = max(len(r) for r in rows)
    return np.array([r + [cfg.pad_id] * (n - len(r)) for r in rows]), hits


@settings(max_examples=2)
@given(source=st.sampled_from(TWINS), seed=st.integers(0, 2**31 - 1))
@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("arch,special", [(arch, special) for arch in ("seq2seq", "decoder") for special in SPECIALS])
def test_cached_greedy_equals_the_argmax_loop_over_full_forward_passes(arch, special, twin, source, seed):
    """Token for token, in float64, in each twin: the output a caller re-reads with a full forward pass is
    the output the cache produced, because it holds no pad (which that pass would mask) before EOS."""
    model = biased(arch, special, source, seed)
    src = _inputs(model, np.random.default_rng(seed))
    tokens = model.generate(twin, src, max_new_tokens=_max_new_tokens(model))
    expected, hits = _argmax_loop(model, twin, src, _max_new_tokens(model))
    assert hits > 0  # the ban decided at least one step: the model favours pad and BOS
    np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("arch,kw", [("seq2seq", {}), ("seq2seq", dict(beam_size=4)),
                                     ("seq2seq", dict(temperature=1.0, seed=0)), ("decoder", {}),
                                     ("decoder", dict(temperature=1.0, top_k=2, seed=0))], ids=str)
@pytest.mark.parametrize("twin", TWINS)
def test_eos_is_all_that_is_left(twin, arch, kw):
    """Vocabulary pad 0, BOS 1, EOS 2, pad and BOS pushed up: every search returns EOS alone (beam search's 2K
    extensions then include forbidden ones, which rank below every other and are never returned)."""
    model = Biased(_config(arch, vocab=3), 1, 2, "torch", 0)
    src = np.zeros((2, 3), dtype=np.int64) if arch == "decoder" else np.array([[1, 2, 0], [2, 0, 0]])  # [2, 3]
    np.testing.assert_array_equal(model.generate(twin, src, max_new_tokens=5, **kw), [[2], [2]])


def _renormalised(logits: np.ndarray, banned: list[int], temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """By hand: softmax(logits / temperature) over the ids not banned, then the top_k most likely (0: all), then
    the smallest set of most likely ids whose probability reaches top_p, renormalised each time -> (V,)."""
    z = logits / temperature  # [V]
    z[banned] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")  # [V]
    if top_k:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    if top_p < 1.0:
        before = np.cumsum(p[order]) - p[order]  # [V]: the mass ranked above each id
        p[order[before >= top_p]] = 0.0
        p /= p.sum()
    return p


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=2),
                                dict(temperature=1.0, top_p=0.7)], ids=str)
@pytest.mark.parametrize("arch", ["seq2seq", "decoder"])
@pytest.mark.parametrize("twin", TWINS)
def test_sampling_renormalises_over_the_allowed_ids(twin, arch, kw):
    """Vocabulary 6 (pad 0, BOS 1, EOS 2, ids 3-5), pad and BOS holding most of the first step's mass: 4,000
    seeded draws of the first token never give pad or BOS, and each frequency is within 4 standard errors at
    p = 0.5 (4 * sqrt(0.25 / 4000) = 0.032) of the renormalised, filtered softmax computed by hand."""
    n = 4000
    model = Biased(_config(arch, vocab=6), 1, 2, "torch", 3, bias=3.0)
    src = np.tile(np.array([[3, 4]]), (n, 1))  # [n, 2]: one source (prompt) n times
    first = model.full(twin, None, np.array([[1, 3, 4]])) if arch == "decoder" else \
        model.full(twin, src[:1], np.array([[1]]))  # [1, T, V]
    logits = first[0, -1]  # [V]
    unrestricted = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()  # [V]
    assert unrestricted[[0, 1]].sum() > 0.5  # pad and BOS hold most of the mass
    expected = _renormalised(logits, [0, 1], kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0))
    tokens = model.generate(twin, src, max_new_tokens=1, seed=0, **kw)
    observed = np.bincount(tokens[:, 0], minlength=6) / n
    assert (observed[expected == 0] == 0).all()
    assert np.abs(observed - expected).max() < 4 * np.sqrt(0.25 / n)
