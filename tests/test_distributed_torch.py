"""torch under torchrun: `twin train` under DDP and FSDP2 (--fsdp) takes the single-process step of the same global
batch (float64: to rounding; float32: 1e-5), writes an ordinary run directory from process 0 alone, and resumes
from and into single-process runs. One 2-process launch of tests/distributed_worker.py (gloo) runs the
Trainer-level checks and then the two torchrun CLI runs; the CLI runs are float64, and the single-process ones
run in this process."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_tx.train as tt
from conftest import once
from parity import cli
from parity.batching import label_pad
from parity.checkpoint import load_checkpoint, load_config
from parity.data import EXTENSIONS, load_corpus
from parity.tokenizer import Tokenizer
from parity.train import (CHECKPOINTS, TrainConfig, _batches, checkpoint_dirs, load_training_checkpoint,
                          model_config, read_metrics)
from distributed_worker import relative
from torch_tx.model import model_for

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ARGS = ["--framework", "torch", "--config", "tiny", "--limit", "300", "--max-tokens", "144", "--dropout", "0",
        "--dtype", "float64", "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--test-limit", "2",
        "--show", "1", "--no-progress"]


def write_data(root: Path) -> Path:
    """builtin's first 300 training examples, 16 validation and 2 test examples of each arch, as data directories
    root/ARCH (the runs evaluate the whole validation split: builtin's 2,000 pairs cost more than the steps; 16
    pairs make batches of 18 and 9 rows, an odd one among them)."""
    for arch in ("seq2seq", "encoder", "decoder"):
        corpus = load_corpus("builtin", limit=300, arch=arch)
        (root / arch).mkdir(parents=True)
        for name, examples in (("train", corpus.train), ("valid", corpus.valid[:16]), ("test", corpus.test[:2])):
            text = "".join("\t".join(example) + "\n" for example in examples)
            (root / arch / f"{name}{EXTENSIONS[arch][0]}").write_text(text, encoding="utf-8")
    return root


def train_args(data: Path, *args: str) -> list[str]:
    return ["train", *ARGS, "--data", str(data / "seq2seq"), *args]


def train_here(data: Path, *args: str) -> None:
    """`twin train ARGS args` in this process, on one thread (like a process with OMP_NUM_THREADS=1)."""
    threads, printed = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            code = cli.main(train_args(data, *args))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, printed.getvalue()[-3000:]


def _runs(root: Path) -> dict:
    """The single-process run (4 steps, checkpoints at 2 and 4), then one torchrun launch of the worker: its
    checks, then the same command under DDP for 2 steps, and --fsdp resuming the single-process step 2."""
    data = write_data(root / "data")
    reference = root / "single" / "run"
    train_here(data, "--out", str(reference), "--steps", "4")
    ddp, fsdp = root / "ddp" / "run", root / "fsdp" / "run"
    shutil.copytree(reference, fsdp)
    shutil.rmtree(fsdp / CHECKPOINTS / "step_0000004")
    commands = {"ddp": train_args(data, "--out", str(ddp), "--steps", "2"),
                "fsdp": train_args(data, "--out", str(fsdp), "--resume", "--steps", "4", "--fsdp")}
    (root / "commands.json").write_text(json.dumps(commands))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *TORCHRUN, str(ROOT / "tests" / "distributed_worker.py"), str(root)],
                            capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    return {"root": str(root), "data": str(data), "single": str(reference), "ddp": str(ddp), "fsdp": str(fsdp),
            "returncode": result.returncode, "stderr": result.stderr[-3000:]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return once(tmp_path_factory, "torch_runs", _runs)


def command(runs: dict, name: str) -> tuple[Path, str]:
    """A torchrun CLI run of the worker: its run directory, and what its two processes printed (rank 0's, then
    rank 1's)."""
    root = Path(runs["root"])
    assert all((root / f"{name}.rank{rank}.done").is_file() for rank in (0, 1)), runs["stderr"]
    assert runs["returncode"] == 0, runs["stderr"]
    return Path(runs[name]), "".join((root / f"{name}.rank{rank}.out").read_text() for rank in (0, 1))


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    """The single-process run: 4 steps, checkpoints at 2 and 4."""
    return Path(runs["single"])


@pytest.fixture(scope="module")
def ddp(runs) -> tuple[Path, str]:
    """The same command under torchrun, DDP over 2 processes, 2 steps: the run, and what it printed."""
    return command(runs, "ddp")


def weights_at(run: Path, step: int | None = None) -> dict[str, np.ndarray]:
    return load_checkpoint(run if step is None else run / CHECKPOINTS / f"step_{step:07d}")[1]


def records(run: Path, last_step: int) -> list[tuple]:
    """(step, split, tokens, loss) of the train and valid records up to `last_step`."""
    return [(r["step"], r["split"], r["tokens"], r["loss"]) for r in read_metrics(run)
            if r["split"] != "test" and r["step"] <= last_step]


def same_records(got: list[tuple], expected: list[tuple]) -> None:
    assert [r[:3] for r in got] == [r[:3] for r in expected]
    assert [r[3] for r in got] == pytest.approx([r[3] for r in expected], rel=1e-12)


def test_trainer_under_ddp_and_fsdp_is_the_single_process_trainer(runs):
    """Per arch, strategy and dtype (tied and shared embeddings, packed rows): 3 steps, evaluation, decoding,
    and a fourth step after loading the other's state, against the single-process Trainer; Context's
    collectives; each process's own dropout stream, restored on resume."""
    root = Path(runs["root"])
    assert all((root / f"rank{rank}.json").is_file() for rank in (0, 1)), runs["stderr"]
    reports = [json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["runs"] == reports[1]["runs"]
    cases = reports[0]["runs"]
    assert len(cases) == 7
    assert any(rows % 2 for run in cases.values() for rows in run["rows"])  # a batch that needs a padding row
    for name, run in cases.items():
        tolerance = 1e-12 if name.endswith("float64") else 1e-5
        assert run["initial"] == 0.0, name
        for key in ("metrics", "weights", "moments", "eval", "resumed_distributed", "resumed_single"):
            assert run[key] <= tolerance, (name, key, run[key])
        assert run["decoded"], name
        assert [s["tokens"] for s in run["sums"]] == [float(int(s["tokens"])) for s in run["sums"]]
    for report in reports:
        assert report["describe"]["ddp"].startswith("DDP over 2 processes (gloo")
        assert report["describe"]["fsdp"].startswith("FSDP2 over 2 processes (gloo")
        assert report["check_same_ok"]
        assert report["check_same_error"] == "processes disagree on step: [10, 11] (by process)"
        assert report["any"] == [True, False]
        assert report["all_sum"] == [2.0, 1.0]
        assert report["streams_differ"] and report["stream_restored"]


class _Halves:
    """A stand-in Context for one of 2 processes inside this one: all_sum adds the other process's sums."""

    devices = 2

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.other


def test_each_process_scales_its_loss_so_the_average_gradient_is_the_global_one():
    """train_step on each half of a batch, its loss sum over the global label count times 2: the mean of the two
    gradients (what DDP and FSDP2 reduce to) is the gradient of the whole batch, and both halves return the
    whole batch's sums."""
    torch.manual_seed(0)
    cfg = model_config("tiny", 40).replace(dropout=0.0)
    tcfg = TrainConfig(clip_norm=1e9)
    model = model_for(cfg).double()
    src = torch.randint(3, 40, (4, 7))  # [B, S]
    tgt = torch.randint(3, 40, (4, 6))  # [B, T]
    tgt[0, 3:] = 0
    tgt[3, 1:] = 0
    batch = {"src": src, "tgt_in": tgt, "labels": tgt.roll(-1, 1)}
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]

    def grads(part, context=None):
        replica = copy.deepcopy(model)
        optimizer, schedule = tt.make_optimizer(replica, tcfg)
        terms = tt.train_step(replica, optimizer, schedule, part, cfg=cfg, tcfg=tcfg, context=context)
        return terms, torch.cat([p.grad.ravel() for p in replica.parameters()])

    def sums(part):
        with torch.no_grad():
            terms = tt.loss_terms(tt.logits_of(model, part, cfg.arch), part["labels"], label_pad(cfg.arch, 0), 0.1)
        return torch.stack([terms[k].to(torch.float64) for k in tt.SUMS])  # [4]

    whole_terms, whole = grads(batch)
    parts = [grads(halves[i], _Halves(sums(halves[1 - i]))) for i in (0, 1)]
    torch.testing.assert_close((parts[0][1] + parts[1][1]) / 2, whole, rtol=1e-12, atol=1e-15)
    for terms, _ in parts:
        for key in tt.SUMS:
            assert float(terms[key]) == pytest.approx(float(whole_terms[key].detach()), rel=1e-12)
    assert int(parts[0][0]["tokens"]) == int((batch["labels"] != 0).sum())


def test_ddp_run_is_the_single_process_run(runs, reference, ddp):
    """Same weights (float64), records and files; process 0 alone prints and writes; a global batch with an odd
    number of rows was split with a padding row."""
    run, printed = ddp
    assert relative(weights_at(reference, 2), weights_at(run)) <= 1e-12
    assert relative(weights_at(reference, 2), weights_at(run, 2)) <= 1e-12
    same_records(records(run, 2), records(reference, 2))
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert [p.name for p in (run / CHECKPOINTS).iterdir()] == ["step_0000002"]
    assert sorted(p.name for p in (run / CHECKPOINTS / "step_0000002").iterdir()) == sorted(
        p.name for p in (reference / CHECKPOINTS / "step_0000002").iterdir())
    assert [r["split"] for r in read_metrics(run)] == ["train", "train", "valid", "test"]
    assert printed.count("distributed: DDP over 2 processes (gloo, cpu)") == 1
    assert printed.count("test exact match:") == 1

    corpus = load_corpus(Path(runs["data"]) / "seq2seq", limit=300)
    tcfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text())["train"])
    stream = _batches(Tokenizer.load(run / "tokenizer.json"), corpus.train, corpus, load_config(run), tcfg,
                      shuffle=True).stream()
    rows = [len(next(stream)[1].labels) for _ in range(2)]
    assert sorted(r % 2 for r in rows) == [0, 1], rows  # one even global batch, one odd (a padding row added)


