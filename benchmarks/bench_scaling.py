"""Scaling of the trainers over devices and processes: JAX meshes and torchrun DDP/FSDP2 against one device.

Measured, for `--config` (default small) on the builtin translation data, float32: the time of a whole
`Trainer.train_step` of each framework (the step `twin train` runs: each device's or process's share of the
rows forward and backward; JAX data: gradient all-reduce, fsdp: parameter all-gather and gradient
reduce-scatter; torch DDP: gradient all-reduce, FSDP2: per-layer all-gathers and reduce-scatters; then
clipping and Adam) on the same global batches, after a warm-up pass over the same batches (which compiles
each JAX shape); the target tokens per second; what one device or process holds: bytes of its parameters
and of its Adam moments (sharded: its shards); and the peak resident memory of a process.

On this 2-core machine the JAX devices are simulated (`--xla_force_host_platform_device_count`) and share
the two cores, and torch processes beyond two oversubscribe them (each computes on 1 thread): the times
show the cost of partitioning and collectives, not a speed-up. The memory columns are what a real mesh or
process group of that size holds per device.

Run from the repository root (each configuration is a fresh process; all of them take 5 to 10 minutes):
    .venv/bin/python benchmarks/bench_scaling.py --json bench_results/scaling.json
    .venv/bin/python benchmarks/bench_scaling.py --frameworks torch --devices 1 2 --strategies fsdp --steps 3
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

STRATEGIES = {"jax": ("data", "fsdp"), "torch": ("ddp", "fsdp")}


def _batches(args: argparse.Namespace):
    """The model config, TrainConfig and the first `--steps` global batches of the builtin data's stream."""
    from parity.batching import Batcher
    from parity.data import load_corpus
    from parity.tokenizer import train_tokenizer
    from parity.train import TrainConfig, model_config

    corpus = load_corpus("builtin", limit=args.limit)
    tokenizer = train_tokenizer(corpus.texts(), vocab_size=1000)
    cfg = model_config(args.config, tokenizer.vocab_size)
    tcfg = TrainConfig(max_tokens=args.max_tokens)
    batcher = Batcher(tokenizer.encode([p[0] for p in corpus.train]), tokenizer.encode([p[1] for p in corpus.train]),
                      pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                      max_tokens=tcfg.max_tokens, max_len=cfg.max_len, bucket_step=tcfg.bucket_step, seed=0)
    stream = batcher.stream()
    return cfg, tcfg, [next(stream)[1] for _ in range(args.steps)]


def _time_steps(trainer, batches) -> dict[str, float]:
    """A warm-up pass over `batches`, then the timed pass: median and mean step time, target tokens/s."""
    import numpy as np

    for batch in batches:
        float(trainer.train_step(batch)["loss"])
    times, tokens = [], 0
    for batch in batches:
        start = time.perf_counter()
        float(trainer.train_step(batch)["loss"])
        times.append(time.perf_counter() - start)
        tokens += batch.tokens
    return {"step_s": float(np.median(times)), "mean_step_s": float(np.mean(times)), "tokens_per_s": tokens / sum(times)}


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def jax_worker(args: argparse.Namespace) -> dict[str, Any] | None:
    """One JAX configuration in this process (XLA_FLAGS set by `launch`)."""
    import jax
    import optax

    from jax_tx import distributed
    from jax_tx.train import Trainer

    mesh = None if args.strategy == "single" else {"data": args.size, "fsdp": 1} if args.strategy == "data" else {
        "data": 1, "fsdp": args.size}
    context = distributed.setup("cpu", mesh=mesh)
    cfg, tcfg, batches = _batches(args)
    trainer = Trainer(cfg, tcfg, context=context)
    timing = _time_steps(trainer, batches)
    state = trainer.train_state
    moments = [optax.tree_utils.tree_get(state.opt_state, name) for name in ("mu", "nu")]
    return {**timing, "devices": trainer.context.devices,
            "param_bytes_per_device": max(distributed.bytes_per_device(state.params).values()),
            "adam_bytes_per_device": max(distributed.bytes_per_device(moments).values()),
            "param_bytes_total": sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.params)),
            "max_rss_mib": _max_rss_mib()}


