"""`twin bench --race`: issue 21's table, every row measured in this one run against the peer a user would pick.

Runs, one after the other in this process, the benchmarks behind the rows (each its own main, writing its JSON
into `--out`), then prints and writes (`race.md`, `race.json`) one table: figure, measured, goal, met.

- decode (bench_decode.py --d-model 512 --no-peer-fast-path): jax_tx and torch_tx `generate`, greedy and beam 4
  (CTranslate2's rule), and the torch twin's dynamic int8 path, against CTranslate2 4.8 float32 and int8 on the
  same weights (6+6 layers, batch 32, source 32, 64 new tokens);
- hf (bench_hf.py --only decode train): torch_tx / jax_tx `generate` (transformers' beam rule) and `twin train`
  trainers against transformers' MarianMTModel `generate` and training step, on one opus-mt-size model (d_model
  512, 6+6 layers, vocab 8,000; dropout 0.1 on the embeddings and residuals in all three, as Marian places it);
- train (bench_train.py --d-model 256 --vocab 8000): the training steps of each twin and `twin train` trainer
  against torch.nn.Transformer and a model of flax.linen's own layers (2+2 layers, batches of 128 x 32);
- demo: `make demo`'s `twin train` (`make demo-args`, both frameworks), each in a fresh process, timed from start to
  its test exact match (training, validation, checkpoints and the translation of the 2,000 test sentences).

    .venv/bin/twin bench --race                  # about 25 minutes on 2 cores
    .venv/bin/twin bench --race --quick --out /tmp/race   # smoke run: every part in its smoke mode
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_report import run_part  # noqa: E402

DEMO_QUICK = ("--data", "builtin", "--config", "tiny", "--steps", "5", "--test-limit", "20")
DEMO_BEFORE_S = {"torch": 410.0, "jax": 460.0}  # the demo before packing (bucketed, 1,200 steps), README's machine
PARTS = {
    "decode": ("bench_decode", ["--d-model", "512", "--no-peer-fast-path"], ["--quick"]),
    "hf": ("bench_hf", ["--only", "decode", "train"], ["--quick", "--only", "decode", "train"]),
    "train": ("bench_train", ["--d-model", "256", "--vocab", "8000", "--repeats", "3"], ["--quick", "--vocab", "500"]),
}


def demo_args(framework: str) -> list[str]:
    """`make demo`'s `twin train` arguments for `framework` on this machine (the Makefile's `make demo-args`)."""
    done = subprocess.run(["make", "--no-print-directory", "-s", "demo-args", f"DEMO_FRAMEWORK={framework}"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.split()


def run_demo(framework: str, quick: bool) -> dict[str, Any]:
    """`twin train --framework F` with `make demo`'s arguments in a fresh process: wall seconds and the test exact
    match."""
    args = list(DEMO_QUICK) if quick else demo_args(framework)
    with tempfile.TemporaryDirectory(prefix="race-demo-") as tmp:
        out = Path(tmp) / "demo"
        command = [sys.executable, "-m", "parity.cli", "train", "--framework", framework, *args, "--out", str(out)]
        print(f"\n## demo ({framework}): {' '.join(command[3:])}\n", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - start
        print(done.stdout[-2000:], flush=True)
        if done.returncode:
            raise SystemExit(f"twin bench --race: the {framework} demo failed (exit status {done.returncode})")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        test = [r for r in records if "exact_match" in r][-1]
    return {"framework": framework, "args": args, "wall_seconds": wall,
            "exact_match": test["exact_match"], "sentences": test.get("sentences")}


def pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The one row whose fields equal `match`."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows match {match}")
    return found[0]


def table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 21's rows: figure, measured ratio (or seconds), goal, met."""
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: float | None, goal: float, detail: str, lower_is_better: bool = False) -> None:
        met = None if value is None else (value <= goal if lower_is_better else value >= goal)
        rows.append({"figure": figure, "value": value, "goal": goal, "lower_is_better": lower_is_better,
                     "met": met, "detail": detail})

    if "decode" in results:
        decode = results["decode"]
        d = max(r["d_model"] for r in decode["results"])
        for mode, label in (("greedy", "greedy"), ("beam", "beam 4")):
            r = pick(decode["results"], d_model=d, model="jax_tx.generate", mode=mode)
            torch_row = pick(decode["results"], d_model=d, model="torch_tx.generate", mode=mode)
            add(f"jax_tx {label} / CTranslate2 float32 {label} (d_model {d})", r["ratio_to_ct2_float32"], 1.2,
                f"{r['tokens_per_s']:,.0f} tokens/s (torch_tx {torch_row['tokens_per_s']:,.0f}, "
                f"{torch_row['ratio_to_ct2_float32']:.2f}x)")
        for r in (r for r in decode.get("int8", []) if r["d_model"] == d):
            add(f"torch_tx int8 {r['mode']} / CTranslate2 int8 {r['mode']} (d_model {d})", r["ratio_to_ct2_int8"], 1.0,
                f"{r['tokens_per_s']:,.0f} tokens/s; tokens = torch float32 {r['same_tokens_as_torch_float32']:.1%} "
                f"(CTranslate2 int8 = its float32 {r['ct2_int8_same_tokens_as_ct2_float32'] or 0:.1%})")
    if "hf" in results:
        hf = results["hf"]
        for r in hf["decoding"]["rows"]:
            if r["role"] == "twin":
                add(f"{r['model'].split('.')[0]} {r['decoding']} / transformers generate {r['decoding']}", r["ratio"],
                    1.5, f"{r['tokens_per_s']:,.0f} tokens/s; same tokens {r['same_tokens_as_hf']:.1%}")
        for r in hf["training"]["rows"]:
            if r["role"] == "twin":
                add(f"{r['model']} step / MarianMTModel step (d_model 512, 6+6, same dropout placement)", r["ratio"],
                    1.2, f"{r['tokens_per_s']:,.0f} target tokens/s")
    if "train" in results:
        for r in results["train"]["results"]:
            if r["ratio"] is not None and not r["model"].endswith("torch.compile"):
                peer = "torch.nn.Transformer" if r["model"].startswith("torch") else "flax.linen layers"
                add(f"{r['model']} step / {peer} (d_model {r['d_model']}, vocab "
                    f"{results['train']['settings']['vocab']:,})", r["ratio"], 1.2, f"{r['tokens_per_s']:,.0f} tokens/s")
    for demo in results.get("demo", []):
        add(f"`make demo` ({demo['framework']}): wall seconds to {demo['exact_match']:.2%} test exact match",
            demo["wall_seconds"], DEMO_BEFORE_S[demo["framework"]] / 2,
            f"goal: half of the {DEMO_BEFORE_S[demo['framework']]:.0f} s of the demo before (bucketed, 1,200 steps) "
            f"and >= 98%; {' '.join(demo['args'])}",
            lower_is_better=True)
        if demo["exact_match"] < 0.98:
            rows[-1]["met"] = False
    return rows


