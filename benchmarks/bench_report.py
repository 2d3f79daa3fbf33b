"""`twin bench`: one report of training, decoding and conversion speed and memory, against the peers.

Runs, one after the other in this process, the benchmarks behind it with the settings below, each writing
its own JSON into `--out` (default bench_results/), then prints one markdown table of the headline figures
and writes it with the combined JSON (`report.json`, `report.md`):

- training (bench_train.py `--memory --compile`): tokens/s of each twin's training step and `twin train`
  trainer against torch.nn.Transformer / flax.linen layers, interleaved in one run (and the torch twin and
  peer under torch.compile); model FLOP/s as a share of the machine's matmul ceiling measured in the same
  run; peak memory of each eager model training alone;
- mixed precision (bench_precision.py): each trainer in float32 and bfloat16 mixed precision, and torch's
  trainer under torch.compile;
- decoding (bench_decode.py, d_model 512, 6+6 layers): greedy tokens/s of each twin's cached `generate`, and
  CTranslate2 float32 / int8 greedy and beam 4 when the deploy extra is installed, against
  torch.nn.Transformer's tutorial loop;
- conversion (bench_convert.py, a 0.37 GB checkpoint): MB/s of `twin convert` from the canonical
  safetensors file to each format and back, whole commands (imports included) and excluding imports.

On AMD CPUs run it as `make bench`, which preloads native/mkl_intel_cpu.c (MKL's AVX-512 kernels for
torch; see there); the header says whether it was. `--quick` runs every part in its smoke mode (a few
minutes; its numbers mean nothing).

    .venv/bin/twin bench                  # about 15 minutes on 2 cores
    .venv/bin/twin bench --quick --out /tmp/bench
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PARTS = {
    "train": ("bench_train", ["--memory", "--compile"], ["--quick"]),
    "precision": ("bench_precision", [], ["--quick"]),
    "decode": ("bench_decode", ["--d-model", "512"], ["--quick"]),
    "convert": ("bench_convert", ["--d-model", "512", "--heads", "8", "--d-ff", "2048", "--repeats", "1"],
                ["--quick"]),
}


def run_part(name: str, out: Path, quick: bool, parts: dict[str, tuple[str, list[str], list[str]]] = PARTS,
             prefix: str = "") -> dict[str, Any]:
    """Run one benchmark's main() with its settings in `parts` (module, full arguments, smoke arguments), writing
    out/{prefix}{name}.json; return that JSON."""
    module, full, smoke = parts[name]
    path = out / f"{prefix}{name}.json"
    print(f"\n## {name}: benchmarks/{module}.py {' '.join(smoke if quick else full)}\n", flush=True)
    status = importlib.import_module(module).main([*(smoke if quick else full), "--json", str(path)])
    if status:
        raise SystemExit(f"twin bench: benchmarks/{module}.py failed (exit status {status})")
    return json.loads(path.read_text())


def training_lines(train: dict[str, Any]) -> list[str]:
    ceiling = train["matmul_ceiling_gflops"]
    lines = [f"Training step, float32, batch {train['settings']['batch']} x {train['settings']['src_len']} tokens, "
             f"{train['settings']['layers']}+{train['settings']['layers']} layers; matmul ceiling of this machine "
             f"{ceiling['machine']:.0f} GFLOP/s (torch {ceiling['torch']:.0f}, jax {ceiling['jax']:.0f}).", "",
             "| d_model | model | tokens/s | vs peer | model GFLOP/s | of ceiling | peak MB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in train["results"]:
        peak = f"{r['peak_memory']['model_bytes'] / 2**20:,.0f}" if r.get("peak_memory") else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "peer"
        lines.append(f"| {r['d_model']} | {r['model']} | {r['tokens_per_s']:,.0f} | {ratio} | "
                     f"{r['gflops_per_s']:.0f} | {r['ceiling_fraction']:.0%} | {peak} |")
    return lines


def precision_lines(precision: dict[str, Any]) -> list[str]:
    lines = ["| d_model | trainer | tokens/s | vs float32 |", "|---:|---|---:|---:|"]
    for r in precision["results"]:
        speedup = r.get("speedup")
        lines.append(f"| {r['d_model']} | {r['model']} | {r['tokens_per_s']:,.0f} | "
                     f"{'%.2fx' % speedup if speedup is not None else '-'} |")
    return lines


def decode_lines(decode: dict[str, Any]) -> list[str]:
    lines = [f"Decoding, batch {decode['settings']['batch']}, {decode['settings']['new_tokens']} new tokens a row.", "",
             "| d_model | model | decoding | tokens/s | vs peer | vs CTranslate2 float32 |",
             "|---:|---|---|---:|---:|---:|"]
    for r in decode["results"]:
        vs_ct2 = r.get("ratio_to_ct2_float32")
        lines.append(f"| {r['d_model']} | {r['model']} | {r['decoding']} | {r['tokens_per_s']:,.0f} | "
                     f"{'%.1fx' % r['ratio'] if r['ratio'] is not None else '-'} | "
                     f"{'%.2fx' % vs_ct2 if vs_ct2 is not None else '-'} |")
    return lines


def convert_lines(convert: dict[str, Any]) -> list[str]:
    size = convert["checkpoint"]["tensor_bytes"]
    lines = [f"Conversion of a {size / 1e9:.2f} GB float32 checkpoint (`twin convert`, one process per command).", "",
             "| conversion | MB/s | MB/s excluding imports | peak RSS / size |", "|---|---:|---:|---:|"]
    for r in convert["results"]:
        busy = r["seconds"] - r["imports_seconds"]
        excluding = f"{r['src_bytes'] / 1e6 / busy:,.0f}" if busy > 0 else "-"
        lines.append(f"| {r['conversion']} | {r['src_bytes'] / 1e6 / r['seconds']:,.0f} | {excluding} | "
                     f"{r['rss_ratio']:.2f} |")
    return lines


LINES = {"train": training_lines, "precision": precision_lines, "decode": decode_lines, "convert": convert_lines}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results",
                        help="directory of the JSON files and report.md (default bench_results/)")
    parser.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS),
                        help="which benchmarks (default all)")
    parser.add_argument("--quick", action="store_true", help="every part in its smoke mode")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {name: run_part(name, args.out, args.quick) for name in args.parts}
    train = results.get("train") or next(iter(results.values()))
    env = train["environment"]
    header = (f"{env.get('cpu', '?')}, {env['cpu_count']} CPUs, torch {env['torch']}, jax {env['jax']}, "
              f"flax {env['flax']}; LD_PRELOAD {env.get('ld_preload') or 'none'}; load average "
              f"{env['load_average'][0]:.2f} at the start; {time.perf_counter() - start:.0f} s"
              + (" (--quick: smoke settings, not a measurement)" if args.quick else ""))
    lines = [header]
    for name, result in results.items():
        lines += ["", *LINES[name](result)]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    (args.out / "report.md").write_text(report)
    (args.out / "report.json").write_text(json.dumps({"parts": results, "wall_seconds": time.perf_counter() - start},
                                                     indent=2) + "\n")
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
