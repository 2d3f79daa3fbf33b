"""`twin`: the command line tool. Subcommands: train, parity, bench."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from parity.suite import TOLERANCES, TWINS, Check


def print_table(rows: Sequence[tuple[str, Check]], title: str) -> int:
    """Print one row per check; return the number of failures."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("config", "left"), ("check", "left"), ("dtype", "left"), ("max abs diff", "right"),
                            ("rel error", "right"), ("tolerance", "right"), ("result", "left")):
        table.add_column(column, justify=justify)
    failures = 0
    for config, check in rows:
        failures += not check.passed
        table.add_row(config, check.what, check.dtype, f"{check.max_abs:.3e}", f"{check.rel:.3e}",
                      f"{check.tol:.0e}", "[green]pass[/green]" if check.passed else "[red]FAIL[/red]")
    console = Console(width=max(160, Console().width))
    console.print(table)
    console.print(f"{len(rows) - failures} passed, {failures} failed")
    return failures


def _setup_jax(device: str) -> None:
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)


def cmd_parity(args: argparse.Namespace) -> int:
    _setup_jax(args.device)
    from parity import suite

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in TOLERANCES:
            raise SystemExit(f"twin parity: unknown dtype {d!r} (choose from {', '.join(TOLERANCES)})")
    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, Check]] = []
    if args.run_dir:
        from parity.checkpoint import CheckpointError, load_checkpoint

        try:
            cfg, weights = load_checkpoint(args.run_dir)
        except CheckpointError as e:
            raise SystemExit(f"twin parity: {e}") from None
        cfg = cfg.replace(dropout=0.0)
        jobs = [(os.path.basename(os.path.normpath(args.run_dir)), cfg, weights, source) for source in TWINS]
    else:
        jobs = []
        for i in range(args.configs):
            cfg = suite.random_config(rng)
            for source in TWINS:
                jobs.append((f"random #{i}", cfg, suite.init_canonical(cfg, source, args.seed + i), source))
    for name, cfg, weights, source in jobs:
        length = min(cfg.max_len, args.length)
        inputs = suite.random_inputs(cfg, args.batch, length, length, rng, empty_source_row=args.batch > 1)
        label = f"{name} d={cfg.d_model} h={cfg.num_heads} L={cfg.num_encoder_layers}/{cfg.num_decoder_layers}"
        for dtype in dtypes:
            rows += [(label, c) for c in suite.compare_twins(cfg, weights, inputs, dtype, source, args.device)]
        if source == "torch":
            rows += [(label, c) for c in suite.round_trip_checks(cfg, weights)]
    title = f"twin parity ({args.run_dir or f'{args.configs} random configs, seed {args.seed}'}, {args.device})"
    return 1 if print_table(rows, title) else 0


def cmd_train(args: argparse.Namespace) -> int:
    from parity.train import TrainConfig, TrainError, run

    if args.framework == "jax" and args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    defaults = TrainConfig()
    try:
        tcfg = TrainConfig(steps=args.steps, max_tokens=args.max_tokens, lr_factor=args.lr_factor,
                           warmup_steps=args.warmup, label_smoothing=args.label_smoothing, clip_norm=args.clip_norm,
                           seed=args.seed, vocab_size=args.vocab_size, log_every=args.log_every,
                           eval_every=args.eval_every, save_every=args.save_every, keep=args.keep,
                           betas=defaults.betas, adam_eps=defaults.adam_eps)
    except ValueError as e:
        raise SystemExit(f"twin train: {e}") from None
    try:
        last = run(args.framework, args.data, args.out, model=args.config, tcfg=tcfg, resume=args.resume,
                   init_from=args.init_from, dtype=args.dtype, device=args.device, limit=args.limit,
                   show=args.show, test_limit=args.test_limit, progress=not args.no_progress,
                   dropout=args.dropout)
    except TrainError as e:
        print(f"twin train: {e}", file=sys.stderr)
        return 1
    return 130 if last.get("interrupted") else 0


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    if not script.is_file():
        raise SystemExit("twin bench: benchmarks/bench_train.py ships with the source repository; "
                         "run it from a clone (pip install -e .)")
    sys.argv = [str(script), *args.extra]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from parity.train import TrainConfig

    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="twin", description="One Transformer, two frameworks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="check that the PyTorch and Flax twins compute the same function")
    p.add_argument("run_dir", nargs="?", help="checkpoint directory (config.json + model.safetensors); "
                   "random configs when omitted")
    p.add_argument("--configs", type=int, default=4, help="number of random configs (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated: float32,float64,bfloat16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--length", type=int, default=7, help="source and target length (capped at max_len)")
    p.set_defaults(func=cmd_parity)
    t = sub.add_parser("train", help="train (or resume) a translation model in PyTorch or JAX",
                       description="Train a model on sentence pairs; the run directory holds the canonical "
                       "checkpoint, the tokenizer, the training state for --resume, metrics.jsonl and loss.png. "
                       "Ctrl-C saves a checkpoint and stops.")
    t.add_argument("--framework", choices=("torch", "jax"), default="torch")
    t.add_argument("--data", default="builtin", help="'builtin' (English -> French number names), a .tsv/.jsonl "
                   "file of pairs, or a directory with train/valid/test files (default builtin)")
    t.add_argument("--out", required=True, help="run directory (new, or an existing run with --resume)")
    t.add_argument("--steps", type=int, default=defaults.steps, help=f"total updates (default {defaults.steps})")
    t.add_argument("--config", default="small", help="model preset (tiny, small, base) or a JSON file of "
                   "TransformerConfig fields (default small)")
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(in either framework)")
    t.add_argument("--init-from", metavar="CHECKPOINT", help="start from the weights (and tokenizer) of a "
                   "checkpoint directory written by either framework")
    t.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="token budget per batch")
    t.add_argument("--lr-factor", type=float, default=defaults.lr_factor)
    t.add_argument("--warmup", type=int, default=defaults.warmup_steps, help="warmup steps of the schedule")
    t.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    t.add_argument("--clip-norm", type=float, default=defaults.clip_norm)
    t.add_argument("--dropout", type=float, help="override the config's dropout")
    t.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="BPE vocabulary size (at most)")
    t.add_argument("--log-every", type=int, default=defaults.log_every)
    t.add_argument("--eval-every", type=int, default=defaults.eval_every)
    t.add_argument("--save-every", type=int, default=defaults.save_every)
    t.add_argument("--keep", type=int, default=defaults.keep, help="checkpoints kept")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    t.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    t.add_argument("--limit", type=int, help="use only the first N training pairs")
    t.add_argument("--test-limit", type=int, help="translate only the first N test sentences at the end "
                   "(0: skip the test)")
    t.add_argument("--show", type=int, default=5, help="translations printed at the end")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    b = sub.add_parser("bench", help="training-step throughput of each twin against its peer "
                       "(benchmarks/bench_train.py; arguments are passed on, e.g. --quick)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
