"""JAX compilations per batch shape: length buckets per side against buckets shared by both sides.

A corpus of 20,000 random pairs whose source lengths are uniform in 3..119 tokens and whose target
lengths are 0.8-1.25x the source's (max_len 128, 4096-token batches, bucket step 8), batched as
`twin train` does (`parity.batching.Batcher`), trains the `small` model with `jax_tx.train.Trainer` for
`--steps` steps under each `--bucket-sides` setting. Every new batch shape compiles the step once; the
first step of each shape is counted as compilation. Reports steps, distinct shapes, wall time, the time
of those first steps and the padding share.

    .venv/bin/python benchmarks/bench_buckets.py [--steps 150] [--json bench_results/buckets.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax_tx.train as jax_train  # noqa: E402
from parity.batching import Batcher  # noqa: E402
from parity.config import TransformerConfig  # noqa: E402
from parity.train import PRESETS, TrainConfig  # noqa: E402


def corpus(count: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    src_lengths = rng.integers(3, 120, count)  # [N]
    tgt_lengths = np.clip((src_lengths * rng.uniform(0.8, 1.25, count)).astype(int), 2, 126)  # [N]
    return [rng.integers(4, 1000, n) for n in src_lengths], [rng.integers(4, 1000, n) for n in tgt_lengths]


def run(sides: str, src, tgt, steps: int) -> dict[str, float]:
    cfg = TransformerConfig(src_vocab_size=1000, tgt_vocab_size=1000, **PRESETS["small"])
    batcher = Batcher(src, tgt, pad_id=0, bos_id=1, eos_id=2, max_tokens=4096, max_len=cfg.max_len, bucket_step=8,
                      shared_length=sides == "shared")
    trainer = jax_train.Trainer(cfg, TrainConfig(bucket_sides=sides))
    shapes: set[tuple[int, ...]] = set()
    first = 0.0
    start = time.perf_counter()
    for _, (_, batch) in zip(range(steps), batcher.stream()):
        t = time.perf_counter()
        float(trainer.train_step(batch)["loss"])
        shape = batch.src.shape + batch.tgt_in.shape
        if shape not in shapes:
            shapes.add(shape)
            first += time.perf_counter() - t
    wall = time.perf_counter() - start
    return {"bucket_sides": sides, "steps": steps, "shapes": len(shapes), "seconds": wall,
            "first_step_of_shape_seconds": first, "other_steps_seconds": wall - first,
            "padding": batcher.padding(0), "buckets_in_epoch": len(batcher.buckets)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    src, tgt = corpus(20000, 0)
    print(f"load average {os.getloadavg()[0]:.2f}")
    rows = [run(sides, src, tgt, args.steps) for sides in ("separate", "shared")]
    print("| bucket sides | steps | shapes compiled | s | s in first steps of a shape | s other steps | padding |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bucket_sides']} | {r['steps']} | {r['shapes']} | {r['seconds']:.0f} | "
              f"{r['first_step_of_shape_seconds']:.0f} | {r['other_steps_seconds']:.0f} | {r['padding']:.1%} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load_average": os.getloadavg(), "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
