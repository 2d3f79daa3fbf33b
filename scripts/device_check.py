"""The device check (issue 22): parity, decoding, training and speed of both twins on one accelerator.

Run by `scripts/device_check.sh` (`make device-check`) in the device image as it is (`PYTHONPATH=.`, no
install step), or here on the CPU with DEVICE=cpu. Writes `report.json` and `summary.md` into OUT (default
device_report/) after every section, so that a run cut short still leaves what it measured.

Sections, in this order; each catches its own failure (recorded with its error line) and the next one runs:

 1. devices     both frameworks see the device (DEVICE=cuda: torch.cuda and jax.devices("gpu")) and run on it.
 2. parity      the Hypothesis parity suite: `parity.suite.compare_twins` on the configs and batches of
                tests/strategies.py, for the three families (seq2seq, encoder, decoder), weights from either twin,
                plain or packed rows, on the device: float64 and float32 with matmul precision "highest" in
                both frameworks (no TF32; DESIGN tolerances 1e-10 and 1e-5: outputs and every gradient),
                bfloat16 forward (2e-2); float32 with TF32 (torch `set_float32_matmul_precision("high")`,
                JAX `default_matmul_precision("tensorfloat32")`) reported, not asserted.
 3. cache       cached decoding (the target fed in chunks through the KV cache) against the full pass, in
                both twins and across them: float64 (1e-10) and float32 (1e-5).
 4. tokens      greedy and beam tokens identical across the twins on the device: random float64 models
                (every beam rule), and the trained tests/data/tiny_run in float32 (greedy and beam 4).
 5. train_step  one step of each trainer (`torch_tx.train.Trainer`, `jax_tx.train.Trainer`) on the same
                converted weights, every family, float64 / float32 (loss, grad norm, gradients, updated
                weights at the DESIGN tolerance) and bfloat16 mixed precision (tests/test_mixed_precision.py's
                tolerances). Reported: whether a repeated step is bitwise the same (nondeterministic kernels),
                and the host syncs of one torch step (torch.cuda.set_sync_debug_mode; CUDA only).
 6. throughput  reported, not asserted: square matmul ceilings (bfloat16, float32, TF32) of both frameworks;
                training-step target tokens/s of both twins (their `twin train` trainers and the bare models)
                and their peers (torch.nn.Transformer, a model of flax.linen layers, transformers' Marian if
                importable), float32 (precision "highest") and bfloat16 mixed precision, with model TFLOP/s
                and their fraction of the measured bfloat16 matmul ceiling; greedy decoding tokens/s of both
                twins at two batch sizes.

Sizes (DEVICE_CHECK_SIZE): "full" (the default with DEVICE=cuda: `base` model, batches of 384 x 64, decoding
at batch 64 and 256), "small" (the default with DEVICE=cpu: the same code at CPU sizes) and "tiny" (CI).
A global time budget (DEVICE_CHECK_BUDGET seconds; 440 on cuda, 270 on cpu) is split over the sections;
what a section leaves over goes to the next ones. Hypothesis sections stop drawing at their deadline, the
throughput section skips the rows it has no time for, and a section is skipped, with the reason recorded,
when too little of the budget is left to start it.

Exit status: 0 every asserted check ran and passed; 1 an asserted check failed or a section errored;
2 nothing failed, but an asserted section was skipped (budget, or not selected); 3 (set by the .sh) the run
was killed (hard timeout or crash): see report.json's "aborted".

    DEVICE=cpu PYTHONPATH=. .venv/bin/python scripts/device_check.py          # or scripts/device_check.sh
    DEVICE=cpu DEVICE_CHECK_SIZE=tiny DEVICE_CHECK_BUDGET=60 scripts/device_check.sh
    DEVICE_CHECK_SECTIONS=devices,throughput make device-check                 # a subset (others: skipped)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

SCHEMA = 1
ARCHS = ("seq2seq", "encoder", "decoder")
TWINS = ("torch", "jax")
# The suite's XLA flags on CPU (tests/conftest.py's FAST_COMPILE): tiny programs compile 3-4x faster.
CPU_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
DEFAULT_BUDGET = {"cuda": 440.0, "cpu": 270.0}
DEFAULT_SIZE = {"cuda": "full", "cpu": "small"}

# Share of the budget each section plans for (cumulative planned ends; the last one gets the rest), and the
# least time (s) it needs to be worth starting.
PLAN = {"devices": 0.04, "parity": 0.27, "cache": 0.07, "tokens": 0.10, "train_step": 0.12, "throughput": 0.40}
MIN_START = {"devices": 1.0, "parity": 5.0, "cache": 3.0, "tokens": 3.0, "train_step": 5.0, "throughput": 5.0}
RESERVE = 2.0  # seconds kept at the end for writing the report

SIZES: dict[str, dict[str, Any]] = {
    "full": dict(parity_examples=8, cache_examples=6, token_examples=10, train_examples=2, tiny_run=True,
                 bench=dict(d_model=512, layers=6, vocab=8000, batch=384, src_len=64, tgt_len=64),
                 bench_steps=4, bench_warmup=2, bench_repeats=3, ceiling_sizes=(4096, 8192), ceiling_repeats=5,
                 decode_batches=(64, 256), decode_src_len=32, decode_new_tokens=64, decode_repeats=3,
                 row_guess={"torch": 15.0, "jax": 60.0}),
    "small": dict(parity_examples=2, cache_examples=2, token_examples=3, train_examples=1, tiny_run=True,
                  bench=dict(d_model=128, layers=2, vocab=1000, batch=16, src_len=32, tgt_len=32),
                  bench_steps=2, bench_warmup=1, bench_repeats=2, ceiling_sizes=(512, 1024), ceiling_repeats=3,
                  decode_batches=(64, 256), decode_src_len=16, decode_new_tokens=8, decode_repeats=2,
                  row_guess={"torch": 3.0, "jax": 6.0}),
    "tiny": dict(parity_examples=1, cache_examples=1, token_examples=1, train_examples=1, tiny_run=False,
                 train_archs=("seq2seq",),
                 bench=dict(d_model=32, layers=1, vocab=64, batch=4, src_len=8, tgt_len=8),
                 bench_steps=1, bench_warmup=1, bench_repeats=1, ceiling_sizes=(128,), ceiling_repeats=1,
                 decode_batches=(4,), decode_src_len=8, decode_new_tokens=4, decode_repeats=1,
                 bench_models=("torch_tx trainer", "jax_tx trainer", "torch.nn.Transformer", "flax.linen layers"),
                 bench_dtypes=("bfloat16",), row_guess={"torch": 1.0, "jax": 2.0}),
}


# ------------------------------------------------------------------------------------------ the report

@dataclass
class Section:
    """One section of the report: `status` pass | fail | error | skipped | reported (not asserted)."""

    name: str
    title: str
    asserted: bool
    status: str = "pending"
    wall_s: float = 0.0
    reason: str | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def check(self, what: str, passed: bool, *, asserted: bool = True, **values: Any) -> dict[str, Any]:
        row = {"what": what, "passed": bool(passed), "asserted": asserted and self.asserted, **values}
        self.checks.append(row)
        return row

    def error(self, what: str, exc: BaseException) -> None:
        """An example or row that raised: recorded as a failed asserted check (or a note, if not asserted)."""
        self.checks.append({"what": what, "passed": False, "asserted": self.asserted, "error": error_line(exc)})


class OutOfTime(Exception):
    """The section's deadline passed."""


