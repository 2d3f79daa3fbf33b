"""Scaling of the JAX trainer over a device mesh: data parallelism and fsdp against one device.

Measured, for `--config` (default small) on the builtin translation data, float32: the time of a whole
`jax_tx.train.Trainer.train_step` (the jitted step `twin train --mesh` runs: each device's share of the rows
forward and backward, the gradient all-reduce (data) or the parameter all-gather and gradient
reduce-scatter (fsdp), clipping, Adam), on the same global batches, after a warm-up pass over the same
batches that compiles each shape; the target tokens per second; and what one device holds: bytes of its
parameters and of its Adam moments (fsdp: its shards). "single" is the plain Trainer (a 1 x 1 mesh).

The devices are simulated (`--xla_force_host_platform_device_count`): on a 2-core machine they share the
same two cores, so the times show the cost of partitioning and collectives, not a speed-up; the memory
columns are what a real mesh of that many devices would hold per device.

Run from the repository root (each configuration is a fresh process; all of them take 1 to 3 minutes):
    .venv/bin/python benchmarks/bench_distributed_jax.py
    .venv/bin/python benchmarks/bench_distributed_jax.py --json bench_results/distributed_jax.json
    .venv/bin/python benchmarks/bench_distributed_jax.py --devices 1 8 --strategies fsdp --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One configuration in this process (XLA_FLAGS set by `launch`): time the steps, write the report to --out."""
    import jax
    import numpy as np
    import optax

    from jax_tx import distributed
    from jax_tx.train import Trainer
    from parity.batching import Batcher
    from parity.data import load_corpus
    from parity.tokenizer import train_tokenizer
    from parity.train import TrainConfig, model_config

    mesh = None if args.strategy == "single" else (
        {"data": args.devices, "fsdp": 1} if args.strategy == "data" else {"data": 1, "fsdp": args.devices})
    context = distributed.setup("cpu", mesh=mesh)
    corpus = load_corpus("builtin", limit=args.limit)
    tokenizer = train_tokenizer(corpus.texts(), vocab_size=1000)
    cfg = model_config(args.config, tokenizer.vocab_size)
    tcfg = TrainConfig(max_tokens=args.max_tokens)
    batcher = Batcher(tokenizer.encode([p[0] for p in corpus.train]), tokenizer.encode([p[1] for p in corpus.train]),
                      pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                      max_tokens=tcfg.max_tokens, max_len=cfg.max_len, bucket_step=tcfg.bucket_step, seed=0)
    stream = batcher.stream()
    batches = [next(stream)[1] for _ in range(args.steps)]
    trainer = Trainer(cfg, tcfg, context=context)
    compile_start = time.perf_counter()
    for batch in batches[:args.warmup] if args.warmup else batches:  # compiles every shape of the timed batches
        float(trainer.train_step(batch)["loss"])
    warmup_s = time.perf_counter() - compile_start
    times, tokens = [], 0
    for batch in batches:
        start = time.perf_counter()
        float(trainer.train_step(batch)["loss"])
        times.append(time.perf_counter() - start)
        tokens += batch.tokens
    state = trainer.train_state
    moments = [optax.tree_utils.tree_get(state.opt_state, name) for name in ("mu", "nu")]
    held = distributed.bytes_per_device(state.params)
    report = {"strategy": args.strategy, "devices": trainer.context.devices, "step_s": float(np.median(times)),
              "mean_step_s": float(np.mean(times)), "tokens_per_s": tokens / sum(times), "warmup_s": warmup_s,
              "param_bytes_per_device": max(held.values()),
              "adam_bytes_per_device": max(distributed.bytes_per_device(moments).values()),
              "param_bytes_total": sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(
                  state.params))}
    Path(args.out).write_text(json.dumps(report))


def launch(strategy: str, devices: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh process with `devices` simulated CPU devices; its report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--strategy", strategy,
                   "--devices", str(devices), "--out", str(out), "--config", args.config, "--limit", str(args.limit),
                   "--max-tokens", str(args.max_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode:
            raise RuntimeError(f"{strategy} x {devices} failed:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'strategy':<8} {'devices':>7} {'step s':>8} {'tokens/s':>9} {'params/device':>14} {'adam/device':>12}")
    for r in results:
        print(f"{r['strategy']:<8} {r['devices']:>7} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['param_bytes_per_device'] / 2 ** 20:>10.2f} MiB {r['adam_bytes_per_device'] / 2 ** 20:>8.2f} MiB")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration; the report (settings, environment, results)."""
    import jax

    configurations = [("single", 1)] * (1 in args.devices) + [(s, n) for s in args.strategies for n in args.devices]
    results = []
    for strategy, devices in configurations:
        started = time.perf_counter()
        results.append({**launch(strategy, devices, args), "launch_s": time.perf_counter() - started})
    return {"benchmark": "jax sharded training step", "settings": {
                "config": args.config, "limit": args.limit, "max_tokens": args.max_tokens, "steps": args.steps,
                "dtype": "float32", "devices": "simulated CPU devices (xla_force_host_platform_device_count)"},
            "environment": {"jax": jax.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                            "machine": platform.machine(), "load_average": os.getloadavg()[0]},
            "results": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--strategies", nargs="+", choices=["data", "fsdp"], default=["data", "fsdp"])
    parser.add_argument("--config", default="small", help="model preset or JSON file (default small)")
    parser.add_argument("--limit", type=int, default=2000, help="training examples read (default 2000)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="token budget of a global batch")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (the first batches of the stream)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 0: one pass over the "
                        "timed batches, which compiles each of their shapes)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=["single", "data", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        args.devices = args.devices[0]
        worker(args)
        return None
    report = run(args)
    print_table(report["results"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    else:
        print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
