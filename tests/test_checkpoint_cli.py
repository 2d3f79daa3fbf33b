"""Checkpoint directories (safetensors + config.json, atomic, never pickle) and `twin parity`."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

import torch_tx
from parity import checkpoint, cli
from parity.config import TransformerConfig
from parity.suite import Check

CFG = TransformerConfig(src_vocab_size=9, tgt_vocab_size=7, d_model=8, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=2, d_ff=16, dropout=0.1, max_len=8, tie_output=True)


@pytest.fixture()
def run_dir(tmp_path):
    torch.manual_seed(0)
    checkpoint.save_checkpoint(tmp_path / "run", CFG, torch_tx.Transformer(CFG).state_dict())
    return tmp_path / "run"


def test_save_and_load_round_trip(run_dir):
    assert sorted(os.listdir(run_dir)) == ["config.json", "model.safetensors"]
    cfg, weights = checkpoint.load_checkpoint(run_dir)
    assert cfg == CFG
    model = torch_tx.Transformer(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    assert json.loads((run_dir / "config.json").read_text())["tie_output"] is True


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "model.safetensors: truncated: tensor "),
    (lambda p: p.write_bytes(b"\x80\x04garbage that is a pickle header"), "header length .* is longer than the file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 2**62) + b"{}"), "header length .* is longer than the file"),
    (lambda p: p.unlink(), "no such file"),
])
def test_damaged_weight_files_give_clear_errors(run_dir, damage, message):
    damage(run_dir / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_checkpoint(run_dir)


def test_mismatched_or_malformed_configs_give_clear_errors(run_dir):
    (run_dir / "config.json").write_text(CFG.replace(num_decoder_layers=1).to_json())
    with pytest.raises(checkpoint.CheckpointError, match="unexpected key.*decoder.layers.1"):
        checkpoint.load_checkpoint(run_dir)
    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="config.json"):
        checkpoint.load_checkpoint(run_dir)
    (run_dir / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="cannot read config"):
        checkpoint.load_checkpoint(run_dir)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    checkpoint.atomic_write_bytes(target, b"old")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_twin_parity_on_random_configs_of_every_arch(capsys):
    """Seed 0 draws an encoder, a decoder and a seq2seq config; each row's label names the arch."""
    assert cli.main(["parity", "--configs", "3", "--dtypes", "float64", "--seed", "0", "--batch", "2",
                     "--length", "4"]) == 0
    out = capsys.readouterr().out
    for label in ("random #0 encoder d=", "random #1 decoder d=", "random #2 seq2seq d="):
        assert label in out
    for what in ("torch->jax memory", "jax->torch logits", "torch->jax hidden", "grads", "round trip"):
        assert what in out
    assert " 0 failed" in out


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_twin_parity_on_encoder_and_decoder_checkpoints(tmp_path, capsys, arch):
    """A run directory of EncoderOnly (with a head), a safetensors file of DecoderOnly (config in its metadata)."""
    from parity import formats

    cfg = CFG.replace(dropout=0.0).for_arch(arch, 3 if arch == "encoder" else None)
    torch.manual_seed(0)
    weights = {k: v.numpy() for k, v in torch_tx.model_for(cfg).state_dict().items()}
    if arch == "encoder":
        path = checkpoint.save_checkpoint(tmp_path / "enc", cfg, weights)
    else:
        path = formats.write_checkpoint(tmp_path / "dec.safetensors", "safetensors", cfg, weights)
    assert cli.main(["parity", str(path), "--dtypes", "float64"]) == 0
    out = capsys.readouterr().out
    label = "enc encoder d=8 h=2 L=1 C=3" if arch == "encoder" else "dec.safetensors decoder d=8 h=2 L=2"
    assert label in out and " 0 failed" in out
    outputs = ("hidden", "class_logits") if arch == "encoder" else ("logits",)
    assert all(f"{d} {o}" in out for d in ("torch->jax", "jax->torch") for o in outputs)


def test_twin_parity_on_a_checkpoint_directory(run_dir, capsys):
    assert cli.main(["parity", str(run_dir), "--dtypes", "float32,float64"]) == 0
    out = capsys.readouterr().out
    assert "run" in out and "float32" in out and "0 failed" in out


def test_twin_parity_refuses_a_broken_checkpoint(run_dir):
    (run_dir / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(SystemExit, match="twin parity: .*model.safetensors"):
        cli.main(["parity", str(run_dir)])


def test_the_table_counts_failures(capsys):
    rows = [("cfg", Check("a", "float64", 0.0, 0.0, 1e-10)), ("cfg", Check("b", "float32", 1.0, 0.5, 1e-5)),
            ("cfg", Check("c", "float32", float("nan"), float("nan"), 1e-5))]
    assert cli.print_table(rows, "t") == 2
    assert "1 passed, 2 failed" in capsys.readouterr().out
    assert not Check("x", "float64", 0.0, np.inf, 1e-10).passed