def error_line(exc: BaseException) -> str:
    """`Type: message` on one line, and the innermost frame of the repository's own code."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT) in f.filename and ".venv" not in f.filename]
    where = f" (at {Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno})" if frames else ""
    return (text[:600] + ("..." if len(text) > 600 else "")) + where


class Context:
    """What every section reads: the device, the sizes, the clock."""

    def __init__(self, device: str, size: str, budget: float, out: Path, start: float):
        self.device, self.size, self.budget, self.out, self.start = device, size, budget, out, start
        self.sizes = SIZES[size]
        self.deadline = start + budget  # the current section's, set by `run`
        self.end = start + budget - RESERVE
        self.flush: Callable[[], None] = lambda: None  # rewrite the report with the running section's state so far

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime()


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out / "report.json")
    (out / "summary.md").write_text(render_summary(report))


def exit_status(sections: list[dict[str, Any]]) -> int:
    if any(s["asserted"] and s["status"] in ("fail", "error") for s in sections):
        return 1
    if any(s["asserted"] and s["status"] in ("skipped", "pending") for s in sections):
        return 2
    return 0


def settle(section: Section) -> None:
    """The status of a section that returned: from its asserted checks."""
    asserted = [c for c in section.checks if c["asserted"]]
    if not section.asserted:
        section.status = "reported"
    elif any(not c["passed"] for c in asserted):
        section.status = "fail"
    elif asserted:
        section.status = "pass"
    else:
        section.status = "skipped"
        section.reason = section.reason or "no asserted check ran within the time left"


def run(sections: list[tuple[str, str, bool, Callable[[Context, Section], None]]], ctx: Context,
        report: dict[str, Any], selected: set[str] | None = None) -> int:
    """Run `sections` (name, title, asserted, fn) in order under the budget; write the report after each."""
    planned, total = {}, 0.0
    for name, *_ in sections:
        total += PLAN.get(name, 0.0)
        planned[name] = total
    scale = 1.0 / total if total else 1.0
    halt: str | None = None
    results: list[Section] = []
    report["sections"] = []
    for index, (name, title, asserted, fn) in enumerate(sections):
        section = Section(name, title, asserted)
        results.append(section)
        report["sections"].append(asdict(section))
        report["current_section"] = name
        is_last = index == len(sections) - 1
        section_end = ctx.end if is_last else min(ctx.end, ctx.start + ctx.budget * planned[name] * scale)
        left = ctx.end - time.monotonic()
        if selected is not None and name not in selected:
            section.status, section.reason = "skipped", "not selected (DEVICE_CHECK_SECTIONS)"
        elif halt is not None:
            section.status, section.reason = "skipped", halt
        elif left < MIN_START.get(name, 1.0):
            section.status, section.reason = "skipped", (f"budget: {max(left, 0):.0f} s of {ctx.budget:.0f} s left, "
                                                         f"the section needs at least {MIN_START.get(name, 1.0):.0f} s")
        else:
            ctx.deadline = max(section_end, time.monotonic() + MIN_START.get(name, 1.0))
            ctx.deadline = min(ctx.deadline, ctx.end)
            print(f"[device_check] {name}: {title} (deadline in {ctx.deadline - time.monotonic():.0f} s)", flush=True)
            started = time.monotonic()
            write_report(report, ctx.out)

            def flush(section=section, index=index, started=started):
                section.wall_s = round(time.monotonic() - started, 2)
                report["sections"][index] = asdict(section)
                write_report(report, ctx.out)

            ctx.flush = flush
            try:
                fn(ctx, section)
                settle(section)
            except OutOfTime:
                section.notes.append("stopped at its deadline")
                settle(section)
            except Exception as exc:  # noqa: BLE001 - every section catches its own failure
                section.status, section.reason = "error", error_line(exc)
                section.details["traceback"] = traceback.format_exc()[-4000:]
            ctx.flush = lambda: None
            section.wall_s = round(time.monotonic() - started, 2)
            if name == "devices" and section.status != "pass":
                halt = f"the devices check did not pass ({section.reason or 'see its checks'})"
            print(f"[device_check] {name}: {section.status} in {section.wall_s:.1f} s"
                  + (f" ({section.reason})" if section.reason else ""), flush=True)
        report["sections"][index] = asdict(section)
        report["wall_s"] = round(time.monotonic() - ctx.start, 2)
        write_report(report, ctx.out)
    report["current_section"] = None
    report["finished"] = now_iso()
    report["exit_status"] = exit_status(report["sections"])
    report["wall_s"] = round(time.monotonic() - ctx.start, 2)
    write_report(report, ctx.out)
    return report["exit_status"]


# --------------------------------------------------------------------------------- frameworks and precision

# float32 matmuls: "highest" is true float32 in both frameworks (what the DESIGN tolerances are for); "tf32" asks
# both for TF32 explicitly (torch's default is "highest", JAX's default on a GPU may be TF32: the devices section
# records both defaults).
JAX_PRECISION = {"highest": "highest", "tf32": "tensorfloat32"}


@contextlib.contextmanager
def torch_precision(mode: str):
    """float32 matmuls in torch: "highest" (no TF32) or "tf32" (set_float32_matmul_precision("high"))."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if mode == "highest" else "high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def jax_device(device: str):
    import jax

    return jax.devices("gpu")[0] if device == "cuda" else jax.devices("cpu")[0]


@contextlib.contextmanager
def jax_on(device: str, precision: str | None = "highest"):
    """JAX's default device `device` and matmul precision `precision` (None: JAX's own default)."""
    import jax

    dev = jax_device(device)
    with jax.default_device(dev):
        if precision is None:
            yield dev
        else:
            with jax.default_matmul_precision(precision):
                yield dev


@contextlib.contextmanager
def precision(device: str, mode: str):
    """Both frameworks: "highest" (torch highest, JAX highest) or "tf32" (torch high, JAX tensorfloat32)."""
    with torch_precision(mode), jax_on(device, JAX_PRECISION[mode]) as dev:
        yield dev


@contextlib.contextmanager
def suite_precision(mode: str):
    """parity.suite's JAX runs under `mode` (the suite itself always sets "highest")."""
    from parity import suite

    original = suite._jax_device
    suite._jax_device = lambda device: jax_on(device, JAX_PRECISION[mode])
    try:
        with torch_precision(mode):
            yield
    finally:
        suite._jax_device = original


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def share_of_time(ctx: Context, parts_left: float):
    """The section's deadline narrowed to an equal share of what is left for each of `parts_left` parts."""
    saved = ctx.deadline
    ctx.deadline = min(saved, time.monotonic() + (saved - time.monotonic()) / max(parts_left, 1))
    try:
        yield
    finally:
        ctx.deadline = saved


def hypothesis_run(ctx: Context, test: Callable[..., None], strategies: dict[str, Any], max_examples: int,
                   counter: dict[str, Any]) -> None:
    """`test` over up to `max_examples` Hypothesis examples (derandomized, no shrinking, no database), stopping
    at the section's deadline. `test` records its own results; it must not raise but for OutOfTime."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings

    def timed(**kwargs):
        ctx.check_time()
        counter["examples"] = counter.get("examples", 0) + 1
        test(**kwargs)

    timed.__signature__ = inspect.Signature([inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in strategies])
    wrapped = settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                       phases=[Phase.generate], suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                       print_blob=False)(given(**strategies)(timed))
    try:
        wrapped()
    except OutOfTime:
        counter["stopped"] = "deadline"
    except BaseException as exc:  # an ExceptionGroup of OutOfTime from Hypothesis' final replay
        inner = getattr(exc, "exceptions", ())
        if inner and all(isinstance(e, OutOfTime) for e in inner):
            counter["stopped"] = "deadline"
        else:
            raise


# ---------------------------------------------------------------------------------------- 1. devices

def section_devices(ctx: Context, section: Section) -> None:
    import jax
    import numpy as np
    import torch

    env = ctx_environment()
    section.details["environment"] = env
    section.details["precision_defaults"] = precision_defaults()
    if ctx.device == "cuda":
        available = torch.cuda.is_available()
        section.check("torch sees a GPU (torch.cuda.is_available())", available,
                      count=torch.cuda.device_count() if available else 0)
        try:
            gpus = jax.devices("gpu")
            section.check("jax sees a GPU (jax.devices('gpu'))", bool(gpus), devices=[str(d) for d in gpus])
        except RuntimeError as exc:
            section.check("jax sees a GPU (jax.devices('gpu'))", False, error=error_line(exc),
                          hint="jax[cuda12] plugin missing, or JAX_PLATFORMS excludes gpu")
            gpus = []
        if available:
            value = float(torch.arange(4, device="cuda", dtype=torch.float32).sum().item())
            section.check("torch runs a kernel on the GPU", value == 6.0, value=value)
        if gpus:
            x = jax.device_put(np.arange(4, dtype=np.float32), gpus[0])
            value = float(jax.jit(lambda a: a.sum())(x))
            section.check("jax runs a kernel on the GPU", value == 6.0, value=value,
                          device_kind=getattr(gpus[0], "device_kind", ""))
        smi = nvidia_smi()
        if smi:
            section.details["nvidia_smi"] = smi
    else:
        cpus = jax.devices("cpu")
        section.check("jax runs on the CPU (DEVICE=cpu)", bool(cpus), devices=[str(d) for d in cpus])
        value = float(torch.arange(4, dtype=torch.float32).sum().item())
        section.check("torch runs on the CPU", value == 6.0, value=value)
        section.details["torch_cuda_available"] = torch.cuda.is_available()


def nvidia_smi() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def precision_defaults() -> dict[str, Any]:
    import jax
    import torch

    out = {"torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
           "jax_default_matmul_precision": jax.config.jax_default_matmul_precision}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out["torch_cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
            out["torch_cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        except Exception as exc:  # noqa: BLE001 - an API that moved
            out["torch_tf32_flags"] = error_line(exc)
    return out


def versions() -> dict[str, Any]:
    """The imported frameworks' own __version__; the other packages' from their metadata (not imported)."""
    import importlib.metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - absent is a fact to record
            out[name] = f"absent ({type(exc).__name__})"
    for dist in ("jax-cuda12-plugin", "jax-cuda13-plugin", "hypothesis", "safetensors", "tokenizers", "transformers",
                 "orbax-checkpoint", "sacrebleu", "ml-dtypes", "num2words", "ctranslate2"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"  # num2words and ctranslate2 are not in the device image: what needs them skips
    return out


def ctx_environment() -> dict[str, Any]:
    import jax
    import torch

    from benchmarks.bench_train import cpu_model

    env: dict[str, Any] = {"versions": versions(), "platform": platform.platform(), "cpu": cpu_model(),
                           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "env": {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                              "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES")
                                   if k in os.environ}}
    try:
        env["jax_devices"], env["jax_backend"] = [str(d) for d in jax.devices()], jax.default_backend()
    except Exception as exc:  # noqa: BLE001 - the checks below say what it means
        env["jax_devices"] = error_line(exc)
    env["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                      "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
                      "cudnn": torch.backends.cudnn.version()}
    return env


# ----------------------------------------------------------------------------------------- 2. parity

PARITY_MODES = (("float64", "float64", "highest", True), ("float32", "float32", "highest", True),
                ("bfloat16 forward", "bfloat16", "highest", True), ("float32 TF32", "float32", "tf32", False))


def output_kind(what: str) -> str:
    """'torch->jax grads (12 params, worst x)' -> 'grads'; 'jax->torch logits' -> 'logits'."""
    return what.split(" ", 2)[1]


def section_parity(ctx: Context, section: Section) -> None:
    from hypothesis import strategies as st

    from parity import suite
    from parity.cli import config_label
    from strategies import configs, inputs

    table: dict[str, dict[str, Any]] = {}
    counters: dict[str, dict[str, Any]] = {}
    for i, arch in enumerate(ARCHS):
        counter = counters.setdefault(arch, {})

        def test(data, source, seed, packed, arch=arch):
            cfg = data.draw(configs(archs=(arch,)), label="cfg")
            batch = data.draw(inputs(cfg, packed=packed), label="batch")
            bf_batch = data.draw(inputs(cfg, allow_empty_source=False), label="bfloat16 batch")
            weights = suite.init_canonical(cfg, source, seed)
            label = f"{config_label(cfg)} from {source}{' packed' if packed else ''}"
            for mode, dtype, prec, asserted in PARITY_MODES:
                key = f"{arch} | {mode}"
                entry = table.setdefault(key, {"arch": arch, "mode": mode, "dtype": dtype, "asserted": asserted,
                                               "examples": 0, "checks": 0, "failed": 0, "worst": {},
                                               "tol": suite.TOLERANCES[dtype]})
                try:
                    with suite_precision(prec):
                        rows = suite.compare_twins(cfg, weights, bf_batch if dtype == "bfloat16" else batch, dtype,
                                                   source, ctx.device)
                except Exception as exc:  # noqa: BLE001 - recorded, the next example runs
                    section.error(f"parity {key}: {label}", exc)
                    if not asserted:
                        section.checks[-1]["asserted"] = False
                    entry["failed"] += 1
                    continue
                entry["examples"] += 1
                for row in rows:
                    kind = output_kind(row.what)
                    entry["checks"] += 1
                    entry["worst"][kind] = max(entry["worst"].get(kind, 0.0), row.rel)
                    check = section.check(f"parity {key}: {row.what}", row.passed, asserted=asserted, config=label,
                                          dtype=dtype, max_abs=row.max_abs, rel=row.rel, tol=row.tol)
                    if not row.passed and asserted:
                        entry["failed"] += 1
                        if ctx.device == "cuda" and dtype == "float32" and entry["failed"] <= 2:
                            check["rel_with_math_sdpa"] = math_sdpa_rel(cfg, weights, batch, source, ctx.device,
                                                                        row.what)

        with share_of_time(ctx, len(ARCHS) - i):  # each family its share of what is left: all three run
            hypothesis_run(ctx, test, dict(data=st.data(), source=st.sampled_from(TWINS),
                                           seed=st.integers(0, 2**31 - 1), packed=st.booleans()),
                           ctx.sizes["parity_examples"], counter)
        section.details["table"] = list(table.values())
        ctx.flush()
    section.details["table"] = list(table.values())
    section.details["examples"] = counters
    section.details["how"] = ("parity.suite.compare_twins: weights from one twin's initializer converted into the "
                              "other; outputs and every parameter's gradient (float64, float32), forward (bfloat16); "
                              "errors relative to the source twin's norm")
    for arch, counter in counters.items():
        if counter.get("stopped"):
            section.notes.append(f"{arch}: stopped drawing at the deadline after {counter.get('examples', 0)} "
                                 f"example(s) of {ctx.sizes['parity_examples']}")


def math_sdpa_rel(cfg, weights, batch, source, device, what) -> float | str:
    """The same float32 comparison with torch's SDPA held to its math kernel: tells a fused attention kernel's
    float32 rounding apart from a real difference."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from parity import suite

        with sdpa_kernel(SDPBackend.MATH), suite_precision("highest"):
            rows = suite.compare_twins(cfg, weights, batch, "float32", source, device)
        return max(r.rel for r in rows if output_kind(r.what) == output_kind(what))
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return error_line(exc)


