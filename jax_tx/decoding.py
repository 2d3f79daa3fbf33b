"""Decoding with the KV cache (Flax twin): greedy, sampling (temperature, top-k, top-p), beam search.

Mirrors `torch_tx/decoding.py` name for name. The encoder runs once; every step feeds one token per
sequence through `Transformer.decode(..., cache=cache)`, inside one jitted `lax.while_loop` with
static shapes that stops once every sequence has finished. A DecoderOnly reads BOS + the prompt in one
cached call before the loop. The cache is a pytree carried through the loop (nothing is mutated).
No search ever emits the pad id or BOS (`forbidden_ids`, static): their scores are floored inside the
search (`forbid`). Greedy and beam search give the same tokens as the torch twin on converted weights;
sampling is reproducible from `seed` (keys `fold_in(key, step)`) within this framework.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_tx.masks import padding_mask
from jax_tx.embeddings import check_token_ids
from jax_tx.model import DecoderOnly, Transformer, _check_ids
from parity.decoding import NEG_INF, check_generate_args, check_prompt, forbidden_ids, length_penalty


def generate(model: Transformer | DecoderOnly, params: Mapping[str, Any], src: jnp.ndarray, *, max_new_tokens: int,
             bos_id: int, eos_id: int, beam_size: int = 1, length_penalty: float = 0.6, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             src_mask: jnp.ndarray | None = None, beam_rule: str = "twin", forced_eos: bool = False) -> jnp.ndarray:
    """Output ids (B, n <= max_new_tokens) for src (B, S), without BOS, pad after EOS.

    No search emits the config's pad_id or bos_id (unless it is eos_id): `parity.decoding.forbidden_ids`.
    beam_size 1 and temperature 0: greedy, the argmax over the other ids. temperature > 0: sampling from
    softmax(logits / temperature) renormalised over the other ids, then restricted to the top_k tokens (0: all)
    and to the smallest set whose probability reaches top_p. beam_size > 1: beam search, hypotheses scored by
    their summed log-probabilities under the model / ((5 + len) / 6) ** length_penalty, or with
    beam_rule="hf" as transformers' `generate(num_beams=...)` scores, keeps and stops (`BEAM_RULES`).
    forced_eos: the last step (new token max_new_tokens) can only be EOS, as transformers' forced_eos_token_id.
    n is the number of steps taken: decoding stops once every sequence has finished (or, for beams, once
    no live hypothesis can beat the finished ones). `params` is the Flax params tree (or {"params": tree}).
    The loop is compiled once per (model, shapes, decoding arguments); pad S to a few lengths.

    A DecoderOnly continues src, the prompt (B, P), right-padded (src_mask: its padding mask; P may be 0):
    each row reads BOS + its real prompt tokens at positions 0.., and the output is the continuation alone.
    P + max_new_tokens must be <= max_len (BOS, the prompt and every new token but the last are read);
    beam_size > 1 raises ValueError (greedy or sampling only).
    """
    check_generate_args(model.cfg, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, beam_size=beam_size,
                        length_penalty=length_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
                        beam_rule=beam_rule, forced_eos=forced_eos)
    params = _params(params)
    src = jnp.asarray(src)
    if isinstance(model, DecoderOnly):
        check_prompt(model.cfg, tuple(src.shape), max_new_tokens=max_new_tokens, beam_size=beam_size)
        check_token_ids(src, model.cfg.tgt_vocab_size)
    else:
        _check_source(src, model.cfg.src_vocab_size, model.cfg.max_len)
    src_pad = padding_mask(src, model.cfg.pad_id, src_mask, "src_mask")  # [B, S]
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (1 << 63))
    tokens, steps = _generate(model, params, src, src_pad, jax.random.key(seed), max_new_tokens=max_new_tokens,
                              bos_id=bos_id, eos_id=eos_id, beam_size=beam_size, alpha=float(length_penalty),
                              temperature=float(temperature), top_k=top_k, top_p=float(top_p), beam_rule=beam_rule,
                              forced_eos=forced_eos)
    return tokens[:, :int(steps)]  # [B, n]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "bos_id", "eos_id", "beam_size", "alpha",
                                             "temperature", "top_k", "top_p", "beam_rule", "forced_eos"))
def _generate(model: Transformer | DecoderOnly, params, src: jnp.ndarray, src_mask: jnp.ndarray, key: jax.Array, *,
              max_new_tokens: int, bos_id: int, eos_id: int, beam_size: int, alpha: float, temperature: float,
              top_k: int, top_p: float, beam_rule: str, forced_eos: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    if isinstance(model, DecoderOnly):
        return sample_continuation(model, params, src, src_mask, max_new_tokens=max_new_tokens, bos_id=bos_id,
                                   eos_id=eos_id, temperature=temperature, top_k=top_k, top_p=top_p, key=key,
                                   forced_eos=forced_eos)
    memory = model.apply({"params": params}, src, src_mask, method=model.encode)  # [B, S, D]
    if beam_size > 1:
        return beam_search(model, params, memory, src_mask, max_new_tokens=max_new_tokens, bos_id=bos_id,
                           eos_id=eos_id, beam_size=beam_size, alpha=alpha, rule=beam_rule, forced_eos=forced_eos)
    return sample(model, params, memory, src_mask, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id,
                  temperature=temperature, top_k=top_k, top_p=top_p, key=key, forced_eos=forced_eos)


def filter_logits(logits: jnp.ndarray, top_k: int, top_p: float) -> jnp.ndarray:
    """logits (B, V) with every token outside the top_k (0: none) and outside the nucleus top_p set to the
    dtype's most negative value. The nucleus is the smallest set of most likely tokens whose probability
    reaches top_p (ties at its edge are kept)."""
    floor = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, floor, logits)  # [B, V]
    if top_p < 1.0:
        ranked = jnp.sort(logits, axis=-1, descending=True)  # [B, V]
        probs = jax.nn.softmax(ranked, -1)  # [B, V]
        kept = ((jnp.cumsum(probs, -1) - probs) < top_p).sum(-1, keepdims=True)  # [B, 1], at least 1
        logits = jnp.where(logits < jnp.take_along_axis(ranked, kept - 1, -1), floor, logits)  # [B, V]
    return logits


def forbid(scores: jnp.ndarray, ids: tuple[int, ...]) -> jnp.ndarray:
    """scores (B, V) (logits or log-probabilities) with the entries of `ids` set to the dtype's most negative
    value, the floor of filter_logits: finite, like the masks, below every other score (a dead beam's too),
    and exp(floor - max) is exactly 0, so a softmax renormalises over the other ids."""
    if not ids:
        return scores
    return scores.at[..., np.asarray(ids)].set(jnp.finfo(scores.dtype).min)  # [B, V]


def force_eos(scores: jnp.ndarray, eos_id: int, forced) -> jnp.ndarray:
    """scores (B, V) where `forced` (a bool, possibly traced: the last step of a forced_eos search): 0 at eos_id,
    every other entry floored as `forbid` floors (transformers' ForcedEOSTokenLogitsProcessor: the forced EOS
    adds nothing to a beam's score); unchanged elsewhere."""
    if forced is False:
        return scores
    keep = jnp.arange(scores.shape[-1]) == eos_id  # [V]
    forced_scores = jnp.where(keep, 0.0, jnp.finfo(scores.dtype).min).astype(scores.dtype)  # [V]
    return jnp.where(forced, forced_scores, scores)  # [B, V]


def next_token(logits: jnp.ndarray, temperature: float, top_k: int, top_p: float, key: jax.Array,
               forbidden: tuple[int, ...] = ()) -> jnp.ndarray:
    """logits (B, V) -> token ids (B,), never one of `forbidden`: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) renormalised over the other ids and filtered (top_k, top_p) after that.
    The ban follows the division, so that a temperature below 1 cannot push the floor to -inf."""
    if temperature == 0.0:
        return forbid(logits, forbidden).argmax(-1)  # [B]
    return jax.random.categorical(key, filter_logits(forbid(logits / temperature, forbidden), top_k, top_p),
                                  axis=-1)  # [B]


def sample(model: Transformer, params, memory: jnp.ndarray, src_mask: jnp.ndarray, *, max_new_tokens: int,
           bos_id: int, eos_id: int, temperature: float, top_k: int, top_p: float,
           key: jax.Array, forced_eos: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy or sampled tokens (B, N) for memory (B, S, D) and the number of steps taken n (columns after n: pad)."""
    b = memory.shape[0]
    fed = jnp.ones((b, 1), dtype=jnp.bool_)  # [B, 1]

    def decode_step(token: jnp.ndarray, cache: dict, steps: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
        logits, cache = model.apply({"params": params}, token, None, None, fed, cache, method=model.decode)  # [B, 1, V]
        return logits[:, -1], cache  # [B, V]

    out = jnp.full((b, max_new_tokens), model.cfg.pad_id, dtype=jnp.int32)  # [B, N]
    token = jnp.full((b, 1), bos_id, dtype=jnp.int32)  # [B, 1]
    done = jnp.zeros(b, dtype=jnp.bool_)  # [B]
    cache = model.apply({"params": params}, memory, src_mask, max_new_tokens, method=model.init_cache)
    choose = _chooser(temperature, top_k, top_p, key, forbidden_ids(model.cfg, bos_id, eos_id),
                      max_new_tokens - 1 if forced_eos else None, eos_id)
    return _sample_loop(decode_step, choose, jnp.int32(0), out, token, cache, done, max_new_tokens=max_new_tokens,
                        eos_id=eos_id, pad_id=model.cfg.pad_id)


def sample_continuation(model: DecoderOnly, params, prompt: jnp.ndarray, prompt_mask: jnp.ndarray, *,
                        max_new_tokens: int, bos_id: int, eos_id: int, temperature: float, top_k: int, top_p: float,
                        key: jax.Array, forced_eos: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy or sampled continuations (B, N) of prompt (B, P) with padding mask (B, P), and the steps taken n.

    One cached call reads BOS + the prompt (each row's real tokens at positions 0..; padding repeats the
    last position and is masked), then one step per token, each row at its own next position.
    """
    (b, p), pad_id = prompt.shape, model.cfg.pad_id
    block = jnp.concatenate([jnp.full((b, 1), bos_id, dtype=prompt.dtype), prompt], 1)  # [B, 1 + P]
    block_mask = jnp.concatenate([jnp.ones((b, 1), dtype=jnp.bool_), prompt_mask], 1)  # [B, 1 + P]
    positions = (jnp.cumsum(block_mask, 1) - 1).astype(jnp.int32)  # [B, 1 + P]
    cache = model.apply({"params": params}, b, p + max_new_tokens, method=model.init_cache)
    logits, cache = model.apply({"params": params}, block, block_mask, cache, method=model.decode,
                                tgt_positions=positions)  # [B, 1 + P, V]
    last = positions.argmax(1)  # [B]: each row's last real token (padding repeats its position)
    logits = jnp.take_along_axis(logits, last[:, None, None], 1)[:, 0]  # [B, V]
    fed = jnp.ones((b, 1), dtype=jnp.bool_)  # [B, 1]

    def decode_step(token: jnp.ndarray, cache: dict, steps: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
        logits, cache = model.apply({"params": params}, token, fed, cache, method=model.decode,
                                    tgt_positions=positions[:, -1:] + steps)  # [B, 1, V]
        return logits[:, -1], cache  # [B, V]

    choose = _chooser(temperature, top_k, top_p, key, forbidden_ids(model.cfg, bos_id, eos_id),
                      max_new_tokens - 1 if forced_eos else None, eos_id)
    out = jnp.full((b, max_new_tokens), pad_id, dtype=jnp.int32)  # [B, N]
    out, token, done = _pick(choose, logits, jnp.int32(0), out, jnp.zeros(b, dtype=jnp.bool_), eos_id=eos_id,
                             pad_id=pad_id)  # token [B, 1]
    return _sample_loop(decode_step, choose, jnp.int32(1), out, token, cache, done, max_new_tokens=max_new_tokens,
                        eos_id=eos_id, pad_id=pad_id)


def beam_search(model: Transformer, params, memory: jnp.ndarray, src_mask: jnp.ndarray, *, max_new_tokens: int,
                bos_id: int, eos_id: int, beam_size: int, alpha: float, rule: str = "twin",
                forced_eos: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The best hypothesis (B, N) of a beam search over memory (B, S, D) and the number of steps taken n.

    Each step extends the K live hypotheses by every token, keeps the 2K best by summed log-probability,
    moves those ending in EOS into a separate pool of K finished ones (scored with the length penalty),
    and keeps the K best others live. It stops when every row's worst finished score beats the best
    score its live hypotheses could still reach (alpha >= 0: log-probabilities only fall, the penalty
    only grows up to max_new_tokens) or no live hypothesis is possible (EOS was the only allowed token),
    or after max_new_tokens. Rows without a finished hypothesis return their best live one.
    The forbidden ids' log-probabilities are floored (not renormalised: a hypothesis scores its
    log-probability under the model, as in fairseq and Hugging Face), so every extension by an allowed
    token, a dead beam's included, outranks one by a forbidden token; EOS is allowed, so a forbidden
    token is never returned. rule="hf" scores, keeps and stops as transformers does, rule="ctranslate2" as
    CTranslate2 does (`parity.decoding.BEAM_RULES`);
    forced_eos: at the last step only EOS extends a hypothesis.
    """
    b, k, n, pad_id = memory.shape[0], beam_size, max_new_tokens, model.cfg.pad_id
    vocab = model.cfg.tgt_vocab_size
    hf, ct2, pooled = rule == "hf", rule == "ctranslate2", rule != "twin"
    forbidden = forbidden_ids(model.cfg, bos_id, eos_id)
    cache = model.apply({"params": params}, memory, src_mask, n, method=model.init_cache)
    cache = _map_cache(cache, lambda x: jnp.repeat(x, k, axis=0))  # cross: B rows
    dtype = jnp.promote_types(memory.dtype, jnp.float32)
    live_tokens = jnp.full((b, k, n), pad_id, dtype=jnp.int32)  # [B, K, N]
    live_logp = jnp.full((b, k), NEG_INF, dtype=dtype).at[:, 0].set(0.0)  # [B, K]
    fin_tokens = jnp.full((b, k, n), pad_id, dtype=jnp.int32)  # [B, K, N]
    fin_scores = jnp.full((b, k), NEG_INF, dtype=dtype)  # [B, K]
    token = jnp.full((b * k, 1), bos_id, dtype=jnp.int32)  # [B*K, 1]
    fed = jnp.ones((b * k, 1), dtype=jnp.bool_)  # [B*K, 1]
    first_row = jnp.arange(b)[:, None] * k  # [B, 1]
    top_ranks = jnp.arange(2 * k) < k  # [2K]: the K best of the 2K extensions
    done = jnp.zeros(b, dtype=jnp.bool_)  # [B]: "hf"/"ctranslate2" rows whose pool is final
    count = jnp.zeros(b, dtype=jnp.int32)  # [B]: hypotheses that joined the pool ("ctranslate2")

    def cond(carry):
        steps, *_, finished = carry
        return (steps < n) & ~finished

    def body(carry):
        steps, live_tokens, live_logp, fin_tokens, fin_scores, token, cache, done, count, _ = carry
        logits, cache = model.apply({"params": params}, token, None, None, fed, cache, method=model.decode)  # [B*K, 1, V]
        logp = forbid(jax.nn.log_softmax(_at_least_float32(logits[:, -1]), -1), forbidden)  # [B*K, V]
        logp = force_eos(logp, eos_id, forced_eos and steps == n - 1).reshape(b, k, vocab)  # [B, K, V]
        top_logp, top_index = jax.lax.top_k((live_logp[:, :, None] + logp).reshape(b, k * vocab), 2 * k)  # [B, 2K]
        parent, chosen = top_index // vocab, (top_index % vocab).astype(jnp.int32)  # [B, 2K]
        seqs = jnp.take_along_axis(live_tokens, parent[:, :, None], 1).at[:, :, steps].set(chosen)  # [B, 2K, N]
        ended = chosen == eos_id  # [B, 2K]
        joins = (ended | (steps + 1 == n)) & top_ranks & ~done[:, None] if pooled else ended  # [B, 2K]
        scores = jnp.concatenate([fin_scores, jnp.where(joins, top_logp / length_penalty(steps + 1, alpha, rule),
                                                        NEG_INF)], 1)  # [B, 3K]
        fin_scores, pick = jax.lax.top_k(scores, k)  # [B, K]
        fin_tokens = jnp.take_along_axis(jnp.concatenate([fin_tokens, seqs], 1), pick[:, :, None], 1)  # [B, K, N]
        live_logp, pick = jax.lax.top_k(jnp.where(ended, NEG_INF, top_logp), k)  # [B, K]
        live_tokens = jnp.take_along_axis(seqs, pick[:, :, None], 1)  # [B, K, N]
        rows = (first_row + jnp.take_along_axis(parent, pick, 1)).reshape(-1)  # [B*K]
        cache = _map_cache(cache, lambda x: jnp.take(x, rows, axis=0))
        token = jnp.take_along_axis(chosen, pick, 1).reshape(b * k, 1)  # [B*K, 1]
        dead = live_logp[:, 0] <= NEG_INF / 2  # [B]: no possible hypothesis is live (EOS was all that was left)
        if hf:
            done = done | ((fin_scores[:, -1] > NEG_INF / 2) &
                           (live_logp[:, 0] / length_penalty(steps + 1, alpha, rule) <= fin_scores[:, -1]))  # [B]
            finished = (done | dead).all()
        elif ct2:
            count = count + joins.sum(1, dtype=count.dtype)  # [B]
            done = done | (joins[:, 0] if alpha == 0 else count >= k)  # [B]: alpha 0: CTranslate2's early exit
            finished = (done | dead).all()
        else:
            finished = ((fin_scores[:, -1] > live_logp[:, 0] / length_penalty(n, alpha)) | dead).all()
        return steps + 1, live_tokens, live_logp, fin_tokens, fin_scores, token, cache, done, count, finished

    steps, live_tokens, _, fin_tokens, fin_scores, *_ = jax.lax.while_loop(
        cond, body, (jnp.int32(0), live_tokens, live_logp, fin_tokens, fin_scores, token, cache, done, count,
                     jnp.bool_(False)))
    has_finished = (fin_scores[:, 0] > NEG_INF / 2)[:, None]  # [B, 1]
    return jnp.where(has_finished, fin_tokens[:, 0], live_tokens[:, 0]), steps  # [B, N]


def cross_attention_weights(model: Transformer, params: Mapping[str, Any], src: jnp.ndarray, tgt: jnp.ndarray,
                            src_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Cross-attention weights (num_decoder_layers, B, H, T, S) of the teacher-forced pass of src (B, S), tgt (B, T)."""
    params = _params(params)
    src, tgt = jnp.asarray(src), jnp.asarray(tgt)
    src_pad = padding_mask(src, model.cfg.pad_id, src_mask, "src_mask")  # [B, S]
    _, state = model.apply({"params": params}, src, tgt, src_pad, jnp.ones(tgt.shape, dtype=jnp.bool_),
                           capture_intermediates=lambda mdl, method: mdl.name == "cross_attn" and method in (
                               "project_q", "project_kv"), mutable=["intermediates"])
    layers = state["intermediates"]["decoder"]
    weights = []
    for i in range(model.cfg.num_decoder_layers):
        captured = layers[f"layers_{i}"]["cross_attn"]
        q, (k, _) = captured["project_q"][0], captured["project_kv"][0]  # [B, H, T, K], [B, H, S, K]
        logits = jnp.where(src_pad[:, None, None, :], q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]),
                           jnp.finfo(q.dtype).min)  # [B, H, T, S]
        weights.append(jax.nn.softmax(logits, -1) * src_pad.any(-1)[:, None, None, None])  # [B, H, T, S]
    return jnp.stack(weights)  # [L, B, H, T, S]


def _at_least_float32(x: jnp.ndarray) -> jnp.ndarray:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _chooser(temperature: float, top_k: int, top_p: float, key: jax.Array, forbidden: tuple[int, ...],
             forced_step: int | None = None, eos_id: int = 0):
    """choose(logits (B, V), steps) -> the token ids (B,) of output column `steps` (next_token's rule, with the
    key fold_in(key, steps)); at column `forced_step` (None: none) only eos_id."""
    def choose(logits: jnp.ndarray, steps: jnp.ndarray) -> jnp.ndarray:
        forced = False if forced_step is None else steps == forced_step
        return next_token(force_eos(_at_least_float32(logits), eos_id, forced), temperature, top_k, top_p,
                          jax.random.fold_in(key, steps), forbidden)

    return choose


def _pick(choose, logits: jnp.ndarray, steps: jnp.ndarray, out: jnp.ndarray, done: jnp.ndarray, *, eos_id: int,
          pad_id: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Output column `steps` of out (B, N) chosen from logits (B, V) (pad in finished rows) -> (out, token (B, 1),
    done)."""
    chosen = jnp.where(done, pad_id, choose(logits, steps)).astype(jnp.int32)  # [B]
    return out.at[:, steps].set(chosen), chosen[:, None], done | (chosen == eos_id)  # token [B, 1]


def _sample_loop(decode_step, choose, steps: jnp.ndarray, out: jnp.ndarray, token: jnp.ndarray, cache: dict,
                 done: jnp.ndarray, *, max_new_tokens: int, eos_id: int,
                 pad_id: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """From column `steps` on: decode_step(token (B, 1), cache, steps) -> (logits (B, V), cache), pick the next
    column, until max_new_tokens columns or every row has finished -> (out (B, N), the steps taken n)."""
    def cond(carry):
        steps, _, _, _, done = carry
        return (steps < max_new_tokens) & ~done.all()

    def body(carry):
        steps, out, token, cache, done = carry
        logits, cache = decode_step(token, cache, steps)  # [B, V]
        out, token, done = _pick(choose, logits, steps, out, done, eos_id=eos_id, pad_id=pad_id)  # token [B, 1]
        return steps + 1, out, token, cache, done

    steps, out, _, _, _ = jax.lax.while_loop(cond, body, (steps, out, token, cache, done))
    return out, steps


def _check_source(src: jnp.ndarray, vocab_size: int, max_len: int) -> None:
    """The checks `Transformer.encode` makes on concrete ids (under jit they could not raise)."""
    _check_ids(src, "src")
    check_token_ids(src, vocab_size)
    if src.shape[1] > max_len:
        raise ValueError(f"sequence length {src.shape[1]} exceeds max_len {max_len}")


def _params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The params tree, from either it or the {"params": tree} variables."""
    return params["params"] if isinstance(params, Mapping) and set(params) == {"params"} else params


def _map_cache(cache: dict, fn) -> dict:
    """Apply fn to the self-attention buffers and tgt_mask; the cross-attention keys and values of the B sources
    (and src_mask) stay as they are, shared by each source's hypotheses (`DecoderLayer`)."""
    return {**cache, "tgt_mask": fn(cache["tgt_mask"]),
            "layers": [{name: fn(x) if name in ("self_k", "self_v") else x for name, x in layer.items()}
                       for layer in cache["layers"]]}
