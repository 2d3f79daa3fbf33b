"""Rebuild tests/data/tiny_run: a small trained run directory the decoding and CLI tests use.

The `tiny` preset trained in PyTorch on the embedded corpus (float32), keeping only what
`twin translate` / `twin eval` read: config.json, model.safetensors, tokenizer.json, train_config.json.

    .venv/bin/python scripts/make_test_run.py [--steps 800]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parity.train import TrainConfig, run  # noqa: E402

KEPT = ("config.json", "model.safetensors", "tokenizer.json", "train_config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "tiny_run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        last = run("torch", "builtin", Path(tmp) / "run", model="tiny", show=3, test_limit=500, progress=False,
                   tcfg=TrainConfig(steps=args.steps, vocab_size=400, warmup_steps=200, eval_every=args.steps,
                                    save_every=args.steps, log_every=100))
        args.out.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            shutil.copy(Path(tmp) / "run" / name, args.out / name)
    print(f"wrote {args.out}: test exact match {last['test']['exact_match']:.2%} (first 500 test sentences)")


if __name__ == "__main__":
    main()