# ------------------------------------------------------------------------------------------ 3. cache

def section_cache(ctx: Context, section: Section) -> None:
    from hypothesis import strategies as st

    from parity.cli import config_label
    from strategies import configs, inputs

    counter: dict[str, Any] = {}
    tolerances = {"float64": 1e-10, "float32": 1e-5}

    def test(data, source, seed):
        cfg = data.draw(configs(), label="cfg")
        batch = data.draw(inputs(cfg, allow_empty_source=False), label="batch")
        t_len = batch.tgt.shape[1]
        cuts = sorted(data.draw(st.sets(st.integers(1, t_len - 1), max_size=3)) if t_len > 1 else [])
        for dtype, tol in tolerances.items():
            label = f"{config_label(cfg)} from {source}, {dtype}, chunks at {cuts}"
            try:
                rels = cached_against_full(ctx.device, cfg, batch, source, seed, cuts, dtype)
            except Exception as exc:  # noqa: BLE001
                section.error(f"cache {dtype}: {label}", exc)
                continue
            for what, rel in rels.items():
                section.check(f"cache {dtype}: {what}", rel <= tol, config=label, dtype=dtype, rel=rel, tol=tol)

    hypothesis_run(ctx, test, dict(data=st.data(), source=st.sampled_from(TWINS), seed=st.integers(0, 2**31 - 1)),
                   ctx.sizes["cache_examples"], counter)
    section.details["examples"] = counter
    if counter.get("stopped"):
        section.notes.append(f"stopped drawing at the deadline after {counter.get('examples', 0)} example(s)")


