"""torch under torchrun: `twin train` under DDP and FSDP2 (--fsdp) takes the single-process step of the same global
batch (float64: to rounding; float32: 1e-5), writes an ordinary run directory from process 0 alone, and resumes
from and into single-process runs. The Trainer-level checks run in one 2-process launch of
tests/distributed_worker.py; the CLI runs are float64, 2 processes, gloo."""

from __future__ import annotations

import copy
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
from parity import cli
from parity.batching import label_pad
from parity.checkpoint import load_checkpoint, load_config
from parity.data import load_corpus
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


def launch(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    """`twin train ARGS args` in one process, or in two under torchrun (a free port each time: --standalone)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, *(TORCHRUN if torchrun else []), "-m", "parity.cli", "train", *ARGS, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights_at(run: Path, step: int | None = None) -> dict[str, np.ndarray]:
    return load_checkpoint(run if step is None else run / CHECKPOINTS / f"step_{step:07d}")[1]


def records(run: Path, last_step: int) -> list[tuple]:
    """(step, split, tokens, loss) of the train and valid records up to `last_step`."""
    return [(r["step"], r["split"], r["tokens"], r["loss"]) for r in read_metrics(run)
            if r["split"] != "test" and r["step"] <= last_step]


def same_records(got: list[tuple], expected: list[tuple]) -> None:
    assert [r[:3] for r in got] == [r[:3] for r in expected]
    assert [r[3] for r in got] == pytest.approx([r[3] for r in expected], rel=1e-12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The single-process run: 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    launch("--out", str(out), "--steps", "4")
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same command under torchrun, DDP over 2 processes, 2 steps."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, launch("--out", str(out), "--steps", "2", torchrun=True)


def test_trainer_under_ddp_and_fsdp_is_the_single_process_trainer(tmp_path):
    """Per arch, strategy and dtype (tied and shared embeddings, packed rows): 3 steps, evaluation, decoding,
    and a fourth step after loading the other's state, against the single-process Trainer; Context's
    collectives; each process's own dropout stream, restored on resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *TORCHRUN, str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["runs"] == reports[1]["runs"]
    runs = reports[0]["runs"]
    assert len(runs) == 7
    assert any(rows % 2 for run in runs.values() for rows in run["rows"])  # a batch that needs a padding row
    for name, run in runs.items():
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


def test_ddp_run_is_the_single_process_run(reference, ddp):
    """Same weights (float64), records and files; process 0 alone prints and writes; a global batch with an odd
    number of rows was split with a padding row."""
    run, result = ddp
    assert relative(weights_at(reference, 2), weights_at(run)) <= 1e-12
    assert relative(weights_at(reference, 2), weights_at(run, 2)) <= 1e-12
    same_records(records(run, 2), records(reference, 2))
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert [p.name for p in (run / CHECKPOINTS).iterdir()] == ["step_0000002"]
    assert sorted(p.name for p in (run / CHECKPOINTS / "step_0000002").iterdir()) == sorted(
        p.name for p in (reference / CHECKPOINTS / "step_0000002").iterdir())
    assert [r["split"] for r in read_metrics(run)] == ["train", "train", "valid", "test"]
    assert result.stdout.count("distributed: DDP over 2 processes (gloo, cpu)") == 1
    assert result.stdout.count("test exact match:") == 1

    corpus = load_corpus("builtin", limit=300)
    tcfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text())["train"])
    stream = _batches(Tokenizer.load(run / "tokenizer.json"), corpus.train, corpus, load_config(run), tcfg,
                      shuffle=True).stream()
    rows = [len(next(stream)[1].labels) for _ in range(2)]
    assert sorted(r % 2 for r in rows) == [0, 1], rows  # one even global batch, one odd (a padding row added)


def test_a_single_process_resumes_a_ddp_run(reference, ddp, tmp_path):
    """The distributed checkpoint is an ordinary one: one process resumes it to the single-process run's end."""
    run = tmp_path / "run"
    shutil.copytree(ddp[0], run)
    launch("--out", str(run), "--resume", "--steps", "4")
    assert relative(weights_at(reference), weights_at(run)) <= 1e-12
    same_records(records(run, 4), records(reference, 4))


def test_fsdp_resumes_a_single_process_run(reference, tmp_path):
    """torchrun --fsdp --resume from the single-process step 2 checkpoint ends where the single-process run did;
    its checkpoint loads into the single-process torch and JAX trainers."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / CHECKPOINTS / "step_0000004")
    result = launch("--out", str(run), "--resume", "--steps", "4", "--fsdp", torchrun=True)
    assert result.stdout.count("distributed: FSDP2 over 2 processes (gloo, cpu)") == 1
    assert result.stdout.count("test exact match:") == 1
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
