"""The twins against transformers' MarianMTModel on one set of weights: decoding, training steps, conversion.

One random, seeded (`torch.manual_seed(--seed)`) transformers `MarianMTModel` at opus-mt size: d_model 512,
6 + 6 layers, 8 heads, ffn 2048, vocabulary `--vocab` (default 8000; real opus-mt models have ~58k: `--vocab
58101`), activation swish, scaled embeddings, pad = decoder start = vocab - 1, EOS 0, forced EOS, 512 positions,
encoder/decoder embeddings shared and tied to the output layer, dropout 0.1, attention and activation dropout 0;
its generation config as opus-mt's generation_config.json has it (bad_words_ids [[pad]], num_beams 4,
max_length 512). `parity.convert.from_hf_marian(model)` gives the twins' config (dropout rates included) and
canonical weights: `torch_tx.Transformer` loads them, `jax_tx.Transformer` runs them as
`parity.convert.canonical_to_flax(...)` params. Everything is float32 on the CPU, measured in one process,
entries taking turns (order reversed every repetition), the fastest of `--repeats` repetitions counting.
spread = slowest / fastest repetition - 1 (large: other processes shared the CPU; the load average before the
run is printed too). Ratios are twin / peer with >1 = the twin is faster; the peer is transformers.

1. decoding: generated tokens per second of `model.generate(input_ids, attention_mask, max_new_tokens=N,
   num_beams=K, do_sample=False)` (K = 1, greedy, and `--beam-size` 4), against `torch_tx.decoding.generate`
   and `jax_tx.decoding.generate` with `parity.hf_reference.generation_options(model, 0)` (beam_rule "hf",
   forced EOS, length penalty 1.0: what the generation config makes transformers do), bos = the decoder start,
   on the same `--batch` (16) random source rows of `--src-len` (32) columns (random ids, EOS at the end of
   each row's length, drawn from [S/2, S], right padded, an attention mask / src_mask saying so) and at most
   `--new-tokens` (32) new tokens. torch entries run under `torch.inference_mode()`; the JAX result is fetched
   to the host inside the timing; one untimed warm-up call per entry (JAX compiles there). Tokens counted,
   the same for all three entries of a row: the real tokens of transformers' output, per row up to and
   including the first EOS (all columns if none). "same tokens as HF" is the fraction of equal entries of
   the twin's output and transformers' (both padded with pad to the longer): 100% expected, not asserted.
2. training step: target tokens (non-pad labels, EOS included) per second of whole training steps on the
   same `NUM_BATCHES` numpy batches (random ids, target rows of `--tgt-len` (32) ending with EOS, lengths in
   [T/2, T], right padded), dropout on at the model's rates in all three. Peer: a copy of the MarianMTModel
   in train mode, `model(input_ids, attention_mask, labels)` (labels -100 on padding; transformers shifts
   them right into decoder_input_ids itself) and its own loss (mean cross-entropy), `loss.backward()`,
   `clip_grad_norm_(1.0)` (transformers' Trainer default), `torch.optim.AdamW(lr=1e-4).step()`,
   `zero_grad()`. Twins: the `twin train` trainers, `torch_tx.train.Trainer` and `jax_tx.train.Trainer`
   built on the same canonical weights, `TrainConfig(label_smoothing=0.0)` (the peer's loss), otherwise
   their defaults: global-norm clipping 1.0, Adam with the warmup schedule; the loss is fetched to the host
   after every repetition of `--steps` steps. Untimed warm-up steps first (JAX compiles). As a check that all
   three hold the same model, the mean cross-entropy of batch 0 without dropout, before training, is printed.
3. conversion: wall seconds and peak RSS (`ru_maxrss` of `os.wait4`, through benchmarks/bench_convert.py's
   launcher, so that a fork's inherited RSS does not count) of `python -m parity.cli convert HF_DIR RUN --to
   safetensors` and `python -m parity.cli convert RUN OUT --to hf-marian`, each a fresh subprocess, against
   the peer, a subprocess running `MarianMTModel.from_pretrained(HF_DIR)` + `save_pretrained(PEER_DIR)` (a
   round trip HF -> HF through transformers). HF_DIR is `save_pretrained` of the benchmark's model (its
   model.safetensors size is the "checkpoint MB"). Interpreter start-up and imports count in every figure.
   Ratios: peer seconds / twin seconds (>1: twin faster) and peer RSS / twin RSS (>1: twin leaner), for each
   twin command and for the two together (seconds summed, the larger RSS). Then the round trip is checked:
   OUT's and HF_DIR's model.safetensors must hold the same tensors bit for bit, and
   `MarianMTModel.from_pretrained` of both the same state dict (names, dtypes, bytes); printed, and the
   script exits 1 if not.

`--only decode train convert` picks sections (e.g. `--only convert --vocab 58101` for the opus-mt-size
conversion figure). Thread counts are the frameworks' defaults unless `--torch-threads`; `--quick` uses 1
torch thread. On a 2-core machine that other processes keep busy, 2 torch threads make every small op wait for
a descheduled thread (measured here: transformers' greedy call 21.7 s with 2 threads, 0.9 s with 1, at load
average 5; see also benchmarks/bench_decode.py): there, run with `--torch-threads 1` (XLA's CPU client ran these
programs on about one core anyway: CPU time = wall time).

Run from the repository root:
    .venv/bin/python benchmarks/bench_hf.py                # opus-mt size, vocab 8000: several minutes
    .venv/bin/python benchmarks/bench_hf.py --quick        # d_model 32, 1 + 1 layers, vocab 200: seconds
    .venv/bin/python benchmarks/bench_hf.py --only convert --vocab 58101 --json bench_results/hf_convert.json
    .venv/bin/twin bench --hf --json bench_results/hf.json
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import torch  # noqa: E402

import jax_tx  # noqa: E402
import jax_tx.train as jax_train  # noqa: E402
import torch_tx  # noqa: E402
import torch_tx.train as torch_train  # noqa: E402
from benchmarks.bench_convert import Run, size_of, spawn  # noqa: E402
from benchmarks.bench_train import (environment, print_noisy, print_wall, render_table, settings_of,  # noqa: E402
                                     with_torch_threads, write_json)
from parity import convert, extras  # noqa: E402
from parity.batching import Batch as TrainBatch  # noqa: E402
from parity.config import TransformerConfig  # noqa: E402
from parity.train import TrainConfig  # noqa: E402

EOS = 0
LEARNING_RATE = 1e-4
NUM_BATCHES = 4
SECTIONS = ("decode", "train", "convert")
HF = "transformers MarianMTModel"
PEER_SCRIPT = """
import sys
from transformers import MarianMTModel
model = MarianMTModel.from_pretrained(sys.argv[1], local_files_only=True)
model.save_pretrained(sys.argv[2])
"""


def progress(message: str) -> None:
    print(f"[bench_hf] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- the model

def build_marian(args: argparse.Namespace):
    """The random, seeded MarianMTModel (eval mode) at opus-mt's layout, with opus-mt's generation config."""
    from transformers import MarianConfig, MarianMTModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    pad = args.vocab - 1
    config = MarianConfig(vocab_size=args.vocab, d_model=args.d_model, encoder_layers=args.layers,
                          decoder_layers=args.layers, encoder_attention_heads=args.heads,
                          decoder_attention_heads=args.heads, encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn,
                          max_position_embeddings=512, pad_token_id=pad, decoder_start_token_id=pad,
                          eos_token_id=EOS, forced_eos_token_id=EOS, activation_function="swish",
                          scale_embedding=True, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                          share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = MarianMTModel(config).eval()
    gen = model.generation_config
    gen.bad_words_ids, gen.num_beams, gen.max_length, gen.bos_token_id = [[pad]], 4, 512, 0
    return model


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ids_of(model) -> dict[str, int]:
    return {"pad_id": model.config.pad_token_id, "decoder_start_id": model.config.decoder_start_token_id,
            "eos_id": model.config.eos_token_id}


# ------------------------------------------------------------------------------------------------ measuring

@dataclass(frozen=True)
class Entry:
    name: str  # model
    mode: str  # decoding mode, or "train step"
    role: str  # "peer" or "twin"
    run: Callable[[], Any]  # one timed unit: a decoding call -> (B, n) ids, or `steps` training steps -> loss


def key(entry: Entry) -> str:
    return f"{entry.name} | {entry.mode}"


def measure(entries: list[Entry], warmup: int, repeats: int, section: str) -> tuple[dict[str, list[float]],
                                                                                    dict[str, Any]]:
    """Warm every entry up, then time one unit `repeats` times, taking turns; seconds per unit, and the
    last result of each."""
    results: dict[str, Any] = {}
    for entry in entries:
        progress(f"{section}: warming up {key(entry)}")
        for _ in range(warmup):
            results[key(entry)] = entry.run()
    times: dict[str, list[float]] = {key(e): [] for e in entries}
    for rep in range(repeats):
        progress(f"{section}: repetition {rep + 1}/{repeats}")
        for entry in entries if rep % 2 == 0 else entries[::-1]:
            start = time.perf_counter()
            results[key(entry)] = entry.run()
            times[key(entry)].append(time.perf_counter() - start)
    return times, results


# ------------------------------------------------------------------------------------------------ decoding

def make_sources(batch: int, src_len: int, vocab: int, seed: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, S) int64 ids and their (B, S) bool mask: random ids in [1, pad), EOS at the end of each row's
    length (drawn from [S // 2, S]), pad after it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, pad, size=(batch, src_len))  # [B, S]
    length = rng.integers(max(1, src_len // 2), src_len + 1, size=(batch, 1))  # [B, 1]
    column = np.arange(src_len)[None, :]  # [1, S]
    ids = np.where(column == length - 1, EOS, ids)  # [B, S]
    mask = column < length  # [B, S]
    return np.where(mask, ids, pad).astype(np.int64), mask


def real_tokens(out: np.ndarray, eos: int, pad: int) -> int:
    """The generated tokens of (B, n) ids: per row up to and including the first EOS, else the non-pad ones."""
    total = 0
    for row in out:
        hits = np.flatnonzero(row == eos)
        total += int(hits[0]) + 1 if hits.size else int(np.count_nonzero(row != pad))
    return total


def same_length(a: np.ndarray, length: int, pad: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=pad)[:, :length]


def agreement(got: np.ndarray, ref: np.ndarray, pad: int) -> float:
    length = max(got.shape[1], ref.shape[1])
    return float(np.mean(same_length(got, length, pad) == same_length(ref, length, pad)))


def decode_section(model, cfg: TransformerConfig, weights: dict[str, np.ndarray],
                   args: argparse.Namespace) -> dict[str, Any]:
    from parity.hf_reference import generation_options

    ids = ids_of(model)
    pad = ids["pad_id"]
    options = generation_options(model, ids["eos_id"])
    cfg = cfg.without_dropout()
    twin = torch_tx.Transformer(cfg).eval()
    twin.load_state_dict({k: convert.to_torch(np.asarray(v, np.float32)) for k, v in weights.items()}, strict=True)
    fmodel, params = jax_tx.Transformer(cfg), convert.canonical_to_flax(weights, cfg)
    src, mask = make_sources(args.batch, args.src_len, args.vocab, args.seed, pad)
    src_t, mask_t = torch.from_numpy(src), torch.from_numpy(mask)
    src_j, mask_j = jax.device_put(src.astype(np.int32)), jax.device_put(mask)
    n = args.new_tokens
    modes = {"greedy": 1, f"beam {args.beam_size}": args.beam_size}

    def hf_run(k: int) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            with torch.inference_mode():
                out = model.generate(input_ids=src_t, attention_mask=mask_t.long(), max_new_tokens=n, num_beams=k,
                                     num_return_sequences=1, do_sample=False)  # [B, 1 + n]
            return out[:, 1:].numpy()  # [B, n] without the decoder start
        return run

    def kw(k: int) -> dict[str, Any]:
        return dict(max_new_tokens=n, bos_id=ids["decoder_start_id"], eos_id=ids["eos_id"], beam_size=k, **options)

    def torch_run(k: int) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            with torch.inference_mode():
                return torch_tx.decoding.generate(twin, src_t, src_mask=mask_t, **kw(k)).numpy()
        return run

    def jax_run(k: int) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(jax_tx.decoding.generate(fmodel, params, src_j, src_mask=mask_j, **kw(k)))

    entries = []
    for mode, k in modes.items():
        entries += [Entry(HF, mode, "peer", hf_run(k)), Entry("torch_tx.generate", mode, "twin", torch_run(k)),
                    Entry("jax_tx.generate", mode, "twin", jax_run(k))]
    times, outputs = measure(entries, args.warmup, args.repeats, "decode")
    rows = []
    for mode in modes:
        ref = outputs[f"{HF} | {mode}"]
        tokens = real_tokens(ref, ids["eos_id"], pad)
        peer_speed = tokens / min(times[f"{HF} | {mode}"])
        for e in (e for e in entries if e.mode == mode):
            k, out = key(e), outputs[key(e)]
            speed = tokens / min(times[k])
            rows.append({"decoding": mode, "model": e.name, "role": e.role, "tokens": tokens,
                         "tokens_per_s": speed, "ms_per_call": 1000 * min(times[k]), "seconds": times[k],
                         "steps": int(out.shape[1]), "ratio": speed / peer_speed if e.role == "twin" else None,
                         "same_tokens_as_hf": agreement(out, ref, pad) if e.role == "twin" else None,
                         "own_real_tokens": real_tokens(out, ids["eos_id"], pad)})
    return {"options": options, "batch": args.batch, "src_len": args.src_len, "max_new_tokens": n,
            "source_tokens": int(mask.sum()), "rows": rows}


def print_decode(section: dict[str, Any]) -> None:
    rows = section["rows"]
    headers = ["decoding", "model", "tokens", "tokens/s", "ms/call", "spread", "twin/peer", "same tokens as HF"]
    cells = [[r["decoding"], r["model"], str(r["tokens"]), f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_call']:,.1f}",
              f"{max(r['seconds']) / min(r['seconds']) - 1:.0%}",
              f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
              f"{r['same_tokens_as_hf']:.1%}" if r["same_tokens_as_hf"] is not None else "-"] for r in rows]
    render_table(f"1. Decoding (generated tokens/s, higher is better; batch {section['batch']}, src "
                 f"{section['src_len']}, at most {section['max_new_tokens']} new tokens, beam_rule hf + forced EOS)",
                 headers, cells, [r["decoding"] for r in rows], left=(0, 1), min_width=120)


# ------------------------------------------------------------------------------------------------ training

@dataclass(frozen=True)
class Batch:
    src: np.ndarray  # [B, S] int64
    src_mask: np.ndarray  # [B, S] bool
    tgt_in: np.ndarray  # [B, T] int64, starts with the decoder start
    labels: np.ndarray  # [B, T] int64, pad on padding
    tokens: int  # non-pad labels


def make_batches(args: argparse.Namespace, pad: int, decoder_start: int) -> list[Batch]:
    """NUM_BATCHES batches: sources as `make_sources`, targets random ids ending with EOS, lengths in [T/2, T]."""
    batches = []
    for i in range(NUM_BATCHES):
        src, mask = make_sources(args.batch, args.src_len, args.vocab, args.seed + 1 + 2 * i, pad)
        labels, real = make_sources(args.batch, args.tgt_len, args.vocab, args.seed + 2 + 2 * i, pad)  # [B, T]
        tgt_in = np.concatenate([np.full((args.batch, 1), decoder_start), labels[:, :-1]], axis=1)  # [B, T]
        batches.append(Batch(src, mask, tgt_in, labels, int(real.sum())))
    return batches


class HFRunner:
    """transformers' own training step of a MarianMTModel: its loss, backward, clip_grad_norm_, AdamW."""

    def __init__(self, model, batches: list[Batch], pad: int):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        self.data = [(torch.from_numpy(b.src), torch.from_numpy(b.src_mask).long(),
                      torch.from_numpy(np.where(b.labels == pad, -100, b.labels))) for b in batches]
        self.step = 0

    def run(self, steps: int) -> float:
        loss = None
        for _ in range(steps):
            src, mask, labels = self.data[self.step % len(self.data)]
            self.step += 1
            loss = self.model(input_ids=src, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def eval_loss(self, i: int = 0) -> float:
        self.model.eval()
        try:
            src, mask, labels = self.data[i]
            return float(self.model(input_ids=src, attention_mask=mask, labels=labels).loss)
        finally:
            self.model.train()


class TwinRunner:
    """A `twin train` trainer (torch_tx.train.Trainer or jax_tx.train.Trainer) on the canonical weights."""

    def __init__(self, trainer_class: type, cfg: TransformerConfig, weights: dict[str, np.ndarray],
                 batches: list[Batch], seed: int):
        self.trainer = trainer_class(cfg, TrainConfig(seed=seed, label_smoothing=0.0), weights)
        self.data = [TrainBatch(b.src.astype(np.int32), b.tgt_in.astype(np.int32), b.labels.astype(np.int32),
                                pad_id=cfg.pad_id) for b in batches]
        self.step = 0

    def run(self, steps: int) -> float:
        metrics = None
        for _ in range(steps):
            metrics = self.trainer.train_step(self.data[self.step % len(self.data)])
            self.step += 1
        return float(metrics["loss"]) / float(metrics["tokens"])

    def eval_loss(self, i: int = 0) -> float:
        sums = self.trainer.eval_step(self.data[i])
        return sums["nll"] / sums["tokens"]


def train_section(model, cfg: TransformerConfig, weights: dict[str, np.ndarray],
                  args: argparse.Namespace) -> dict[str, Any]:
    ids = ids_of(model)
    batches = make_batches(args, ids["pad_id"], ids["decoder_start_id"])
    progress("train: building the three trainers")
    runners = {HF: HFRunner(copy.deepcopy(model), batches, ids["pad_id"]),
               "torch_tx trainer": TwinRunner(torch_train.Trainer, cfg, weights, batches, args.seed),
               "jax_tx trainer": TwinRunner(jax_train.Trainer, cfg, weights, batches, args.seed)}
    eval_losses = {name: r.eval_loss() for name, r in runners.items()}  # before any update
    entries = [Entry(name, "train step", "peer" if name == HF else "twin", lambda r=r: r.run(args.steps))
               for name, r in runners.items()]
    times, losses = measure(entries, 1, args.repeats, "train")  # warm-up: one repetition of --steps steps
    steps = [batches[i % NUM_BATCHES].tokens for i in range(args.steps * (1 + args.repeats))]
    tokens = {rep: sum(steps[(1 + rep) * args.steps:(2 + rep) * args.steps]) for rep in range(args.repeats)}
    # every runner walks through the batches in the same order, so repetition r covers the same tokens for all
    rows = []

    def speed(name: str) -> float:
        return max(tokens[rep] / s for rep, s in enumerate(times[f"{name} | train step"]))

    for e in entries:
        s = speed(e.name)
        rows.append({"model": e.name, "role": e.role, "tokens_per_s": s,
                     "tokens_per_step": sum(tokens.values()) / (args.repeats * args.steps),
                     "ms_per_step": 1000 * min(times[key(e)]) / args.steps, "seconds": times[key(e)],
                     "ratio": s / speed(HF) if e.role == "twin" else None,
                     "eval_loss_before": eval_losses[e.name], "loss_after": losses[key(e)]})
    del runners
    return {"batch": args.batch, "src_len": args.src_len, "tgt_len": args.tgt_len, "steps_per_repetition": args.steps,
            "dropout": {"dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
                        "activation_dropout": cfg.activation_dropout}, "rows": rows}


def print_train(section: dict[str, Any]) -> None:
    rows = section["rows"]
    headers = ["model", "tokens/step", "tokens/s", "ms/step", "spread", "twin/peer", "eval loss before"]
    cells = [[r["model"], f"{r['tokens_per_step']:,.0f}", f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:,.0f}",
              f"{max(r['seconds']) / min(r['seconds']) - 1:.0%}",
              f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-", f"{r['eval_loss_before']:.6f}"] for r in rows]
    d = section["dropout"]
    render_table(f"2. Training step (target tokens/s, higher is better; batch {section['batch']}, src "
                 f"{section['src_len']}, tgt {section['tgt_len']}, dropout {d['dropout']:g}, best of "
                 f"repetitions of {section['steps_per_repetition']} steps)", headers, cells, [0] * len(rows),
                 left=(0,), min_width=120)


# ---------------------------------------------------------------------------------------------- conversion

def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def same_safetensors(a: Path, b: Path) -> tuple[bool, str]:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if set(x) != set(y):
        return False, f"keys differ: {sorted(set(x) ^ set(y))[:5]}"
    for k in x:
        if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or x[k].tobytes() != y[k].tobytes():
            return False, f"{k!r} differs"
    return True, f"{len(x)} tensors equal"


def same_state_dicts(a: Path, b: Path) -> tuple[bool, str]:
    from transformers import MarianMTModel

    x, y = (MarianMTModel.from_pretrained(str(p), local_files_only=True).state_dict() for p in (a, b))
    if set(x) != set(y):
        return False, f"keys differ: {sorted(set(x) ^ set(y))[:5]}"
    for k in x:
        if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or not torch.equal(x[k], y[k]):
            return False, f"{k!r} differs"
    return True, f"{len(x)} tensors equal"


def convert_section(model, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    hf_dir, run_dir, out_dir, peer_dir = (workdir / name for name in ("hf", "run", "out", "peer"))
    for p in (hf_dir, run_dir, out_dir, peer_dir):
        remove(p)
    progress(f"convert: save_pretrained into {hf_dir}")
    model.save_pretrained(str(hf_dir))
    checkpoint = hf_dir / "model.safetensors"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    twin = [sys.executable, "-m", "parity.cli", "convert"]
    commands = {  # name -> (argv, destination)
        "MarianMTModel.from_pretrained + save_pretrained": ([sys.executable, "-c", PEER_SCRIPT, str(hf_dir),
                                                              str(peer_dir)], peer_dir),
        "twin convert HF_DIR RUN --to safetensors": (twin + [str(hf_dir), str(run_dir), "--to", "safetensors"],
                                                     run_dir),
        "twin convert RUN OUT --to hf-marian": (twin + [str(run_dir), str(out_dir), "--to", "hf-marian"], out_dir)}
    names = list(commands)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[1:] + names[:1]  # the peer first, then last
        for name in order:
            argv, dst = commands[name]
            remove(dst)
            progress(f"convert: [{rep + 1}/{args.repeats}] {name}")
            runs[name].append(spawn(argv, env))
    peer_name = names[0]
    peer_s = min(r.seconds for r in runs[peer_name])
    peer_rss = max(r.max_rss for r in runs[peer_name])
    rows = []
    for name in names:
        argv, dst = commands[name]
        s, rss = min(r.seconds for r in runs[name]), max(r.max_rss for r in runs[name])
        src = hf_dir if name != names[2] else run_dir
        rows.append({"command": name, "role": "peer" if name == peer_name else "twin", "seconds": s,
                     "all_seconds": [r.seconds for r in runs[name]], "max_rss_bytes": rss,
                     "all_max_rss_bytes": [r.max_rss for r in runs[name]], "src_bytes": size_of(src),
                     "dst_bytes": size_of(dst),
                     "time_ratio": peer_s / s if name != peer_name else None,
                     "rss_ratio": peer_rss / rss if name != peer_name else None})
    twins = rows[1:]
    both_s, both_rss = sum(r["seconds"] for r in twins), max(r["max_rss_bytes"] for r in twins)
    rows.append({"command": "twin convert, both (HF -> safetensors -> HF)", "role": "twin", "seconds": both_s,
                 "max_rss_bytes": both_rss, "src_bytes": size_of(hf_dir), "dst_bytes": size_of(out_dir),
                 "time_ratio": peer_s / both_s, "rss_ratio": peer_rss / both_rss})
    progress("convert: checking the round trip")
    files_equal, files_detail = same_safetensors(checkpoint, out_dir / "model.safetensors")
    states_equal, states_detail = same_state_dicts(hf_dir, out_dir)
    result = {"workdir": str(workdir), "checkpoint_bytes": checkpoint.stat().st_size, "vocab": args.vocab,
              "rows": rows, "round_trip": {"bit_identical": files_equal and states_equal,
                                           "files_equal": files_equal, "files_detail": files_detail,
                                           "state_dicts_equal": states_equal, "state_dicts_detail": states_detail}}
    for p in (run_dir, out_dir, peer_dir):
        remove(p)
    return result


def print_convert(section: dict[str, Any]) -> None:
    rows = section["rows"]
    headers = ["command", "s", "peak RSS MB", "MB in", "MB out", "twin/peer time", "twin/peer RSS"]
    cells = [[r["command"], f"{r['seconds']:.2f}", f"{r['max_rss_bytes'] / 1e6:,.0f}",
              f"{r['src_bytes'] / 1e6:,.1f}", f"{r['dst_bytes'] / 1e6:,.1f}",
              f"{r['time_ratio']:.2f}x" if r["time_ratio"] is not None else "-",
              f"{r['rss_ratio']:.2f}x" if r["rss_ratio"] is not None else "-"] for r in rows]
    render_table(f"3. Conversion, vocab {section['vocab']}, checkpoint {section['checkpoint_bytes'] / 1e6:,.1f} MB "
                 "(subprocesses, imports included; twin/peer = peer s / twin s and peer RSS / twin RSS, >1: twin "
                 "faster / leaner)", headers, cells, [r["role"] == "peer" or "both" in r["command"] for r in rows],
                 left=(0,), min_width=150)
    t = section["round_trip"]
    print(f"round trip HF -> safetensors -> HF: {'bit-identical' if t['bit_identical'] else 'DIFFERS'} "
          f"(model.safetensors: {t['files_detail']}; from_pretrained state dicts: {t['state_dicts_detail']})")


# ------------------------------------------------------------------------------------------------ the run

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="the sections to run (default: all three)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default 8000; opus-mt: 58101)")
    parser.add_argument("--d-model", type=int, default=512, help="d_model (default 512)")
    parser.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each (default 6)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    parser.add_argument("--ffn", type=int, default=2048, help="feed-forward width (default 2048)")
    parser.add_argument("--batch", type=int, default=16, help="rows per decoding call and training batch (default 16)")
    parser.add_argument("--src-len", type=int, default=32, help="source columns (default 32)")
    parser.add_argument("--tgt-len", type=int, default=32, help="training target columns (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="at most this many new tokens (default 32)")
    parser.add_argument("--beam-size", type=int, default=4, help="beam width of the beam rows (default 4)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per repetition (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed decoding calls per entry (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions, the fastest counts (default 3)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the conversion section writes (default: a temporary "
                        "directory, removed at the end)")
    parser.add_argument("--quick", action="store_true", help="smoke run: d_model 32, 2 heads, ffn 64, 1 + 1 layers, "
                        "vocab 200, batch 2, lengths 8, 4 new tokens, 1 step, 1 repetition, 1 torch thread")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, environment and results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.ffn, args.layers, args.vocab = 32, 2, 64, 1, 200
        args.batch, args.src_len, args.tgt_len, args.new_tokens = 2, 8, 8, 4
        args.steps, args.warmup, args.repeats, args.torch_threads = 1, 1, 1, 1
    if min(args.batch, args.src_len, args.tgt_len, args.new_tokens, args.beam_size, args.steps, args.warmup,
           args.repeats) < 1:
        parser.error("--batch, --src-len, --tgt-len, --new-tokens, --beam-size, --steps, --warmup and --repeats "
                     "must be at least 1")
    if args.vocab < 3:
        parser.error("--vocab must leave ids beyond EOS (0) and pad (vocab - 1)")
    if args.d_model % args.heads:
        parser.error("--d-model must be a multiple of --heads")
    if max(args.src_len, args.tgt_len, args.new_tokens + 1) > 512:
        parser.error("--src-len, --tgt-len and --new-tokens + 1 must fit the 512 positions")
    if args.torch_threads is not None and args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1")
    if args.workdir is not None and args.workdir.resolve().is_relative_to(ROOT):
        parser.error(f"--workdir {args.workdir} is inside the repository; choose a directory outside it")
    args.only = [s for s in SECTIONS if s in args.only]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        extras.require("benchmarks/bench_hf.py", ["hf"], why="transformers' MarianMTModel is the peer")
    except extras.MissingExtra as e:
        print(e, file=sys.stderr)
        return 1
    return with_torch_threads(args.torch_threads, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    import transformers

    wall_start = time.perf_counter()
    env = {**environment(), "transformers": transformers.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(f"transformers {env['transformers']}, torch {env['torch']} ({env['torch_threads']} threads), jax "
          f"{env['jax']}, flax {env['flax']}, python {env['python']}, {env['cpu_count']} CPUs ({env['cpu']}), "
          f"load average {env['load_average'][0]:.2f}"
          + (f", XLA_FLAGS={env['xla_flags']}" if env["xla_flags"] else ""))
    model = build_marian(args)
    cfg, weights = convert.from_hf_marian(model)
    print(f"MarianMTModel: d_model {args.d_model}, {args.layers}+{args.layers} layers, {args.heads} heads, ffn "
          f"{args.ffn}, vocab {args.vocab}, swish, shared + tied embeddings, {parameter_count(model):,} parameters "
          f"(seed {args.seed}); float32 CPU; sections {' '.join(args.only)}; best of {args.repeats}")
    report: dict[str, Any] = {"settings": settings_of(args), "environment": env,
                              "model": {"marian_config": model.config.to_dict(), "twin_config": cfg.to_dict(),
                                        "parameters": parameter_count(model)}}
    noisy_rows: list[dict[str, Any]] = []
    if "decode" in args.only:
        report["decoding"] = decode_section(model, cfg, weights, args)
        print_decode(report["decoding"])
        noisy_rows += [{**r, "label": f"{r['model']} ({r['decoding']})"} for r in report["decoding"]["rows"]]
    if "train" in args.only:
        report["training"] = train_section(model, cfg, weights, args)
        print_train(report["training"])
        noisy_rows += [{**r, "label": f"{r['model']} (train step)"} for r in report["training"]["rows"]]
    status = 0
    if "convert" in args.only:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            report["conversion"] = convert_section(model, args, args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
                report["conversion"] = convert_section(model, args, Path(tmp))
        print_convert(report["conversion"])
        if not report["conversion"]["round_trip"]["bit_identical"]:
            print("FAILED: the round trip HF -> safetensors -> HF changed the weights", file=sys.stderr)
            status = 1
    wall = time.perf_counter() - wall_start
    print_noisy(noisy_rows, lambda r: r["label"])
    print_wall(wall, env)
    report["wall_seconds"] = wall
    if args.json:
        write_json(args.json, report)
    return status


if __name__ == "__main__":
    sys.exit(main())
