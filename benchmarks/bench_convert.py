"""Time and peak memory of `twin convert` on a large checkpoint, against reading (and copying) the file once.

Measured: wall seconds and peak RSS (`ru_maxrss` from `os.wait4`) of `twin convert SRC DST --to T
--force`, each conversion a fresh subprocess: `python -c WRAPPER convert ...`, where WRAPPER runs
`parity.cli` as `__main__` (what `python -m parity.cli` does) and then records which frameworks the
conversion imported and whether it started JAX's backend. Each subprocess is started by a small
launcher process, because Linux counts the RSS a process had at fork, before its exec, in its
ru_maxrss. Interpreter start-up and imports are part of every figure. The source is a canonical
safetensors checkpoint of a real TransformerConfig with random float32 weights (default d_model
1024, 16 heads, d_ff 4096, 6 + 6 layers, vocabularies 32000: 1.10 GB), generated once and cached in
`--workdir` (never in the repository). Eight conversions, chained so that every container is both
written and read:

    safetensors -> torch .pt            -> safetensors
    safetensors -> flax (orbax dir)     -> safetensors
    safetensors -> flax .msgpack        -> safetensors
    safetensors -> nn-transformer .pt   -> safetensors (with --config config.json)

At the end the four final safetensors files must hold the source's tensors bit for bit (same keys,
dtypes, shapes and bytes; the metadata may differ) and carry its config; otherwise the script fails.

Baselines, each its own subprocess, right before each conversion: "read once" reads every byte of
SRC (the file, or every file of a directory) into a 16 MiB buffer with `readinto`; "copy once" does
the same and writes the bytes to a new file, fsynced (what any conversion must at least do: twin
convert fsyncs what it writes); both are timed inside the process. "imports" imports what the
conversion imported (parity.cli and, as recorded, parity.formats, torch, jax, flax, orbax.checkpoint,
safetensors, msgpack) and starts JAX's CPU backend if the conversion did.
Columns: s = seconds; x read = s / read-once seconds of that SRC; x read -imports = (s - imports
seconds) / read-once seconds; x copy -imports = (s - imports seconds) / copy-once seconds; peak RSS;
RSS/size and (RSS - imports RSS)/size, size being the source checkpoint's bytes. Pages of a
memory-mapped SRC that the conversion touches count in its RSS. Targets (the issue, "Large
checkpoints"): peak RSS at most 1.5x the checkpoint size (raw RSS, imports included) and time within
3x of reading the file once (judged on x read -imports: the imports alone take many read-once times).

Page cache: the source is warm after generation (or an earlier run), and so is each SRC written by
the previous conversion; the baselines read the same warm files. `--drop-cache` evicts SRC
(posix_fadvise DONTNEED) before each baseline and each conversion instead, so that they read from
disk. DST is removed before each run (not timed), so every run writes a new file. Each conversion
runs `--repeats` times (the chains repeated in order): the best time and the highest RSS count; a
load average above 0 before the run means other processes shared the CPU and the disk.

Run from the repository root:
    .venv/bin/python benchmarks/bench_convert.py             # 1.1 GB checkpoint, a few minutes
    .venv/bin/python benchmarks/bench_convert.py --quick     # a 7 MB checkpoint, 1 repetition, ~30 s
    .venv/bin/python benchmarks/bench_convert.py --repeats 3 --json bench_results/convert.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import environment, print_wall, render_table, settings_of, write_json  # noqa: E402
from parity.config import TransformerConfig  # noqa: E402
from parity.formats import write_checkpoint  # noqa: E402
from parity.names import aliases, canonical_shapes  # noqa: E402

RSS_TARGET = 1.5  # peak RSS / checkpoint size
TIME_TARGET = 3.0  # seconds excl. imports / read-once seconds
READ_CHUNK = 16 << 20
# modules whose import the baseline repeats when the conversion imported them
TRACKED = ("parity.formats", "numpy", "torch", "jax", "flax", "flax.serialization",
           "orbax.checkpoint", "safetensors", "msgpack", "ml_dtypes")
WRAPPER = f"""
import json, os, runpy, sys
sys.argv = ["twin", *sys.argv[1:]]
try:
    runpy.run_module("parity.cli", run_name="__main__", alter_sys=True)