def cached_against_full(device: str, cfg, batch, source: str, seed: int, cuts: list[int], dtype: str) -> dict[str, float]:
    """tests/test_decoding.py's cached-decoding check, on `device` in `dtype`: relative errors of the torch
    cache against the torch full pass, the Flax cache against the Flax full pass, and the Flax cache against
    the torch full pass."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jax_tx
    import torch_tx
    from parity import suite
    from parity.convert import canonical_to_flax, to_torch

    weights = suite.init_canonical(cfg, source, seed)
    t_len = batch.tgt.shape[1]
    chunks = list(zip([0, *cuts], [*cuts, t_len]))
    with precision(device, "highest") as dev:
        model = torch_tx.Transformer(cfg).to(device=device, dtype=getattr(torch, dtype)).eval()
        model.load_state_dict({k: to_torch(np.asarray(v)) for k, v in weights.items()})
        src, tgt, src_mask, tgt_mask = (torch.from_numpy(a).to(device)
                                        for a in (batch.src, batch.tgt, batch.src_mask, batch.tgt_mask))
        with torch.no_grad():
            full = model(src, tgt, src_mask, tgt_mask).cpu().numpy()  # [B, T, V]
            cache = model.init_cache(model.encode(src, src_mask), src_mask, length=cfg.max_len)
            steps_t = []
            for a, b in chunks:
                logits, cache = model.decode(tgt[:, a:b], None, tgt_mask=tgt_mask[:, a:b], cache=cache)  # [B, b-a, V]
                steps_t.append(logits.cpu().numpy())
        if cache["index"] != t_len:
            raise AssertionError(f"torch cache index {cache['index']} after {t_len} positions")
        fm = jax_tx.Transformer(cfg)
        params = jax.tree.map(lambda a: jax.device_put(jnp.asarray(a, dtype), dev), canonical_to_flax(weights, cfg))

        @jax.jit
        def cached(params, src, src_mask, tgt, tgt_mask):
            variables = {"params": params}
            memory = fm.apply(variables, src, src_mask, method=fm.encode)  # [B, S, D]
            jcache = fm.apply(variables, memory, src_mask, cfg.max_len, method=fm.init_cache)
            steps = []
            for a, b in chunks:
                logits, jcache = fm.apply(variables, tgt[:, a:b], None, None, tgt_mask[:, a:b], jcache,
                                          method=fm.decode)  # [B, b-a, V]
                steps.append(logits)
            return jnp.concatenate(steps, 1), jcache["index"]  # [B, T, V]

        jsrc, jsrc_mask, jtgt, jtgt_mask = (jax.device_put(a, dev) for a in (batch.src, batch.src_mask, batch.tgt,
                                                                            batch.tgt_mask))
        steps_j, index = cached(params, jsrc, jsrc_mask, jtgt, jtgt_mask)
        if int(index) != t_len:
            raise AssertionError(f"jax cache index {int(index)} after {t_len} positions")
        full_j = np.asarray(jax.jit(fm.apply)({"params": params}, jsrc, jtgt, jsrc_mask, jtgt_mask))  # [B, T, V]
    steps_j = np.asarray(steps_j)
    rel = lambda got, ref: suite.errors(got, ref)[1]  # noqa: E731
    return {"torch cached vs torch full": rel(np.concatenate(steps_t, 1), full),
            "jax cached vs jax full": rel(steps_j, full_j), "jax cached vs torch full": rel(steps_j, full)}


# ----------------------------------------------------------------------------------------- 4. tokens

BOS, EOS = 1, 2


class DeviceTwins:
    """Both twins on the same canonical weights, in one dtype, on `device` (tests/test_decoding.py's Twins)."""

    def __init__(self, cfg, weights, dtype: str, device: str):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import torch

        import jax_tx
        import torch_tx
        from parity.convert import canonical_to_flax, to_torch

        self.cfg, self.device = cfg, device
        self.torch = torch_tx.Transformer(cfg).to(device=device, dtype=getattr(torch, dtype)).eval()
        self.torch.load_state_dict({k: to_torch(np.asarray(v)) for k, v in weights.items()})
        self.flax = jax_tx.Transformer(cfg)
        dev = jax_device(device)
        self.params = jax.tree.map(lambda a: jax.device_put(jnp.asarray(np.asarray(a), dtype), dev),
                                   canonical_to_flax(weights, cfg))

    def generate(self, src, **kw):
        """(torch tokens, jax tokens) as numpy, both under matmul precision "highest"."""
        import jax
        import numpy as np
        import torch

        import jax_tx
        import torch_tx

        kw = {"bos_id": BOS, "eos_id": EOS, **kw}
        with precision(self.device, "highest") as dev:
            tokens_t = torch_tx.generate(self.torch, torch.from_numpy(src).long().to(self.device), **kw).cpu().numpy()
            tokens_j = np.asarray(jax_tx.generate(self.flax, self.params, jax.device_put(src.astype(np.int32), dev),
                                                  **kw))
        return tokens_t, tokens_j


def random_sources(cfg, rng, batch: int = 3, length: int = 6):
    import numpy as np

    lengths = rng.integers(1, length + 1, size=batch)  # [B]
    ids = rng.integers(1, cfg.src_vocab_size, size=(batch, length))  # [B, S]
    return np.where(np.arange(length)[None, :] < lengths[:, None], ids, cfg.pad_id).astype(np.int64)


def section_tokens(ctx: Context, section: Section) -> None:
    import numpy as np
    from hypothesis import strategies as st

    from parity import suite
    from parity.cli import config_label
    from strategies import configs

    counter: dict[str, Any] = {}
    if ctx.sizes["tiny_run"]:  # first: the trained checkpoint is the one a user would look at
        tiny_run_tokens(ctx, section)

    def test(cfg, source, seed, beam_size, alpha, eos, rule):
        label = f"{config_label(cfg)} from {source}, beam {beam_size}, alpha {alpha}, eos {eos}, rule {rule}"
        try:
            twins = DeviceTwins(cfg, suite.init_canonical(cfg, source, seed), "float64", ctx.device)
            src = random_sources(cfg, np.random.default_rng(seed))
            tokens_t, tokens_j = twins.generate(src, max_new_tokens=8, beam_size=beam_size, length_penalty=alpha,
                                                eos_id=eos, beam_rule=rule)
        except Exception as exc:  # noqa: BLE001
            section.error(f"tokens float64: {label}", exc)
            return
        same = tokens_t.shape == tokens_j.shape and bool((tokens_t == tokens_j).all())
        section.check(f"tokens float64 {'greedy' if beam_size == 1 else 'beam'}: torch == jax", same, config=label,
                      shape=list(tokens_t.shape),
                      differing=None if same else int((tokens_t != tokens_j).sum()) if tokens_t.shape == tokens_j.shape
                      else "shapes differ")

    hypothesis_run(ctx, test, dict(cfg=configs(), source=st.sampled_from(suite.TWINS), seed=st.integers(0, 2**31 - 1),
                                   beam_size=st.sampled_from([1, 2, 3]), alpha=st.sampled_from([0.0, 0.6, 1.5]),
                                   eos=st.integers(2, 6), rule=st.sampled_from(["twin", "hf", "ctranslate2"])),
                   ctx.sizes["token_examples"], counter)
    section.details["examples"] = counter
    if counter.get("stopped"):
        section.notes.append(f"stopped drawing at the deadline after {counter.get('examples', 0)} example(s)")


def tiny_run_tokens(ctx: Context, section: Section) -> None:
    """tests/data/tiny_run (trained, float32): 48 test sentences, greedy and beam 4, the same tokens in both twins."""
    import numpy as np

    from parity.checkpoint import load_checkpoint
    from parity.data import load_corpus
    from parity.tokenizer import Tokenizer

    run_dir = ROOT / "tests" / "data" / "tiny_run"
    try:
        cfg, weights = load_checkpoint(run_dir)
        tokenizer = Tokenizer.load(run_dir)
        pairs = load_corpus("builtin").test[:48]
        encoded = [np.append(ids, tokenizer.eos_id) for ids in tokenizer.encode([p[0] for p in pairs])]
        src = np.zeros((len(encoded), 32), dtype=np.int64)
        for row, ids in enumerate(encoded):
            src[row, :len(ids)] = ids
        twins = DeviceTwins(cfg, weights, "float32", ctx.device)
    except Exception as exc:  # noqa: BLE001
        section.error("tiny_run float32: load", exc)
        return
    for beam_size in (1, 4):
        what = f"tiny_run float32 {'greedy' if beam_size == 1 else 'beam 4'}: torch == jax"
        try:
            tokens_t, tokens_j = twins.generate(src, max_new_tokens=48, beam_size=beam_size, eos_id=tokenizer.eos_id)
        except Exception as exc:  # noqa: BLE001
            section.error(what, exc)
            continue
        same = tokens_t.shape == tokens_j.shape and bool((tokens_t == tokens_j).all())
        exact = float(np.mean([tokenizer.decode(r) == p[1] for r, p in zip(tokens_t, pairs)]))
        section.check(what, same, sentences=len(src), shape=list(tokens_t.shape), torch_exact_match=exact,
                      jax_exact_match=float(np.mean([tokenizer.decode(r) == p[1] for r, p in zip(tokens_j, pairs)])))
        ctx.check_time()


# ------------------------------------------------------------------------------------- 5. train_step

# tests/test_mixed_precision.py's one-step tolerances for bfloat16 (gradients of tiny random models: GRAD_TOL)
TRAIN_TOLERANCES = {"float64": {"loss": 1e-10, "grad_norm": 1e-10, "grads": 1e-10, "weights": 1e-10},
                    "float32": {"loss": 1e-5, "grad_norm": 1e-5, "grads": 1e-5, "weights": 1e-5},
                    "bfloat16": {"loss": 2e-2, "grad_norm": 2e-2, "grads": 1e-1, "weights": 2e-2}}


def training_batch(cfg, draw):
    """tests/test_mixed_precision.py's batch_of (without empty source rows): a right-padded training batch of
    cfg.arch."""
    import numpy as np
    from hypothesis import strategies as st

    from parity.batching import NO_CLASS, Batch
    from strategies import inputs

    found = draw(inputs(cfg, allow_empty_source=False))  # every row has labels: the step must move the weights
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if cfg.arch == "encoder":
        classes = rng.integers(0, cfg.num_classes, len(found.src))  # [B]
        return Batch(found.src.astype(np.int32), None, np.where(found.src_mask.any(1), classes, NO_CLASS)
                     .astype(np.int32), pad_id=cfg.pad_id)
    labels = np.where(found.tgt_mask, rng.integers(1, cfg.tgt_vocab_size, found.tgt.shape), cfg.pad_id)  # [B, T]
    return Batch(None if cfg.arch == "decoder" else found.src.astype(np.int32), found.tgt.astype(np.int32),
                 labels.astype(np.int32), pad_id=cfg.pad_id)


def flat(arrays) -> Any:
    import numpy as np

    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in sorted(arrays)])


def one_step(trainer, batch, tcfg) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.train_step(batch).items()}
    state = trainer.export_state(1)
    return {"loss": metrics["loss"] / max(metrics["tokens"], 1), "grad_norm": metrics["grad_norm"],
            "grads": flat(state.exp_avg) / (1 - tcfg.betas[0]), "weights": flat(state.weights)}


def section_train_step(ctx: Context, section: Section) -> None:
    from hypothesis import strategies as st

    import jax_tx.train as jt
    import torch_tx.train as tt
    from parity import suite
    from parity.cli import config_label
    from parity.train import TrainConfig
    from strategies import configs

    trainers = {"torch": tt.Trainer, "jax": jt.Trainer}
    tcfg = TrainConfig()
    counters: dict[str, Any] = {}
    archs = ctx.sizes.get("train_archs", ARCHS)
    for i, arch in enumerate(archs):
        counter = counters.setdefault(arch, {})

        def test(data, source, arch=arch):
            cfg = data.draw(configs(archs=(arch,)), label="cfg")
            if cfg.arch == "encoder" and cfg.num_classes is None:
                cfg = cfg.replace(num_classes=2)
            batch = training_batch(cfg, data.draw)
            weights = suite.init_canonical(cfg, source, 0)
            other = "jax" if source == "torch" else "torch"
            for dtype, tols in TRAIN_TOLERANCES.items():
                label = f"{config_label(cfg)} from {source}, {dtype}"
                try:
                    with precision(ctx.device, "highest"):
                        results = {name: one_step(trainers[name](cfg, tcfg, weights, dtype=dtype, device=ctx.device),
                                                  batch, tcfg) for name in TWINS}
                except Exception as exc:  # noqa: BLE001
                    section.error(f"train step {arch} {dtype}: {label}", exc)
                    continue
                ref, got = results[source], results[other]
                for what, tol in tols.items():
                    if what in ("loss", "grad_norm"):
                        rel = abs(got[what] - ref[what]) / max(abs(ref[what]), 1e-30)
                    else:
                        rel = suite.errors(got[what], ref[what])[1]
                    section.check(f"train step {arch} {dtype}: {what}", rel <= tol, config=label, dtype=dtype,
                                  rel=rel, tol=tol)
                moved = suite.errors(ref["weights"], flat(weights))[1]
                section.check(f"train step {arch} {dtype}: the step updated the weights", moved > 0, config=label,
                              rel=moved)
                ctx.check_time()

        with share_of_time(ctx, len(archs) - i + 0.3):  # and a little left for the probe below
            hypothesis_run(ctx, test, dict(data=st.data(), source=st.sampled_from(TWINS)),
                           ctx.sizes["train_examples"], counter)
        ctx.flush()
    section.details["examples"] = counters
    for arch, counter in counters.items():
        if counter.get("stopped"):
            section.notes.append(f"{arch}: stopped drawing at the deadline after {counter.get('examples', 0)} "
                                 f"example(s) of {ctx.sizes['train_examples']}")
    if ctx.left() < 3:
        section.notes.append("repeatability / host-sync probe skipped: no time left")
        return
    try:
        repeatability_and_syncs(ctx, section)
    except OutOfTime:
        raise
    except Exception as exc:  # noqa: BLE001 - reported only
        section.notes.append(f"repeatability / host-sync probe failed: {error_line(exc)}")


