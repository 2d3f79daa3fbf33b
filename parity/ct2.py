"""CTranslate2 models written by `twin convert --to ctranslate2`, run beside the twins.

`CT2Model.load(path)` reads twin_config.json and CTranslate2's vocabularies and opens the family's CTranslate2
class: `ctranslate2.Translator` (seq2seq), `ctranslate2.Generator` (decoder) or `ctranslate2.Encoder` (encoder).
`generate(model, src, ...)` has the twins' `generate` signature and output contract (ids [B, n] without BOS,
pad after EOS, pad and BOS never emitted), so that the three decoders are interchangeable:

    torch_tx.generate(model, src, ...)   jax_tx.generate(model, params, src, ...)   parity.ct2.generate(model, src, ...)

Every CTranslate2 decoding argument is set explicitly (its defaults are beam_size 2, max_decoding_length 256,
min_decoding_length 1 and inputs truncated at 1024 tokens): beam_size, patience 1, num_hypotheses 1,
length_penalty, coverage_penalty 0, repetition_penalty 1, no_repeat_ngram_size 0, disable_unk False,
suppress_sequences = the pad and BOS tokens (`parity.decoding.forbidden_ids`), end_token = EOS with
return_end_token, max_input_length 0 (no truncation: the caller checks max_len), max_decoding_length =
max_new_tokens, min_decoding_length 0, sampling_topk 1 (greedy) or top_k (0: the whole vocabulary),
sampling_topp, sampling_temperature, and `ctranslate2.set_random_seed(seed)` before sampling. CTranslate2 seeds
its worker thread's generator once, so sampling repeats from the seed for the same sequence of calls on a freshly
loaded model (each `twin translate --seed` run), not call by call.

Greedy decoding is the twins' greedy (the same argmax over the same ids). Beam search is CTranslate2's own rule,
which the twins also implement as `beam_rule="ctranslate2"` (`parity.decoding.BEAM_RULES`); their "twin" and "hf"
rules are different searches and are refused here, as is forced_eos (CTranslate2 has none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from parity.config import TransformerConfig
from parity.decoding import check_generate_args, check_prompt, forbidden_ids
from parity.formats.ctranslate2 import (HEAD_FILE, HEAD_KEYS, CT2Error, ct2_config, is_ct2_dir, read_twin_config,
                                        read_vocabularies, stored_weight_type)

CLASSES = {"seq2seq": "Translator", "decoder": "Generator", "encoder": "Encoder"}
BEAM_RULE = "ctranslate2"


@dataclass
class CT2Model:
    """A CTranslate2 model directory opened for one family: `engine` is the ctranslate2 object."""

    path: Path
    cfg: TransformerConfig
    engine: object
    source: list[str]
    target: list[str]
    ids: dict[str, int]  # target token -> id
    start_token: str  # the decoder start (seq2seq) or BOS (decoder)
    head: dict[str, np.ndarray] | None = None
    compute_type: str = "default"

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu", compute_type: str = "default",
             threads: int = 0) -> "CT2Model":
        """Open `path` (written by twin convert --to ctranslate2). `compute_type`: CTranslate2's (default: the
        stored type); `threads`: intra_threads (0: CTranslate2's default). CT2Error naming the file."""
        path = Path(path)
        if not is_ct2_dir(path):
            raise CT2Error(f"{path}: not a CTranslate2 model written by twin convert --to ctranslate2 (no model.bin "
                           f"and twin_config.json)")
        cfg = read_twin_config(path).without_dropout()
        config = ct2_config(path)
        vocab = read_vocabularies(path, cfg.arch)
        source, target = vocab.get("source", []), vocab.get("target", [])
        token = "decoder_start_token" if cfg.arch == "seq2seq" else "bos_token"
        start = config.get(token)
        if cfg.arch != "encoder" and start not in set(target):
            raise CT2Error(f"{path / 'config.json'}: {token} {start!r} is not in the target vocabulary")
        head = None
        if cfg.arch == "encoder" and cfg.num_classes is not None:
            head = _read_head(path / HEAD_FILE, cfg)
        import ctranslate2

        engine_class = getattr(ctranslate2, CLASSES[cfg.arch])
        try:
            engine = engine_class(str(path), device=device, compute_type=compute_type, intra_threads=threads)
        except (RuntimeError, ValueError) as e:
            raise CT2Error(f"{path}: CTranslate2 cannot load the model ({str(e).splitlines()[0]})") from None
        return cls(path, cfg, engine, source, target, {t: i for i, t in enumerate(target)}, start, head,
                   compute_type)

    def target_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.ids[t] for t in tokens]


