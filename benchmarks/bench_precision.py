"""Training-step throughput of each twin's trainer in float32, bfloat16 mixed precision and with torch.compile.

Measured: target tokens per second (the non-pad labels) of the steps `twin train` runs
(`torch_tx.train.Trainer`, `jax_tx.train.Trainer`: label smoothing, clipping, the warmup schedule, metrics
fetched every step), dropout 0.1, on CPU, in one process, on the batches of benchmarks/bench_train.py
(`make_batches`: the same numpy batches for every trainer):

- torch: float32; bfloat16 mixed precision (`--dtype bfloat16`: float32 master weights and Adam moments,
  the forward under torch.autocast); torch.compile of the model (`--compile`); compile + bfloat16.
- jax: float32; bfloat16 mixed precision (the matmuls' weights and inputs cast to bfloat16 inside the
  jitted loss, float32 master weights). The JAX step is always jitted: it has no compile variant.

"first step" is the wall time of each trainer's first step, compilation included (torch.compile's
graphs and kernels, XLA's jit; for eager torch, first allocations). torch.compile starts from an empty
on-disk cache (TORCHINDUCTOR_CACHE_DIR is a fresh temporary directory unless --warm-cache), so that a
repeated run times a whole compilation, not cache hits. Then every trainer warms up and is
timed as in bench_train (`measure`: `--steps` steps `--repeats` times, taking turns, order reversed
every repetition, the fastest repetition counts). speedup = tokens/s / tokens/s of the same framework's
float32 trainer. spread = slowest / fastest repetition - 1: a large spread, or a load average above 0,
means other processes shared the CPU.

Run from the repository root:
    .venv/bin/python benchmarks/bench_precision.py            # d_model 256 and 512, a few minutes
    .venv/bin/python benchmarks/bench_precision.py --quick    # smoke run, about a minute (torch.compile)
    .venv/bin/python benchmarks/bench_precision.py --json bench_results/precision.json
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax_tx.train as jax_train  # noqa: E402
import torch_tx.train as torch_train  # noqa: E402
from bench_train import (NUM_BATCHES, Entry, TrainerRunner, config_for, environment, make_batches,  # noqa: E402
                         measure, print_noisy, print_wall, render_table, settings_of, write_json)


@dataclass(frozen=True)
class Variant:
    """One trainer setting: its table name, framework, dtype name (`PRECISIONS`) and torch.compile or not."""

    name: str
    framework: str
    dtype: str
    compile: bool = False

    def trainer_class(self):
        """The framework's Trainer with this variant's dtype (and compile) bound."""
        if self.framework == "jax":
            return functools.partial(jax_train.Trainer, dtype=self.dtype)
        return functools.partial(torch_train.Trainer, dtype=self.dtype, compile=self.compile)


VARIANTS = (Variant("torch_tx float32", "torch", "float32"),
            Variant("torch_tx bf16 mixed", "torch", "bfloat16"),
            Variant("torch_tx compile", "torch", "float32", compile=True),
            Variant("torch_tx compile + bf16", "torch", "bfloat16", compile=True),
            Variant("jax_tx float32", "jax", "float32"),
            Variant("jax_tx bf16 mixed", "jax", "bfloat16"))
BASELINES = {"torch": "torch_tx float32", "jax": "jax_tx float32"}


def build_entries(cfg, batches, seed: int, variants=VARIANTS) -> tuple[list[Entry], dict[str, float]]:
    """Each variant's trainer on `batches`, and the wall time of its first step (seconds), by name."""
    entries, first = [], {}
    for variant in variants:
        runner = TrainerRunner(variant.trainer_class(), cfg, batches, seed)
        start = time.perf_counter()
        runner.run(1)
        first[variant.name] = time.perf_counter() - start
        entries.append(Entry(variant.name, variant.framework, "twin", runner))
    return entries, first


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    headers = ["d_model", "trainer", "tokens/s", "ms/step", "spread", "speedup", "first step"]
    cells = [[str(r["d_model"]), r["model"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:.1f}",
              f"{max(r['seconds']) / min(r['seconds']) - 1:.0%}", f"{r['speedup']:.2f}x",
              f"{r['first_step_s']:.2f} s"] for r in rows]
    render_table(title, headers, cells, [r["d_model"] for r in rows], left=(1,), min_width=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, nargs="+", default=[256, 512], help="d_model values (default 256 512)")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each (default 2)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--src-len", type=int, default=32, help="source length (default 32)")
    parser.add_argument("--tgt-len", type=int, default=32, help="target length (default 32)")
    parser.add_argument("--vocab", type=int, default=1000, help="source and target vocabulary size (default 1000)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per repetition (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps after the first, at least 1 "
                        "(default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions, the fastest counts (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: d_model 64, 1 layer, batch 4, lengths 16, 2 steps, 1 warm-up, 1 repetition")
    parser.add_argument("--warm-cache", action="store_true", help="keep torch's on-disk compile cache (first steps "
                        "of a repeated run are then cache hits)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, environment and results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.batch, args.src_len, args.tgt_len = [64], 1, 4, 16, 16
        args.steps, args.warmup, args.repeats = 2, 1, 1
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cache = None if args.warm_cache else tempfile.mkdtemp(prefix="bench_precision_inductor_")
    if cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        run(args)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    wall_start = time.perf_counter()
    env = environment()
    print(f"torch {env['torch']} ({env['torch_threads']} threads), jax {env['jax']}, python {env['python']}, "
          f"{env['cpu_count']} CPUs ({env['cpu']}), load average {env['load_average'][0]:.2f}")
    print(f"CPU, dropout 0.1, batch {args.batch}, src {args.src_len}, tgt {args.tgt_len}, vocab {args.vocab}, "
          f"{args.layers}+{args.layers} layers; first step, {args.warmup} warm-up steps, best of "
          f"{args.repeats} x {args.steps} steps")
    batches = make_batches(NUM_BATCHES, args.batch, args.src_len, args.tgt_len, args.vocab, args.seed)
    tokens = sum(batches[i % len(batches)].tokens for i in range(args.steps))
    rows: list[dict[str, Any]] = []
    for d_model in args.d_model:
        cfg = config_for(args, d_model)
        entries, first = build_entries(cfg, batches, args.seed)
        times = measure(entries, args.steps, args.warmup, args.repeats)
        speed = {e.name: tokens / min(times[e.name]) for e in entries}
        for variant in VARIANTS:
            name = variant.name
            rows.append({"d_model": d_model, "num_heads": cfg.num_heads, "d_ff": cfg.d_ff, "model": name,
                         "framework": variant.framework, "dtype": variant.dtype, "compile": variant.compile,
                         "tokens_per_s": speed[name], "ms_per_step": 1000 * min(times[name]) / args.steps,
                         "speedup": speed[name] / speed[BASELINES[variant.framework]],
                         "first_step_s": first[name], "seconds": times[name]})
        del entries
    print_table(rows, "Trainer throughput by precision (target tokens/s, higher is better; speedup vs the "
                      "framework's float32 trainer)")
    wall = time.perf_counter() - wall_start
    print_noisy(rows)
    print_wall(wall, env)
    if args.json:
        write_json(args.json, {"settings": settings_of(args), "environment": env, "tokens_per_repetition": tokens,
                               "wall_seconds": wall, "load_average_after": os.getloadavg(), "results": rows})


if __name__ == "__main__":
    main()
