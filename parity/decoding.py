"""What both twins' `generate` share: argument checks, the ids it never emits and the beam-search length penalty
(framework-neutral)."""

from __future__ import annotations

import math
from typing import Mapping

from parity.config import TransformerConfig

NEG_INF = -1.0e9
"""Log-probability of an impossible hypothesis (a dead beam, an unfilled pool slot); finite, like the masks'."""


def forbidden_ids(cfg: TransformerConfig, bos_id: int, eos_id: int) -> tuple[int, ...]:
    """The ids `generate` never emits, sorted: pad_id and bos_id, less eos_id (EOS is never forbidden, even
    where a config makes it the pad or BOS id).

    "Pad after EOS" is the output contract, so a pad before EOS would make it ambiguous, and a full forward
    pass over the output would mask it as padding; BOS is read, never predicted. Both ids are in the target
    vocabulary (`check_generate_args` checks bos_id, the config pad_id), and EOS always remains to choose.
    """
    return tuple(sorted({cfg.pad_id, bos_id} - {eos_id}))


BEAM_RULES = ("twin", "hf", "ctranslate2")
"""Beam search's rules, the `beam_rule` of both twins' generate:
- "twin": the length penalty ((5 + len) / 6) ** alpha (Wu et al. 2016); any EOS among the 2K best extensions
  joins the finished pool; the search stops when no live hypothesis can still beat every finished one (an
  exact bound); a row with no finished hypothesis returns its best live one.
- "hf": transformers' `generate(num_beams=K)` with its default early_stopping=False: the penalty len ** alpha
  (its length_penalty, 1.0 by default); only EOS extensions ranked among the best K of the 2K join the pool; a
  row is done once its pool is full and its best live score divided by the penalty of its current length
  does not beat the worst finished one, and adds nothing after that; at max_new_tokens the best K extensions
  join the pool, EOS or not.
- "ctranslate2": CTranslate2 4.8's `translate_batch(beam_size=K, patience=1)` (src/decoding.cc BeamSearch): the
  penalty len ** alpha (its length_penalty), applied when a hypothesis is final; EOS extensions among the best K
  of the 2K join the pool, and at max_new_tokens the best K extensions, EOS or not; a row is done once K
  hypotheses have joined (with alpha 0 instead: once the best extension of a step joins), and returns the best
  of its pool."""


def hf_generation_options(config: Mapping, eos_id: int, where: str = "generation_config.json") -> dict:
    """The twins' `generate` options that decode as transformers' `generate` does under a generation config
    (a dict of generation_config.json; fields left out or None take transformers' defaults): beam_size
    (num_beams), length_penalty, beam_rule "hf", forced_eos (forced_eos_token_id == eos_id). ValueError,
    naming the field, for what the twins do not implement: early_stopping other than false, do_sample."""
    early = config.get("early_stopping")
    if early not in (None, False):
        raise ValueError(f"{where}: early_stopping {early!r}: the twins' beam_rule 'hf' is transformers' "
                         f"early_stopping=False")
    if config.get("do_sample"):
        raise ValueError(f"{where}: do_sample is true: sample with a temperature instead")
    beams, penalty = config.get("num_beams"), config.get("length_penalty")
    return {"beam_size": 1 if beams is None else int(beams), "length_penalty": 1.0 if penalty is None else
            float(penalty), "beam_rule": "hf", "forced_eos": config.get("forced_eos_token_id") == eos_id}


def length_penalty(length, alpha: float, rule: str = "twin"):
    """The divisor of a hypothesis' summed log-probability: ((5 + length) / 6) ** alpha (Wu et al. 2016) for
    the "twin" rule, length ** alpha (transformers, CTranslate2) for "hf" and "ctranslate2"; length counts the new
    tokens, EOS included."""
    if rule in ("hf", "ctranslate2"):
        return (0.0 + length) ** alpha
    return ((5.0 + length) / 6.0) ** alpha


def check_decoding_options(*, beam_size: int, length_penalty: float, temperature: float, top_k: int, top_p: float,
                           beam_rule: str = "twin", forced_eos: bool = False,
                           names: Mapping[str, str] | None = None) -> None:
    """Raise ValueError unless the search/sampling options make sense; `names` renames the arguments in the
    message (e.g. {"beam_size": "--beam"} for a command line)."""
    def name(arg: str) -> str:
        return (names or {}).get(arg, arg)

    for arg, value in (("beam_size", beam_size), ("top_k", top_k)):
        if not _is_int(value):
            raise ValueError(f"{name(arg)} must be an int, got {value!r}")
    if beam_size < 1:
        raise ValueError(f"{name('beam_size')} must be at least 1, got {beam_size}")
    if not (math.isfinite(length_penalty) and length_penalty >= 0.0):
        raise ValueError(f"{name('length_penalty')} must be a finite number >= 0, got {length_penalty}")
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"{name('temperature')} must be >= 0 and finite (0: greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"{name('top_k')} must be >= 0 (0: no top-k filter), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{name('top_p')} must be in (0, 1] (1: no nucleus filter), got {top_p}")
    if beam_rule not in BEAM_RULES:
        raise ValueError(f"{name('beam_rule')} must be one of {', '.join(BEAM_RULES)}, got {beam_rule!r}")
    if not isinstance(forced_eos, bool):
        raise ValueError(f"{name('forced_eos')} must be a bool, got {forced_eos!r}")
    if beam_size > 1 and temperature > 0.0:
        raise ValueError(f"beam search is deterministic: use {name('beam_size')} > 1 with {name('temperature')} 0, "
                         f"or sample with {name('beam_size')} 1")


def check_generate_args(cfg: TransformerConfig, *, max_new_tokens: int, bos_id: int, eos_id: int, beam_size: int,
                        length_penalty: float, temperature: float, top_k: int, top_p: float, beam_rule: str = "twin",
                        forced_eos: bool = False) -> None:
    """Raise ValueError, naming the argument, unless the decoding arguments make sense for `cfg`."""
    for name, value in (("max_new_tokens", max_new_tokens), ("bos_id", bos_id), ("eos_id", eos_id)):
        if not _is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 1 <= max_new_tokens <= cfg.max_len:
        raise ValueError(f"max_new_tokens must be in [1, max_len={cfg.max_len}], got {max_new_tokens}")
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if not 0 <= value < cfg.tgt_vocab_size:
            raise ValueError(f"{name} must be a target token id in [0, {cfg.tgt_vocab_size}), got {value}")
    check_decoding_options(beam_size=beam_size, length_penalty=length_penalty, temperature=temperature, top_k=top_k,
                           top_p=top_p, beam_rule=beam_rule, forced_eos=forced_eos)


def check_prompt(cfg: TransformerConfig, shape: tuple[int, ...], *, max_new_tokens: int, beam_size: int) -> None:
    """Raise ValueError unless a DecoderOnly can continue a prompt of `shape` (B, P) by max_new_tokens (checked
    by `check_generate_args` first): no beam search, and BOS + the prompt + every new token but the last
    (P + max_new_tokens positions) fit max_len."""
    if beam_size > 1:
        raise ValueError(f"beam search is for the encoder-decoder Transformer: a DecoderOnly generates greedily or "
                         f"samples (beam_size 1), got beam_size={beam_size}")
    if len(shape) != 2:
        raise ValueError(f"the prompt must have shape (B, P), got {shape}")
    if shape[1] + max_new_tokens > cfg.max_len:
        raise ValueError(f"prompt length P={shape[1]} + max_new_tokens={max_new_tokens} exceeds max_len={cfg.max_len}: "
                         f"the model reads BOS, the prompt and every new token but the last")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