def _read_head(file: Path, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from parity.names import canonical_shapes

    try:
        head = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise CT2Error(f"{file}: cannot read the classification head ({e})") from None
    shapes = canonical_shapes(cfg)
    for key in HEAD_KEYS:
        if key not in head:
            raise CT2Error(f"{file}: missing {key!r}")
        if tuple(head[key].shape) != shapes[key]:
            raise CT2Error(f"{file}: {key!r} has shape {tuple(head[key].shape)}, expected {shapes[key]}")
    return head


def _rows(ids: np.ndarray, mask: np.ndarray | None, pad_id: int) -> list[list[int]]:
    """The real ids of each row (mask True, or not pad)."""
    ids = np.asarray(ids)
    keep = (ids != pad_id) if mask is None else np.asarray(mask, bool)
    return [[int(i) for i in row[k]] for row, k in zip(ids, keep)]


def _pad_outputs(rows: list[list[int]], pad_id: int) -> np.ndarray:
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), pad_id, dtype=np.int64)  # [B, n]
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def decoding_kwargs(model: CT2Model, *, max_new_tokens: int, bos_id: int, eos_id: int, beam_size: int,
                    length_penalty: float, temperature: float, top_k: int, top_p: float, beam_rule: str | None,
                    forced_eos: bool) -> dict:
    """CTranslate2's decoding arguments for the twins' options, every one explicit; ValueError naming the option
    CTranslate2 cannot follow."""
    cfg = model.cfg
    check_generate_args(cfg, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, beam_size=beam_size,
                        length_penalty=length_penalty, temperature=temperature, top_k=top_k, top_p=top_p)
    if beam_size > 1 and beam_rule not in (None, BEAM_RULE):
        raise ValueError(f"beam_rule {beam_rule!r}: CTranslate2 searches beams by its own rule, {BEAM_RULE!r} (the "
                         f"twins decode by it too)")
    if forced_eos:
        raise ValueError("forced_eos: CTranslate2 has no forced EOS at max_new_tokens")
    if model.target[bos_id] != model.start_token:
        raise ValueError(f"bos_id {bos_id} ({model.target[bos_id]!r}) is not the model's decoder start "
                         f"{model.start_token!r} ({model.path / 'config.json'})")
    suppress = [[model.target[i]] for i in forbidden_ids(cfg, bos_id, eos_id)]
    kw = dict(beam_size=beam_size, patience=1.0, num_hypotheses=1, length_penalty=float(length_penalty),
              repetition_penalty=1.0, no_repeat_ngram_size=0, disable_unk=False, suppress_sequences=suppress or None,
              end_token=model.target[eos_id], return_end_token=True,
              sampling_topk=(top_k if top_k else 0) if temperature > 0 else 1, sampling_topp=float(top_p),
              sampling_temperature=float(temperature) if temperature > 0 else 1.0)
    if cfg.arch == "seq2seq":
        kw.update(coverage_penalty=0.0, max_input_length=0, max_decoding_length=max_new_tokens,
                  min_decoding_length=0, use_vmap=False, replace_unknowns=False, prefix_bias_beta=0.0)
    else:
        kw.update(max_length=max_new_tokens, min_length=0, include_prompt_in_result=False)
    return kw


