"""Decoding with the KV cache (torch twin): greedy, sampling (temperature, top-k, top-p), beam search.

Mirrors `jax_tx/decoding.py` name for name. The encoder runs once; every step feeds one token per
sequence through `Transformer.decode(..., cache=cache)`. Greedy and beam search give the same tokens
as the Flax twin on converted weights; sampling is reproducible from `seed` within this framework.
"""

from __future__ import annotations

import math

import torch

from parity.decoding import NEG_INF, check_generate_args, length_penalty
from torch_tx.masks import padding_mask
from torch_tx.model import Transformer


@torch.no_grad()
def generate(model: Transformer, src: torch.Tensor, *, max_new_tokens: int, bos_id: int, eos_id: int,
             beam_size: int = 1, length_penalty: float = 0.6, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, src_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Output ids (B, n <= max_new_tokens) for src (B, S), without BOS, pad after EOS.

    beam_size 1 and temperature 0: greedy. temperature > 0: sampling from softmax(logits / temperature)
    restricted to the top_k tokens (0: all) and to the smallest set whose probability reaches top_p.
    beam_size > 1: beam search, hypotheses scored by summed log-probabilities / ((5 + len) / 6) ** length_penalty.
    n is the number of steps taken: decoding stops once every sequence has finished (or, for beams, once
    no live hypothesis can beat the finished ones).
    """
    check_generate_args(model.cfg, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, beam_size=beam_size,
                        length_penalty=length_penalty, temperature=temperature, top_k=top_k, top_p=top_p)
    was_training = model.training
    model.eval()
    try:
        src_pad = padding_mask(src, model.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        memory = model.encode(src, src_pad)  # [B, S, D]
        if beam_size > 1:
            return beam_search(model, memory, src_pad, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id,
                               beam_size=beam_size, alpha=length_penalty)
        generator = None
        if temperature > 0.0:
            generator = torch.Generator(device=src.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        return sample(model, memory, src_pad, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id,
                      temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
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


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature == 0.0:
        return logits.argmax(-1)  # [B]
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # [B]


def sample(model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor, *, max_new_tokens: int, bos_id: int,
           eos_id: int, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Greedy or sampled tokens (B, n) for memory (B, S, D), one cached decoder step per token."""
    b, pad_id = memory.shape[0], model.cfg.pad_id
    cache = model.init_cache(memory, src_mask, max_new_tokens)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=memory.device)  # [B, N]
    token = torch.full((b, 1), bos_id, dtype=torch.long, device=memory.device)  # [B, 1]
    fed = torch.ones(b, 1, dtype=torch.bool, device=memory.device)  # [B, 1]
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)  # [B]
    steps = 0
    while steps < max_new_tokens and not bool(done.all()):
        logits, cache = model.decode(token, None, tgt_mask=fed, cache=cache)  # [B, 1, V]
        chosen = next_token(_at_least_float32(logits[:, -1]), temperature, top_k, top_p, generator)  # [B]
        chosen = chosen.masked_fill(done, pad_id)  # [B]
        out[:, steps] = chosen
        done |= chosen == eos_id
        token, steps = chosen[:, None], steps + 1  # [B, 1]
    return out[:, :steps]  # [B, n]


