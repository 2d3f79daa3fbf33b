"""Before/after measurements of the optimizations considered for the training step (float32, CPU).

Each row times one alternative against the current choice, interleaved, best of `--repeats`:

- fused QKV: the q/k/v projections of one attention block as one matmul with the three weights concatenated
  ((3D, D) torch / (D, 3D) jax: what the twins' `in_proj` and torch.nn.MultiheadAttention do) against three
  matmuls (the twins before the fusion), forward and backward, on the rows of a default `twin train` batch
  (4096 tokens) and of a small one (512 tokens);
- donated state (JAX): the `jax_tx.train` step jitted with the train state donated (what the trainer does)
  and without; time per step and XLA's memory analysis of the compiled step (arguments + outputs +
  temporaries - aliased bytes);
- Adam (torch): `torch.optim.Adam`'s update alone with the for-loop implementation (torch's default on
  CPU, what the trainer uses), foreach, and fused, on the model's parameters, against the step it is part of.

    .venv/bin/python benchmarks/bench_ablations.py [--d-model 512] [--json bench_results/ablations.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import jax_tx.train as jax_train  # noqa: E402
import torch_tx  # noqa: E402
from bench_train import TrainerRunner, config_for, environment, make_batches, parse_args as train_args  # noqa: E402


def best_ms(calls: dict[str, Callable[[], Any]], repeats: int, inner: int = 3) -> dict[str, float]:
    """Best time of `inner` calls, ms per call, the calls taking turns."""
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(inner):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / inner * 1000)
    return best


def fused_qkv(d_model: int, tokens: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, d_model), dtype=np.float32)  # [N, D]
    w = [rng.standard_normal((d_model, d_model), dtype=np.float32) / d_model ** 0.5 for _ in range(3)]  # [D, D]
    tx = torch.from_numpy(x).requires_grad_()
    tw = [torch.from_numpy(a).requires_grad_() for a in w]
    tw3 = torch.cat(tw).detach().requires_grad_()  # [3D, D]

    def torch_separate():
        sum(F.linear(tx, a).tanh().sum() for a in tw).backward()

    def torch_fused():
        F.linear(tx, tw3).tanh().sum().backward()  # [N, 3D]

    jx, jw, jw3 = jnp.asarray(x), [jnp.asarray(a) for a in w], jnp.concatenate([jnp.asarray(a) for a in w], 1)
    separate = jax.jit(jax.grad(lambda x, ws: sum(jnp.tanh(x @ a).sum() for a in ws), argnums=(0, 1)))
    fused = jax.jit(jax.grad(lambda x, w3: jnp.tanh(x @ w3).sum(), argnums=(0, 1)))  # [N, 3D] inside
    times = best_ms({"torch separate": torch_separate, "torch fused": torch_fused,
                     "jax separate": lambda: jax.block_until_ready(separate(jx, jw)),
                     "jax fused": lambda: jax.block_until_ready(fused(jx, jw3))}, repeats)
    return times


def donated_state(cfg, batches, repeats: int) -> dict[str, Any]:
    runner = TrainerRunner(jax_train.Trainer, cfg, batches, seed=0)
    trainer = runner.trainer
    step = functools.partial(jax_train._keyed_train_step, cfg=cfg, tcfg=trainer.tcfg, unshard=None)
    out: dict[str, Any] = {}
    batch, key = trainer._arrays(runner.data[0]), trainer.rng
    for name, donate in (("donated", (0,)), ("not donated", ())):
        compiled = jax.jit(step, donate_argnums=donate).lower(trainer.train_state, batch, key).compile()
        memory = compiled.memory_analysis()
        state = jax.tree.map(jnp.copy, trainer.train_state)

        def call(box=[state]):
            box[0], metrics = compiled(box[0], batch, key)
            jax.block_until_ready(metrics)

        out[name] = {"ms_per_step": best_ms({name: call}, repeats, inner=2)[name],
                     "bytes": int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                  + memory.temp_size_in_bytes - memory.alias_size_in_bytes)}
    return out


def adam(cfg, repeats: int) -> dict[str, float]:
    model = torch_tx.Transformer(cfg)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-9, **kw)
                  for name, kw in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                                   ("fused", {"fused": True}))}
    return best_ms({name: opt.step for name, opt in optimizers.items()}, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    settings = train_args(["--d-model", str(args.d_model)])
    cfg = config_for(settings, args.d_model)
    env = environment()
    print(f"load average {env['load_average'][0]:.2f}; d_model {args.d_model}, float32")
    report: dict[str, Any] = {"environment": env, "d_model": args.d_model}
    report["fused_qkv"] = {tokens: fused_qkv(args.d_model, tokens, args.repeats) for tokens in (512, 4096)}
    for tokens, t in report["fused_qkv"].items():
        print(f"fused QKV, {tokens} tokens, forward + backward ms: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
              + f"; fused/separate torch {t['torch fused'] / t['torch separate']:.2f}, "
                f"jax {t['jax fused'] / t['jax separate']:.2f}")
    batches = make_batches(2, settings.batch, settings.src_len, settings.tgt_len, settings.vocab, 0)
    report["donated_state"] = donated_state(cfg, batches, args.repeats)
    print(f"JAX train step, state donated or not: {report['donated_state']}")
    report["adam"] = adam(cfg, args.repeats)
    print("torch Adam update alone, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in report["adam"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