def generate(model: CT2Model, src: np.ndarray, *, max_new_tokens: int, bos_id: int, eos_id: int, beam_size: int = 1,
             length_penalty: float = 0.6, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, src_mask: np.ndarray | None = None, beam_rule: str | None = None,
             forced_eos: bool = False) -> np.ndarray:
    """Output ids (B, n <= max_new_tokens) for src (B, S) int ids, without BOS, pad after EOS: the twins'
    `generate` through CTranslate2 (module docstring). A decoder continues the prompt src (right-padded,
    src_mask its padding mask), as the twins' DecoderOnly does; beam search is for seq2seq. Unlike the twins,
    CTranslate2 returns an empty output, without decoding, for a source that is BOS or EOS alone, or starts with
    EOS or with BOS EOS (found by trying every source of up to 3 tokens on a 7-token vocabulary); twin translate
    never sends one (its sources are text, then EOS)."""
    import ctranslate2

    cfg = model.cfg
    if cfg.arch == "encoder":
        raise ValueError("an encoder-only model does not generate: use encode or classify")
    kw = decoding_kwargs(model, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, beam_size=beam_size,
                         length_penalty=length_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
                         beam_rule=beam_rule, forced_eos=forced_eos)
    src = np.asarray(src)
    rows = _rows(src, src_mask, cfg.pad_id)
    vocab_size = cfg.src_vocab_size if cfg.arch == "seq2seq" else cfg.tgt_vocab_size
    for row in rows:
        if row and not 0 <= min(row) <= max(row) < vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got {min(row)}..{max(row)}")
    if temperature > 0:
        ctranslate2.set_random_seed(int(seed) if seed is not None else int(np.random.SeedSequence().entropy % 2**31))
    if cfg.arch == "seq2seq":
        results = model.engine.translate_batch([[model.source[i] for i in row] for row in rows], **kw)
    else:
        check_prompt(cfg, tuple(src.shape), max_new_tokens=max_new_tokens, beam_size=beam_size)
        starts = [[model.target[bos_id]] + [model.target[i] for i in row] for row in rows]
        results = model.engine.generate_batch(starts, **kw)
    return _pad_outputs([model.target_ids(r.sequences[0] if hasattr(r, "sequences") else r.hypotheses[0])
                         for r in results], cfg.pad_id)


def score(model: CT2Model, src: np.ndarray, tgt: np.ndarray, src_mask: np.ndarray | None = None,
          tgt_mask: np.ndarray | None = None) -> list[np.ndarray]:
    """seq2seq: the log-probability of each real target token and then EOS, per row ([T_b + 1] float32), from
    `Translator.score_batch` (the decoder reads the decoder start, then the target)."""
    cfg = model.cfg
    if cfg.arch != "seq2seq":
        raise ValueError("score is for seq2seq models (a decoder's logits come from logits())")
    sources = [[model.source[i] for i in row] for row in _rows(src, src_mask, cfg.pad_id)]
    targets = [[model.target[i] for i in row] for row in _rows(tgt, tgt_mask, cfg.pad_id)]
    results = model.engine.score_batch(sources, targets, max_input_length=0)
    return [np.asarray(r.log_probs, dtype=np.float32) for r in results]


def logits(model: CT2Model, tgt: np.ndarray, tgt_mask: np.ndarray | None = None) -> list[np.ndarray]:
    """decoder: the logits after BOS and each real token of each row ([T_b + 1, V] float32), from
    `Generator.forward_batch` (positions from 0, BOS first)."""
    cfg = model.cfg
    if cfg.arch != "decoder":
        raise ValueError("logits is for decoder models")
    rows = [[model.ids[model.start_token]] + row for row in _rows(tgt, tgt_mask, cfg.pad_id)]
    out = np.asarray(model.engine.forward_batch(rows), dtype=np.float32)  # [B, T + 1, V]
    return [out[i, :len(row)] for i, row in enumerate(rows)]