finally:  # before the atexit handlers, one of which clears JAX's backends
    xb = sys.modules.get("jax._src.xla_bridge")
    with open(os.environ["BENCH_CONVERT_IMPORTS"], "w") as f:
        json.dump({{"modules": ["parity.cli", *(m for m in {TRACKED!r} if m in sys.modules)],
                   "jax_backend": bool(xb is not None and getattr(xb, "_backends", None))}}, f)
"""
# starts each measured process: forked straight from this benchmark (~400 MB), a child's ru_maxrss
# would start at the benchmark's RSS
LAUNCHER = """
import json, os, sys, time
out, err, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "wb") as o, open(err, "wb") as e:
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, o.fileno(), 1),
                                                                  (os.POSIX_SPAWN_DUP2, e.fileno(), 2)])
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
print(json.dumps([seconds, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]))
"""
COPY_ONCE = """
import os, sys, time
buf = bytearray(int(sys.argv[1])); view = memoryview(buf)
start = time.perf_counter()
with open(sys.argv[2], "wb") as out:
    for path in sys.argv[3:]:
        with open(path, "rb", buffering=0) as f:
            while (got := f.readinto(view)):
                out.write(view[:got])
    out.flush()
    os.fsync(out.fileno())
print(time.perf_counter() - start)
"""
READ_ONCE = """
import sys, time
buf = bytearray(int(sys.argv[1])); view = memoryview(buf); n = 0
start = time.perf_counter()
for path in sys.argv[2:]:
    with open(path, "rb", buffering=0) as f:
        while (got := f.readinto(view)):
            n += got
