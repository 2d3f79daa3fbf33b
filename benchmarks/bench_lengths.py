"""How a training step of each twin scales: step time and peak memory vs sequence length and d_model.

Measured: whole steps of the `twin train` trainers, `torch_tx.train.Trainer` and `jax_tx.train.Trainer`
(via bench_train's `TrainerRunner`: label smoothing 0.1, global-norm clipping, the warmup schedule, the loss
fetched to the host every step), float32 on CPU, dropout 0.1 on, on bench_train's random batches
(`make_batches`: each row right-padded from a random length in [L // 2, L]; padding saves no compute).

- sweep A (length): source = target length L in 64, 128, 256, 512, 1024 at d_model 256 (4 heads, d_ff 1024),
  2 + 2 layers, vocab 1000, a fixed batch of 4 rows, so the work per token grows with L through the
  attention scores (QK^T and PV cost 4 * B * L^2 * D FLOPs forward per attention; the linear layers cost
  2 * B * L * (their weights)). Per twin the script fits t(L) = a * L + b * L^2 (least squares on the
  relative residuals, so each length counts alike; no constant term) and reports the quadratic share
  b * L^2 / t(L) of the fitted time, beside the analytic forward FLOPs share of the attention scores and
  values (the backward pass multiplies both parts by about 3).
- sweep B (d_model): d_model 128, 256, 512, 1024 (heads d_model // 64, d_ff 4 * d_model) at L 128, batch 4.

tokens/s counts target positions, B x L per step with padding, the positions each step computes (the JSON
also has `label_tokens_per_s`, bench_train's non-pad labels). "per token vs L=64" is the step time per
position divided by that of the shortest length of sweep A: 1.00 means linear scaling.

Each point (framework, d_model, length) runs in a fresh process (this script with a hidden --point flag):
the batches are made and the framework's backend started, the resident set size is read
(/proc/self/statm), then the trainer is built and trained; "train MiB" = peak RSS (ru_maxrss, right after
the timed steps) minus that baseline: parameters, Adam moments, activations and gradients, the allocators'
caches and, for JAX, compilation. For JAX the script then compiles the step once more ahead of time and
reports XLA's `memory_analysis()` of it: "XLA MiB" = arguments (state, batch) + temporaries (activations,
gradients) + outputs not aliased to donated arguments. Timing: `--warmup` untimed steps (JAX compiles in
the first), the last one timed to choose the steps per repetition (about `--target-seconds`, 1 to `--steps`),
then `--repeats` repetitions; the fastest counts. Thread counts are the frameworks' defaults. The load
average is recorded before the run and at the start of each point: above 0, other processes shared the CPU.
`--in-process` (implied by `--quick`) measures every point in this one process: faster, no train MiB.

Run from the repository root:
    .venv/bin/python benchmarks/bench_lengths.py --json bench_results/lengths.json --plot bench_results/lengths.png
    .venv/bin/python benchmarks/bench_lengths.py --quick --plot /tmp/lengths.png    # smoke run, under a minute
    .venv/bin/python benchmarks/bench_lengths.py --lengths 128 512 --d-models 256 --frameworks jax
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import torch  # noqa: E402
import jax_tx.train as jax_train  # noqa: E402
import torch_tx.train as torch_train  # noqa: E402
from benchmarks.bench_train import (NUM_BATCHES, TrainerRunner, config_for, environment,  # noqa: E402
                                    make_batches, print_noisy, print_wall, render_table, settings_of,
                                    with_torch_threads, write_json)
from parity.config import TransformerConfig  # noqa: E402

TRAINERS = {"torch": torch_train.Trainer, "jax": jax_train.Trainer}
MODEL = {"torch": "torch_tx trainer", "jax": "jax_tx trainer"}
MIB = 2 ** 20
QUICK = {"lengths": [16, 32], "d_model": 32, "d_models": [32, 64], "length": 16, "layers": 1, "batch": 2,
         "warmup": 1, "steps": 1, "repeats": 1, "in_process": True, "torch_threads": 1}


def model_config(args: argparse.Namespace, d_model: int, length: int) -> TransformerConfig:
    """bench_train's config (heads d_model // 64, d_ff 4 * d_model, dropout 0.1) for source = target length."""
    return config_for(argparse.Namespace(vocab=args.vocab, layers=args.layers, src_len=length, tgt_len=length),
                      d_model)