def repeatability_and_syncs(ctx: Context, section: Section) -> None:
    """Reported: a float32 trainer of each twin, stepped twice from the same state, takes the same step bitwise (or
    not: nondeterministic kernels such as atomic-add scatters in the embedding backward); whether export_state() is
    a snapshot or aliases the live weights; and (CUDA) the host syncs of one torch_tx trainer step and of a few
    greedy decoding steps (`count_syncs`)."""
    import numpy as np
    import torch

    import jax_tx.train as jt
    import torch_tx
    import torch_tx.train as tt
    from parity.batching import Batch
    from parity.config import TransformerConfig
    from parity.train import TrainConfig

    d, layers, rows, length = (16, 1, 4, 8) if ctx.size == "tiny" else (64, 2, 16, 24)
    cfg = TransformerConfig(src_vocab_size=64, tgt_vocab_size=64, d_model=d, num_heads=4, num_encoder_layers=layers,
                            num_decoder_layers=layers, d_ff=2 * d, dropout=0.0, max_len=64)
    rng = np.random.default_rng(0)
    src = rng.integers(1, 64, (rows, length)).astype(np.int32)
    tgt = rng.integers(1, 64, (rows, length + 1)).astype(np.int32)
    batch = Batch(src, tgt[:, :-1], tgt[:, 1:], pad_id=0)
    tcfg = TrainConfig()
    from parity import suite

    weights = suite.init_canonical(cfg, "torch", 0)
    trainers = {}
    for name, cls in (("torch", tt.Trainer), ("jax", jt.Trainer)):
        with precision(ctx.device, "highest"):
            trainer = trainers[name] = cls(cfg, tcfg, weights, dtype="float32", device=ctx.device)
            exported = trainer.export_state(0)
            start = copy.deepcopy(exported)  # (the torch twin's export aliases its live CPU parameters: below)
            a = one_step(trainer, batch, tcfg)
            aliased = [k for k in start.weights if not np.array_equal(start.weights[k], exported.weights[k])]
            section.check(f"snapshot: {name}_tx export_state() is not changed by a later step", not aliased,
                          asserted=False, changed_tensors=len(aliased), example=aliased[:1])
            trainer.load_state(start)  # the same trainer (one JAX compilation), back at step 0
            b = one_step(trainer, batch, tcfg)
        same = bool(np.array_equal(a["grads"], b["grads"]) and np.array_equal(a["weights"], b["weights"]))
        section.check(f"repeatability: {name}_tx trainer float32 step twice from the same state, bitwise equal",
                      same, asserted=False, max_abs_grads=float(np.max(np.abs(a["grads"] - b["grads"]))),
                      max_abs_weights=float(np.max(np.abs(a["weights"] - b["weights"]))))
    if ctx.device != "cuda":
        section.details["host_syncs"] = "not measured on the CPU (torch.cuda.set_sync_debug_mode is CUDA only)"
        return
    model = trainers["torch"]
    src_t = torch.from_numpy(src[:, :8]).long().cuda()
    steps = 4
    section.details["host_syncs"] = {
        "how": "torch.cuda.set_sync_debug_mode('warn'): one warning per synchronizing CUDA call, by the Python line",
        "torch_tx trainer step": count_syncs(lambda: model.train_step(batch)),
        f"torch_tx.generate greedy, {steps} steps": count_syncs(lambda: torch_tx.generate(
            model.model, src_t, max_new_tokens=steps, bos_id=BOS, eos_id=EOS))}


def count_syncs(call: Callable[[], Any]) -> dict[str, Any]:
    """Synchronizing CUDA calls of `call()` (after one untimed call): their number and where they come from."""
    import torch

    call()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where: dict[str, int] = {}
    for w in caught:
        path = Path(w.filename)
        key = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    return {"count": len(caught), "where": dict(sorted(where.items(), key=lambda kv: -kv[1])[:12]),
            "messages": sorted({" ".join(str(w.message).split())[:120] for w in caught})[:3]}


# ------------------------------------------------------------------------------------- 6. throughput

def section_throughput(ctx: Context, section: Section) -> None:
    import jax

    x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", False)  # as `twin train` and the benchmarks run (float32 Adam math)
    if ctx.device == "cpu":
        section.notes.append("CPU mode: sizes shrunk, torch at "
                             f"{__import__('torch').get_num_threads()} thread(s), XLA with the test suite's fast-compile "
                             "flags: these figures test the script, they are not comparable with the README's tables")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")  # nn.Transformer's, at 2 heads
            ceilings = matmul_ceilings(ctx, section)
            section.details["matmul_ceiling_tflops"] = ceilings
            ctx.check_time()
            bench = TrainBench(ctx, section, ceilings)
            dtypes = ctx.sizes.get("bench_dtypes", ("bfloat16", "float32"))
            bench.rows(dtypes[:1])  # bfloat16 first: the goal's figure
            decode_rows(ctx, section, bench.guess)
            bench.rows(dtypes[1:])
            bench.finish()
    finally:
        jax.config.update("jax_enable_x64", x64)


def matmul_ceilings(ctx: Context, section: Section) -> dict[str, Any]:
    """Best n x n matmul TFLOP/s of torch and jax.jit, each dtype: bfloat16 (the ceiling the step is measured
    against), float32 at precision "highest" and TF32. Each timing runs enough calls for ~50 ms, then syncs."""
    import jax
    import jax.numpy as jnp
    import torch

    device = ctx.device
    best: dict[str, dict[str, float]] = {"torch": {}, "jax": {}}
    kinds = (("bfloat16", "highest"), ("float32", "highest"), ("tf32", "tf32"))
    for n in ctx.sizes["ceiling_sizes"]:
        for kind, mode in kinds:
            dtype = "float32" if kind == "tf32" else kind
            flops = 2.0 * n ** 3
            with precision(device, mode) as dev:
                a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
                b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
                x, y = (jax.device_put(jax.random.normal(jax.random.key(i), (n, n), dtype), dev) for i in (0, 1))
                matmul = jax.jit(jnp.matmul)
                calls = {"torch": (lambda: a @ b, lambda out: sync(device)),
                         "jax": (lambda: matmul(x, y), lambda out: out.block_until_ready())}
                for name, (call, wait) in calls.items():
                    wait(call())
                    start = time.perf_counter()
                    wait(call())
                    once = max(time.perf_counter() - start, 1e-6)
                    iters = int(min(200, max(1, math.ceil(0.05 / once))))
                    for _ in range(ctx.sizes["ceiling_repeats"]):
                        sync(device)
                        start = time.perf_counter()
                        for _ in range(iters):
                            out = call()
                        wait(out)
                        rate = flops * iters / (time.perf_counter() - start) / 1e12
                        best[name][kind] = max(best[name].get(kind, 0.0), rate)
                del a, b, x, y
            ctx.check_time()
    best["machine"] = {kind: max(best["torch"].get(kind, 0.0), best["jax"].get(kind, 0.0)) for kind, _ in kinds}
    best["sizes"] = list(ctx.sizes["ceiling_sizes"])
    return best


BENCH_MODELS = ("torch_tx trainer", "torch.nn.Transformer", "jax_tx trainer", "flax.linen layers",
                "torch_tx.Transformer", "jax_tx.Transformer", "transformers Marian")
PEER_OF = {"torch_tx trainer": "torch.nn.Transformer", "torch_tx.Transformer": "torch.nn.Transformer",
           "jax_tx trainer": "flax.linen layers", "jax_tx.Transformer": "flax.linen layers"}
FRAMEWORK = {"torch_tx trainer": "torch", "torch.nn.Transformer": "torch", "torch_tx.Transformer": "torch",
             "transformers Marian": "torch", "jax_tx trainer": "jax", "flax.linen layers": "jax",
             "jax_tx.Transformer": "jax"}


def bench_config(ctx: Context):
    from types import SimpleNamespace

    from benchmarks.bench_train import config_for

    b = ctx.sizes["bench"]
    return config_for(SimpleNamespace(vocab=b["vocab"], layers=b["layers"], src_len=b["src_len"],
                                      tgt_len=b["tgt_len"]), b["d_model"])


