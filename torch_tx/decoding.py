"""Decoding with the KV cache (torch twin): greedy, sampling (temperature, top-k, top-p), beam search.

Mirrors `jax_tx/decoding.py` name for name. The encoder runs once; every step feeds one token per
sequence through `Transformer.decode(..., cache=cache)`. A DecoderOnly reads BOS + the prompt in one
cached call, then one token per step. No search ever emits the pad id or BOS (`forbidden_ids`): their
scores are floored inside the search (`forbid`). Greedy and beam search give the same tokens as the Flax
twin on converted weights; sampling is reproducible from `seed` within this framework.
"""

from __future__ import annotations

import math

import torch

from parity.decoding import NEG_INF, check_generate_args, check_prompt, forbidden_ids, length_penalty
from torch_tx.embeddings import ids_checked
from torch_tx.masks import padding_mask
from torch_tx.model import DecoderOnly, Transformer


@torch.no_grad()
def generate(model: Transformer | DecoderOnly, src: torch.Tensor, *, max_new_tokens: int, bos_id: int, eos_id: int,
             beam_size: int = 1, length_penalty: float = 0.6, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, src_mask: torch.Tensor | None = None,
             beam_rule: str = "twin", forced_eos: bool = False) -> torch.Tensor:
    """Output ids (B, n <= max_new_tokens) for src (B, S), without BOS, pad after EOS.

    No search emits the config's pad_id or bos_id (unless it is eos_id): `parity.decoding.forbidden_ids`.
    beam_size 1 and temperature 0: greedy, the argmax over the other ids. temperature > 0: sampling from
    softmax(logits / temperature) renormalised over the other ids, then restricted to the top_k tokens (0: all)
    and to the smallest set whose probability reaches top_p. beam_size > 1: beam search, hypotheses scored by
    their summed log-probabilities under the model / ((5 + len) / 6) ** length_penalty, or with
    beam_rule="hf" as transformers' `generate(num_beams=...)` scores, keeps and stops (`BEAM_RULES`).
    forced_eos: the last step (new token max_new_tokens) can only be EOS, as transformers' forced_eos_token_id.
    n is the number of steps taken: decoding stops once every sequence has finished (or, for beams, once
    no live hypothesis can beat the finished ones).

    A DecoderOnly continues src, the prompt (B, P), right-padded (src_mask: its padding mask; P may be 0):
    each row reads BOS + its real prompt tokens at positions 0.., and the output is the continuation alone.
    P + max_new_tokens must be <= max_len (BOS, the prompt and every new token but the last are read);
    beam_size > 1 raises ValueError (greedy or sampling only).
    """
    check_generate_args(model.cfg, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, beam_size=beam_size,
                        length_penalty=length_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
                        beam_rule=beam_rule, forced_eos=forced_eos)
    if isinstance(model, DecoderOnly):
        check_prompt(model.cfg, tuple(src.shape), max_new_tokens=max_new_tokens, beam_size=beam_size)
    was_training = model.training
    model.eval()
    try:
        src_pad = padding_mask(src, model.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        generator = None
        if temperature > 0.0:
            generator = torch.Generator(device=src.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        if isinstance(model, DecoderOnly):
            return sample_continuation(model, src, src_pad, max_new_tokens=max_new_tokens, bos_id=bos_id,
                                       eos_id=eos_id, temperature=temperature, top_k=top_k, top_p=top_p,
                                       generator=generator, forced_eos=forced_eos)
        memory = model.encode(src, src_pad)  # [B, S, D]
        if beam_size > 1:
            return beam_search(model, memory, src_pad, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id,
                               beam_size=beam_size, alpha=length_penalty, rule=beam_rule, forced_eos=forced_eos)
        return sample(model, memory, src_pad, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id,
                      temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, forced_eos=forced_eos)
    finally:
        model.train(was_training)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (B, V) with every token outside the top_k (0: none) and outside the nucleus top_p set to the
    dtype's most negative value. The nucleus is the smallest set of most likely tokens whose probability
    reaches top_p (ties at its edge are kept)."""
    floor = torch.finfo(logits.dtype).min
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, floor)  # [B, V]
    if top_p < 1.0:
        ranked = logits.sort(dim=-1, descending=True).values  # [B, V]
        probs = ranked.softmax(-1)  # [B, V]
        kept = ((probs.cumsum(-1) - probs) < top_p).sum(-1, keepdim=True)  # [B, 1], at least 1
        logits = logits.masked_fill(logits < ranked.gather(-1, kept - 1), floor)  # [B, V]
    return logits


def forbid(scores: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """scores (B, V) (logits or log-probabilities) with the entries of `ids` set to the dtype's most negative
    value, the floor of filter_logits: finite, like the masks, below every other score (a dead beam's too),
    and exp(floor - max) is exactly 0, so a softmax renormalises over the other ids."""
    if not ids:
        return scores
    return scores.index_fill(-1, torch.tensor(ids, device=scores.device), torch.finfo(scores.dtype).min)  # [B, V]


def force_eos(scores: torch.Tensor, eos_id: int, forced) -> torch.Tensor:
    """scores (B, V) where `forced` (a bool: the last step of a forced_eos search): 0 at eos_id, every other entry
    floored as `forbid` floors (transformers' ForcedEOSTokenLogitsProcessor: the forced EOS adds nothing to a
    beam's score); unchanged elsewhere."""
    if not forced:
        return scores
    keep = torch.arange(scores.shape[-1], device=scores.device) == eos_id  # [V]
    return torch.full_like(scores, torch.finfo(scores.dtype).min).masked_fill(keep, 0.0)  # [B, V]


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None, forbidden: tuple[int, ...] = ()) -> torch.Tensor:
    """logits (B, V) -> token ids (B,), never one of `forbidden`: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) renormalised over the other ids and filtered (top_k, top_p) after that.
    The ban follows the division, so that a temperature below 1 cannot push the floor to -inf."""
    if temperature == 0.0:
        return forbid(logits, forbidden).argmax(-1)  # [B]
    probs = filter_logits(forbid(logits / temperature, forbidden), top_k, top_p).softmax(-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # [B]


def sample(model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor, *, max_new_tokens: int, bos_id: int,
           eos_id: int, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None, forced_eos: bool = False) -> torch.Tensor:
    """Greedy or sampled tokens (B, n) for memory (B, S, D), one cached decoder step per token."""
    b, device = memory.shape[0], memory.device
    fed = torch.ones(b, 1, dtype=torch.bool, device=device)  # [B, 1]

    def decode_step(token: torch.Tensor, cache: dict, steps: int) -> tuple[torch.Tensor, dict]:
        logits, cache = model.decode(token, None, tgt_mask=fed, cache=cache)  # [B, 1, V]
        return logits[:, -1], cache  # [B, V]

    out = torch.full((b, max_new_tokens), model.cfg.pad_id, dtype=torch.long, device=device)  # [B, N]
    token = torch.full((b, 1), bos_id, dtype=torch.long, device=device)  # [B, 1]
    done = torch.zeros(b, dtype=torch.bool, device=device)  # [B]
    cache = model.init_cache(memory, src_mask, max_new_tokens)
    choose = _chooser(temperature, top_k, top_p, generator, forbidden_ids(model.cfg, bos_id, eos_id),
                      max_new_tokens - 1 if forced_eos else None, eos_id)
    return _sample_loop(decode_step, choose, 0, out, token, cache, done, max_new_tokens=max_new_tokens,
                        eos_id=eos_id, pad_id=model.cfg.pad_id)


def sample_continuation(model: DecoderOnly, prompt: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                        bos_id: int, eos_id: int, temperature: float, top_k: int, top_p: float,
                        generator: torch.Generator | None, forced_eos: bool = False) -> torch.Tensor:
    """Greedy or sampled continuations (B, n) of prompt (B, P) with padding mask (B, P).

    One cached call reads BOS + the prompt (each row's real tokens at positions 0..; padding repeats the
    last position and is masked), then one step per token, each row at its own next position.
    """
    (b, p), device, pad_id = prompt.shape, prompt.device, model.cfg.pad_id
    block = torch.cat([prompt.new_full((b, 1), bos_id), prompt], 1)  # [B, 1 + P]
    block_mask = torch.cat([prompt_mask.new_ones(b, 1), prompt_mask], 1)  # [B, 1 + P]
    positions = block_mask.long().cumsum(1) - 1  # [B, 1 + P]
    cache = model.init_cache(b, p + max_new_tokens)
    logits, cache = model.decode(block, block_mask, cache, tgt_positions=positions)  # [B, 1 + P, V]
    last = positions.argmax(1)  # [B]: each row's last real token (padding repeats its position)
    logits = logits[torch.arange(b, device=device), last]  # [B, V]
    fed = torch.ones(b, 1, dtype=torch.bool, device=device)  # [B, 1]

    def decode_step(token: torch.Tensor, cache: dict, steps: int) -> tuple[torch.Tensor, dict]:
        logits, cache = model.decode(token, fed, cache, tgt_positions=positions[:, -1:] + steps)  # [B, 1, V]
        return logits[:, -1], cache  # [B, V]

    choose = _chooser(temperature, top_k, top_p, generator, forbidden_ids(model.cfg, bos_id, eos_id),
                      max_new_tokens - 1 if forced_eos else None, eos_id)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [B, N]
    out, token, done = _pick(choose, logits, 0, out, torch.zeros(b, dtype=torch.bool, device=device),
                             eos_id=eos_id, pad_id=pad_id)  # token [B, 1]
    return _sample_loop(decode_step, choose, 1, out, token, cache, done, max_new_tokens=max_new_tokens,
                        eos_id=eos_id, pad_id=pad_id)


def beam_search(model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor, *, max_new_tokens: int,
                bos_id: int, eos_id: int, beam_size: int, alpha: float, rule: str = "twin",
                forced_eos: bool = False) -> torch.Tensor:
    """The best hypothesis (B, n) of a beam search over memory (B, S, D).

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
    device, vocab = memory.device, model.cfg.tgt_vocab_size
    hf, ct2, pooled = rule == "hf", rule == "ctranslate2", rule != "twin"
    forbidden = forbidden_ids(model.cfg, bos_id, eos_id)
    cache = _map_cache(model.init_cache(memory, src_mask, n), lambda x: x.repeat_interleave(k, 0))  # cross: B rows
    dtype = torch.promote_types(memory.dtype, torch.float32)
    live_tokens = torch.full((b, k, n), pad_id, dtype=torch.long, device=device)  # [B, K, N]
    live_logp = torch.full((b, k), NEG_INF, dtype=dtype, device=device)  # [B, K]
    live_logp[:, 0] = 0.0
    fin_tokens = torch.full((b, k, n), pad_id, dtype=torch.long, device=device)  # [B, K, N]
    fin_scores = torch.full((b, k), NEG_INF, dtype=dtype, device=device)  # [B, K]
    token = torch.full((b * k, 1), bos_id, dtype=torch.long, device=device)  # [B*K, 1]
    fed = torch.ones(b * k, 1, dtype=torch.bool, device=device)  # [B*K, 1]
    first_row = torch.arange(b, device=device)[:, None] * k  # [B, 1]
    top_ranks = torch.arange(2 * k, device=device) < k  # [2K]: the K best of the 2K extensions
    done = torch.zeros(b, dtype=torch.bool, device=device)  # [B]: "hf"/"ctranslate2" rows whose pool is final
    count = torch.zeros(b, dtype=torch.long, device=device)  # [B]: hypotheses that joined the pool ("ctranslate2")
    steps, finished = 0, False
    while steps < n and not finished:
        with ids_checked():  # the tokens fed back are the search's own
            logits, cache = model.decode(token, None, tgt_mask=fed, cache=cache)  # [B*K, 1, V]
        logp = forbid(torch.log_softmax(_at_least_float32(logits[:, -1]), -1), forbidden)  # [B*K, V]
        logp = force_eos(logp, eos_id, forced_eos and steps == n - 1).view(b, k, vocab)  # [B, K, V]
        top_logp, top_index = _top_k((live_logp[:, :, None] + logp).view(b, k * vocab), 2 * k)  # [B, 2K]
        parent, chosen = top_index // vocab, top_index % vocab  # [B, 2K]
        seqs = live_tokens.gather(1, parent[:, :, None].expand(-1, -1, n)).clone()  # [B, 2K, N]
        seqs[:, :, steps] = chosen
        ended = chosen == eos_id  # [B, 2K]
        joins = (ended | (steps + 1 == n)) & top_ranks & ~done[:, None] if pooled else ended  # [B, 2K]
        scores = torch.cat([fin_scores, torch.where(joins, top_logp / length_penalty(steps + 1, alpha, rule),
                                                    NEG_INF)], 1)  # [B, 3K]
        fin_scores, pick = _top_k(scores, k)  # [B, K]
        fin_tokens = torch.cat([fin_tokens, seqs], 1).gather(1, pick[:, :, None].expand(-1, -1, n))  # [B, K, N]
        live_logp, pick = _top_k(torch.where(ended, NEG_INF, top_logp), k)  # [B, K]
        live_tokens = seqs.gather(1, pick[:, :, None].expand(-1, -1, n))  # [B, K, N]
        rows = (first_row + parent.gather(1, pick)).view(-1)  # [B*K]
        cache = _reorder_cache(cache, rows)
        token = chosen.gather(1, pick).view(b * k, 1)  # [B*K, 1]
        steps += 1
        dead = live_logp[:, 0] <= NEG_INF / 2  # [B]: no possible hypothesis is live (EOS was all that was left)
        if hf:
            done = done | ((fin_scores[:, -1] > NEG_INF / 2) &
                           (live_logp[:, 0] / length_penalty(steps, alpha, rule) <= fin_scores[:, -1]))  # [B]
            finished = bool((done | dead).all())
        elif ct2:
            count = count + joins.sum(1)  # [B]
            done = done | (joins[:, 0] if alpha == 0 else count >= k)  # [B]: alpha 0: CTranslate2's early exit
            finished = bool((done | dead).all())
        else:
            finished = bool(((fin_scores[:, -1] > live_logp[:, 0] / length_penalty(n, alpha)) | dead).all())
    has_finished = (fin_scores[:, 0] > NEG_INF / 2)[:, None]  # [B, 1]
    return torch.where(has_finished, fin_tokens[:, 0], live_tokens[:, 0])[:, :steps]  # [B, n]


@torch.no_grad()
def cross_attention_weights(model: Transformer, src: torch.Tensor, tgt: torch.Tensor,
                            src_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-attention weights (num_decoder_layers, B, H, T, S) of the teacher-forced pass of src (B, S), tgt (B, T)."""
    model.eval()
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(attn, args):
        captured.append((attn.project_q(args[0]), attn.project_kv(args[1])[0]))  # [B, H, T, K], [B, H, S, K]

    hooks = [layer.cross_attn.register_forward_pre_hook(capture) for layer in model.decoder.layers]
    try:
        src_pad = padding_mask(src, model.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        model(src, tgt, src_pad, torch.ones_like(tgt, dtype=torch.bool))
    finally:
        for hook in hooks:
            hook.remove()
    weights = []
    for q, k in captured:
        logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
            ~src_pad[:, None, None, :], torch.finfo(q.dtype).min)  # [B, H, T, S]
        weights.append(logits.softmax(-1) * src_pad.any(-1)[:, None, None, None])  # [B, H, T, S]
    return torch.stack(weights)  # [L, B, H, T, S]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _chooser(temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
             forbidden: tuple[int, ...], forced_step: int | None = None, eos_id: int = 0):
    """choose(logits (B, V), steps) -> the token ids (B,) of output column `steps` (next_token's rule); at column
    `forced_step` (None: none) only eos_id."""
    def choose(logits: torch.Tensor, steps: int) -> torch.Tensor:
        forced = False if forced_step is None else steps == forced_step
        return next_token(force_eos(_at_least_float32(logits), eos_id, forced), temperature, top_k, top_p,
                          generator, forbidden)

    return choose


def _pick(choose, logits: torch.Tensor, steps: int, out: torch.Tensor, done: torch.Tensor, *, eos_id: int,
          pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output column `steps` of out (B, N) chosen from logits (B, V) (pad in finished rows) -> (out, token (B, 1),
    done)."""
    chosen = choose(logits, steps).masked_fill(done, pad_id)  # [B]
    out[:, steps] = chosen
    return out, chosen[:, None], done | (chosen == eos_id)  # token [B, 1]


def _sample_loop(decode_step, choose, steps: int, out: torch.Tensor, token: torch.Tensor, cache: dict,
                 done: torch.Tensor, *, max_new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """From column `steps` on: decode_step(token (B, 1), cache, steps) -> (logits (B, V), cache), pick the next
    column, until max_new_tokens columns or every row has finished -> out[:, :n] (B, n)."""
    while steps < max_new_tokens and not bool(done.all()):
        with ids_checked():  # the tokens fed back are the search's own
            logits, cache = decode_step(token, cache, steps)  # [B, V]
        out, token, done = _pick(choose, logits, steps, out, done, eos_id=eos_id, pad_id=pad_id)  # token [B, 1]
        steps += 1
    return out[:, :steps]  # [B, n]


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of x (B, M) and their indices (B, k); ties go to the lower index, as in jax.lax.top_k.

    float32: one torch.topk over int64 keys that order by value, then by lower index (unique, so topk's
    unspecified tie order never matters); other dtypes: a stable sort, exact and slower."""
    if x.dtype != torch.float32:
        values, indices = x.sort(dim=-1, descending=True, stable=True)  # [B, M]
        return values[:, :k], indices[:, :k]  # [B, k]
    bits = (x + 0.0).view(torch.int32)  # [B, M]; + 0.0 makes -0.0 +0.0, which sorts as its equal
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # [B, M]: integer order = float order
    rank = torch.arange(x.shape[-1] - 1, -1, -1, device=x.device)  # [M]: the lower index wins a tie
    indices = (ordered * 2**32 + rank).topk(k, dim=-1).indices  # [B, k]
    return x.gather(-1, indices), indices  # [B, k]


def _reorder_cache(cache: dict, rows: torch.Tensor) -> dict:
    """The beam reorder: row i of every self-attention buffer and of tgt_mask becomes row rows[i] (B*K,), in place
    and only over the cache["index"] filled slots (the rest are unread, and rewritten before they are read)."""
    end = cache["index"]

    def take(x: torch.Tensor, axis: int) -> None:
        filled = x.narrow(axis, 0, end)  # [B*K, ..., end, ...]
        filled.copy_(filled.index_select(0, rows))

    take(cache["tgt_mask"], 1)
    for layer in cache["layers"]:
        take(layer["self_k"], 2)
        take(layer["self_v"], 2)
    return cache


def _map_cache(cache: dict, fn) -> dict:
    """Apply fn to the self-attention buffers and tgt_mask; the cross-attention keys and values of the B sources
    (and src_mask) stay as they are, shared by each source's hypotheses (`DecoderLayer`)."""
    return {**cache, "tgt_mask": fn(cache["tgt_mask"]),
            "layers": [{name: fn(x) if name in ("self_k", "self_v") else x for name, x in layer.items()}
                       for layer in cache["layers"]]}
