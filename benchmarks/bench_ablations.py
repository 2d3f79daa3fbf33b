"""Before/after measurements of the optimizations considered for the training step (float32, CPU).

Each row times one alternative against the current choice, interleaved, best of `--repeats`:

- fused QKV: the q/k/v projections of one attention block as one matmul with the three weights concatenated
  ((3D, D) torch / (D, 3D) jax: torch.nn.MultiheadAttention's layout) against three matmuls (what the twins
  do), forward and backward, on the rows of a default `twin train` batch (4096 tokens) and of a small one
  (512 tokens);
- one matmul in the step: whole training steps (`bench_train`'s loop) of each twin as it is (separate
  `q_proj`, `k_proj`, `v_proj`) against the same twin concatenating the weights inside forward, so that
  self-attention projects q, k, v with one matmul and cross-attention k, v with one (no fused parameter, no
  renamed weights), interleaved, at every `--d-model`;
- donated state (JAX): the `jax_tx.train` step jitted with the train state donated (what the trainer does)
  and without; time per step and XLA's memory analysis of the compiled step (arguments + outputs +
  temporaries - aliased bytes);
- Adam (torch): `torch.optim.Adam`'s update alone with the for-loop implementation (torch's default on
  CPU, what the trainer uses), foreach, and fused, on the model's parameters, against the step it is part of.

    .venv/bin/python benchmarks/bench_ablations.py [--d-model 512] [--parts qkv step donate adam]
                                                   [--json bench_results/ablations.json]
"""

from __future__ import annotations

import argparse
import functools
import os
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
import jax_tx  # noqa: E402
import torch_tx  # noqa: E402
import torch_tx.attention  # noqa: E402
from bench_train import (Entry, JaxRunner, TorchRunner, TrainerRunner, config_for, environment,  # noqa: E402
                         make_batches, measure, parse_args as train_args, write_json)
from flax import linen as fnn  # noqa: E402
from jax_tx.attention import MultiHeadAttention as FlaxAttention  # noqa: E402


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


def torch_concatenated(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every attention projecting q, k, v (self) or k, v (cross) with one matmul on its weights
    concatenated inside forward (per-instance overrides; the parameters stay `q_proj`, `k_proj`, `v_proj`)."""
    def project(attn, x, names):
        layers = [getattr(attn, name) for name in names]
        out = F.linear(x, torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers]))  # [B, L, n D]
        return tuple(attn._split_heads(part) for part in out.chunk(len(names), -1))  # n x [B, H, L, K]

    for attn in model.modules():
        if isinstance(attn, torch_tx.attention.MultiHeadAttention):
            attn.project_qkv = functools.partial(project, attn, names=("q_proj", "k_proj", "v_proj"))
            attn.project_kv = functools.partial(project, attn, names=("k_proj", "v_proj"))
    return model


def flax_concatenated(next_fun, args, kwargs, context):
    """nn.intercept_methods hook: the Flax twin's attention projecting with concatenated kernels, as
    `torch_concatenated`."""
    names = {"project_qkv": ("q_proj", "k_proj", "v_proj"), "project_kv": ("k_proj", "v_proj")}.get(
        context.method_name)
    if not isinstance(context.module, FlaxAttention) or names is None:
        return next_fun(*args, **kwargs)
    attn, dense = context.module, [getattr(context.module, name) for name in names]
    kernel = jnp.concatenate([d.variables["params"]["kernel"] for d in dense], axis=1)  # [D, n D]
    bias = jnp.concatenate([d.variables["params"]["bias"] for d in dense])  # [n D]
    x, kernel, bias = fnn.dtypes.promote_dtype(args[0], kernel, bias)
    out = x @ kernel + bias  # [B, L, n D]
    return tuple(attn._split_heads(part) for part in jnp.split(out, len(names), axis=-1))  # n x [B, H, L, K]


def concatenated_step(cfg, batches, steps: int, repeats: int) -> dict[str, float]:
    """Tokens/s of whole training steps, each twin as it is and with its projections concatenated."""
    torch.manual_seed(0)
    concatenated_jax = JaxRunner(jax_tx.Transformer(cfg), batches, seed=0)
    apply = concatenated_jax.state.apply_fn

    def apply_concatenated(*args, **kwargs):
        with fnn.intercept_methods(flax_concatenated):
            return apply(*args, **kwargs)

    concatenated_jax.state = concatenated_jax.state.replace(apply_fn=apply_concatenated)  # its own jit cache entry
    pairs = [[Entry("torch separate", "torch", "twin", TorchRunner(torch_tx.Transformer(cfg), batches)),
              Entry("torch one matmul", "torch", "twin", TorchRunner(torch_concatenated(torch_tx.Transformer(cfg)),
                                                                      batches))],
             [Entry("jax separate", "jax", "twin", JaxRunner(jax_tx.Transformer(cfg), batches, seed=0)),
              Entry("jax one matmul", "jax", "twin", concatenated_jax)]]
    # One framework at a time: with all four interleaved, the JAX pair's ratio followed the order of the
    # entries (0.85-0.91 fused/separate; 0.99-1.01 timed on its own).
    times = {name: t for pair in pairs for name, t in measure(pair, steps, warmup=2, repeats=repeats).items()}
    tokens = sum(batches[i % len(batches)].tokens for i in range(steps))  # as bench_train counts them
    return {name: tokens / min(t) for name, t in times.items()}


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
    parser.add_argument("--d-model", type=int, nargs="+", default=[512])
    parser.add_argument("--parts", nargs="+", choices=("qkv", "step", "donate", "adam"),
                        default=["qkv", "step", "donate", "adam"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    env = environment()
    report: dict[str, Any] = {"environment": env, "d_model": args.d_model}
    for d_model in args.d_model:
        settings = train_args(["--d-model", str(d_model)])
        cfg = config_for(settings, d_model)
        print(f"load average {env['load_average'][0]:.2f}; d_model {d_model}, float32")
        part: dict[str, Any] = report.setdefault(str(d_model), {})
        batches = make_batches(2, settings.batch, settings.src_len, settings.tgt_len, settings.vocab, 0)
        if "qkv" in args.parts:
            part["fused_qkv"] = {tokens: fused_qkv(d_model, tokens, args.repeats) for tokens in (512, 4096)}
            for tokens, t in part["fused_qkv"].items():
                print(f"fused QKV, {tokens} tokens, forward + backward ms: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
                      + f"; fused/separate torch {t['torch fused'] / t['torch separate']:.2f}, "
                        f"jax {t['jax fused'] / t['jax separate']:.2f}")
        if "step" in args.parts:
            t = part["concatenated_step"] = concatenated_step(cfg, batches, settings.steps, args.repeats)
            print("training step with separate / concatenated q, k, v projections, tokens/s: "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in t.items())
                  + f"; one matmul/separate torch {t['torch one matmul'] / t['torch separate']:.3f}, "
                    f"jax {t['jax one matmul'] / t['jax separate']:.3f}")
        if "donate" in args.parts:
            part["donated_state"] = donated_state(cfg, batches, args.repeats)
            print(f"JAX train step, state donated or not: {part['donated_state']}")
        if "adam" in args.parts:
            part["adam"] = adam(cfg, args.repeats)
            print("torch Adam update alone, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in part["adam"].items()))
    report["load_average_after"] = list(os.getloadavg())
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