def forward_flops(cfg: TransformerConfig, batch: int, length: int) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add) of the seq2seq model at S = T = length, matrix products only.

    linear: every projection, feed-forward and the output layer, 2 * B * L * (weights); attention: the
    scores and values of each encoder self, decoder self and decoder cross attention, 4 * B * L^2 * D
    (all L x L entries: the causal mask saves nothing).
    """
    d, f = cfg.d_model, cfg.d_ff
    weights = (cfg.num_encoder_layers * (4 * d * d + 2 * d * f) + cfg.num_decoder_layers * (8 * d * d + 2 * d * f)
               + d * cfg.tgt_vocab_size)
    linear = 2.0 * batch * length * weights
    attention = (cfg.num_encoder_layers + 2 * cfg.num_decoder_layers) * 4.0 * batch * length ** 2 * d
    return {"linear": linear, "attention": attention, "attention_share": attention / (linear + attention)}


def fit_quadratic(lengths: list[float], times: list[float]) -> tuple[float, float]:
    """(a, b) of t = a * L + b * L^2 by least squares on relative residuals (a * L + b * L^2) / t - 1."""
    length = np.asarray(lengths, np.float64)  # [N]
    t = np.asarray(times, np.float64)  # [N]
    design = np.stack([length, length ** 2], axis=1) / t[:, None]  # [N, 2]
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return float(a), float(b)


def quadratic_share(a: float, b: float, length: float) -> float:
    """b * L^2 / (a * L + b * L^2): the part of the fitted step time that grows with L^2."""
    return b * length ** 2 / (a * length + b * length ** 2)


def rss_bytes() -> int:
    """The resident set size of this process now (Linux /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def xla_memory(runner: TrainerRunner) -> dict[str, float]:
    """XLA's memory analysis (MiB) of the jax trainer's jitted step (its private `_train_step`: there is no
    public handle), compiled ahead of time for batch 0 (jit's cache has it already)."""
    trainer = runner.trainer
    stats = trainer._train_step.lower(trainer.train_state, trainer._arrays(runner.data[0]),
                                      trainer.rng).compile().memory_analysis()
    parts = {"argument": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes,
             "output": stats.output_size_in_bytes, "alias": stats.alias_size_in_bytes}
    mib = {name: size / MIB for name, size in parts.items()}
    mib["total"] = mib["argument"] + mib["temp"] + mib["output"] - mib["alias"]
    return mib


def measure_point(framework: str, d_model: int, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """One point in this process: build the trainer after a baseline RSS, warm up, time; the result row."""
    load = os.getloadavg()[0]
    cfg = model_config(args, d_model, length)
    batches = make_batches(NUM_BATCHES, args.batch, length, length, args.vocab, args.seed)
    if framework == "jax":
        jax.devices()
    baseline = rss_bytes()
    runner = TrainerRunner(TRAINERS[framework], cfg, batches, args.seed)
    warmup = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        loss = runner.run(1)
        warmup.append(time.perf_counter() - start)
    if not math.isfinite(loss):
        raise RuntimeError(f"{framework} d_model {d_model} length {length}: non-finite loss {loss}")
    steps = max(1, min(args.steps, round(args.target_seconds / warmup[-1])))
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        runner.run(steps)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss: KiB on Linux
    step_s = min(seconds) / steps
    labels = sum(batches[i % len(batches)].tokens for i in range(steps)) / steps
    return {"framework": framework, "model": MODEL[framework], "d_model": d_model, "num_heads": cfg.num_heads,
            "d_ff": cfg.d_ff, "length": length, "batch": args.batch, "ms_per_step": 1000 * step_s,
            "tokens_per_s": args.batch * length / step_s, "label_tokens_per_s": labels / step_s, "steps": steps,
            "seconds": seconds, "warmup_seconds": warmup, "loss": loss, "baseline_rss_mib": baseline / MIB,
            "peak_rss_mib": peak / MIB, "train_mib": None if args.in_process else (peak - baseline) / MIB,
            "xla_mib": xla_memory(runner) if framework == "jax" else None,
            "flops": forward_flops(cfg, args.batch, length), "load_average": load}


def launch(framework: str, d_model: int, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """`measure_point` in a fresh process of this script; its row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--point", framework, str(d_model), str(length),
                   "--out", str(out), "--batch", str(args.batch), "--layers", str(args.layers),
                   "--vocab", str(args.vocab), "--seed", str(args.seed), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--repeats", str(args.repeats),
                   "--target-seconds", str(args.target_seconds)]
        if args.torch_threads is not None:
            command += ["--torch-threads", str(args.torch_threads)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode:
            raise RuntimeError(f"{framework} d_model {d_model} length {length} failed:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


def points(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(d_model, length) of sweep A then sweep B, the point they share once."""
    wanted = [(args.d_model, n) for n in args.lengths] + [(d, args.length) for d in args.d_models]
    return list(dict.fromkeys(wanted))


def fit_sweep(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Per framework with 2+ lengths: a (ms per length) and b (ms per length^2) of sweep A; each of its rows
    gets its `quadratic_share` of the fitted time."""
    result = {}
    for framework in args.frameworks:
        sweep = sweep_rows(rows, framework, "length", args)
        if len(sweep) < 2:
            continue
        a, b = fit_quadratic([r["length"] for r in sweep], [r["ms_per_step"] for r in sweep])
        result[framework] = {"a_ms": a, "b_ms": b}
        for r in sweep:
            r["quadratic_share"] = quadratic_share(a, b, r["length"])
    return result


def sweep_rows(rows: list[dict[str, Any]], framework: str, sweep: str, args: argparse.Namespace) -> list[dict]:
    """The rows of sweep "length" (A) or "d_model" (B) for one framework, in sweep order."""
    if sweep == "length":
        keys = [(args.d_model, n) for n in args.lengths]
    else:
        keys = [(d, args.length) for d in args.d_models]
    by_key = {(r["d_model"], r["length"]): r for r in rows if r["framework"] == framework}
    return [by_key[k] for k in keys if k in by_key]


def mib_cell(mib: float | None) -> str:
    return "-" if mib is None else f"{mib:,.0f}"


def table_cells(report: dict[str, Any], sweep: str) -> tuple[list[str], list[list[str]], list[Any]]:
    """Headers, cells and section keys of one sweep's table, rows grouped by the swept value."""
    args = argparse.Namespace(**report["settings"])
    rows = [r for f in args.frameworks for r in sweep_rows(report["results"], f, sweep, args)]
    rows.sort(key=lambda r: (r[sweep], args.frameworks.index(r["framework"])))
    if sweep == "length":
        first = {f: sweep_rows(report["results"], f, "length", args)[0] for f in args.frameworks}
        headers = ["length", "trainer", "ms/step", "tokens/s", f"per token vs L={min(args.lengths)}",
                   "fit: L^2 share", "attn FLOPs share", "train MiB", "XLA MiB"]

        def cells(r: dict[str, Any]) -> list[str]:
            base = first[r["framework"]]
            per_token = (r["ms_per_step"] / r["length"]) / (base["ms_per_step"] / base["length"])
            share = r.get("quadratic_share")
            return [str(r["length"]), r["model"], f"{r['ms_per_step']:,.1f}", f"{r['tokens_per_s']:,.0f}",
                    f"{per_token:.2f}x", "-" if share is None else f"{share:.0%}",
                    f"{r['flops']['attention_share']:.0%}", mib_cell(r["train_mib"]),
                    mib_cell(r["xla_mib"] and r["xla_mib"]["total"])]
    else:
        headers = ["d_model", "heads", "trainer", "ms/step", "tokens/s", "attn FLOPs share", "train MiB", "XLA MiB"]

        def cells(r: dict[str, Any]) -> list[str]:
            return [str(r["d_model"]), str(r["num_heads"]), r["model"], f"{r['ms_per_step']:,.1f}",
                    f"{r['tokens_per_s']:,.0f}", f"{r['flops']['attention_share']:.0%}", mib_cell(r["train_mib"]),
                    mib_cell(r["xla_mib"] and r["xla_mib"]["total"])]
    return headers, [cells(r) for r in rows], [r[sweep] for r in rows]


def print_tables(report: dict[str, Any]) -> None:
    s = report["settings"]
    titles = {"length": f"Sweep A: length (d_model {s['d_model']}, batch {s['batch']})",
              "d_model": f"Sweep B: d_model (length {s['length']}, batch {s['batch']})"}
    for sweep, title in titles.items():
        headers, cells, sections = table_cells(report, sweep)
        render_table(title, headers, cells, sections, left=(headers.index("trainer"),), min_width=150)
    for framework, fit in report["fits"].items():
        print(f"{MODEL[framework]}: t(L) = {fit['a_ms']:.4g} ms * L + {fit['b_ms']:.4g} ms * L^2")


def markdown_tables(report: dict[str, Any]) -> str:
    """Both sweeps as markdown tables (for the README)."""
    out = []
    for sweep in ("length", "d_model"):
        headers, cells, _ = table_cells(report, sweep)
        out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(line) + " |" for line in cells] + [""]
    return "\n".join(out)


def plot(report: dict[str, Any], path: Path) -> None:
    """PNG: ms/step vs length (log-log, with the fitted a * L + b * L^2), peak memory vs length, ms/step vs d_model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    args = argparse.Namespace(**report["settings"])
    colors = {"torch": "tab:red", "jax": "tab:blue"}
    fig, (ax_t, ax_m, ax_d) = plt.subplots(1, 3, figsize=(15, 4.5))
    for framework in args.frameworks:
        color, label = colors[framework], MODEL[framework]
        rows = sweep_rows(report["results"], framework, "length", args)
        lengths = [r["length"] for r in rows]
        ax_t.plot(lengths, [r["ms_per_step"] for r in rows], "o-", color=color, label=label)
        fit = report["fits"].get(framework)
        if fit:
            grid = np.geomspace(min(lengths), max(lengths), 50)  # [G]
            ax_t.plot(grid, fit["a_ms"] * grid + fit["b_ms"] * grid ** 2, "--", color=color, alpha=0.6,
                      label=f"{label} fit a·L + b·L²")
            ax_t.plot(grid, fit["a_ms"] * grid, ":", color=color, alpha=0.6, label=f"{label} linear part a·L")
        if not args.in_process:
            ax_m.plot(lengths, [r["train_mib"] for r in rows], "o-", color=color, label=f"{label} peak RSS - baseline")
        if framework == "jax":
            ax_m.plot(lengths, [r["xla_mib"]["total"] for r in rows], "s--", color=color, alpha=0.6,
                      label=f"{label} XLA analysis")
        rows = sweep_rows(report["results"], framework, "d_model", args)
        ax_d.plot([r["d_model"] for r in rows], [r["ms_per_step"] for r in rows], "o-", color=color, label=label)
    ax_t.set(xscale="log", yscale="log", xlabel="source = target length L", ylabel="ms / step",
             title=f"Step time vs length (d_model {args.d_model}, batch {args.batch})")
    ax_m.set(xscale="log", yscale="log", xlabel="source = target length L", ylabel="MiB",
             title="Training memory vs length")
    ax_d.set(xscale="log", yscale="log", xlabel="d_model", ylabel="ms / step",
             title=f"Step time vs d_model (length {args.length}, batch {args.batch})")
    for ax, ticks in ((ax_t, args.lengths), (ax_m, args.lengths), (ax_d, args.d_models)):
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    load = report["environment"]["load_average"][0]
    fig.suptitle(f"Training step, float32 CPU, {args.layers}+{args.layers} layers, dropout 0.1 "
                 f"(load average {load:.2f} before the run)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024],
                        help="sweep A: source = target lengths (default 64 128 256 512 1024)")
    parser.add_argument("--d-model", type=int, default=256, help="sweep A's d_model (default 256)")
    parser.add_argument("--d-models", type=int, nargs="+", default=[128, 256, 512, 1024],
                        help="sweep B: d_model values (default 128 256 512 1024)")
    parser.add_argument("--length", type=int, default=128, help="sweep B's length (default 128)")
    parser.add_argument("--frameworks", nargs="+", choices=list(TRAINERS), default=list(TRAINERS))
    parser.add_argument("--batch", type=int, default=4, help="rows per batch (default 4)")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each (default 2)")
    parser.add_argument("--vocab", type=int, default=1000, help="source and target vocabulary size (default 1000)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps, at least 1 (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition at most (default 5)")
    parser.add_argument("--target-seconds", type=float, default=1.0,
                        help="aim for repetitions this long, within 1 to --steps steps (default 1.0)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions, the fastest counts (default 3)")
    parser.add_argument("--torch-threads", type=int, help="torch's intra-op threads (default: torch's own; "
                        "--quick: 1, as tiny ops on 2 busy cores wait for a descheduled second thread)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute: lengths 16 32 at "
                        "d_model 32, d_model 32 64 at length 16, 1 layer, batch 2, 1 warm-up step, 1 x 1 step, "
                        "--in-process (flags given beside it win)")
    parser.add_argument("--in-process", action="store_true", help="measure every point in this process: faster, "
                        "no train MiB (XLA's analysis remains)")
    parser.add_argument("--markdown", action="store_true", help="also print both tables as markdown")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, environment, fits and rows here")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write the three-panel PNG here")
    parser.add_argument("--point", nargs=3, metavar=("FRAMEWORK", "D_MODEL", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    args.lengths, args.d_models = sorted(set(args.lengths)), sorted(set(args.d_models))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with_torch_threads(args.torch_threads, lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """A worker's point (--point), or every point, the tables and the files."""
    if args.point:
        framework, d_model, length = args.point[0], int(args.point[1]), int(args.point[2])
        args.out.write_text(json.dumps(measure_point(framework, d_model, length, args)))
        return
    wall_start = time.perf_counter()
    env = environment()
    print(f"torch {env['torch']} ({torch.get_num_threads()} threads), jax {env['jax']}, {env['cpu_count']} CPUs, "
          f"load average {env['load_average'][0]:.2f}")
    print(f"trainers, float32 CPU, dropout 0.1, batch {args.batch}, {args.layers}+{args.layers} layers, vocab "
          f"{args.vocab}; {'all points in this process' if args.in_process else 'each point a fresh process'}; "
          f"{args.warmup} warm-up steps, best of {args.repeats} repetitions of 1 to {args.steps} steps")
    measure = measure_point if args.in_process else launch
    rows = []
    for d_model, length in points(args):
        for framework in args.frameworks:
            r = measure(framework, d_model, length, args)
            rows.append(r)
            print(f"  {r['model']:16} d_model {d_model:5} length {length:5}: {r['ms_per_step']:9.1f} ms/step, "
                  f"{mib_cell(r['train_mib']):>7} MiB (load {r['load_average']:.2f})", flush=True)
    report = {"benchmark": "training step vs length and d_model", "settings": settings_of(args, ("point", "out")),
              "environment": env, "results": rows}
    report["fits"] = fit_sweep(rows, args)
    print_tables(report)
    if args.markdown:
        print(markdown_tables(report))
    print_noisy(rows, lambda r: f"{r['model']} at d_model {r['d_model']}, length {r['length']}")
    report["wall_seconds"] = time.perf_counter() - wall_start
    report["load_average_after"] = os.getloadavg()
    print_wall(report["wall_seconds"], env)
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