def make_runner(name: str, dtype: str, cfg, batches, ctx: Context):
    """The runner (bench_train's Runner protocol: run(steps) -> last loss, synced) of one table row."""
    import functools

    import torch

    import jax_tx
    import jax_tx.train as jax_train
    import torch_tx
    import torch_tx.train as torch_train
    from benchmarks import bench_train

    device, seed = ctx.device, 0
    compute = torch.bfloat16 if dtype == "bfloat16" else None
    torch.manual_seed(seed)
    if name == "torch_tx trainer":
        return bench_train.TrainerRunner(functools.partial(torch_train.Trainer, dtype=dtype, device=device), cfg,
                                         batches, seed)
    if name == "jax_tx trainer":
        return bench_train.TrainerRunner(functools.partial(jax_train.Trainer, dtype=dtype, device=device), cfg,
                                         batches, seed)
    if name == "torch_tx.Transformer":
        return DeviceTorchRunner(torch_tx.Transformer(cfg), batches, device, compute)
    if name == "torch.nn.Transformer":
        return DeviceTorchRunner(bench_train.TorchPeer(cfg), batches, device, compute)  # masks on the inputs' device
    if name == "transformers Marian":
        return MarianRunner(cfg, batches, device, compute)
    model = jax_tx.Transformer(cfg) if name == "jax_tx.Transformer" else bench_train.FlaxPeer(cfg)
    with jax_on(device, None):
        return bench_train.JaxRunner(model, batches, seed) if compute is None else MixedJaxRunner(model, batches, seed)


class DeviceTorchRunner:
    """bench_train.TorchRunner's step (forward, cross-entropy, backward, Adam, zero_grad) on `device`, the forward
    under torch.autocast(bfloat16) when `compute` is set."""

    def __init__(self, model, batches, device: str, compute):
        import numpy as np
        import torch

        from benchmarks.bench_train import LEARNING_RATE

        self.model, self.device, self.compute = model.to(device).train(), device, compute
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        self.data = [tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (b.src, b.tgt_in, b.labels))
                     for b in batches]

    def run(self, steps: int) -> float:
        import torch
        import torch.nn.functional as F

        from benchmarks.bench_train import PAD

        loss = None
        for i in range(steps):
            src, tgt_in, labels = self.data[i % len(self.data)]
            with torch.autocast(torch.device(self.device).type, dtype=self.compute or torch.float32,
                                enabled=self.compute is not None):
                logits = self.model(src, tgt_in)  # [B, T, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=PAD)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        return loss.item()


class MarianRunner:
    """transformers' MarianMTModel (opus-mt layout at the benchmark's sizes: swish, shared and tied embeddings)
    trained as transformers trains it: its own loss, backward, clip_grad_norm_(1.0), AdamW; autocast for bf16."""

    def __init__(self, cfg, batches, device: str, compute):
        import numpy as np
        import torch
        from transformers import MarianConfig, MarianMTModel
        from transformers.utils import logging as hf_logging

        from benchmarks.bench_train import LEARNING_RATE, PAD

        hf_logging.set_verbosity_error()
        config = MarianConfig(vocab_size=cfg.tgt_vocab_size, d_model=cfg.d_model, encoder_layers=cfg.num_encoder_layers,
                              decoder_layers=cfg.num_decoder_layers, encoder_attention_heads=cfg.num_heads,
                              decoder_attention_heads=cfg.num_heads, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
                              max_position_embeddings=max(512, cfg.max_len), pad_token_id=PAD,
                              decoder_start_token_id=PAD, eos_token_id=2, activation_function="swish",
                              scale_embedding=True, dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0,
                              share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
        self.model = MarianMTModel(config).to(device).train()
        self.device, self.compute = device, compute
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE)
        self.data = [tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in
                           (b.src, b.src != PAD, b.tgt_in, np.where(b.labels == PAD, -100, b.labels))) for b in batches]

    def run(self, steps: int) -> float:
        import torch

        loss = None
        for i in range(steps):
            src, mask, tgt_in, labels = self.data[i % len(self.data)]
            with torch.autocast(torch.device(self.device).type, dtype=self.compute or torch.float32,
                                enabled=self.compute is not None):
                loss = self.model(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt_in,
                                  labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


_MIXED_STEP = None


def mixed_train_step():
    """bench_train.train_step with the twins' mixed-precision rule (jax_tx.train): the weights of every layer that
    has a kernel cast to bfloat16 inside the jitted loss, and so the inputs of every Dense, DenseGeneral (flax's
    attention projections) and output layer; embeddings, norms, the residual stream and the loss in float32."""
    global _MIXED_STEP
    if _MIXED_STEP is not None:
        return _MIXED_STEP
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    import jax_tx.train as jax_train
    from benchmarks.bench_train import PAD

    calls = (*jax_train.MATMUL_CALLS, (nn.DenseGeneral, "__call__"))

    def cast_input(next_fun, args, kwargs, context):
        if any(isinstance(context.module, kind) and context.method_name == method for kind, method in calls):
            args = (args[0].astype(jnp.bfloat16), *args[1:])
        return next_fun(*args, **kwargs)

    def step(state, batch, rng):
        dropout_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(params):
            with nn.intercept_methods(cast_input):
                logits = state.apply_fn({"params": jax_train.compute_params(params, jnp.bfloat16)}, batch["src"],
                                        batch["tgt_in"], deterministic=False, rngs={"dropout": dropout_rng})
            real = batch["labels"] != PAD  # [B, T]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
            return (ce * real).sum() / jnp.maximum(real.sum(), 1)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), {"loss": loss}

    _MIXED_STEP = jax.jit(step, donate_argnums=0)
    return _MIXED_STEP


class MixedJaxRunner:
    """bench_train.JaxRunner with `mixed_train_step`."""

    def __init__(self, model, batches, seed: int):
        from benchmarks.bench_train import JaxRunner

        self.inner = JaxRunner(model, batches, seed)

    def run(self, steps: int) -> float:
        import jax

        inner, step = self.inner, mixed_train_step()
        metrics = None
        for i in range(steps):
            inner.state, metrics = step(inner.state, inner.data[i % len(inner.data)], inner.rng)
        jax.block_until_ready(inner.state)
        return float(metrics["loss"])


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


GOAL_FRACTION = 0.35  # issue 22: a bf16 step at `base` size at >= 35% of the bf16 matmul ceiling, ahead of the peer


class TrainBench:
    """The training rows of the throughput section: one model at a time (build, warm up, best of the repeats),
    skipping the rows the deadline leaves no time for (the time a row takes is learnt per framework)."""

    def __init__(self, ctx: Context, section: Section, ceilings: dict[str, Any]):
        from benchmarks import bench_train

        self.ctx, self.section, sizes = ctx, section, ctx.sizes
        b = sizes["bench"]
        self.cfg = bench_config(ctx)
        self.batches = bench_train.make_batches(bench_train.NUM_BATCHES, b["batch"], b["src_len"], b["tgt_len"],
                                                b["vocab"], 0)
        self.steps, self.warmup, self.repeats = sizes["bench_steps"], sizes["bench_warmup"], sizes["bench_repeats"]
        self.tokens = sum(self.batches[i % len(self.batches)].tokens for i in range(self.steps))
        self.flops = bench_train.train_flops(self.cfg, b["batch"], b["src_len"], b["tgt_len"])
        self.bf16_ceiling = ceilings["machine"].get("bfloat16", 0.0)
        self.f32_ceiling = ceilings["machine"].get("float32", 0.0)
        section.details["train_setup"] = {
            "config": self.cfg.to_dict(), "batch": b["batch"], "src_len": b["src_len"], "tgt_len": b["tgt_len"],
            "positions_per_batch": b["batch"] * b["tgt_len"],
            "target_tokens_per_batch": [int(x.tokens) for x in self.batches], "flops_per_step": self.flops,
            "steps": self.steps, "warmup": self.warmup, "repeats": self.repeats,
            "float32": "matmul precision highest in both frameworks (no TF32)",
            "bfloat16": "mixed: float32 weights and Adam, matmuls in bfloat16 (torch.autocast; the twins' rule in JAX, "
                        "which the flax.linen peer gets too)"}
        self.models = list(sizes.get("bench_models", BENCH_MODELS))
        if importlib.util.find_spec("transformers") is None and "transformers Marian" in self.models:
            self.models.remove("transformers Marian")
            section.notes.append("transformers is not importable: no Marian row")
        self.guess = dict(sizes["row_guess"])  # seconds a row of each framework takes, compilation included
        self.results: list[dict[str, Any]] = []
        section.details["train"] = self.results

    def rows(self, dtypes) -> None:
        for dtype in dtypes:
            for name in self.models:
                self.results.append(self.row(name, dtype))
                self.ctx.flush()

    def row(self, name: str, dtype: str) -> dict[str, Any]:
        ctx, framework = self.ctx, FRAMEWORK[name]
        row: dict[str, Any] = {"dtype": dtype, "model": name, "framework": framework}
        if ctx.left() < self.guess[framework]:
            row["skipped"] = (f"budget: {max(ctx.left(), 0):.0f} s left, a {framework} row takes "
                              f"~{self.guess[framework]:.0f} s")
            return row
        print(f"[device_check] throughput: {name} {dtype}", flush=True)
        started, runner = time.monotonic(), None
        try:
            # float32 rows: matmul precision highest in both; bfloat16 rows: what autocast leaves in float32 may
            # use TF32
            with precision(ctx.device, "highest" if dtype == "float32" else "tf32"):
                runner = make_runner(name, dtype, self.cfg, self.batches, ctx)
                sync(ctx.device)
                first = time.perf_counter()
                loss = runner.run(self.warmup)
                row["warmup_s"] = round(time.perf_counter() - first, 2)
                if not math.isfinite(loss):
                    raise RuntimeError(f"non-finite loss {loss} after warm-up")
                times = []
                for _ in range(self.repeats):
                    sync(ctx.device)
                    start = time.perf_counter()
                    runner.run(self.steps)
                    times.append(time.perf_counter() - start)
            seconds = min(times) / self.steps
            row.update(tokens_per_s=self.tokens / min(times), ms_per_step=1000 * seconds, seconds=times,
                       tflops=self.flops / seconds / 1e12, last_loss=loss)
            row["of_bf16_ceiling"] = row["tflops"] / self.bf16_ceiling if self.bf16_ceiling else None
            row["of_f32_ceiling"] = row["tflops"] / self.f32_ceiling if self.f32_ceiling and dtype == "float32" else None
        except Exception as exc:  # noqa: BLE001 - a row that fails is recorded; the next row runs
            row["error"] = error_line(exc)
            self.section.notes.append(f"train row {name} {dtype}: {row['error']}")
        finally:
            del runner
            free(ctx.device)
        took = time.monotonic() - started
        self.guess[framework] = max(self.guess[framework] * 0.5, took)
        row["wall_s"] = round(took, 2)
        return row

    def finish(self) -> None:
        rows = self.results
        speed = {(r["dtype"], r["model"]): r.get("tokens_per_s") for r in rows}
        for r in rows:
            peer = speed.get((r["dtype"], PEER_OF.get(r["model"], "")))
            r["vs_peer"] = r["tokens_per_s"] / peer if peer and r.get("tokens_per_s") else None
        goal = []
        for r in rows:
            if r["dtype"] == "bfloat16" and r["model"] in PEER_OF and r.get("tokens_per_s"):
                frac = r.get("of_bf16_ceiling")
                goal.append({"model": r["model"], "of_bf16_ceiling": frac, "vs_peer": r.get("vs_peer"),
                             "met": bool(frac is not None and frac >= GOAL_FRACTION and (r.get("vs_peer") or 0) > 1)})
        self.section.details["goal"] = {"rule": f"bf16 step >= {GOAL_FRACTION:.0%} of the bf16 matmul ceiling and "
                                                "faster than the peer, at size full",
                                        "rows": goal}


