"""DecoderOnly decoding: the KV cache with per-row prompt positions against the full forward pass, and
`generate` continuing prompts (greedy across the twins, each row as if alone, sampling, bad input).

Weights come from one twin's initializer and are converted into the other (float64). Configs come from
the small fixed set CONFIGS and prompts have few shapes, so that JAX compiles the decoding loop few times.
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
from parity.config import TransformerConfig
from parity.convert import flax_to_torch, torch_to_flax

BOS, EOS = 1, 2
_BASE = TransformerConfig(13, 13, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=32,
                          dropout=0.0, max_len=12, arch="decoder")
CONFIGS = (
    _BASE,
    _BASE.replace(num_decoder_layers=2, norm_first=True, activation="gelu", tie_output=True, layer_norm_eps=1e-6),
    _BASE.replace(final_norm=False, output_bias=False, pad_id=3),
)
P, N = 4, 8  # prompt width and max_new_tokens: P + N = max_len, the longest generation allowed


class Twins:
    """A DecoderOnly in both twins (float64), on weights from `source`'s initializer converted into the other."""

    def __init__(self, cfg: TransformerConfig, source: str = "torch", seed: int = 0):
        self.cfg = cfg
        self.flax = jax_tx.DecoderOnly(cfg)
        if source == "torch":
            torch.manual_seed(seed)
            self.torch = torch_tx.DecoderOnly(cfg).double().eval()
            self.params = torch_to_flax(self.torch.state_dict(), cfg)
        else:
            variables = self.flax.init(jax.random.key(seed), jnp.ones((1, 1), jnp.int32))
            self.params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
            self.torch = torch_tx.DecoderOnly(cfg).double().eval()
            self.torch.load_state_dict(flax_to_torch(self.params, cfg))

    def generate(self, twin: str, prompt: np.ndarray, src_mask: np.ndarray | None = None, **kw) -> np.ndarray:
        kw = {"max_new_tokens": N, "bos_id": BOS, "eos_id": EOS, **kw}
        if twin == "torch":
            mask = None if src_mask is None else torch.from_numpy(src_mask)
            return torch_tx.generate(self.torch, torch.from_numpy(prompt), src_mask=mask, **kw).numpy()
        mask = None if src_mask is None else jnp.asarray(src_mask)
        return np.asarray(jax_tx.generate(self.flax, self.params, jnp.asarray(prompt), src_mask=mask, **kw))

    def full(self, twin: str, tgt: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of the plain causal pass over tgt (B, T), no cache, no padding."""
        if twin == "torch":
            return self.torch(torch.from_numpy(tgt)).detach().numpy()
        return np.asarray(jax.jit(self.flax.apply)({"params": self.params}, jnp.asarray(tgt)))

    def cached(self, twin: str, chunks: list[np.ndarray], masks: list[np.ndarray],
               positions: list[np.ndarray | None]) -> np.ndarray:
        """Logits (B, sum T_i, V) of feeding the chunks (B, T_i) one after the other through one cache."""
        b, length = chunks[0].shape[0], sum(c.shape[1] for c in chunks)
        out = []
        if twin == "torch":
            cache = self.torch.init_cache(b, length)
            for tgt, mask, pos in zip(chunks, masks, positions):
                logits, cache = self.torch.decode(torch.from_numpy(tgt), torch.from_numpy(mask), cache,
                                                  tgt_positions=None if pos is None else torch.from_numpy(pos))
                out.append(logits.detach().numpy())
            assert cache["index"] == length
            return np.concatenate(out, 1)  # [B, sum T_i, V]
        fm = self.flax

        @jax.jit
        def run(params):  # one compiled program, as in generate
            cache = fm.apply({"params": params}, b, length, method=fm.init_cache)
            for tgt, mask, pos in zip(chunks, masks, positions):
                logits, cache = fm.apply({"params": params}, jnp.asarray(tgt), jnp.asarray(mask), cache,
                                         method=fm.decode, tgt_positions=None if pos is None else jnp.asarray(pos))
                out.append(logits)
            return jnp.concatenate(out, 1), cache["index"]  # [B, sum T_i, V]

        logits, index = run(self.params)
        assert int(index) == length
        return np.asarray(logits)


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref))


def _prompts(cfg: TransformerConfig, lengths, rng: np.random.Generator, width: int = P) -> np.ndarray:
    """Random prompts (B, width) of ids >= 4 (never pad, BOS or EOS), right-padded to the given lengths."""
    ids = rng.integers(4, cfg.tgt_vocab_size, size=(len(lengths), width))  # [B, P]
    return np.where(np.arange(width)[None, :] < np.asarray(lengths)[:, None], ids, cfg.pad_id)  # [B, P]


ROW_LENGTHS, ROW_PROMPT_SEED = [4, 0, 2], 13  # the prompts of test_each_row_continues_as_if_alone


def _covers(twins: Twins) -> bool:
    """Whether greedy decoding of ROW_LENGTHS' prompts exercises what test_each_row_continues_as_if_alone is
    about: row 0 runs to N tokens, rows 1 and 2 stop at EOS at different early steps, and at some step the
    model's unrestricted argmax is pad or BOS (which `generate` never emits). Read off the textbook loop."""
    prompt = _prompts(twins.cfg, ROW_LENGTHS, np.random.default_rng(ROW_PROMPT_SEED))
    runs = [_greedy_by_recomputation(twins.torch, prompt[row, :n].tolist(), N) for row, n in enumerate(ROW_LENGTHS)]
    (first, _), *rest = runs
    return (len(first) == N and all(len(t) < N and t[-1] == EOS for t, _ in rest)
            and len({len(t) for t, _ in rest}) == len(rest) and sum(hits for _, hits in runs) > 0)


@pytest.fixture(scope="module")
def twins() -> Twins:
    """The first initializer seed whose model covers the behaviour test_each_row_continues_as_if_alone checks
    (`_covers`); a search, so that a change of initializer picks another seed instead of silently weakening the
    test. Coverage only: the equalities below hold for any seed."""
    for seed in range(500):
        twins = Twins(CONFIGS[0], "torch", seed)
        if _covers(twins):
            return twins
    raise AssertionError("no seed in range(500) covers a full-length row, two early stops and a banned argmax")


# ------------------------------------------------------------------------------------------ the KV cache

@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_cached_chunks_equal_the_full_forward_pass(twin):
    """BOS + 7 tokens fed in chunks of 3, 1 and 4 (positions = the cache slots) give the full pass's logits."""
    twins = Twins(CONFIGS[1], "torch", 1)
    tgt = np.concatenate([np.full((2, 1), BOS), np.random.default_rng(0).integers(4, 13, (2, 7))], 1)  # [2, 8]
    chunks = [tgt[:, :3], tgt[:, 3:4], tgt[:, 4:]]
    cached = twins.cached(twin, chunks, [np.ones(c.shape, bool) for c in chunks], [None] * 3)
    assert _rel(cached, twins.full(twin, tgt)) <= 1e-10


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_padded_prompts_with_row_positions_equal_each_row_alone(twin):
    """BOS + prompts of lengths 4, 1, 0 right-padded to 4 in one cached call (padding masked, positions 0..len),
    then 3 tokens one at a time at each row's own next position: every row's logits at its real tokens equal
    the full pass over that row alone, unpadded."""
    twins = Twins(CONFIGS[2], "torch", 2)
    cfg, lengths = twins.cfg, [4, 1, 0]
    rng = np.random.default_rng(1)
    block = np.concatenate([np.full((3, 1), BOS), _prompts(cfg, lengths, rng)], 1)  # [3, 1 + P]
    block_mask = block != cfg.pad_id  # [3, 1 + P]
    positions = np.cumsum(block_mask, 1) - 1  # [3, 1 + P]
    fed = rng.integers(4, cfg.tgt_vocab_size, (3, 3))  # [3, 3]
    chunks = [block, *(fed[:, i:i + 1] for i in range(3))]
    masks = [block_mask, *(np.ones((3, 1), bool),) * 3]
    steps = [positions, *(np.asarray(lengths)[:, None] + 1 + i for i in range(3))]
    cached = twins.cached(twin, chunks, masks, steps)  # [3, 1 + P + 3, V]
    for row, length in enumerate(lengths):
        alone = np.concatenate([block[row, :1 + length], fed[row]])[None]  # [1, 1 + length + 3]
        real = [*range(1 + length), *range(1 + P, 1 + P + 3)]
        assert _rel(cached[row, real], twins.full(twin, alone)[0]) <= 1e-10


# ------------------------------------------------------------------------------------------ generate

@settings(max_examples=8)
@given(cfg=st.sampled_from(CONFIGS), source=st.sampled_from(["torch", "jax"]), seed=st.integers(0, 2**31 - 1),
       lengths=st.lists(st.integers(0, P), min_size=3, max_size=3))
def test_greedy_tokens_match_across_twins(cfg, source, seed, lengths):
    twins = Twins(cfg, source, seed)
    prompt = _prompts(cfg, lengths, np.random.default_rng(seed))
    tokens_t, tokens_j = twins.generate("torch", prompt), twins.generate("jax", prompt)
    np.testing.assert_array_equal(tokens_t, tokens_j)
    ended = tokens_t == EOS  # [B, n]
    assert (tokens_t[np.cumsum(ended, 1) - ended > 0] == cfg.pad_id).all()  # pad after the first EOS
    assert tokens_t.shape[1] == N or ended.any(1).all()  # an early stop only once every row has finished


def _greedy_by_recomputation(model: torch_tx.DecoderOnly, prompt: list[int], steps: int) -> tuple[list[int], int]:
    """The textbook loop on one unpadded row: the plain forward pass over the whole sequence at every step (its
    padding mask derived from the pad id), no cache, and the argmax over every id but pad and BOS -> (the new
    tokens, at how many steps the unrestricted argmax was pad or BOS)."""
    seq, banned, hits = [BOS, *prompt], sorted({model.cfg.pad_id, BOS} - {EOS}), 0
    for _ in range(steps):
        logits = model(torch.tensor([seq]))[0, -1].detach()  # [V]
        hits += int(logits.argmax()) in banned
        logits[banned] = -torch.inf
        seq.append(int(logits.argmax()))
        if seq[-1] == EOS:
            break
    return seq[1 + len(prompt):], hits


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_each_row_continues_as_if_alone(twins, twin):
    """Rows of prompt lengths 4, 0 (unconditional) and 2 give the tokens generating each row alone gives, and
    the textbook loop gives; an explicit src_mask overrides the ids in the padding."""
    cfg, lengths = twins.cfg, ROW_LENGTHS
    prompt = _prompts(cfg, lengths, np.random.default_rng(ROW_PROMPT_SEED))
    twins.torch.train()
    tokens = twins.generate(twin, prompt)
    assert twins.torch.training
    twins.torch.eval()
    alone = [twins.generate(twin, prompt[row:row + 1, :length])[0] for row, length in enumerate(lengths)]
    assert tokens.shape[1] == max(len(a) for a in alone)
    banned_argmax = 0
    for row, length in enumerate(lengths):
        expected, hits = _greedy_by_recomputation(twins.torch, prompt[row, :length].tolist(), N)
        banned_argmax += hits
        assert alone[row].tolist() == expected
        assert tokens[row].tolist() == expected + [cfg.pad_id] * (tokens.shape[1] - len(expected))
    assert banned_argmax > 0  # the ban changed the output here: the fixture's coverage
    assert len({tuple(a) for a in alone}) == len(lengths)  # the rows differ: the prompts matter
    assert len(alone[0]) == N and tokens.shape[1] == N  # row 0 reaches position P + N - 1 = max_len - 1
    assert all(len(a) < N and a[-1] == EOS for a in alone[1:])  # the others stop early, at different steps
    garbage = np.where(prompt == cfg.pad_id, 7, prompt)
    np.testing.assert_array_equal(twins.generate(twin, garbage, src_mask=prompt != cfg.pad_id), tokens)


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_sampling_is_reproducible_from_the_seed(twins, twin):
    prompt = _prompts(twins.cfg, [4, 1, 0], np.random.default_rng(4))
    kw = dict(temperature=1.0, top_k=6, top_p=0.9)
    first = twins.generate(twin, prompt, seed=5, **kw)
    np.testing.assert_array_equal(twins.generate(twin, prompt, seed=5, **kw), first)
    assert not np.array_equal(twins.generate(twin, prompt, seed=6, **kw), first)


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_top_k_1_sampling_is_greedy(twins, twin):
    prompt = _prompts(twins.cfg, [4, 1, 0], np.random.default_rng(5))
    np.testing.assert_array_equal(twins.generate(twin, prompt, temperature=1.0, top_k=1, seed=3),
                                  twins.generate(twin, prompt))


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("prompt,kw,error,message", [
    ([[4, 13]], {}, ValueError, r"token ids must be in \[0, 13\)"),
    ([[-1, 4]], {}, ValueError, r"token ids must be in \[0, 13\)"),
    ([[4.0, 5.0]], {}, TypeError, "token ids must be an integer"),
    ([[4] * 5], {}, ValueError, r"prompt length P=5 \+ max_new_tokens=8 exceeds max_len=12"),
    ([[4]], dict(max_new_tokens=12), ValueError, r"prompt length P=1 \+ max_new_tokens=12 exceeds max_len=12"),
    ([[4]], dict(max_new_tokens=13), ValueError, r"max_new_tokens must be in \[1, max_len=12\]"),
    ([[4, 5]], dict(beam_size=2), ValueError, "beam search is for the encoder-decoder Transformer"),
    ([4, 5], {}, ValueError, r"the prompt must have shape \(B, P\), got \(2,\)"),
    ([[[4, 5]]], {}, ValueError, r"the prompt must have shape \(B, P\), got \(1, 1, 2\)"),
    ([[4, 5]], dict(src_mask=np.ones((1, 3), bool)), ValueError, r"src_mask must have shape \(B, L\) = \(1, 2\)"),
    ([[4, 5]], dict(src_mask=np.ones((1, 2), int)), TypeError, "src_mask must be boolean"),
    ([[4, 5]], dict(bos_id=13), ValueError, r"bos_id must be a target token id in \[0, 13\)"),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_bad_input_is_a_clear_error(twins, twin, prompt, kw, error, message):
    with pytest.raises(error, match=message):
        twins.generate(twin, np.array(prompt), **kw)