print(time.perf_counter() - start, n)
"""


@dataclass(frozen=True)
class Conversion:
    name: str
    src: str  # names inside the workdir; "source" is the generated checkpoint
    dst: str
    to: str
    chain: str
    config: bool = False  # pass --config config.json


CONVERSIONS = (
    Conversion("safetensors -> torch", "source", "torch.pt", "torch", "torch"),
    Conversion("torch -> safetensors", "torch.pt", "torch.safetensors", "safetensors", "torch"),
    Conversion("safetensors -> flax (orbax)", "source", "orbax", "flax", "orbax"),
    Conversion("flax (orbax) -> safetensors", "orbax", "orbax.safetensors", "safetensors", "orbax"),
    Conversion("safetensors -> flax (msgpack)", "source", "flax.msgpack", "flax", "msgpack"),
    Conversion("flax (msgpack) -> safetensors", "flax.msgpack", "msgpack.safetensors", "safetensors", "msgpack"),
    Conversion("safetensors -> nn-transformer", "source", "nn_transformer.pt", "nn-transformer", "nn-transformer"),
    Conversion("nn-transformer -> safetensors", "nn_transformer.pt", "nn_transformer.safetensors", "safetensors",
               "nn-transformer", config=True),
)


@dataclass
class Run:
    seconds: float
    max_rss: int  # bytes
    stdout: str


def spawn(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Run `argv` to completion through LAUNCHER; wall seconds and peak RSS. A failure raises with its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        report = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(out), str(err), *argv], cwd=ROOT, env=env,
                                capture_output=True, text=True, check=True).stdout
        seconds, max_rss_kib, code = json.loads(report)
        if code != 0:
            shown = argv[:1] + argv[3:] if argv[1] == "-c" else argv
            raise RuntimeError(f"{' '.join(shown)} exited with {code}:\n{err.read_text()[-3000:]}")
        return Run(seconds, max_rss_kib * 1024, out.read_text())  # ru_maxrss: KiB on Linux


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in files_of(path))


def evict(path: Path) -> None:
    """Drop the clean page-cache pages of every file of `path` (posix_fadvise DONTNEED)."""
    for p in files_of(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def read_once(path: Path) -> float:
    """Seconds one process takes to read every byte of `path`, timed inside it."""
    run = spawn([sys.executable, "-c", READ_ONCE, str(READ_CHUNK), *map(str, files_of(path))])
    seconds, n = run.stdout.split()
    if int(n) != size_of(path):
        raise RuntimeError(f"read {n} bytes of {path}, which has {size_of(path)}")
    return float(seconds)


def copy_once(path: Path, workdir: Path) -> float:
    """Seconds one process takes to read every byte of `path` and write them to one new file, fsynced."""
    tmp = workdir / ".copy-once.tmp"
    try:
        return float(spawn([sys.executable, "-c", COPY_ONCE, str(READ_CHUNK), str(tmp),
                            *map(str, files_of(path))]).stdout)
    finally:
        tmp.unlink(missing_ok=True)


def import_baseline(imports: dict[str, Any]) -> Run:
    code = "".join(f"import {m}\n" for m in imports["modules"])
    if imports["jax_backend"]:
        code += "import jax\njax.devices()\n"
    return spawn([sys.executable, "-c", code or "pass"])


def config_for(args: argparse.Namespace) -> TransformerConfig:
    return TransformerConfig(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, d_model=args.d_model,
                             num_heads=args.heads, num_encoder_layers=args.layers, num_decoder_layers=args.layers,
                             d_ff=args.d_ff, dropout=0.0)


def checkpoint_bytes(cfg: TransformerConfig) -> int:
    tied = aliases(cfg)
    return 4 * sum(int(np.prod(s)) for k, s in canonical_shapes(cfg).items() if k not in tied)


def make_source(cfg: TransformerConfig, workdir: Path, seed: int) -> Path:
    """The cached canonical safetensors checkpoint of `cfg` (random float32, config in the metadata)."""
    tag = hashlib.sha1(f"{cfg.to_json()} seed={seed}".encode()).hexdigest()[:12]
    path = workdir / f"source-d{cfg.d_model}-{tag}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            if TransformerConfig.from_json(f.metadata()["config"]) == cfg:
                print(f"source checkpoint: {path} (cached)")
                return path
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    weights = {k: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
               for k, shape in canonical_shapes(cfg).items()}  # one copy: ~the checkpoint's size
    write_checkpoint(path, "safetensors", cfg, weights)
    del weights
    print(f"source checkpoint: {path} (generated in {time.perf_counter() - start:.1f} s)")
    return path


def tensors_equal(a: Path, b: Path) -> tuple[bool, str]:
    """Same keys, and every tensor the same dtype, shape and bytes; the configs in the metadata equal."""
    from safetensors import safe_open

    with safe_open(str(a), framework="numpy") as fa, safe_open(str(b), framework="numpy") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False, f"keys differ: {sorted(set(fa.keys()) ^ set(fb.keys()))[:5]}"
        ca, cb = (TransformerConfig.from_json(f.metadata()["config"]) for f in (fa, fb))
        if ca != cb:
            return False, "configs in the metadata differ"
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False, f"{key!r} differs ({x.dtype}{x.shape} vs {y.dtype}{y.shape})"
        return True, f"{len(fa.keys())} tensors equal"


def measure(args: argparse.Namespace, source: Path, workdir: Path) -> tuple[dict[str, dict[str, Any]], list]:
    """Each conversion `repeats` times, the chains in order; per conversion its runs and baselines."""
    config_json = workdir / "config.json"
    paths = {c.dst: workdir / c.dst for c in CONVERSIONS} | {"source": source}
    imports_file = workdir / "imports.json"
    env = {**os.environ, "BENCH_CONVERT_IMPORTS": str(imports_file)}
    runs: dict[str, dict[str, Any]] = {c.name: {"seconds": [], "rss": [], "read_seconds": [], "copy_seconds": []}
                                       for c in CONVERSIONS}
    baselines: dict[str, list[Run]] = {}
    for rep in range(args.repeats):
        for c in CONVERSIONS:
            src, dst = paths[c.src], paths[c.dst]
            remove(dst)
            cold = evict if args.drop_cache else lambda path: None
            cold(src)
            runs[c.name]["read_seconds"].append(read_once(src))
            cold(src)
            runs[c.name]["copy_seconds"].append(copy_once(src, workdir))
            cold(src)
            argv = [sys.executable, "-c", WRAPPER, "convert", str(src), str(dst), "--to", c.to, "--force"]
            run = spawn(argv + (["--config", str(config_json)] if c.config else []), env)
            runs[c.name]["seconds"].append(run.seconds)
            runs[c.name]["rss"].append(run.max_rss)
            imports = json.loads(imports_file.read_text())
            runs[c.name]["imports"] = imports
            label = " ".join(imports["modules"]) + (" +jax backend" if imports["jax_backend"] else "")
            if len(baselines.setdefault(label, [])) <= rep:  # once per repetition
                baselines[label].append(import_baseline(imports))
            runs[c.name]["imports_label"] = label
            runs[c.name]["src_bytes"], runs[c.name]["dst_bytes"] = size_of(src), size_of(dst)
            print(f"  [{rep + 1}/{args.repeats}] {c.name}: {run.seconds:.2f} s, peak RSS {run.max_rss / 1e6:,.0f} MB")
    return runs, [{"imports": k, "seconds": min(r.seconds for r in v), "max_rss_bytes": max(r.max_rss for r in v),
                   "all_seconds": [r.seconds for r in v]} for k, v in baselines.items()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "twin-bench-convert",
                        help="where the source checkpoint is cached and the conversions write "
                             "(default /tmp/twin-bench-convert)")
    parser.add_argument("--d-model", type=int, default=1024, help="d_model (default 1024)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    parser.add_argument("--d-ff", type=int, default=4096, help="feed-forward width (default 4096)")
    parser.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each (default 6)")
    parser.add_argument("--vocab", type=int, default=32000, help="source and target vocabulary size (default 32000)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per conversion; best time, highest RSS (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--drop-cache", action="store_true",
                        help="evict SRC from the page cache before each read baseline and conversion")
    parser.add_argument("--keep", action="store_true", help="keep the converted files (default: removed at the end; "
                        "the source checkpoint always stays cached)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: d_model 64, 4 heads, d_ff 256, 2 + 2 layers, vocab 8000 (7 MB), 1 repetition")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, environment and results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.d_ff, args.layers, args.vocab, args.repeats = 64, 4, 256, 2, 8000, 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.workdir.resolve().is_relative_to(ROOT):
        parser.error(f"--workdir {args.workdir} is inside the repository; choose a directory outside it")
    return args


def summarize(runs: dict[str, dict[str, Any]], baselines: list[dict[str, Any]], size: int,
              source: Path) -> list[dict[str, Any]]:
    """One row per conversion: best time, highest RSS, the ratios to the baselines and the targets."""
    base = {b["imports"]: b for b in baselines}
    rows = []
    for c in CONVERSIONS:
        r = runs[c.name]
        b = base[r["imports_label"]]
        seconds, rss, read, copy = min(r["seconds"]), max(r["rss"]), min(r["read_seconds"]), min(r["copy_seconds"])
        row = {"conversion": c.name, "src": source.name if c.src == "source" else c.src, "dst": c.dst, "to": c.to,
               "chain": c.chain, "seconds": seconds, "all_seconds": r["seconds"], "max_rss_bytes": rss,
               "all_max_rss_bytes": r["rss"], "read_once_seconds": read, "copy_once_seconds": copy,
               "src_bytes": r["src_bytes"], "dst_bytes": r["dst_bytes"], "imports": r["imports"],
               "imports_seconds": b["seconds"], "imports_rss_bytes": b["max_rss_bytes"],
               "ratio_read": seconds / read, "ratio_read_excl_imports": (seconds - b["seconds"]) / read,
               "ratio_copy_excl_imports": (seconds - b["seconds"]) / copy, "rss_ratio": rss / size,
               "rss_excl_imports_ratio": (rss - b["max_rss_bytes"]) / size}
        row["meets_rss_target"] = row["rss_ratio"] <= RSS_TARGET
        row["meets_time_target"] = row["ratio_read_excl_imports"] <= TIME_TARGET
        rows.append(row)
    return rows


def check_round_trips(source: Path, workdir: Path) -> list[dict[str, Any]]:
    out = []
    for chain in dict.fromkeys(c.chain for c in CONVERSIONS):
        final = workdir / [c.dst for c in CONVERSIONS if c.chain == chain][-1]
        equal, detail = tensors_equal(source, final)
        out.append({"chain": chain, "final": final.name, "equal": equal, "detail": detail})
    return out


def print_table(rows: list[dict[str, Any]], size: int) -> None:
    headers = ["conversion", "s", "x read", "x read -imports", "x copy -imports", "peak RSS MB", "RSS/size",
               "(RSS-imports)/size", "targets"]
    cells = [[r["conversion"], f"{r['seconds']:.2f}", f"{r['ratio_read']:.1f}x", f"{r['ratio_read_excl_imports']:.1f}x",
              f"{r['ratio_copy_excl_imports']:.1f}x", f"{r['max_rss_bytes'] / 1e6:,.0f}", f"{r['rss_ratio']:.2f}x",
              f"{r['rss_excl_imports_ratio']:.2f}x", ", ".join(["RSS ok" if r["meets_rss_target"] else "RSS OVER",
                                                               "time ok" if r["meets_time_target"] else "time OVER"])]
             for r in rows]
    render_table(f"twin convert, {size / 1e9:.2f} GB float32 checkpoint (targets: peak RSS <= {RSS_TARGET}x size, "
                 f"time excl. imports <= {TIME_TARGET}x read once)", headers, cells, [r["chain"] for r in rows],
                 left=(0, 8), min_width=160)
    for r in rows:
        print(f"{r['conversion']}: SRC {r['src_bytes'] / 1e6:,.0f} MB read once in {r['read_once_seconds']:.3f} s "
              f"({r['src_bytes'] / r['read_once_seconds'] / 1e9:.1f} GB/s), copied once in "
              f"{r['copy_once_seconds']:.2f} s; DST {r['dst_bytes'] / 1e6:,.0f} MB; imports "
              f"{r['imports_seconds']:.2f} s, {r['imports_rss_bytes'] / 1e6:,.0f} MB")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    env = environment()
    print(f"torch {env['torch']}, jax {env['jax']}, flax {env['flax']}, python {env['python']}, "
          f"{env['cpu_count']} CPUs, load average {env['load_average'][0]:.2f} "
          f"(1/5/15 min: {' '.join(f'{x:.2f}' for x in env['load_average'])})")
    cfg = config_for(args)
    size = checkpoint_bytes(cfg)
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = make_source(cfg, args.workdir, args.seed)
    (args.workdir / "config.json").write_text(cfg.to_json())
    file_size = source.stat().st_size
    if not 0 <= file_size - size < 1 << 20:
        raise RuntimeError(f"{source} has {file_size} bytes, expected {size} of tensors plus a header")
    print(f"checkpoint: d_model {cfg.d_model}, {cfg.num_heads} heads, d_ff {cfg.d_ff}, {cfg.num_encoder_layers}+"
          f"{cfg.num_decoder_layers} layers, vocab {cfg.src_vocab_size}/{cfg.tgt_vocab_size}: {size // 4:,} float32 "
          f"parameters, {size / 1e9:.3f} GB ({file_size:,} bytes on disk)")
    cache = ("evicted before each baseline and conversion (--drop-cache): reads come from disk" if args.drop_cache
             else "warm: every SRC is in the page cache (just written or read), reads do not touch the disk")
    print(f"page cache: {cache}; best of {args.repeats} run(s) per conversion")
    runs, baselines = measure(args, source, args.workdir)
    rows = summarize(runs, baselines, size, source)
    round_trips = check_round_trips(source, args.workdir)
    print_table(rows, size)
    for b in baselines:
        print(f"imports baseline [{b['imports']}]: {b['seconds']:.2f} s, peak RSS {b['max_rss_bytes'] / 1e6:,.0f} MB")
    for t in round_trips:
        print(f"round trip via {t['chain']}: {t['final']} {'equals' if t['equal'] else 'DIFFERS FROM'} the source "
              f"({t['detail']})")
    if not args.keep:
        for c in CONVERSIONS:
            remove(args.workdir / c.dst)
    wall = time.perf_counter() - wall_start
    print_wall(wall, env)
    if args.json:
        report = {"settings": settings_of(args), "environment": env, "page_cache": cache,
                  "checkpoint": {"path": str(source), "config": cfg.to_dict(), "tensor_bytes": size,
                                 "file_bytes": file_size},
                  "targets": {"rss_ratio": RSS_TARGET, "time_ratio_read_excl_imports": TIME_TARGET},
                  "import_baselines": baselines, "wall_seconds": wall, "results": rows, "round_trips": round_trips}
        write_json(args.json, report)
    failed = [t["chain"] for t in round_trips if not t["equal"]]
    if failed:
        print(f"FAILED: the round trip(s) via {', '.join(failed)} changed the weights", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