def beam_search(model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor, *, max_new_tokens: int,
                bos_id: int, eos_id: int, beam_size: int, alpha: float) -> torch.Tensor:
    """The best hypothesis (B, n) of a beam search over memory (B, S, D).

    Each step extends the K live hypotheses by every token, keeps the 2K best by summed log-probability,
    moves those ending in EOS into a separate pool of K finished ones (scored with the length penalty),
    and keeps the K best others live. It stops when every row's worst finished score beats the best
    score its live hypotheses could still reach (alpha >= 0: log-probabilities only fall, the penalty
    only grows up to max_new_tokens), or after max_new_tokens. Rows without a finished hypothesis
    return their best live one.
    """
    b, k, n, pad_id = memory.shape[0], beam_size, max_new_tokens, model.cfg.pad_id
    device, vocab = memory.device, model.cfg.tgt_vocab_size
    cache = _map_cache(model.init_cache(memory, src_mask, n), lambda x: x.repeat_interleave(k, 0), self_only=False)
    dtype = torch.promote_types(memory.dtype, torch.float32)
    live_tokens = torch.full((b, k, n), pad_id, dtype=torch.long, device=device)  # [B, K, N]
    live_logp = torch.full((b, k), NEG_INF, dtype=dtype, device=device)  # [B, K]
    live_logp[:, 0] = 0.0
    fin_tokens = torch.full((b, k, n), pad_id, dtype=torch.long, device=device)  # [B, K, N]
    fin_scores = torch.full((b, k), NEG_INF, dtype=dtype, device=device)  # [B, K]
    token = torch.full((b * k, 1), bos_id, dtype=torch.long, device=device)  # [B*K, 1]
    fed = torch.ones(b * k, 1, dtype=torch.bool, device=device)  # [B*K, 1]
    first_row = torch.arange(b, device=device)[:, None] * k  # [B, 1]
    steps, finished = 0, False
    while steps < n and not finished:
        logits, cache = model.decode(token, None, tgt_mask=fed, cache=cache)  # [B*K, 1, V]
        logp = torch.log_softmax(_at_least_float32(logits[:, -1]), -1).view(b, k, vocab)  # [B, K, V]
        top_logp, top_index = _top_k((live_logp[:, :, None] + logp).view(b, k * vocab), 2 * k)  # [B, 2K]
        parent, chosen = top_index // vocab, top_index % vocab  # [B, 2K]
        seqs = live_tokens.gather(1, parent[:, :, None].expand(-1, -1, n)).clone()  # [B, 2K, N]
        seqs[:, :, steps] = chosen
        ended = chosen == eos_id  # [B, 2K]
        scores = torch.cat([fin_scores, torch.where(ended, top_logp / length_penalty(steps + 1, alpha),
                                                    NEG_INF)], 1)  # [B, 3K]
        fin_scores, pick = _top_k(scores, k)  # [B, K]
        fin_tokens = torch.cat([fin_tokens, seqs], 1).gather(1, pick[:, :, None].expand(-1, -1, n))  # [B, K, N]
        live_logp, pick = _top_k(torch.where(ended, NEG_INF, top_logp), k)  # [B, K]
        live_tokens = seqs.gather(1, pick[:, :, None].expand(-1, -1, n))  # [B, K, N]
        rows = (first_row + parent.gather(1, pick)).view(-1)  # [B*K]
        cache = _map_cache(cache, lambda x: x.index_select(0, rows), self_only=True)
        token = chosen.gather(1, pick).view(b * k, 1)  # [B*K, 1]
        steps += 1
        finished = bool((fin_scores[:, -1] > live_logp[:, 0] / length_penalty(n, alpha)).all())
    has_finished = (fin_scores[:, 0] > NEG_INF / 2)[:, None]  # [B, 1]
    return torch.where(has_finished, fin_tokens[:, 0], live_tokens[:, 0])[:, :steps]  # [B, n]


@torch.no_grad()
def cross_attention_weights(model: Transformer, src: torch.Tensor, tgt: torch.Tensor,
                            src_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-attention weights (num_decoder_layers, B, H, T, S) of the teacher-forced pass of src (B, S), tgt (B, T)."""
    model.eval()
    captured: dict[str, list[torch.Tensor]] = {"q": [], "k": []}
    hooks = [proj.register_forward_hook(lambda _m, _i, out, key=key: captured[key].append(out))
             for layer in model.decoder.layers
             for key, proj in (("q", layer.cross_attn.q_proj), ("k", layer.cross_attn.k_proj))]
    try:
        src_pad = padding_mask(src, model.cfg.pad_id, src_mask, "src_mask")  # [B, S]
        model(src, tgt, src_pad, torch.ones_like(tgt, dtype=torch.bool))
    finally:
        for hook in hooks:
            hook.remove()
    heads = model.cfg.num_heads
    weights = []
    for q, k in zip(captured["q"], captured["k"]):
        q = q.view(*q.shape[:2], heads, -1).transpose(1, 2)  # [B, H, T, K]
        k = k.view(*k.shape[:2], heads, -1).transpose(1, 2)  # [B, H, S, K]
        logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
            ~src_pad[:, None, None, :], torch.finfo(q.dtype).min)  # [B, H, T, S]
        weights.append(logits.softmax(-1) * src_pad.any(-1)[:, None, None, None])  # [B, H, T, S]
    return torch.stack(weights)  # [L, B, H, T, S]


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of x (B, M) and their indices (B, k); ties go to the lower index, as in jax.lax.top_k."""
    values, indices = x.sort(dim=-1, descending=True, stable=True)  # [B, M]
    return values[:, :k], indices[:, :k]  # [B, k]


def _map_cache(cache: dict, fn, self_only: bool) -> dict:
    """Apply fn to the cache's per-sequence tensors: all of them, or (self_only) those a beam reorder changes."""
    shared = () if self_only else ("cross_k", "cross_v")
    return {**cache, "tgt_mask": fn(cache["tgt_mask"]), "src_mask": cache["src_mask"] if self_only else
            fn(cache["src_mask"]), "layers": [{name: fn(x) if name in ("self_k", "self_v") + shared else x
                                               for name, x in layer.items()} for layer in cache["layers"]]}
