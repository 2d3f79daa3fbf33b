"""Where a training step's time goes: matmuls against everything else, each twin and its peer (float32, CPU).

torch: `torch.profiler` over `--steps` steps of bench_train's TorchRunner (the same loop for the twin and
torch.nn.Transformer); self CPU time per op, grouped as matmul (aten::mm, addmm, bmm, and SDPA's own
kernels), dropout's random numbers (aten::bernoulli_), the optimizer (Adam's ops under Optimizer.step)
and the rest (elementwise, norms, softmax, copies), with the top ops listed.

jax: XLA runs one fused program per step, so the split comes from experiments on the same jitted step
of bench_train's JaxRunner: the step as is; without dropout (dropout 0: no random bits, no masks); and
the matmul time alone estimated as the model's matmul FLOPs (`train_flops`) over the jax matmul ceiling
measured in the same run.

The bound this gives: a twin can beat its peer by at most peer step / matmul time when both run the same
matmuls on the same library.

    .venv/bin/python benchmarks/profile_step.py [--d-model 512] [--json bench_results/profile.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import jax_tx  # noqa: E402
import torch_tx  # noqa: E402
from bench_train import (PEERS, FlaxPeer, JaxRunner, TorchPeer, TorchRunner, config_for, environment,  # noqa: E402
                         make_batches, matmul_ceiling, parse_args as train_args, train_flops)

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
GROUPS = ("matmul", "dropout random numbers", "optimizer", "other")


def torch_split(runner: TorchRunner, steps: int) -> dict[str, Any]:
    """Self CPU ms per step by group, and the top 8 ops, from the profiler."""
    runner.run(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.run(steps)
    events = prof.key_averages()
    under_optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    groups = dict.fromkeys(GROUPS, 0.0)
    for e in events:
        if e.key.startswith(("Optimizer.", "autograd::", "ProfilerStep")):
            continue
        group = ("matmul" if e.key in MATMUL else "dropout random numbers" if e.key == "aten::bernoulli_"
                 else "other")
        groups[group] += e.self_cpu_time_total / 1000 / steps
    groups["optimizer"] = under_optimizer / 1000 / steps
    groups["other"] = max(0.0, groups["other"] - groups["optimizer"])  # Adam's own ops are inside `other`
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"ms_per_step": groups, "total_ms": sum(groups.values()),
            "top": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1000 / steps, "calls": e.count // steps}
                    for e in top]}


def jax_times(cfg, batches, seed: int, steps: int) -> dict[str, float]:
    """ms per step of the twin and the peer, with dropout as configured and with dropout 0."""
    out = {}
    for label, config in (("dropout", cfg), ("no dropout", cfg.replace(dropout=0.0))):
        for name, model in (("jax_tx.Transformer", jax_tx.Transformer(config)), (PEERS["jax"], FlaxPeer(config))):
            runner = JaxRunner(model, batches, seed)
            runner.run(2)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                runner.run(steps)
                best = min(best, (time.perf_counter() - start) / steps * 1000)
            out[f"{name}, {label}"] = best
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    settings = train_args(["--d-model", str(args.d_model)])
    cfg = config_for(settings, args.d_model)
    batches = make_batches(4, settings.batch, settings.src_len, settings.tgt_len, settings.vocab, settings.seed)
    env = environment()
    flops = train_flops(cfg, settings.batch, settings.src_len, settings.tgt_len)
    print(f"d_model {args.d_model}, batch {settings.batch} x {settings.src_len}, load average "
          f"{env['load_average'][0]:.2f}, LD_PRELOAD {env['ld_preload'] or 'none'}; "
          f"{flops / 1e9:.1f} GFLOP of matmuls per step")
    ceiling = matmul_ceiling()
    report: dict[str, Any] = {"environment": env, "d_model": args.d_model, "flops_per_step": flops,
                              "matmul_ceiling_gflops": ceiling, "torch": {}}
    torch.manual_seed(0)
    for name, model in (("torch_tx.Transformer", torch_tx.Transformer(cfg)), (PEERS["torch"], TorchPeer(cfg))):
        report["torch"][name] = split = torch_split(TorchRunner(model, batches), args.steps)
        groups = split["ms_per_step"]
        print(f"\n{name}: {split['total_ms']:.0f} ms/step of self CPU time: "
              + ", ".join(f"{g} {v:.0f} ms ({v / split['total_ms']:.0%})" for g, v in groups.items()))
        for op in split["top"]:
            print(f"  {op['op']:<45} {op['ms_per_step']:8.1f} ms/step  {op['calls']:4d} calls/step")
    twin, peer = report["torch"]["torch_tx.Transformer"], report["torch"][PEERS["torch"]]
    print(f"\ntorch bound: even with nothing but its matmuls the twin would be at most "
          f"{peer['total_ms'] / twin['ms_per_step']['matmul']:.2f}x the peer "
          f"(peer {peer['total_ms']:.0f} ms, twin's matmuls {twin['ms_per_step']['matmul']:.0f} ms)")
    report["jax"] = times = jax_times(cfg, batches, settings.seed, args.steps)
    matmul_ms = flops / (ceiling["jax"] * 1e9) * 1000
    report["jax_matmul_ms_at_ceiling"] = matmul_ms
    print("\njax ms/step: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f"; matmuls alone at the jax ceiling ({ceiling['jax']:.0f} GFLOP/s): {matmul_ms:.0f} ms")
    print(f"jax bound: the twin at most {times[PEERS['jax'] + ', dropout'] / matmul_ms:.2f}x the peer")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