def render(rows: list[dict[str, Any]], header: str) -> str:
    def fmt(r: dict[str, Any]) -> str:
        if r["value"] is None:
            return "-"
        return f"{r['value']:.0f} s" if r["lower_is_better"] else f"{r['value']:.2f}x"

    lines = [header, "", "| figure | measured | goal | met | detail |", "|---|---:|---:|---|---|"]
    for r in rows:
        goal = f"<= {r['goal']:.0f} s" if r["lower_is_better"] else f">= {r['goal']:.1f}x"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(f"| {r['figure']} | {fmt(r)} | {goal} | {met} | {r['detail']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results",
                        help="directory of the JSON files, race.md and race.json (default bench_results/)")
    parser.add_argument("--parts", nargs="+", choices=(*PARTS, "demo"), default=[*PARTS, "demo"],
                        help="which parts (default all)")
    parser.add_argument("--quick", action="store_true", help="every part in its smoke mode (numbers mean nothing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    load = os.getloadavg()[0]
    results: dict[str, Any] = {name: run_part(name, args.out, args.quick, PARTS, "race_")
                               for name in PARTS if name in args.parts}
    if "demo" in args.parts:
        results["demo"] = [run_demo(framework, args.quick) for framework in ("torch", "jax")]
    rows = table(results)
    env = next((r["environment"] for r in results.values() if isinstance(r, dict) and "environment" in r), {})
    header = (f"{env.get('cpu', '?')}, {os.cpu_count()} CPUs, torch {env.get('torch', '?')}, jax {env.get('jax', '?')}; "
              f"load average {load:.2f} at the start; {time.perf_counter() - start:.0f} s"
              + (" (--quick: smoke settings, not a measurement)" if args.quick else ""))
    report = render(rows, header)
    print("\n" + report)
    (args.out / "race.md").write_text(report)
    (args.out / "race.json").write_text(json.dumps({"rows": rows, "parts": results, "quick": args.quick,
                                                    "wall_seconds": time.perf_counter() - start}, indent=2) + "\n")
    print(f"wrote {args.out / 'race.md'} and {args.out / 'race.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
