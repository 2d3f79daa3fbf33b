"""Scaling of the torch trainer over torchrun processes: DDP and FSDP2 against one process.

Measured, for `--config` (default small) on the builtin translation data, float32, dropout as configured:
the time of a whole `torch_tx.train.Trainer.train_step` on the same global batches (the step `twin train`
runs: forward and backward on this process's share of the rows, the gradient all-reduce (DDP) or
all-gathers and reduce-scatters (FSDP2), clipping, Adam), after warm-up steps; the target tokens per second
of the global batches; and what one process holds: bytes of its parameters and of its Adam moments (FSDP2:
its shards), and its peak resident memory. "single" is the plain one-process Trainer (no process group).

Each process computes with `--threads` threads (default 1): on a 2-core machine 2 processes use both cores and
4 oversubscribe them (the timings then show the cost of sharing, not a speed-up). One process with 2 OpenMP
threads is the other way to use both cores, but it degrades badly as soon as anything else runs (measured here
at 13x slower under a load of 5), so it is measured only on request (--threads 2).

Run from the repository root (each configuration is a torchrun launch; all of them take 1 to 3 minutes):
    .venv/bin/python benchmarks/bench_distributed_torch.py
    .venv/bin/python benchmarks/bench_distributed_torch.py --json bench_results/distributed_torch.json
    .venv/bin/python benchmarks/bench_distributed_torch.py --processes 1 2 --strategies fsdp --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration (under torchrun unless --strategy single): time the steps, write rank 0's
    report to --out."""
    import numpy as np
    import torch

    from parity.batching import Batcher
    from parity.data import load_corpus
    from parity.tokenizer import train_tokenizer
    from parity.train import TrainConfig, model_config
    from torch_tx import distributed
    from torch_tx.train import Trainer

    torch.set_num_threads(args.threads)
    context = None if args.strategy == "single" else distributed.setup("cpu", fsdp=args.strategy == "fsdp")
    corpus = load_corpus("builtin", limit=args.limit)
    tokenizer = train_tokenizer(corpus.texts(), vocab_size=1000)
    cfg = model_config(args.config, tokenizer.vocab_size)
    tcfg = TrainConfig(max_tokens=args.max_tokens)
    batcher = Batcher(tokenizer.encode([p[0] for p in corpus.train]), tokenizer.encode([p[1] for p in corpus.train]),
                      pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                      max_tokens=tcfg.max_tokens, max_len=cfg.max_len, bucket_step=tcfg.bucket_step, seed=0)
    stream = batcher.stream()
    batches = [next(stream)[1] for _ in range(args.warmup + args.steps)]
    trainer = Trainer(cfg, tcfg, context=context)
    times, tokens = [], 0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        metrics = trainer.train_step(batch)
        float(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += batch.tokens
    moments = [t for slot in trainer.optimizer.state.values() for k, t in slot.items() if k != "step"]
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])  # MiB on Linux
    report = {"strategy": args.strategy, "processes": 1 if context is None else context.processes,
              "threads_per_process": args.threads, "step_s": float(np.median(times)),
              "mean_step_s": float(np.mean(times)), "tokens_per_s": tokens / sum(times),
              "param_bytes_per_process": distributed.local_bytes(trainer.params.values()),
              "adam_bytes_per_process": distributed.local_bytes(moments),
              "param_bytes_total": sum(p.numel() * p.element_size() for p in
                                       {id(p): p for p in trainer.params.values()}.values()),
              "max_rss_mib": float((rss if context is None else context.all_gather(rss)).max())}
    if context is not None:
        context.close()
    if context is None or context.rank == 0:
        Path(args.out).write_text(json.dumps(report))


def launch(strategy: str, processes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in fresh processes; rank 0's report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        launcher = [] if strategy == "single" else ["-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(processes)]
        command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", "--strategy", strategy,
                   "--threads", str(args.threads), "--out", str(out), "--config", args.config,
                   "--limit", str(args.limit), "--max-tokens", str(args.max_tokens), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode:
            raise RuntimeError(f"{strategy} x {processes} failed:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'strategy':<8} {'procs':>5} {'threads':>7} {'step s':>8} {'tokens/s':>9} {'params/proc':>12} "
          f"{'adam/proc':>12} {'max RSS':>9}")
    for r in results:
        print(f"{r['strategy']:<8} {r['processes']:>5} {r['threads_per_process']:>7} {r['step_s']:>8.3f} "
              f"{r['tokens_per_s']:>9.0f} {r['param_bytes_per_process'] / 2 ** 20:>9.2f} MiB "
              f"{r['adam_bytes_per_process'] / 2 ** 20:>9.2f} MiB {r['max_rss_mib']:>5.0f} MiB")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration; the report (settings, environment, results)."""
    import torch

    configurations = [("single", 1)] * (1 in args.processes) + [(s, n) for s in args.strategies for n in args.processes]
    results = []
    for strategy, processes in configurations:
        started = time.perf_counter()
        results.append({**launch(strategy, processes, args), "launch_s": time.perf_counter() - started})
    return {"benchmark": "torch distributed training step", "settings": {
                "config": args.config, "limit": args.limit, "max_tokens": args.max_tokens, "steps": args.steps,
                "warmup": args.warmup, "dtype": "float32", "backend": "gloo"},
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count(), "machine": platform.machine(),
                            "load_average": os.getloadavg()[0]},
            "results": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--strategies", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    parser.add_argument("--config", default="small", help="model preset or JSON file (default small)")
    parser.add_argument("--limit", type=int, default=2000, help="training examples read (default 2000)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="token budget of a global batch")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
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