def encode(model: CT2Model, src: np.ndarray, src_mask: np.ndarray | None = None) -> list[np.ndarray]:
    """encoder: the hidden states of each row's real tokens ([S_b, D] float32), from `Encoder.forward_batch`."""
    cfg = model.cfg
    if cfg.arch != "encoder":
        raise ValueError("encode is for encoder models")
    rows = _rows(src, src_mask, cfg.pad_id)
    if any(not row for row in rows):
        raise ValueError("CTranslate2's encoder needs at least one token per row")
    hidden = np.asarray(model.engine.forward_batch(rows).last_hidden_state, dtype=np.float32)  # [B, S, D]
    return [hidden[i, :len(row)] for i, row in enumerate(rows)]


def classify(model: CT2Model, src: np.ndarray, src_mask: np.ndarray | None = None) -> np.ndarray:
    """encoder with a head: class logits (B, C) float32 = classifier(tanh(pooler(mean of the real tokens' hidden
    states))), the twins' EncoderOnly head applied to CTranslate2's hidden states."""
    if model.head is None:
        raise ValueError(f"{model.path}: this encoder has no classification head (num_classes=None)")
    h = model.head
    pooled = np.stack([states.mean(axis=0) for states in encode(model, src, src_mask)])  # [B, D]
    hidden = np.tanh(pooled @ h["pooler.weight"].T + h["pooler.bias"])  # [B, D]
    return hidden @ h["classifier.weight"].T + h["classifier.bias"]  # [B, C]


# ------------------------------------------------------------------------------- parity against a twin

SCORE_TOLERANCE = 1e-4
"""CTranslate2 float32 against a twin in float64, relative to the twin's norm: CTranslate2's own GEMM, softmax and
layer-norm kernels round differently from the twins' (the twins agree with each other to 1e-5 in float32)."""
EXACT_TYPES = ("float32",)


def twin_generate(twin: str, cfg: TransformerConfig, weights, src: np.ndarray, *, bos_id: int, eos_id: int,
                  max_new_tokens: int, src_mask: np.ndarray | None = None) -> np.ndarray:
    """Greedy ids [B, n] from a twin in float64 (the reference argmax; a decoder continues the prompt src)."""
    if twin == "torch":
        import torch

        import torch_tx
        from parity.convert import to_torch

        model = torch_tx.model_for(cfg).double().eval()
        model.load_state_dict({k: to_torch(v) for k, v in weights.items()})
        mask = None if src_mask is None else torch.from_numpy(src_mask)
        return torch_tx.generate(model, torch.from_numpy(src).long(), max_new_tokens=max_new_tokens, bos_id=bos_id,
                                 eos_id=eos_id, src_mask=mask).numpy()
    import jax
    import jax.numpy as jnp

    import jax_tx
    from parity.convert import canonical_to_flax

    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), canonical_to_flax(weights, cfg))
    mask = None if src_mask is None else jnp.asarray(src_mask)
    return np.asarray(jax_tx.generate(jax_tx.model_for(cfg), params, jnp.asarray(src, jnp.int32),
                                      max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, src_mask=mask))


def _trim(row: np.ndarray, eos_id: int) -> list[int]:
    """A generated row up to and with its first EOS."""
    row = [int(i) for i in row]
    return row[:row.index(eos_id) + 1] if eos_id in row else row


def twin_log_probs(twin: str, cfg: TransformerConfig, weights, tgt_in: np.ndarray, src: np.ndarray | None = None,
                   src_mask: np.ndarray | None = None) -> np.ndarray:
    """A twin's float64 log-probabilities [B, T, V] after each token of tgt_in [B, T] (BOS first; every position
    read, so pad none of it)."""
    from parity.suite import RUNNERS, Inputs

    batch = len(tgt_in)
    src = np.zeros((batch, 0), np.int64) if src is None else np.asarray(src, np.int64)
    src_mask = src != cfg.pad_id if src_mask is None else src_mask
    inputs = Inputs(src, np.asarray(tgt_in, np.int64), src_mask, np.ones(tgt_in.shape, bool), {})
    out = RUNNERS[twin](cfg, weights, inputs, "float64", grads=False)["logits"].astype(np.float64)  # [B, T, V]
    top = out.max(-1, keepdims=True)  # [B, T, 1]
    return out - top - np.log(np.exp(out - top).sum(-1, keepdims=True))  # [B, T, V]