def test_a_single_process_resumes_a_ddp_run(runs, reference, ddp, tmp_path):
    """The distributed checkpoint is an ordinary one: one process resumes it to the single-process run's end."""
    run = tmp_path / "run"
    shutil.copytree(ddp[0], run)
    train_here(Path(runs["data"]), "--out", str(run), "--resume", "--steps", "4")
    assert relative(weights_at(reference), weights_at(run)) <= 1e-12
    same_records(records(run, 4), records(reference, 4))


def test_fsdp_resumes_a_single_process_run(runs, reference):
    """torchrun --fsdp --resume from a copy of the single-process run without its step 4 checkpoint ends where
    the single-process run did; its checkpoint loads into the single-process torch and JAX trainers."""
    run, printed = command(runs, "fsdp")
    assert printed.count("distributed: FSDP2 over 2 processes (gloo, cpu)") == 1
    assert printed.count("test exact match:") == 1
    assert relative(weights_at(reference), weights_at(run)) <= 1e-12
    same_records(records(run, 4), records(reference, 4))
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000002", "step_0000004"]

    import jax_tx.train as jt

    cfg = load_config(run)
    state, _ = load_training_checkpoint(run / CHECKPOINTS / "step_0000004", cfg)
    assert state.rng["torch_processes"].shape[0] == 2
    expected, _ = load_training_checkpoint(reference / CHECKPOINTS / "step_0000004", cfg)
    assert relative(expected.exp_avg, state.exp_avg) <= 1e-12
    for trainer in (tt.Trainer(cfg, TrainConfig(), dtype="float64"), jt.Trainer(cfg, TrainConfig(), dtype="float64")):
        trainer.load_state(state)
        assert relative(state.weights, trainer.weights()) == 0.0


@pytest.mark.parametrize("args, message", [
    (["--fsdp"], "twin train: --fsdp runs under torchrun: torchrun --nproc-per-node N -m parity.cli train "
                 "--framework torch --fsdp ..."),
    (["--mesh", "data=2"], "twin train: --mesh is for --framework jax; PyTorch spreads a run over processes: "
                           "torchrun --nproc-per-node N -m parity.cli train --framework torch [--fsdp] ...")])
def test_distributed_flags_without_torchrun_are_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["train", "--framework", "torch", "--out", str(tmp_path / "run"), *args]) == 1
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "run").exists()