def decode_rows(ctx: Context, section: Section, guess: dict[str, float]) -> None:
    """Greedy decoding tokens/s of both twins at each batch size: bench_decode's models (pad/BOS/EOS forbidden, so
    every row decodes all new tokens), float32, matmul precision highest. `guess`: seconds a row takes."""
    import jax
    import numpy as np
    import torch

    import jax_tx
    import torch_tx
    from benchmarks import bench_decode

    sizes = ctx.sizes
    cfg = bench_config(ctx).replace(dropout=0.0, max_len=max(512, sizes["decode_new_tokens"] + 1))
    n = sizes["decode_new_tokens"]
    rows: list[dict[str, Any]] = []
    section.details["decode"] = rows
    if ctx.left() < guess["torch"] + guess["jax"]:
        section.notes.append(f"decoding rows skipped: {max(ctx.left(), 0):.0f} s left")
        return
    twin, _peer, params = bench_decode.build_models(cfg, 0)
    del _peer
    twin = twin.to(ctx.device)
    fmodel = jax_tx.Transformer(cfg)
    dev = jax_device(ctx.device)
    params = jax.device_put(params, dev)
    for batch in sizes["decode_batches"]:
        src = bench_decode.make_sources(batch, sizes["decode_src_len"], cfg.src_vocab_size, 0)  # [B, S]
        src_t = torch.from_numpy(src).to(ctx.device)
        src_j = jax.device_put(src.astype(np.int32), dev)
        calls = {"torch_tx.generate": ("torch", lambda: torch_tx.generate(
                     twin, src_t, max_new_tokens=n, bos_id=bench_decode.BOS, eos_id=bench_decode.EOS).cpu().numpy()),
                 "jax_tx.generate": ("jax", lambda: np.asarray(jax_tx.generate(
                     fmodel, params, src_j, max_new_tokens=n, bos_id=bench_decode.BOS, eos_id=bench_decode.EOS)))}
        outputs = {}
        for name, (framework, call) in calls.items():
            row = {"model": name, "batch": batch, "new_tokens": n, "src_len": sizes["decode_src_len"]}
            rows.append(row)
            if ctx.left() < guess[framework]:
                row["skipped"] = f"budget: {max(ctx.left(), 0):.0f} s left"
                continue
            print(f"[device_check] throughput: {name} greedy, batch {batch}", flush=True)
            started = time.monotonic()
            try:
                with precision(ctx.device, "highest"):
                    first = time.perf_counter()
                    out = call()
                    row["warmup_s"] = round(time.perf_counter() - first, 2)
                    if out.shape != (batch, n) or np.isin(out, [bench_decode.PAD, bench_decode.BOS,
                                                                 bench_decode.EOS]).any():
                        raise RuntimeError(f"{name} returned shape {out.shape} (expected {(batch, n)}) or emitted "
                                           "pad/BOS/EOS despite their forbidden bias")
                    outputs[name] = out
                    times = []
                    for _ in range(sizes["decode_repeats"]):
                        sync(ctx.device)
                        start = time.perf_counter()
                        call()
                        times.append(time.perf_counter() - start)
                row.update(tokens_per_s=batch * n / min(times), ms_per_token_step=1000 * min(times) / n, seconds=times)
            except Exception as exc:  # noqa: BLE001
                row["error"] = error_line(exc)
                section.notes.append(f"decode row {name} batch {batch}: {row['error']}")
            row["wall_s"] = round(time.monotonic() - started, 2)
            ctx.flush()
        if len(outputs) == 2:
            same = float((outputs["torch_tx.generate"] == outputs["jax_tx.generate"]).mean())
            for row in rows[-2:]:
                row["same_tokens_as_other_twin"] = same
    del twin, params
    free(ctx.device)


SECTIONS = [("devices", "both frameworks see the device", True, section_devices),
            ("parity", "Hypothesis parity suite: float64, float32 (highest), bfloat16 forward; TF32 reported", True,
             section_parity),
            ("cache", "cached decoding against the full pass", True, section_cache),
            ("tokens", "greedy and beam tokens identical across the twins", True, section_tokens),
            ("train_step", "one training step of each trainer on converted weights", True, section_train_step),
            ("throughput", "matmul ceilings, training and decoding throughput (reported)", False, section_throughput)]


# --------------------------------------------------------------------------------------------- summary

def fmt(value: Any, spec: str = ".2e") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def render_summary(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    lines = [f"# Device check: {report.get('device_mode', '?')}, size {report.get('size', '?')}", ""]
    gpu = env.get("gpu", {})
    vers = env.get("versions", {})
    lines += [f"- date: {report.get('started', '?')} (finished {report.get('finished') or 'not finished'})",
              f"- device: {gpu.get('name') or report.get('device_name') or env.get('cpu', '?')}"
              + (f" (capability {gpu['capability']}, {gpu['memory_gib']} GiB, CUDA {env.get('torch_cuda')}, "
                 f"cuDNN {gpu.get('cudnn')})" if gpu else ""),
              f"- torch {vers.get('torch', '?')}, jax {vers.get('jax', '?')} (jaxlib {vers.get('jaxlib', '?')}), "
              f"flax {vers.get('flax', '?')}, optax {vers.get('optax', '?')}, transformers {vers.get('transformers', '?')}, "
              f"python {vers.get('python', '?')}",
              f"- budget {fmt(report.get('budget_s'), '.0f')} s, wall {fmt(report.get('wall_s'), '.1f')} s, exit status "
              f"{fmt(report.get('exit_status'))} (0: every asserted check passed)", ""]
    if report.get("aborted"):
        lines += [f"**Aborted**: {report['aborted']}", ""]
    lines += ["| section | status | wall s | checks (asserted: passed/run) | note |", "|---|---|---:|---|---|"]
    for s in report.get("sections", []):
        asserted = [c for c in s["checks"] if c["asserted"]]
        passed = sum(c["passed"] for c in asserted)
        note = s.get("reason") or "; ".join(s.get("notes", [])[:2])
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {passed}/{len(asserted)} | "
                     f"{note.replace('|', '/')[:300]} |")
    lines.append("")
    for s in report.get("sections", []):
        renderer = RENDERERS.get(s["name"])
        if renderer and s["status"] not in ("pending", "skipped"):
            lines += renderer(s)
        failed = [c for c in s["checks"] if c["asserted"] and not c["passed"]]
        if failed:
            lines += [f"Failed in {s['name']} (first 10 of {len(failed)}):", ""]
            for c in failed[:10]:
                if c.get("error"):
                    detail = c["error"]
                elif isinstance(c.get("rel"), float) and c.get("tol") is not None:
                    detail = f"rel {fmt(c['rel'])} > tol {fmt(c['tol'], '.0e')}"
                else:
                    detail = "failed"
                skip = {"what", "passed", "asserted", "error", "rel", "tol", "config", "dtype"}
                extra = "".join(f", {k} {fmt(v) if isinstance(v, float) else v}" for k, v in c.items() if k not in skip)
                config = f" [{c['config']}]" if c.get("config") else ""
                lines.append(f"- {c['what']}{config}: {detail}{extra}")
            lines.append("")
    return "\n".join(lines) + "\n"