def greedy_agreement(model: CT2Model, weights, src: np.ndarray, *, twin: str, bos_id: int, eos_id: int,
                     max_new_tokens: int, error: float, src_mask: np.ndarray | None = None,
                     reported: bool = False, label: str = ""):
    """A parity-table row: CTranslate2's greedy rows against the twin's (float64). A row that differs passes
    only where, at its first differing step, the twin's log-probabilities of the two tokens are within
    4 * `error` (CTranslate2's measured log-probability error) + 1e-6: a near tie, which float32 may order
    either way. rel = the share of rows that differ otherwise (tolerance 0)."""
    from parity.suite import Check

    cfg = model.cfg
    ours = generate(model, src, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id, src_mask=src_mask)
    ref = twin_generate(twin, cfg, weights, src, bos_id=bos_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
                        src_mask=src_mask)
    got, want = [_trim(r, eos_id) for r in ours], [_trim(r, eos_id) for r in ref]
    differing = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    unexplained = 0
    if differing:
        prompts = _rows(src, src_mask, cfg.pad_id) if cfg.arch == "decoder" else None
        width = max(len(got[i]) for i in differing) + 1 + (max(len(prompts[i]) for i in differing) if prompts else 0)
        tgt_in = np.full((len(differing), width), bos_id, np.int64)  # [n, T]: BOS, (prompt,) CTranslate2's tokens
        offsets = []
        for j, i in enumerate(differing):
            prefix = [bos_id] + (prompts[i] if prompts else [])
            row = prefix + got[i]
            tgt_in[j, :len(row)] = row
            offsets.append(len(prefix) - 1)
        seq_src = None if cfg.arch == "decoder" else np.asarray(src)[differing]
        seq_mask = None if cfg.arch == "decoder" or src_mask is None else np.asarray(src_mask)[differing]
        lp = twin_log_probs(twin, cfg, weights, tgt_in, seq_src, seq_mask)  # [n, T, V]
        for j, i in enumerate(differing):
            t = next(k for k in range(min(len(got[i]), len(want[i])) + 1)
                     if k >= len(got[i]) or k >= len(want[i]) or got[i][k] != want[i][k])
            if t >= len(got[i]) or t >= len(want[i]):
                unexplained += 1  # one stopped early without choosing differently: no tie explains it
                continue
            step = lp[j, offsets[j] + t]  # [V]
            unexplained += bool(step[want[i][t]] - step[got[i][t]] > 4 * error + 1e-6)
    what = (f"ctranslate2 greedy tokens vs {twin}: {len(got) - len(differing)}/{len(got)} rows identical, "
            f"{len(differing) - unexplained} differ at a near tie{label}")
    return Check(what, "tokens", float(len(differing)), unexplained / max(len(got), 1),
                 float("inf") if reported else 0.0)


