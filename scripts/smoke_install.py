"""Smoke test of a one-framework install: every `twin` subcommand works with the framework that is installed,
or exits with status 1 and one line on stderr naming the missing extra (and the option that avoids it).

Run it with the python of a virtualenv made by `pip install -e '.[torch]'` (or `'.[jax]'`), naming the
framework that is installed and a directory of checkpoints in the missing framework's own formats (for a
torch install `tiny.msgpack` and the orbax directory `tiny-orbax`, for a jax install `tiny.pt`, all of
tests/data/tiny_run; tests/test_installs.py writes them and builds the two virtualenvs):

    VENV/bin/python scripts/smoke_install.py --framework torch --foreign DIR [--work DIR]

The commands that train, translate, evaluate or convert each run as `twin`, in a process of their own; the --help
and refusal commands (which start no framework) run at the end in one fresh interpreter of the install, one
parity.cli.main call each, with the same checks (`twin --help` and the first refusal also run as `twin`). Each
command is printed with its exit status (and seconds); exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
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
# The twin commands' environment, under the caller's: one intra-op thread (the tiny models gain nothing from a
# second, whose spinning took a torch `twin train` from 4.1-4.5 to 6.3-10.3 s of CPU on a busy 2-core machine),
# and a JAX compilation cache in WORK, so that the --resume run loads the programs the first run compiled (the
# same config and shapes) instead of compiling them again.
ENV = {"OMP_NUM_THREADS": "1", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def write_data(directory: Path) -> Path:
    """A tiny corpus: the 100 two-word pairs of EN x EN ("three one" -> "trois un"), 80/10/10."""
    pairs = [(f"{a} {b}", f"{FR[i]} {FR[j]}") for i, a in enumerate(EN) for j, b in enumerate(EN)]
    directory.mkdir(parents=True)
    for name, part in (("train", pairs[:80]), ("valid", pairs[80:90]), ("test", pairs[90:])):
        (directory / f"{name}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in part))
    return directory


# Runs in one interpreter of the install (`python -c`): parity.cli.main on each argv of the JSON list on stdin, as
# the `twin` script would (`sys.exit(main())`), stdout and stderr captured; prints [[status, stdout, stderr], ...].
IN_ONE_PROCESS = """
import contextlib, io, json, sys, traceback
del sys.path[0]  # the current directory (`twin` has its bin directory there)
from parity.cli import main
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
        except BaseException:
            traceback.print_exc()
            status = 1
        if status is not None and not isinstance(status, int):
            print(status, file=sys.stderr)
            status = 1
    results.append([status or 0, out.getvalue(), err.getvalue()])
