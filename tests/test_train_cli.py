"""`twin train` end to end: a short run in each framework, --init-from across frameworks, Ctrl-C, errors,
a packed language model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity.checkpoint import load_config
from parity.data import load_corpus
from parity.train import checkpoint_dirs, read_metrics

SMALL = ["--config", "tiny", "--limit", "2000", "--max-tokens", "256", "--no-progress"]


def twin(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "torch"
    result = twin("train", "--framework", "torch", "--out", str(out), "--steps", "6", "--eval-every", "3",
                  "--save-every", "3", "--log-every", "1", "--test-limit", "8", "--show", "2", *SMALL)
    assert result.returncode == 0, result.stderr
    assert "test exact match:" in result.stdout and "->" in result.stdout
    return out


def test_one_short_run_has_everything(torch_run):
    names = sorted(p.name for p in torch_run.iterdir())
    assert names == ["checkpoints", "config.json", "loss.png", "metrics.jsonl", "model.safetensors",
                     "tokenizer.json", "train_config.json"]
    assert [p.name for p in checkpoint_dirs(torch_run)] == ["step_0000003", "step_0000006"]
    records = read_metrics(torch_run)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "nll", "ppl", "accuracy", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    assert [r["step"] for r in records if r["split"] == "valid"] == [3, 6]
    assert [r["sentences"] for r in records if r["split"] == "test"] == [8]
    assert (torch_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((torch_run / "train_config.json").read_text())["framework"] == "torch"
    assert json.loads((torch_run / "train_config.json").read_text())["tokenizer"] == "twin-bpe"


def test_init_from_crosses_frameworks_both_ways(torch_run, tmp_path):
    """--init-from carries weights and tokenizer across: with a negligible lr, the JAX run started from the
    torch run, and the torch run started from that JAX run, have the torch run's validation loss."""
    reference = [r for r in read_metrics(torch_run) if r["split"] == "valid"][-1]
    source = torch_run
    for framework in ("jax", "torch"):
        out = tmp_path / framework
        result = twin("train", "--framework", framework, "--init-from", str(source), "--out", str(out), "--steps",
                      "1", "--lr-factor", "1e-12", "--test-limit", "0", *SMALL)
        assert result.returncode == 0, result.stderr
        assert (out / "tokenizer.json").read_bytes() == (torch_run / "tokenizer.json").read_bytes()
        valid = [r for r in read_metrics(out) if r["split"] == "valid"][-1]
        assert valid["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert valid["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-4)
        source = out


def test_ctrl_c_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "parity.cli", "train", "--framework", "torch", "--out", str(out),
                             "--steps", "100000", "--save-every", "100000", "--log-every", "1", *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(out) if (out / "metrics.jsonl").exists() else []) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stdout
    saved = checkpoint_dirs(out)
    assert len(saved) == 1
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert step >= 3
    result = twin("train", "--framework", "torch", "--out", str(out), "--resume", "--steps", str(step + 2),
                  "--test-limit", "0", *SMALL)
    assert result.returncode == 0, result.stderr
    assert checkpoint_dirs(out)[-1].name == f"step_{step + 2:07d}"


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.tsv"], "missing.tsv: no such file or directory"),
    (["--config", "huge"], "--config huge: not a preset (tiny, small, base, marian) and not readable"),
    (["--steps", "0"], "steps must be at least 1"),
])
def test_errors_are_one_line(tmp_path, args, message):
    result = twin("train", "--out", str(tmp_path / "run"), "--steps", "1", *SMALL, *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_packed_language_model(tmp_path):
    """--arch decoder --pack: the padding saved is printed, then samples and the test perplexity."""
    data = tmp_path / "lm"
    data.mkdir()
    corpus = load_corpus("builtin", arch="decoder", limit=300)
    for split, examples in (("train", corpus.train), ("valid", corpus.valid[:8]), ("test", corpus.test[:4])):
        (data / f"{split}.txt").write_text("".join(text + "\n" for text, in examples))
    out = tmp_path / "run"
    result = twin("train", "--arch", "decoder", "--pack", "--data", str(data), "--out", str(out), "--steps", "2",
                  "--vocab-size", "200", "--show", "1", *SMALL)
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "train_config.json").read_text())
    padding = saved["padding"]
    assert (f"padding: {padding['unpacked']:.1%} -> {padding['packed']:.1%} of positions (packed rows of 64)"
            in result.stdout)
    assert "(no prompt)" in result.stdout and "test perplexity:" in result.stdout
    assert load_config(out).arch == "decoder" and saved["train"]["pack"] is True