def torch_worker(args: argparse.Namespace) -> dict[str, Any] | None:
    """One process of a torch configuration (under torchrun unless single); rank 0's report, None elsewhere."""
    import torch

    from torch_tx import distributed
    from torch_tx.train import Trainer

    torch.set_num_threads(1)
    context = None if args.strategy == "single" else distributed.setup("cpu", fsdp=args.strategy == "fsdp")
    cfg, tcfg, batches = _batches(args)
    trainer = Trainer(cfg, tcfg, context=context)
    timing = _time_steps(trainer, batches)
    moments = [t for slot in trainer.optimizer.state.values() for k, t in slot.items() if k != "step"]
    rss = torch.tensor([_max_rss_mib()])
    report = {**timing, "devices": 1 if context is None else context.processes,
              "param_bytes_per_device": distributed.local_bytes(trainer.params.values()),
              "adam_bytes_per_device": distributed.local_bytes(moments),
              "param_bytes_total": sum(p.numel() * p.element_size() for p in trainer.model.parameters()),
              "max_rss_mib": float((rss if context is None else context.all_gather(rss)).max())}
    if context is not None:
        context.close()
        if context.rank:
            return None
    return report


def launch(framework: str, strategy: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in fresh processes: JAX with n simulated devices, torch with n torchrun processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--frameworks", framework,
                   "--strategy", strategy, "--size", str(n), "--out", str(out), "--config", args.config,
                   "--limit", str(args.limit), "--max-tokens", str(args.max_tokens), "--steps", str(args.steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if framework == "torch" else {
            **os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}
        if framework == "torch" and strategy != "single":
            command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode:
            raise RuntimeError(f"{framework} {strategy} x {n} failed:\n{result.stderr[-3000:]}")
        return {"framework": framework, "strategy": strategy, **json.loads(out.read_text())}


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| framework | strategy | devices | step s | tokens/s | params / device | Adam / device | max RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['framework']} | {r['strategy']} | {r['devices']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['param_bytes_per_device'] / 2 ** 20:.2f} MiB | "
                     f"{r['adam_bytes_per_device'] / 2 ** 20:.2f} MiB | {r['max_rss_mib']:,.0f} MiB |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration; the report (settings, environment, results)."""
    import jax
    import torch

    results = []
    for framework in args.frameworks:
        configurations = [("single", 1)] * (1 in args.devices) + [
            (s, n) for s in args.strategies if s in STRATEGIES[framework] for n in args.devices]
        for strategy, n in configurations:
            started = time.perf_counter()
            results.append({**launch(framework, strategy, n, args), "launch_s": time.perf_counter() - started})
    return {"benchmark": "distributed training step", "settings": {
                "config": args.config, "limit": args.limit, "max_tokens": args.max_tokens, "steps": args.steps,
                "dtype": "float32", "jax_devices": "simulated CPU devices", "torch_backend": "gloo, 1 thread/process"},
            "environment": {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count(), "machine": platform.machine(),
                            "load_average": os.getloadavg()[0]},
            "results": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="JAX devices / torch processes (default 1 2 4 8)")
    parser.add_argument("--strategies", nargs="+", choices=["data", "ddp", "fsdp"], default=["data", "ddp", "fsdp"],
                        help="data (JAX), ddp (torch), fsdp (both)")
    parser.add_argument("--config", default="small", help="model preset or JSON file (default small)")
    parser.add_argument("--limit", type=int, default=2000, help="training examples read (default 2000)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="token budget of a global batch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (the first batches of the stream)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=["single", "data", "ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        report = (jax_worker if args.frameworks == ["jax"] else torch_worker)(args)
        if report is not None:
            Path(args.out).write_text(json.dumps(report))
        return None
    report = run(args)
    print(markdown_table(report["results"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