sys.__stdout__.write(json.dumps(results))
"""


class Smoke:
    """Runs `twin` commands and records every check that fails: `run` starts `twin` itself, `queue` saves a command
    for `run_queued`, which runs all the saved ones in one interpreter (for --help and refusals, which start no
    framework: a process each would only repeat the interpreter's start-up)."""

    def __init__(self, twin: Path, env: dict[str, str] | None = None) -> None:
        self.twin, self.env, self.failures, self.queued = twin, env, [], []

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
        start, cpu = time.perf_counter(), _children_cpu()
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                                env=self.env)
        print(f"$ twin {' '.join(command[1:])}  ->  {result.returncode} ({time.perf_counter() - start:.1f} s, "
              f"{_children_cpu() - cpu:.1f} s CPU)", flush=True)
        self._judge(args, result.returncode, result.stdout, result.stderr, error, absent)
        return result.stdout

    def queue(self, *args: str | Path, error: str | None = None, absent: Path | None = None) -> None:
        """`run`'s checks of `twin ARGS`, made by `run_queued`."""
        self.queued.append((tuple(map(str, args)), error, absent))

    def run_queued(self) -> None:
        """The queued commands, each a call of parity.cli.main in one fresh interpreter of the install."""
        queued, self.queued = self.queued, []
        start, cpu = time.perf_counter(), _children_cpu()
        result = subprocess.run([sys.executable, "-c", IN_ONE_PROCESS], input=json.dumps([a for a, _, _ in queued]),
                                capture_output=True, text=True, timeout=600, env=self.env)
        print(f"{len(queued)} commands in one process  ->  {result.returncode} "
              f"({time.perf_counter() - start:.1f} s, {_children_cpu() - cpu:.1f} s CPU)", flush=True)
        try:
            results = json.loads(result.stdout)
        except ValueError:
            results = []
        if result.returncode != 0 or len(results) != len(queued):
            self.fail(f"the queued commands did not run ({result.returncode}):\n{result.stdout[-3000:]}\n"
                      f"{result.stderr[-3000:]}")
            return
        for (args, error, absent), (status, out, err) in zip(queued, results):
            print(f"$ twin {' '.join(args)}  ->  {status}", flush=True)
            self._judge(args, status, out, err, error, absent)

    def _judge(self, args, status: int, out: str, err: str, error: str | None, absent: Path | None) -> None:
        shown = f"\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
        if error is None:
            self.check(status == 0 and "Traceback" not in err,
                       f"twin {args[0]}: expected exit status 0 and no traceback, got {status}{shown}")
        else:
            self.check(status == 1 and out == "" and err == error + "\n",
                       f"twin {args[0]}: expected exit status 1 and the one line\n{error}\ngot {status}{shown}")
        if absent is not None:
            self.check(not absent.exists(), f"{absent} was created")


def _children_cpu() -> float:
    """User + system seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    s = Smoke(twin, {**ENV, "JAX_COMPILATION_CACHE_DIR": str(work / "jax-cache"), **os.environ})
    missing = f"{LABELS[lack]} is not installed"
    install = f"pip install 'twin-transformer[{lack}]'"
    other = f"{install}, or pass --framework {have}"

    s.run("--help")
    for sub in SUBCOMMANDS:
        s.queue(sub, "--help")

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
    s.queue("translate", TINY_RUN, "--framework", lack, PAIRS[0][0],
            error=f"twin translate: {missing}: {other}")

    out = s.run("eval", TINY_RUN, "--limit", "6")
    s.check(f"{TINY_RUN}: test split of builtin, {have}, greedy" in out and "exact match 100.00%" in out,
            f"twin eval printed {out!r}")
    s.queue("eval", TINY_RUN, "--limit", "6", "--framework", lack, error=f"twin eval: {missing}: {other}")

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
        s.queue("convert", TINY_RUN, dst, "--to", target, absent=dst,
                error=f"twin convert: {missing} (to write --to {target} at {dst}): {install}, or {instead}")
    for src in foreign_sources:
        s.queue("convert", src, c / "y.safetensors", "--to", "safetensors", "--config", config_file,
                absent=c / "y.safetensors", error=f"twin convert: {missing} (to read {src}): {install}")
    s.queue("convert", TINY_RUN, c / "ct2", "--to", "ctranslate2", absent=c / "ct2",
            error=f"twin convert: CTranslate2 is not installed (to write --to ctranslate2 at {c / 'ct2'}): "
                  f"pip install 'twin-transformer[deploy]', or pass --to safetensors")
    s.queue("convert", TINY_RUN, c / "v.safetensors", "--to", "safetensors", "--verify",
            absent=c / "v.safetensors",
            error=f"twin convert: {missing} (--verify runs both twins): {install}, or leave out --verify")

    both = f"{missing} (it runs both twins): {install}"
    s.queue("parity", "--configs", "1", error=f"twin parity: {both}")
    s.queue("parity", TINY_RUN, error=f"twin parity: {both}")

    bench = f"twin bench: {missing} (the benchmarks measure both twins): {install}"
    s.queue("bench", "--quick", "--out", work / "bench", error=bench, absent=work / "bench")
    s.queue("bench", "--decode", error=bench)

    s.run_queued()

    print(f"{have}-only install: {len(s.failures)} failed checks")
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