def render_parity(s: dict[str, Any]) -> list[str]:
    lines = ["## Parity (worst relative error per output over the examples)", "",
             "| family | mode | asserted | examples | checks | failed | worst errors | tolerance |",
             "|---|---|---|---:|---:|---:|---|---:|"]
    for e in s["details"].get("table", []):
        worst = ", ".join(f"{k} {v:.1e}" for k, v in e["worst"].items())
        lines.append(f"| {e['arch']} | {e['mode']} | {'yes' if e['asserted'] else 'reported'} | {e['examples']} | "
                     f"{e['checks']} | {e['failed']} | {worst} | {e['tol']:.0e} |")
    return lines + [""]


def render_checks_worst(title: str):
    def render(s: dict[str, Any]) -> list[str]:
        groups: dict[str, list[dict[str, Any]]] = {}
        for c in s["checks"]:
            groups.setdefault(c["what"], []).append(c)
        lines = [f"## {title}", "", "| check | runs | passed | worst rel | tolerance |", "|---|---:|---:|---:|---:|"]
        for what, cs in groups.items():
            rels = [c["rel"] for c in cs if isinstance(c.get("rel"), float)]
            lines.append(f"| {what} | {len(cs)} | {sum(c['passed'] for c in cs)} | {fmt(max(rels) if rels else None)} | "
                         f"{fmt(cs[0].get('tol'), '.0e')} |")
        if s["details"].get("host_syncs"):
            lines += ["", f"Host syncs (reported): {json.dumps(s['details']['host_syncs'])[:600]}"]
        return lines + [""]

    return render


def render_throughput(s: dict[str, Any]) -> list[str]:
    d = s["details"]
    lines = ["## Throughput (reported, not asserted)", ""]
    c = d.get("matmul_ceiling_tflops")
    if c:
        lines += [f"Matmul ceilings, TFLOP/s (best n x n, n in {c.get('sizes')}): "
                  + "; ".join(f"{fw}: " + ", ".join(f"{k} {v:.1f}" for k, v in c[fw].items()) for fw in ("torch", "jax")),
                  ""]
    setup = d.get("train_setup")
    if setup:
        cfg = setup["config"]
        lines += [f"Training steps: d_model {cfg['d_model']}, {cfg['num_encoder_layers']}+{cfg['num_decoder_layers']} "
                  f"layers, {cfg['num_heads']} heads, d_ff {cfg['d_ff']}, vocab {cfg['tgt_vocab_size']}, dropout "
                  f"{cfg['dropout']}; batch {setup['batch']} x {setup['src_len']}/{setup['tgt_len']} "
                  f"({setup['positions_per_batch']:,} target positions, about "
                  f"{sum(setup['target_tokens_per_batch']) // len(setup['target_tokens_per_batch']):,} real target "
                  f"tokens); best of {setup['repeats']} x {setup['steps']} steps after {setup['warmup']} warm-up.", "",
                  "| dtype | model | tokens/s | ms/step | vs peer | model TFLOP/s | of bf16 ceiling | warm-up s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in d.get("train", []):
            if "tokens_per_s" in r:
                lines.append(f"| {r['dtype']} | {r['model']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | "
                             f"{fmt(r.get('vs_peer'), '.2f')} | {r['tflops']:.2f} | "
                             f"{fmt(r.get('of_bf16_ceiling'), '.1%')} | {fmt(r.get('warmup_s'), '.1f')} |")
            else:
                lines.append(f"| {r['dtype']} | {r['model']} | {r.get('skipped') or r.get('error', '?')[:120]} | | | | | |")
        lines.append("")
        goal = d.get("goal")
        if goal and goal["rows"]:
            lines += [f"Goal ({goal['rule']}): " + "; ".join(
                f"{g['model']} {fmt(g['of_bf16_ceiling'], '.0%')}, {fmt(g['vs_peer'], '.2f')}x peer: "
                f"{'met' if g['met'] else 'not met'}" for g in goal["rows"]), ""]
    if d.get("decode"):
        lines += ["| greedy decoding | batch | new tokens | tokens/s | ms/token step | same tokens as the other twin |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in d["decode"]:
            if "tokens_per_s" in r:
                lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']:,.0f} | "
                             f"{r['ms_per_token_step']:.2f} | {fmt(r.get('same_tokens_as_other_twin'), '.1%')} |")
            else:
                lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | "
                             f"{r.get('skipped') or r.get('error', '?')[:120]} | | |")
        lines.append("")
    if s.get("notes"):
        lines += [f"- {n}" for n in s["notes"]] + [""]
    return lines


RENDERERS = {"parity": render_parity, "cache": render_checks_worst("Cached decoding against the full pass"),
             "tokens": render_checks_worst("Tokens across the twins"),
             "train_step": render_checks_worst("One training step of each trainer"),
             "throughput": render_throughput}


# ------------------------------------------------------------------------------------------------ main

def finalize(out: Path, rc: int) -> int:
    """After the driver was killed or crashed (the .sh passes its status): mark the report aborted."""
    path = out / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        report = {"schema": SCHEMA, "started": None, "sections": []}
    if report.get("finished"):
        return int(report.get("exit_status", 1))
    during = report.get("current_section")
    what = "killed by the hard timeout" if rc in (124, 137) else f"the driver exited with status {rc}"
    report["aborted"] = f"{what} during section {during!r}" if during else what
    for s in report.get("sections", []):
        if s["status"] == "pending":
            s["status"], s["reason"] = "error" if s["name"] == during else "skipped", report["aborted"]
    report["finished"] = now_iso()
    report["exit_status"] = 3
    write_report(report, out)
    return 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=os.environ.get("DEVICE", "cuda"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "device_report"))
    p.add_argument("--budget", type=float, default=None, help="seconds (DEVICE_CHECK_BUDGET; 440 cuda, 270 cpu)")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="DEVICE_CHECK_SIZE (full cuda, small cpu)")
    p.add_argument("--sections", default=os.environ.get("DEVICE_CHECK_SECTIONS"),
                   help="comma-separated subset to run (DEVICE_CHECK_SECTIONS); the others are skipped")
    p.add_argument("--finalize", type=int, metavar="RC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = float(os.environ.get("DEVICE_CHECK_BUDGET") or DEFAULT_BUDGET[args.device])
    if args.size is None:
        args.size = os.environ.get("DEVICE_CHECK_SIZE") or DEFAULT_SIZE[args.device]
    if args.size not in SIZES:
        p.error(f"DEVICE_CHECK_SIZE must be one of {', '.join(SIZES)}, got {args.size!r}")
    return args


def configure(device: str) -> None:
    """Environment the frameworks read at import: before torch and jax are imported."""
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if not os.environ.get("DEVICE_CHECK_DEFAULT_XLA"):
            flags = os.environ.get("XLA_FLAGS", "")
            if CPU_XLA_FLAGS not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAGS}".strip()
    else:  # torch and JAX share the GPU: JAX preallocates less than its default 75%
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.finalize is not None:
        return finalize(args.out, args.finalize)
    start = time.monotonic()
    configure(args.device)
    selected = {s.strip() for s in args.sections.split(",") if s.strip()} if args.sections else None
    unknown = (selected or set()) - {s[0] for s in SECTIONS}
    if unknown:
        print(f"unknown sections: {', '.join(sorted(unknown))}; known: {', '.join(s[0] for s in SECTIONS)}",
              file=sys.stderr)
        return 1
    ctx = Context(args.device, args.size, args.budget, args.out, start)
    report: dict[str, Any] = {"schema": SCHEMA, "started": now_iso(), "finished": None, "device_mode": args.device,
                              "size": args.size, "budget_s": args.budget, "sizes": SIZES[args.size],
                              "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "environment": None, "sections": []}
    try:
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 parity; the throughput section turns it off
        import torch

        if args.device == "cpu":  # CPU mode tests the script: 2 torch threads on 2 busy cores thrash (benchmarks/)
            torch.set_num_threads(int(os.environ.get("DEVICE_CHECK_TORCH_THREADS") or 1))
    except Exception as exc:  # noqa: BLE001 - the devices section records it
        report["import_error"] = error_line(exc)

    def devices(c: Context, s: Section) -> None:
        if report.get("import_error"):
            raise RuntimeError(f"importing the frameworks failed: {report['import_error']}")
        section_devices(c, s)
        report["environment"] = s.details.get("environment")
        gpu = (report["environment"] or {}).get("gpu")
        if gpu:
            report["device_name"] = gpu["name"]
        else:
            from benchmarks.bench_train import cpu_model

            report["device_name"] = cpu_model()

    sections = [(n, t, a, devices if n == "devices" else f) for n, t, a, f in SECTIONS]
    rc = run(sections, ctx, report, selected)
    print((args.out / "summary.md").read_text())
    print(f"[device_check] report: {args.out / 'report.json'}, summary: {args.out / 'summary.md'}; exit status {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
