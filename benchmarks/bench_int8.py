"""int8 decoding against float32 on a trained model: the torch twin's dynamic int8 path next to CTranslate2 int8.

On a trained run directory (default `tests/data/tiny_run`, the shipped tiny model) and the test split of its data
(default builtin: 2,000 sentences), decoded by `parity.translate.Translator` as `twin eval` decodes (sorted by
length, batches of `--batch-size`, greedy unless `--beam`):

- "torch float32": the torch twin, the reference;
- "torch int8": `Translator.load(..., quantize="int8")`, i.e. `torch_tx.quantize.quantize_dynamic_int8` (per-channel
  int8 weights, the default; `--per-tensor` adds a per-tensor row);
- "ctranslate2 float32" and "ctranslate2 int8" (the optional [deploy] extra): the same weights written as
  `twin convert --to ctranslate2 [--quantization int8]` writes them, into a temporary directory (not timed),
  loaded with `parity.ct2.CT2Model.load` (compute type "default": int8 runs as int8_float32 on CPU). Left out,
  said in one line, without ctranslate2.

Reported per row: corpus BLEU and chrF (sacrebleu), exact match against the references, the share of sentences
whose translation is identical to torch float32's, BLEU and exact match minus float32's, and sentences/s of one
pass (a rough figure: one pass, after one warm-up batch; benchmarks/bench_decode.py is the speed benchmark).

Run from the repository root:
    .venv/bin/python benchmarks/bench_int8.py --json bench_results/int8.json        # ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_int8.py --beam 4 --per-tensor
    .venv/bin/python benchmarks/bench_int8.py --quick                                 # the first 200 sentences
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_train import environment, print_wall, settings_of, with_torch_threads, write_json  # noqa: E402
from parity.data import load_corpus  # noqa: E402
from parity.translate import Translator  # noqa: E402

try:
    import ctranslate2  # the optional [deploy] extra
except ImportError:
    ctranslate2 = None

TINY_RUN = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny_run"
REFERENCE = "torch float32"


def write_ct2_dirs(run_dir: Path, tmp: Path) -> dict[str, Path]:
    """`twin convert RUN_DIR DST --to ctranslate2 [--quantization int8]`, in this process, quietly."""
    from parity.formats import read_checkpoint, write_checkpoint
    from parity.formats.hf_dir import companion_special_ids

    loaded = read_checkpoint(run_dir)
    dirs = {}
    for name, quantization in (("ctranslate2 float32", None), ("ctranslate2 int8", "int8")):
        dst = tmp / (quantization or "float32")
        write_checkpoint(dst, "ctranslate2", loaded.cfg, loaded.weights, force=False, companions=loaded.companions,
                         special_ids=companion_special_ids(loaded.companions), quantization=quantization)
        dirs[name] = dst
    return dirs


def evaluate(translator: Translator, pairs: list[tuple[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    translator.translate([pairs[0][0]], beam_size=args.beam)  # warm-up: first allocations, CTranslate2's threads
    return translator.evaluate(pairs, batch_size=args.batch_size, beam_size=args.beam)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=TINY_RUN, help="a trained seq2seq run (default "
                        "tests/data/tiny_run)")
    parser.add_argument("--data", default="builtin", help="the data whose test split is decoded (default builtin)")
    parser.add_argument("--limit", type=int, help="only the first N test sentences")
    parser.add_argument("--beam", type=int, default=1, help="beam size (default 1: greedy)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    parser.add_argument("--per-tensor", action="store_true", help="also a torch int8 row with per-tensor weights")
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own); "
                        "CTranslate2 gets its default")
    parser.add_argument("--quick", action="store_true", help="the first 200 test sentences")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, environment and results here")
    args = parser.parse_args(argv)
    if args.quick and args.limit is None:
        args.limit = 200
    if args.beam < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--beam, --batch-size and --limit must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    from torch_tx.quantize import quantize_dynamic_int8

    wall_start = time.perf_counter()
    env = environment()
    print(f"torch {env['torch']} ({env['torch_threads']} threads, quantized engine "
          f"{torch.backends.quantized.engine}), {env['cpu_count']} CPUs, load average {env['load_average'][0]:.2f}")
    pairs = load_corpus(args.data).test[:args.limit]
    decoding = "greedy" if args.beam == 1 else f"beam {args.beam}"
    print(f"{args.run_dir}: {len(pairs)} test sentences of {args.data}, {decoding}, batches of {args.batch_size}")
    translators = {REFERENCE: Translator.load(args.run_dir, "torch"),
                   "torch int8": Translator.load(args.run_dir, "torch", quantize="int8")}
    if args.per_tensor:
        per_tensor = Translator.load(args.run_dir, "torch")
        per_tensor.backend.model = quantize_dynamic_int8(per_tensor.backend.model, weights="per_tensor")
        translators["torch int8 per-tensor"] = per_tensor
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_int8_") as tmp:
        if ctranslate2 is None:
            print("ctranslate2 is not installed (the optional [deploy] extra): no CTranslate2 rows")
        else:
            for name, path in write_ct2_dirs(args.run_dir, Path(tmp)).items():
                translators[name] = Translator.load(path)
        for name, translator in translators.items():
            scores = evaluate(translator, pairs, args)
            results[name] = scores
    reference = [t["hyp"] for t in results[REFERENCE]["translations"]]
    rows = []
    for name, scores in results.items():
        hyps = [t["hyp"] for t in scores["translations"]]
        rows.append({"model": name, "sentences": scores["sentences"], "bleu": scores["bleu"], "chrf": scores["chrf"],
                     "exact_match": scores["exact_match"],
                     "identical_to_float32": sum(h == r for h, r in zip(hyps, reference)) / len(reference),
                     "bleu_delta": scores["bleu"] - results[REFERENCE]["bleu"],
                     "exact_match_delta": scores["exact_match"] - results[REFERENCE]["exact_match"],
                     "seconds": scores["seconds"], "sentences_per_s": scores["sentences_per_s"],
                     "differing": [{"src": t["src"], "float32": r, "hyp": t["hyp"]}
                                   for t, r in zip(scores["translations"], reference) if t["hyp"] != r]})
    width = max(len(r["model"]) for r in rows)
    print(f"{'model':<{width}}  {'BLEU':>6}  {'dBLEU':>6}  {'chrF':>6}  {'exact':>7}  {'identical to f32':>16}  "
          f"{'sent/s':>7}")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['bleu']:6.2f}  {r['bleu_delta']:+6.2f}  {r['chrf']:6.2f}  "
              f"{r['exact_match']:7.2%}  {r['identical_to_float32']:16.2%}  {r['sentences_per_s']:7.1f}")
    wall = time.perf_counter() - wall_start
    print_wall(wall, env)
    if args.json:
        write_json(args.json, {"settings": settings_of(args), "environment": env,
                               "quantized_engine": torch.backends.quantized.engine,
                               "ctranslate2": ctranslate2.__version__ if ctranslate2 is not None else None,
                               "decoding": decoding, "wall_seconds": wall, "results": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return with_torch_threads(args.torch_threads, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
