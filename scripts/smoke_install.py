"""Smoke test of a one-framework install: every `twin` subcommand works with the framework that is installed,
or exits with status 1 and one line on stderr naming the missing extra (and the option that avoids it).

Run it with the python of a virtualenv made by `pip install -e '.[torch]'` (or `'.[jax]'`), naming the
framework that is installed and a directory of checkpoints in the missing framework's own formats (for a
torch install `tiny.msgpack` and the orbax directory `tiny-orbax`, for a jax install `tiny.pt`, all of
tests/data/tiny_run; tests/test_installs.py writes them and builds the two virtualenvs):

    VENV/bin/python scripts/smoke_install.py --framework torch --foreign DIR [--work DIR]

Each command is printed with its exit status and seconds; exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ROOT / "tests" / "data" / "tiny_run"
LABELS = {"torch": "PyTorch", "jax": "JAX/Flax"}
MODULES = {"torch": ("torch",), "jax": ("jax", "jaxlib", "flax", "optax")}
SUBCOMMANDS = ("train", "translate", "eval", "convert", "parity", "bench")
PAIRS = [("six hundred and sixty-five thousand, four hundred and eighty-eight",  # tiny_run's first test pairs
          "six cent soixante-cinq mille quatre cent quatre-vingt-huit"),
         ("nine hundred and fifteen thousand, three hundred and thirty-one",
          "neuf cent quinze mille trois cent trente et un")]
EN = "one two three four five six seven eight nine ten".split()
FR = "un deux trois quatre cinq six sept huit neuf dix".split()


def write_data(directory: Path) -> Path:
    """A tiny corpus: the 100 two-word pairs of EN x EN ("three one" -> "trois un"), 80/10/10."""
    pairs = [(f"{a} {b}", f"{FR[i]} {FR[j]}") for i, a in enumerate(EN) for j, b in enumerate(EN)]
    directory.mkdir(parents=True)
    for name, part in (("train", pairs[:80]), ("valid", pairs[80:90]), ("test", pairs[90:])):
        (directory / f"{name}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in part))
    return directory


class Smoke:
    """Runs `twin` commands and records every check that fails."""

    def __init__(self, twin: Path) -> None:
        self.twin, self.failures = twin, []

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"    FAIL: {what}", flush=True)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.fail(what)

    def run(self, *args: str | Path, error: str | None = None, absent: Path | None = None) -> str:
        """`twin ARGS`; error None: exit status 0 and no traceback, else exit status 1, nothing on stdout and
        exactly the line `error` on stderr; `absent`: a path the command must not create. Returns stdout."""
        command = [str(self.twin), *map(str, args)]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        print(f"$ twin {' '.join(command[1:])}  ->  {result.returncode} ({time.perf_counter() - start:.1f} s)",
              flush=True)
        shown = f"\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        if error is None:
            self.check(result.returncode == 0 and "Traceback" not in result.stderr,
                       f"twin {args[0]}: expected exit status 0 and no traceback, got {result.returncode}{shown}")
        else:
            self.check(result.returncode == 1 and result.stdout == "" and result.stderr == error + "\n",
                       f"twin {args[0]}: expected exit status 1 and the one line\n{error}\ngot "
                       f"{result.returncode}{shown}")
        if absent is not None:
            self.check(not absent.exists(), f"{absent} was created")
        return result.stdout


def same_weights(a: Path, b: Path) -> bool:
    """Whether two canonical safetensors files hold the same tensors, bit for bit."""
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=tuple(LABELS), required=True, help="the framework installed")
    parser.add_argument("--foreign", type=Path, required=True, help="tiny_run in the missing framework's formats")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.work is None:
        with tempfile.TemporaryDirectory() as work:
            return smoke(args.framework, args.foreign, Path(work))
    return smoke(args.framework, args.foreign, args.work)


def smoke(have: str, foreign: Path, work: Path) -> int:
    lack = next(f for f in LABELS if f != have)
    found = {m: importlib.util.find_spec(m) is not None for f in LABELS for m in MODULES[f]}
    if not all(found[m] for m in MODULES[have]) or any(found[m] for m in MODULES[lack]):
        print(f"not a {have}-only install: {found}")
        return 1
    twin = Path(sys.executable).parent / "twin"
    s = Smoke(twin)
    missing = f"{LABELS[lack]} is not installed"
    install = f"pip install 'twin-transformer[{lack}]'"
    other = f"{install}, or pass --framework {have}"

    for sub in ("", *SUBCOMMANDS):
        s.run(*([sub] if sub else []), "--help")

    data, run_dir = write_data(work / "data"), work / "run"
    train = ["--data", data, "--config", "tiny", "--no-progress", "--log-every", "1", "--eval-every", "2",
             "--save-every", "2", "--show", "1"]
    s.run("train", *train, "--steps", "2", "--out", run_dir)
    config = json.loads((run_dir / "train_config.json").read_text()) if (run_dir / "train_config.json").is_file() \
        else {}
    s.check(config.get("framework") == have, f"twin train ran {config.get('framework')!r}, expected {have!r}")
    quiet = ["--show", "0", "--test-limit", "0"]
    s.run("train", *train, "--steps", "3", "--out", run_dir, "--resume", *quiet)
    s.run("train", *train, "--steps", "1", "--out", work / "tuned", "--init-from", TINY_RUN, *quiet)  # a torch run
    s.run("train", *train, "--steps", "2", "--out", work / "run-other", "--framework", lack,
          error=f"twin train: {missing}: {other}", absent=work / "run-other")

    out = s.run("translate", TINY_RUN, *(p[0] for p in PAIRS))
    s.check(out.splitlines() == [p[1] for p in PAIRS], f"twin translate printed {out!r}")
    s.run("translate", TINY_RUN, "--framework", lack, PAIRS[0][0], error=f"twin translate: {missing}: {other}")

    out = s.run("eval", TINY_RUN, "--limit", "6")
    s.check(f"{TINY_RUN}: test split of builtin, {have}, greedy" in out and "exact match 100.00%" in out,
            f"twin eval printed {out!r}")
    s.run("eval", TINY_RUN, "--limit", "6", "--framework", lack, error=f"twin eval: {missing}: {other}")

    c = work / "convert"
    c.mkdir()
    s.run("convert", TINY_RUN, c / "bf16.safetensors", "--to", "safetensors", "--dtype", "bfloat16")
    config_file = TINY_RUN / "config.json"
    if have == "torch":
        native = [("torch", c / "native.pt"), ("nn-transformer", c / "nn")]
        foreign_sources = [foreign / "tiny.msgpack", foreign / "tiny-orbax"]
        refused = [("flax", c / "x.msgpack", "pass --to safetensors"), ("flax", c / "x", "pass --to safetensors")]
    else:
        native = [("flax", c / "native"), ("flax", c / "native.msgpack"), ("nn-transformer", c / "nn.safetensors")]
        foreign_sources = [foreign / "tiny.pt"]
        refused = [("torch", c / "x.pt", "pass --to safetensors"),
                   ("nn-transformer", c / "nn", "give DST a .safetensors name")]
    for i, (target, dst) in enumerate(native):
        s.run("convert", TINY_RUN, dst, "--to", target)
        back = c / f"back{i}.safetensors"
        s.run("convert", dst, back, "--to", "safetensors", "--config", config_file)
        s.check(back.is_file() and same_weights(back, TINY_RUN / "model.safetensors"),
                f"{TINY_RUN} -> --to {target} -> safetensors changed the weights")
    for target, dst, instead in refused:
        s.run("convert", TINY_RUN, dst, "--to", target, absent=dst,
              error=f"twin convert: {missing} (to write --to {target} at {dst}): {install}, or {instead}")
    for src in foreign_sources:
        s.run("convert", src, c / "y.safetensors", "--to", "safetensors", "--config", config_file,
              absent=c / "y.safetensors", error=f"twin convert: {missing} (to read {src}): {install}")
    s.run("convert", TINY_RUN, c / "v.safetensors", "--to", "safetensors", "--verify", absent=c / "v.safetensors",
          error=f"twin convert: {missing} (--verify runs both twins): {install}, or leave out --verify")

    both = f"{missing} (it runs both twins): {install}"
    s.run("parity", "--configs", "1", error=f"twin parity: {both}")
    s.run("parity", TINY_RUN, error=f"twin parity: {both}")

    bench = f"twin bench: {missing} (the benchmarks measure both twins): {install}"
    s.run("bench", "--quick", "--out", work / "bench", error=bench, absent=work / "bench")
    s.run("bench", "--decode", error=bench)

    print(f"{have}-only install: {len(s.failures)} failed checks")
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
