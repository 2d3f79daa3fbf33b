"""`twin`: the command line tool. Subcommands: parity, bench."""

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