def compare(model: CT2Model, weights, *, bos_id: int, eos_id: int, twin: str = "torch", seed: int = 0,
            batch: int = 8, length: int = 10) -> list:
    """Rows of the parity table (parity.suite.Check): CTranslate2 against `twin` (float64) on the weights it was
    converted from, on random inputs. seq2seq: score_batch log-probabilities; decoder: forward_batch logits;
    encoder: Encoder.forward_batch hidden states (and the class logits); then, for seq2seq and decoder, the
    greedy tokens of the same sources or prompts (`greedy_agreement`). Quantized weights (a compute type other
    than float32) are reported, not held to a tolerance."""
    from parity.suite import RUNNERS, Check, errors, make_inputs

    cfg = model.cfg
    stored, compute = stored_weight_type(model.path), str(model.engine.compute_type)
    reported = stored not in EXACT_TYPES or compute not in EXACT_TYPES
    tol = float("inf") if reported else SCORE_TOLERANCE
    compute = compute if compute == stored else f"{stored} -> {compute}"
    label = f" ({compute}: reported)" if reported else ""
    rng = np.random.default_rng(seed)
    inputs = make_inputs(cfg, rng.integers(1, length + 1, size=batch), rng.integers(1, length + 1, size=batch),
                         length, length, rng)
    _avoid_skipped_sources(inputs.src, inputs.src_mask, {bos_id, eos_id}, cfg.src_vocab_size)
    if cfg.arch == "encoder":
        ref = RUNNERS[twin](cfg, weights, inputs, "float64", grads=False)
        hidden = encode(model, inputs.src, inputs.src_mask)
        want = np.concatenate([ref["hidden"][i, :len(h)] for i, h in enumerate(hidden)])
        rows = [Check(f"ctranslate2 Encoder.forward_batch hidden vs {twin}{label}", compute,
                      *errors(np.concatenate(hidden), want), tol)]
        if model.head is not None:
            rows.append(Check(f"ctranslate2 hidden + classification head vs {twin}{label}", compute,
                              *errors(classify(model, inputs.src, inputs.src_mask), ref["class_logits"]), tol))
        return rows
    skip = set(forbidden_ids(cfg, bos_id, eos_id)) | {eos_id}
    allowed = np.array([i for i in range(cfg.tgt_vocab_size) if i not in skip])
    tgt = [list(allowed[rng.integers(0, len(allowed), size=int(n))]) for n in rng.integers(1, length + 1, size=batch)]
    tgt_in = np.full((batch, length + 1), bos_id, np.int64)  # [B, T + 1]: BOS, the target, filler after it
    for i, row in enumerate(tgt):
        tgt_in[i, 1:len(row) + 1] = row
    mask = np.arange(length)[None, :] < np.array([len(r) for r in tgt])[:, None]  # [B, T]
    if cfg.arch == "seq2seq":
        lp = twin_log_probs(twin, cfg, weights, tgt_in, inputs.src, inputs.src_mask)  # [B, T + 1, V]
        want = np.concatenate([[lp[i, t, tok] for t, tok in enumerate(row + [eos_id])] for i, row in enumerate(tgt)])
        got = np.concatenate(score(model, inputs.src, tgt_in[:, 1:], inputs.src_mask, mask))
        max_abs, rel = errors(got, want)
        rows = [Check(f"ctranslate2 score_batch log-probs vs {twin}{label}", compute, max_abs, rel, tol)]
        src, src_mask = inputs.src, inputs.src_mask
    else:
        got = logits(model, tgt_in[:, 1:], mask)
        ref = RUNNERS[twin](cfg, weights, _decoder_inputs(cfg, tgt_in), "float64", grads=False)["logits"]
        want = np.concatenate([ref[i, :len(g)] for i, g in enumerate(got)])
        max_abs, rel = errors(np.concatenate(got), want)
        rows = [Check(f"ctranslate2 forward_batch logits vs {twin}{label}", compute, max_abs, rel, tol)]
        max_abs *= 2  # a log-probability errs by at most the logit's error plus the log-sum-exp's
        src, src_mask = tgt_in[:, 1:4], mask[:, :3]
    rows.append(greedy_agreement(model, weights, src, twin=twin, bos_id=bos_id, eos_id=eos_id, src_mask=src_mask,
                                 max_new_tokens=min(cfg.max_len - src.shape[1], 2 * length), error=max_abs,
                                 reported=reported, label=label))
    return rows


def _avoid_skipped_sources(src: np.ndarray, mask: np.ndarray, special: set[int], vocab: int) -> None:
    """In place: a source row starting with BOS or EOS gets another first id (CTranslate2 skips some of those,
    `generate`)."""
    other = next(i for i in range(vocab) if i not in special | {0})
    for row, keep in zip(src, mask):
        if keep.any() and int(row[np.argmax(keep)]) in special:
            row[np.argmax(keep)] = other


def _decoder_inputs(cfg: TransformerConfig, tgt_in: np.ndarray):
    from parity.suite import Inputs

    empty = np.zeros((len(tgt_in), 0), np.int64)
    return Inputs(empty, tgt_in, empty.astype(bool), np.ones(tgt_in.shape, bool), {})
