"""Decoding throughput of each twin's `generate` (KV cache) against the PyTorch tutorials' greedy loop and CTranslate2.

Measured: generated tokens per second, float32 on CPU, no gradients, in one process, for a batch of
`--batch` random source sentences (`--src-len` ids, each row right-padded from a random length in
[S // 2, S]) and exactly `--new-tokens` new tokens per row:

- peer: `TorchPeer` of benchmarks/bench_train.py (`torch.nn.Transformer(batch_first=True)` plus
  scaled nn.Embedding, the sinusoidal table and an nn.Linear output layer), in eval mode under
  `torch.inference_mode()`, decoded greedily the way the PyTorch tutorials do it: encode once, then
  at every step run the decoder on the whole prefix `ys` (BOS + the tokens so far) with a causal
  mask and the source padding mask, take the last position's argmax, append it; no cache, so step t
  recomputes t positions. It stops early when every row has emitted EOS (never happens here, see
  below). `torch.nn.Transformer` is measured with the MHA fast path off
  (`torch.backends.mha.set_fastpath_enabled(False)`: plain layers, the twins' numerics; in eval mode
  the fast path swaps in fused native kernels, which change the numbers) and, as a second row, on
  (PyTorch's default).
  The twins' ratio is against the fast-path-off peer; the JSON also has the ratio against the other.
- twins: `torch_tx.generate(model, src, ...)` and `jax_tx.generate(fmodel, params, src, ...)` as a
  user calls them, both with their KV cache: greedy (the ratio to the peer), beam search
  (`--beam-size` 4, length penalty 0.6, `beam_rule="ctranslate2"`: CTranslate2's search, so that the beam rows
  do the same work and return the same tokens) and sampling (temperature 1.0, top-k 50, a fixed seed), the
  last two without a peer. The JAX result is fetched to the host (`np.asarray`) inside the timing.
- CTranslate2 (the optional [deploy] extra): "ctranslate2 float32" and "ctranslate2 int8", the twin's
  weights written by `parity.formats.ctranslate2.write_ct2` (quantization "float32" / "int8", `IdVocabulary`)
  into a temporary directory once per d_model, loaded by `parity.ct2.CT2Model.load` with compute_type
  "default" (the stored type; the JSON records `engine.compute_type`: int8 runs as int8_float32 on CPU) and
  decoded by `parity.ct2.generate`, greedy and beam search (`--beam-size`, length penalty 0.6, its own rule);
  no sampling row. Export and load are not timed; the
  id <-> token string mapping of `parity.ct2.generate` (CTranslate2 takes strings) is. Reported per d_model:
  each twin's tokens/s over ctranslate2 float32's (greedy over greedy, beam over beam), ctranslate2 int8's
  over float32's, and the share of greedy and of beam tokens (position by position over batch x new tokens)
  of each twin and of int8 equal to float32's. Without ctranslate2 importable these rows are left out, said in one line.
- "torch_tx.generate int8" (issue 21; `--no-int8` leaves it out): the same torch twin through
  `torch_tx.quantize.quantize_dynamic_int8` (dynamic int8 nn.Linear, per-channel qint8 weights, the quantized
  engine torch picks: x86 here), greedy and beam search as the twin's rows, timed in the same turns. Its rows are a
  table and a JSON list ("int8") of their own, beside the CTranslate2 int8 rows: tokens/s, its ratio to
  ctranslate2 int8's and to the float32 torch twin's (greedy over greedy, beam over beam), and the share of its
  tokens equal to the float32 torch twin's (CTranslate2 int8's equal to CTranslate2 float32's beside it).
  On AMD CPUs CTranslate2 4.8 picks its AVX2 kernels and oneDNN, not MKL (`CT2_VERBOSE=1` logs it;
  `CT2_FORCE_CPU_ISA`, `CT2_USE_MKL` change it).

All models carry the same weights: a random `torch_tx.Transformer` (seed `--seed`), converted
to the peer (`parity.convert.to_nn_transformer` for the stacks, the embeddings and output layer
copied), to Flax (`parity.convert.torch_to_flax`) and, once the bias below is set, to CTranslate2.
To force the same number of steps everywhere, the output bias of the pad (0), BOS (1) and EOS (2)
ids is set to -1e4, so no decoder ever emits them (random logits are O(1)) and every row runs all
`--new-tokens` steps; the script checks that each result has exactly that many columns and no
pad/BOS/EOS, and fails otherwise. Token counts:
greedy and sampling, batch x new tokens; beam search, batch x new tokens of the returned (best)
hypothesis, although it computes `--beam-size` times as many positions. "ms/token step" is the time
of one call divided by the number of new tokens (one step = one new token for every row).
As a sanity check it prints how many greedy tokens each decoder shares with the peer (random weights
make near-ties common, and one differing argmax changes the rest of the row; no assertion).

Warm-up calls (JAX compilation of each decoding mode, torch's first allocations) are not timed.
Then each entry decodes the batch once per repetition, `--repeats` times, the entries taking turns
(order reversed every repetition), and the fastest repetition counts. ratio = twin tokens/s / peer
tokens/s: below 1, the twin is slower. spread = slowest / fastest repetition - 1; a large spread, or
a load average above 0 before the run, means other processes shared the CPU.
Model: `--layers` encoder and decoder layers each (default 6 + 6, the size of the CTranslate2 comparison;
`--layers 2` is the setting of the README's twins-against-peer table), heads d_model // 64, d_ff
4 * d_model (256: 4 heads, d_ff 1024; 512: 8 heads, 2048), vocab 1000, post-LN, relu, batch 32,
source 32, 64 new tokens. Threads: torch's default unless `--torch-threads` sets it
(restored on return); JAX, XLA's own (every core); CTranslate2, intra_threads = torch's thread count (the
same threads as torch_tx; `--ct2-threads` sets another), inter_threads 1. `--quick` uses 1 torch thread
(so 1 CTranslate2 thread), because 2 torch threads on 2 cores that other processes keep busy make each of
the many small decoding ops wait for a descheduled thread (measured: ~0.2 s per step of a d_model 64
model, against ~1 ms with 1 thread).

Target (issue 4, "Speed"): the twins' greedy decoding reaches at least 5x the peer's tokens/s at
d_model 256 and 512 (with 64 new tokens the peer's decoder runs 1 + 2 + ... + 64 = 2080 positions
per row, a cached decoder 64; the encoder and the output layer cost both the same).

Run from the repository root:
    .venv/bin/python benchmarks/bench_decode.py --json bench_results/decode_ct2.json   # 256, 512; ~13 min, 2 cores
    .venv/bin/python benchmarks/bench_decode.py --quick    # smoke run, seconds
    .venv/bin/python benchmarks/bench_decode.py --layers 2 --d-model 512 --repeats 5 --json bench_results/decode.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import torch  # noqa: E402
from torch import nn as tnn  # noqa: E402

import jax_tx  # noqa: E402
import torch_tx  # noqa: E402
from benchmarks.bench_train import (TorchPeer, environment, print_noisy, print_wall, render_table,  # noqa: E402
                                     settings_of, with_torch_threads, write_json)
from parity import convert, ct2  # noqa: E402
from parity.config import TransformerConfig  # noqa: E402
from parity.formats.ctranslate2 import IdVocabulary, write_ct2  # noqa: E402
from torch_tx.quantize import quantize_dynamic_int8  # noqa: E402

try:
    import ctranslate2  # the optional [deploy] extra
except ImportError:
    ctranslate2 = None

PAD, BOS, EOS = 0, 1, 2
FORBIDDEN_BIAS = -1e4  # output bias of PAD, BOS and EOS: never emitted, every row runs every step
PEER = "torch.nn.Transformer"
PEER_FAST = "torch.nn.Transformer, fast path"
CT2_F32, CT2_INT8 = "ctranslate2 float32", "ctranslate2 int8"
CT2_QUANTIZATION = {CT2_F32: "float32", CT2_INT8: "int8"}  # write_ct2's quantization; loaded as compute_type "default"
TWINS = ("torch_tx.generate", "jax_tx.generate")
TORCH_INT8 = "torch_tx.generate int8"  # torch_tx.quantize.quantize_dynamic_int8 of the torch twin (role "int8")


def make_sources(batch: int, src_len: int, vocab: int, seed: int) -> np.ndarray:
    """(B, S) int64 ids in [3, vocab) (no pad/BOS/EOS), each row right-padded from a random length in [S // 2, S]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(EOS + 1, vocab, size=(batch, src_len))  # [B, S]
    keep = rng.integers(max(1, src_len // 2), src_len + 1, size=(batch, 1))  # [B, 1]
    return np.where(np.arange(src_len) < keep, ids, PAD)  # [B, S]


def build_models(cfg: TransformerConfig, seed: int) -> tuple[torch_tx.Transformer, TorchPeer, Any]:
    """A random torch twin with pad/BOS/EOS forbidden, and the same weights as the peer and as Flax params."""
    torch.manual_seed(seed)
    twin = torch_tx.Transformer(cfg).eval()
    with torch.no_grad():
        twin.generator.bias[[PAD, BOS, EOS]] = FORBIDDEN_BIAS
    state = {k: v.detach().clone() for k, v in twin.state_dict().items()}
    peer = TorchPeer(cfg)
    peer.transformer = convert.to_nn_transformer(state, cfg)
    with torch.no_grad():
        peer.src_embed.weight.copy_(state["src_embed.weight"])
        peer.tgt_embed.weight.copy_(state["tgt_embed.weight"])
        peer.generator.weight.copy_(state["generator.weight"])
        peer.generator.bias.copy_(state["generator.bias"])
    params = convert.torch_to_flax(state, cfg)
    return twin, peer.eval(), params


@torch.inference_mode()
def tutorial_greedy(peer: TorchPeer, src: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The tutorials' greedy loop, batched: src (B, S) -> (B, new_tokens) ids, pad after EOS; no cache."""
    src_pad = src == PAD  # [B, S] True = pad
    memory = peer.transformer.encoder(peer.embed(peer.src_embed, src), src_key_padding_mask=src_pad)  # [B, S, D]
    ys = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)  # [B, 1]
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)  # [B]
    for _ in range(new_tokens):
        causal = tnn.Transformer.generate_square_subsequent_mask(ys.shape[1], device=src.device)  # [T, T] -inf above
        out = peer.transformer.decoder(peer.embed(peer.tgt_embed, ys), memory, tgt_mask=causal,
                                       memory_key_padding_mask=src_pad)  # [B, T, D]
        next_ids = peer.generator(out[:, -1]).argmax(-1)  # [B]
        next_ids = torch.where(done, PAD, next_ids)  # [B]
        ys = torch.cat([ys, next_ids[:, None]], dim=1)  # [B, T + 1]
        done |= next_ids == EOS
        if bool(done.all()):
            break
    return ys[:, 1:]  # [B, n]


@dataclass(frozen=True)
class Entry:
    name: str  # model
    decoding: str
    role: str  # "peer", "twin", "ctranslate2" or "int8" (the torch twin's int8 path: reported on its own)
    mode: str  # "greedy", "beam" or "sample": what the ratios pair up
    ratio_to_peer: bool
    run: Callable[[], np.ndarray]  # one decoding call -> (B, n) ids on the host
    compute_type: str | None = None  # CTranslate2's, as loaded


def fastpath(enabled: bool, fn: Callable[[], torch.Tensor]) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(enabled)
        try:
            return fn().numpy()
        finally:
            torch.backends.mha.set_fastpath_enabled(before)
    return run


def build_entries(cfg: TransformerConfig, args: argparse.Namespace, src_np: np.ndarray,
                  ct2_dir: Path | None, ct2_threads: int) -> list[Entry]:
    """Every entry on one set of weights; the CTranslate2 models (exported into `ct2_dir`, None: left out) after
    the pad/BOS/EOS bias is set, loaded with `ct2_threads` intra_threads."""
    twin, peer, params = build_models(cfg, args.seed)
    fmodel = jax_tx.Transformer(cfg)
    src_t = torch.from_numpy(src_np)  # [B, S] int64
    src_j = jax.device_put(src_np.astype(np.int32))  # [B, S] int32
    n = args.new_tokens
    modes: dict[str, tuple[str, dict[str, Any]]] = {
        "greedy": ("greedy, KV cache", {}),
        "beam": (f"beam {args.beam_size}, KV cache, CTranslate2's rule",
                 {"beam_size": args.beam_size, "length_penalty": 0.6, "beam_rule": "ctranslate2"}),
        "sample": (f"sample T={args.temperature:g} top-k {args.top_k}, KV cache",
                   {"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed})}

    def torch_run(kw: dict[str, Any], model: tnn.Module = twin) -> Callable[[], np.ndarray]:
        return lambda: torch_tx.generate(model, src_t, max_new_tokens=n, bos_id=BOS, eos_id=EOS, **kw).numpy()

    def jax_run(kw: dict[str, Any]) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(jax_tx.generate(fmodel, params, src_j, max_new_tokens=n, bos_id=BOS,
                                                  eos_id=EOS, **kw))

    def ct2_run(model: ct2.CT2Model, kw: dict[str, Any]) -> Callable[[], np.ndarray]:
        return lambda: ct2.generate(model, src_np, max_new_tokens=n, bos_id=BOS, eos_id=EOS, **kw)

    ct2_models = {}
    if ct2_dir is not None:
        weights = {k: v.detach().numpy() for k, v in twin.state_dict().items()}  # canonical, bias included
        for name, quantization in CT2_QUANTIZATION.items():
            write_ct2(ct2_dir / quantization, cfg, weights, IdVocabulary(cfg), "ids", quantization=quantization)
            ct2_models[name] = ct2.CT2Model.load(ct2_dir / quantization, device="cpu", compute_type="default",
                                                 threads=ct2_threads)
    entries = [Entry(PEER, "greedy, prefix recomputed", "peer", "greedy", False,
                     fastpath(False, lambda: tutorial_greedy(peer, src_t, n)))]
    if args.peer_fast_path:
        entries.append(Entry(PEER_FAST, "greedy, prefix recomputed", "peer", "greedy", False,
                             fastpath(True, lambda: tutorial_greedy(peer, src_t, n))))
    int8 = quantize_dynamic_int8(twin) if args.int8 else None  # after the pad/BOS/EOS bias, like CTranslate2's
    for mode, (decoding, kw) in modes.items():
        entries.append(Entry("torch_tx.generate", decoding, "twin", mode, mode == "greedy", torch_run(kw)))
        entries.append(Entry("jax_tx.generate", decoding, "twin", mode, mode == "greedy", jax_run(kw)))
        if mode != "sample":
            entries.extend(Entry(name, decoding, "ctranslate2", mode, False, ct2_run(model, kw),
                                 model.engine.compute_type) for name, model in ct2_models.items())
            if int8 is not None:
                entries.append(Entry(TORCH_INT8, decoding, "int8", mode, False, torch_run(kw, int8),
                                     f"qint8 per-channel, {torch.backends.quantized.engine}"))
    return entries


def check_output(entry: Entry, out: np.ndarray, batch: int, new_tokens: int) -> None:
    """Every row must have run all `new_tokens` steps: otherwise the token counts would differ between entries."""
    if out.shape != (batch, new_tokens):
        raise RuntimeError(f"{entry.name} ({entry.decoding}) returned shape {out.shape}, expected "
                           f"{(batch, new_tokens)}: not every row decoded {new_tokens} tokens")
    if np.isin(out, [PAD, BOS, EOS]).any():
        raise RuntimeError(f"{entry.name} ({entry.decoding}) emitted pad, BOS or EOS although their logits "
                           f"are {FORBIDDEN_BIAS:g} below the rest")


def key(entry: Entry) -> str:
    return f"{entry.name} | {entry.decoding}"


def measure(entries: list[Entry], args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Warm every entry up, then time one call `repeats` times, taking turns; seconds per call, and the outputs."""
    outputs: dict[str, np.ndarray] = {}
    for entry in entries:
        for _ in range(args.warmup):
            outputs[key(entry)] = entry.run()
        check_output(entry, outputs[key(entry)], args.batch, args.new_tokens)
    times: dict[str, list[float]] = {key(e): [] for e in entries}
    for rep in range(args.repeats):
        for entry in entries if rep % 2 == 0 else entries[::-1]:
            start = time.perf_counter()
            out = entry.run()
            times[key(entry)].append(time.perf_counter() - start)
            check_output(entry, out, args.batch, args.new_tokens)
    return times, outputs


def config_for(args: argparse.Namespace, d_model: int) -> TransformerConfig:
    return TransformerConfig(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, d_model=d_model,
                             num_heads=max(1, d_model // 64), num_encoder_layers=args.layers,
                             num_decoder_layers=args.layers, d_ff=4 * d_model, dropout=0.0,
                             max_len=max(512, args.src_len, args.new_tokens + 1), pad_id=PAD)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    headers = ["d_model", "model", "decoding", "tokens/s", "ms/token step", "spread", "twin/peer", "vs CT2 f32",
               "greedy = CT2 f32"]
    cells = [[str(r["d_model"]), r["model"], r["decoding"], f"{r['tokens_per_s']:,.0f}",
              f"{r['ms_per_token_step']:.2f}", f"{max(r['seconds']) / min(r['seconds']) - 1:.0%}",
              f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
              f"{r['ratio_to_ct2_float32']:.2f}x" if r["ratio_to_ct2_float32"] is not None else "-",
              f"{r['same_greedy_tokens_as_ct2_float32']:.1%}" if r["same_greedy_tokens_as_ct2_float32"] is not None
              else "-"] for r in rows]
    render_table(title, headers, cells, [r["d_model"] for r in rows], left=(1, 2), min_width=190)


def ct2_comparison(d_model: int, entries: list[Entry], speed: dict[str, float],
                   outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per d_model: tokens/s ratios to CTranslate2 float32 (greedy to greedy, beam to beam) of each twin and of
    CTranslate2 int8, and their share of greedy tokens equal to CTranslate2 float32's (over B x new tokens)."""
    keys = {(e.name, e.mode): key(e) for e in entries}
    ratios = {mode: {name: speed[keys[name, mode]] / speed[keys[CT2_F32, mode]] for name in (*TWINS, CT2_INT8)}
              for mode in ("greedy", "beam")}
    same = {mode: {name: float((outputs[keys[name, mode]] == outputs[keys[CT2_F32, mode]]).mean())  # over [B, n]
                   for name in (*TWINS, CT2_INT8)} for mode in ("greedy", "beam")}
    return {"d_model": d_model, "compute_types": {e.name: e.compute_type for e in entries if e.compute_type},
            "ratios_to_ct2_float32": ratios, "same_greedy_tokens_as_ct2_float32": same["greedy"],
            "same_beam_tokens_as_ct2_float32": same["beam"]}


def int8_rows(d_model: int, entries: list[Entry], speed: dict[str, float], times: dict[str, list[float]],
              outputs: dict[str, np.ndarray], new_tokens: int) -> list[dict[str, Any]]:
    """The torch twin's int8 rows: tokens/s, ratios to CTranslate2 int8 (None without it) and to the float32 torch
    twin, and the share of tokens (over B x new tokens) equal to the float32 twin's; CTranslate2 int8's share equal to
    CTranslate2 float32's beside it."""
    keys = {(e.name, e.mode): key(e) for e in entries}
    rows = []
    for e in entries:
        if e.role != "int8":
            continue
        k, f32 = key(e), keys["torch_tx.generate", e.mode]
        ct2_int8, ct2_f32 = keys.get((CT2_INT8, e.mode)), keys.get((CT2_F32, e.mode))
        rows.append({"d_model": d_model, "model": e.name, "decoding": e.decoding, "mode": e.mode,
                     "quantization": e.compute_type, "tokens_per_s": speed[k],
                     "ms_per_token_step": 1000 * min(times[k]) / new_tokens, "seconds": times[k],
                     "ratio_to_ct2_int8": speed[k] / speed[ct2_int8] if ct2_int8 else None,
                     "ratio_to_torch_float32": speed[k] / speed[f32],
                     "same_tokens_as_torch_float32": float((outputs[k] == outputs[f32]).mean()),
                     "ct2_int8_same_tokens_as_ct2_float32": (float((outputs[ct2_int8] == outputs[ct2_f32]).mean())
                                                             if ct2_int8 else None)})
    return rows


def print_int8_table(rows: list[dict[str, Any]]) -> None:
    def pct(x: float | None) -> str:
        return f"{x:.1%}" if x is not None else "-"

    headers = ["d_model", "decoding", "tokens/s", "ms/token step", "spread", "vs CT2 int8", "vs torch f32",
               "tokens = torch f32", "CT2 int8 = CT2 f32"]
    cells = [[str(r["d_model"]), r["decoding"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_token_step']:.2f}",
              f"{max(r['seconds']) / min(r['seconds']) - 1:.0%}",
              f"{r['ratio_to_ct2_int8']:.2f}x" if r["ratio_to_ct2_int8"] is not None else "-",
              f"{r['ratio_to_torch_float32']:.2f}x", pct(r["same_tokens_as_torch_float32"]),
              pct(r["ct2_int8_same_tokens_as_ct2_float32"])] for r in rows]
    render_table(f"{TORCH_INT8} (torch_tx.quantize.quantize_dynamic_int8, {rows[0]['quantization']})", headers, cells,
                 [r["d_model"] for r in rows], left=(1,), min_width=175)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, nargs="+", default=[256, 512], help="d_model values (default 256 512)")
    parser.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each (default 6)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--src-len", type=int, default=32, help="source length (default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per row, forced (default 64)")
    parser.add_argument("--vocab", type=int, default=1000, help="source and target vocabulary size (default 1000)")
    parser.add_argument("--beam-size", type=int, default=4, help="beam search width (default 4)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, default=50, help="sampling top-k (default 50)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls, at least 1 (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per entry, the fastest counts (default 3)")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--ct2-threads", type=int, help="CTranslate2 intra_threads (default: torch's thread count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help=f"leave out {TORCH_INT8} (the torch twin's dynamic int8 path)")
    parser.add_argument("--no-peer-fast-path", dest="peer_fast_path", action="store_false",
                        help="leave out the peer with PyTorch's MHA fast path on")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: d_model 64, 1 layer, batch 2, source 8, 4 new tokens, vocab 128, "
                             "1 torch thread, 1 warm-up, 1 repetition")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, environment and results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.batch, args.src_len, args.new_tokens, args.vocab = [64], 1, 2, 8, 4, 128
        args.warmup, args.repeats, args.torch_threads = 1, 1, 1
    if any(n is not None and n < 1 for n in (args.torch_threads, args.ct2_threads)):
        parser.error("--torch-threads and --ct2-threads must be at least 1")
    if args.warmup < 1 or args.repeats < 1 or args.new_tokens < 1 or args.beam_size < 1:
        parser.error("--warmup, --repeats, --new-tokens and --beam-size must be at least 1")
    if not 0 < args.top_k < args.vocab - 3:
        parser.error(f"--top-k must be in [1, vocab - 3) = [1, {args.vocab - 3}) so that pad/BOS/EOS stay out of it")
    if args.vocab <= EOS + 1:
        parser.error("--vocab must leave ids beyond pad, BOS and EOS")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return with_torch_threads(args.torch_threads, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    wall_start = time.perf_counter()
    env = environment()
    ct2_threads = args.ct2_threads or torch.get_num_threads()
    print(f"torch {env['torch']} ({env['torch_threads']} threads), jax {env['jax']}, flax {env['flax']}, "
          f"python {env['python']}, {env['cpu_count']} CPUs, jax devices {env['jax_devices']}, "
          f"load average {env['load_average'][0]:.2f}")
    if ctranslate2 is None:
        print("ctranslate2 is not installed (the optional [deploy] extra): no CTranslate2 rows")
    else:
        threads_from = "--ct2-threads" if args.ct2_threads else "torch's thread count"
        print(f"ctranslate2 {ctranslate2.__version__}, intra_threads {ct2_threads} ({threads_from}), inter_threads 1")
    print(f"float32 CPU, no grad, batch {args.batch}, src {args.src_len}, {args.new_tokens} new tokens forced "
          f"(pad/BOS/EOS output bias {FORBIDDEN_BIAS:g}), vocab {args.vocab}, {args.layers}+{args.layers} layers; "
          f"{args.warmup} warm-up call(s), best of {args.repeats}")
    src = make_sources(args.batch, args.src_len, args.vocab, args.seed)  # [B, S]
    tokens = args.batch * args.new_tokens
    rows: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    int8: list[dict[str, Any]] = []
    for d_model in args.d_model:
        cfg = config_for(args, d_model)
        with tempfile.TemporaryDirectory(prefix="bench_decode_ct2_") as tmp:
            entries = build_entries(cfg, args, src, Path(tmp) if ctranslate2 is not None else None, ct2_threads)
            times, outputs = measure(entries, args)
        speed = {key(e): tokens / min(times[key(e)]) for e in entries}
        int8.extend(int8_rows(d_model, entries, speed, times, outputs, args.new_tokens))
        entries = [e for e in entries if e.role != "int8"]  # timed in the same turns, reported on their own
        peer, peer_fast = f"{PEER} | greedy, prefix recomputed", f"{PEER_FAST} | greedy, prefix recomputed"
        comparison = ct2_comparison(d_model, entries, speed, outputs) if ctranslate2 is not None else None
        for e in entries:
            k = key(e)
            vs_ct2 = comparison["ratios_to_ct2_float32"].get(e.mode, {}).get(e.name) if comparison else None
            same_ct2 = (comparison["same_greedy_tokens_as_ct2_float32"].get(e.name)
                        if comparison and e.mode == "greedy" else None)
            rows.append({"d_model": d_model, "num_heads": cfg.num_heads, "d_ff": cfg.d_ff, "model": e.name,
                         "decoding": e.decoding, "role": e.role, "mode": e.mode, "compute_type": e.compute_type,
                         "tokens": tokens, "tokens_per_s": speed[k],
                         "ms_per_token_step": 1000 * min(times[k]) / args.new_tokens,
                         "ratio": speed[k] / speed[peer] if e.ratio_to_peer else None,
                         "ratio_fast_path_peer": (speed[k] / speed[peer_fast]
                                                  if e.ratio_to_peer and peer_fast in speed else None),
                         "ratio_to_ct2_float32": vs_ct2, "same_greedy_tokens_as_ct2_float32": same_ct2,
                         "seconds": times[k]})
        for e in entries:
            k = key(e)
            if e.mode == "greedy" and e.name != PEER:
                agreement.append({"d_model": d_model, "model": e.name,
                                  "same_tokens_as_peer": float((outputs[k] == outputs[peer]).mean())})
        if comparison:
            comparisons.append(comparison)
    print_table(rows, f"Decoding throughput (generated tokens/s, higher is better; batch {args.batch}, "
                      f"{args.new_tokens} new tokens, {args.layers}+{args.layers} layers)")
    for a in agreement:
        print(f"d_model {a['d_model']}: {a['model']} greedy tokens equal to {PEER}'s: {a['same_tokens_as_peer']:.1%}")
    for r in rows:
        if r["ratio_fast_path_peer"] is not None:
            print(f"d_model {r['d_model']}: {r['model']} greedy vs {PEER_FAST}: {r['ratio_fast_path_peer']:.2f}x")
    for c in comparisons:
        types = ", ".join(f"{name} {kind}" for name, kind in c["compute_types"].items())
        print(f"d_model {c['d_model']}: compute types {types}")
        for mode, ratios in c["ratios_to_ct2_float32"].items():
            print(f"d_model {c['d_model']}: {mode} tokens/s / {CT2_F32}'s: "
                  + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
        for mode in ("greedy", "beam"):
            print(f"d_model {c['d_model']}: {mode} tokens equal to {CT2_F32}'s: " + ", ".join(
                f"{name} {share:.1%}" for name, share in c[f"same_{mode}_tokens_as_ct2_float32"].items()))
    if int8:
        print_int8_table(int8)
    wall = time.perf_counter() - wall_start
    print_noisy(rows + int8, lambda r: f"{r['model']} ({r['decoding']}) at d_model {r['d_model']}")
    print_wall(wall, env)
    if args.json:
        ct2_info = ({"version": ctranslate2.__version__, "intra_threads": ct2_threads, "inter_threads": 1,
                     "quantization": CT2_QUANTIZATION, "load_compute_type": "default"}
                    if ctranslate2 is not None else None)
        write_json(args.json, {"settings": settings_of(args), "environment": env, "tokens_per_call": tokens,
                               "forbidden_bias": FORBIDDEN_BIAS, "wall_seconds": wall, "results": rows,
                               "greedy_agreement": agreement, "ctranslate2": ct2_info,
                               "ctranslate2_comparison": comparisons, "int8": int8})
    return 0


if __name__ == "__main__":
    sys.exit(main())
