"""Run by tests/test_sharding.py in one fresh process, with no device count set by the caller; prints one JSON
report. First `twin train` in this process: on `--mesh data=2,fsdp=4` (the command itself asks for the 8
simulated CPU devices, before anything else starts JAX's backends), on one device, and the mesh run resumed on
one device. Then the JAX Trainer's steps on one device and on several meshes of those 8 devices, from the same
weights on the same global batches. A part that fails is reported as its traceback; the other part still runs.

Usage: python tests/sharded_step.py OUT  (OUT: an empty directory for the runs)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from jax_tx import distributed  # noqa: E402
from jax_tx.train import Trainer  # noqa: E402
from parity import cli  # noqa: E402
from parity.batching import NO_CLASS, Batch  # noqa: E402
from parity.config import TransformerConfig  # noqa: E402
from parity.data import load_corpus  # noqa: E402
from parity.train import TrainConfig  # noqa: E402

MESHES = ({"data": 8, "fsdp": 1}, {"data": 2, "fsdp": 4}, {"data": 1, "fsdp": 8})
V = 48


def batches(arch: str, rng: np.random.Generator) -> list[Batch]:
    """Two global batches of 13 rows (padded with 3 empty rows on 8 devices), ragged lengths."""
    out = []
    for rows in (13, 13):
        src = rng.integers(3, V, (rows, 12)).astype(np.int32)  # [B, S]
        tgt = rng.integers(3, V, (rows, 9)).astype(np.int32)  # [B, T]
        for r in range(rows):
            src[r, rng.integers(4, 13):] = 0
            tgt[r, rng.integers(3, 10):] = 0
        labels = np.where(tgt > 0, np.roll(tgt, -1, 1), 0).astype(np.int32)  # [B, T]
        if arch == "encoder":
            out.append(Batch(src, None, np.where(rng.random(rows) < 0.9, rng.integers(0, 5, rows), NO_CLASS)
                             .astype(np.int32)))
        elif arch == "decoder":
            out.append(Batch(None, tgt, labels))
        else:
            out.append(Batch(src, tgt, labels))
    return out


def spec(array: jax.Array) -> list:
    """A jax.Array's PartitionSpec as JSON: one entry per dimension, None (whole), an axis name or a list of them."""
    return [list(part) if isinstance(part, tuple) else part for part in array.sharding.spec]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


def compare(arch: str, dtype: str, meshes, rng: np.random.Generator, resume=None) -> list[dict]:
    """Each mesh against one device: loss sums per step, and every weight tensor after the steps.

    k_proj.bias is reported apart: its exact gradient is zero (softmax ignores a per-query shift of the scores),
    so what it receives is rounding noise that Adam scales to +-lr whatever the layout; it is compared against
    the size of all the weights. With `resume` (a mesh), the last sharded state also resumes there."""
    cfg = TransformerConfig(V, V, d_model=32, num_heads=4, num_encoder_layers=1, num_decoder_layers=1, d_ff=64,
                            dropout=0.1, max_len=16).for_arch(arch, 5 if arch == "encoder" else None)
    tcfg = TrainConfig(warmup_steps=4, seed=3)
    data = batches(arch, rng)
    single = Trainer(cfg, tcfg, dtype=dtype)
    start = single.weights()
    losses = [{k: float(v) for k, v in single.train_step(b).items()} for b in data]
    reference = single.weights()
    scale = np.sqrt(sum(np.sum(np.square(w, dtype=np.float64)) for w in reference.values()))
    rows = []
    for mesh in meshes:
        context = distributed.setup("cpu", mesh=mesh)
        sharded = Trainer(cfg, tcfg, start, dtype=dtype, context=context)
        got = [{k: float(v) for k, v in sharded.train_step(b).items()} for b in data]
        weights = sharded.weights()
        state = sharded.train_state
        params = jax.tree_util.tree_leaves_with_path(state.params)
        mu = jax.tree_util.tree_leaves(state.opt_state[1][0].mu)
        held = distributed.bytes_per_device(state.params)
        rows.append({
            "arch": arch, "dtype": dtype, "mesh": mesh,
            "loss_rel": max(abs(g[k] - r[k]) / max(abs(r[k]), 1e-300) for g, r in zip(got, losses)
                            for k in ("loss", "nll", "grad_norm")),
            "tokens_equal": all(g["tokens"] == r["tokens"] for g, r in zip(got, losses)),
            "weights_rel": max(rel(weights[k], reference[k]) for k in reference if not k.endswith("k_proj.bias")),
            "k_proj_bias_vs_all": max(float(np.linalg.norm(weights[k] - reference[k])) / scale
                                      for k in reference if k.endswith("k_proj.bias")),
            "specs": {jax.tree_util.keystr(path): spec(leaf) for path, leaf in params},
            "shapes": {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in params},
            "mu_specs_match": all(m.sharding.spec == p.sharding.spec for m, (_, p) in zip(mu, params)),
            "param_devices": sorted({len(leaf.sharding.device_set) for _, leaf in params}),
            "bytes_per_device": sorted(held.values()), "bytes_total": sum(w.nbytes for w in weights.values()),
            "batch_spec": spec(sharded._arrays(data[1])["labels"]),
            "fsdp_unsharded": [jax.tree_util.keystr(path) for path, leaf in params
                               if "fsdp" not in spec(leaf) and mesh["fsdp"] > 1],
            "describe": context.describe(),
        })
    if resume is not None:
        rows[-1]["resumed_rel"] = resumed(cfg, tcfg, dtype, single, sharded, data, resume)
    return rows


def resumed(cfg, tcfg, dtype: str, single: Trainer, sharded: Trainer, data: list[Batch], mesh) -> float:
    """A sharded state exported and loaded into another mesh, one more step there, against one device."""
    other = Trainer(cfg, tcfg, dtype=dtype, context=distributed.setup("cpu", mesh=mesh))
    other.load_state(sharded.export_state(len(data)))
    other.train_step(data[0])
    single.train_step(data[0])
    got, want = other.weights(), single.weights()
    return max(rel(got[k], want[k]) for k in want if not k.endswith("k_proj.bias"))


TRAIN = ["--framework", "jax", "--config", "tiny", "--limit", "64", "--max-tokens", "256", "--warmup", "4",
         "--log-every", "1", "--eval-every", "100", "--save-every", "3", "--no-progress", "--vocab-size", "1",
         "--dtype", "float64"]


def write_data(directory: Path) -> Path:
    """A data directory of builtin's pairs of 31 to 38 characters: 64 training, 16 validation, 2 test pairs.

    `--vocab-size 1` leaves BPE no merges (a token per character, and the word-start mark), so every pair is
    33 to 40 tokens long with its BOS or EOS: every batch is one shape, (6, 40), and each run compiles its step
    once. 6 rows take 2 empty ones on 8 devices. Each run evaluates the whole validation split at its end."""
    corpus = load_corpus("builtin")
    directory.mkdir(parents=True)
    for name, pairs in (("train", corpus.train), ("valid", corpus.valid), ("test", corpus.test)):
        pairs = [pair for pair in pairs if 31 <= max(map(len, pair)) <= 38][:{"train": 64, "valid": 16}.get(name, 2)]
        (directory / f"{name}.tsv").write_text("".join(f"{src}\t{tgt}\n" for src, tgt in pairs), encoding="utf-8")
    return directory


def train(data: Path, out: Path, *extra: str) -> str:
    """`twin train` in this process; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["train", *TRAIN, "--data", str(data), "--out", str(out), *extra])
    assert code == 0, (code, printed.getvalue()[-3000:])
    return printed.getvalue()


def mesh_runs(root: Path) -> dict[str, str]:
    """Three steps on `--mesh data=2,fsdp=4` (first: the command asks for its 8 devices), five on one device, and
    the mesh run resumed on one device for two more: run directories and the mesh run's output."""
    data = write_data(root / "data")
    out = {name: root / name for name in ("single", "mesh", "mesh_then_single")}
    mesh_log = train(data, out["mesh"], "--steps", "3", "--mesh", "data=2,fsdp=4", "--test-limit", "2")
    train(data, out["single"], "--steps", "5", "--test-limit", "0")
    shutil.copytree(out["mesh"], out["mesh_then_single"])
    train(data, out["mesh_then_single"], "--steps", "5", "--resume", "--test-limit", "0")
    return {**{name: str(path) for name, path in out.items()}, "mesh_log": mesh_log}


def sharded_steps() -> dict:
    rng = np.random.default_rng(0)
    report = {"devices": len(jax.devices()), "rows": []}
    report["rows"] += compare("seq2seq", "float64", MESHES, rng, resume=MESHES[0])
    report["rows"] += compare("seq2seq", "float32", MESHES[1:2], rng)
    report["rows"] += compare("encoder", "float64", MESHES[1:2], rng)
    report["rows"] += compare("decoder", "float64", MESHES[1:2], rng)
    try:
        distributed.setup("cpu", mesh={"data": 4, "fsdp": 4})
        report["too_many"] = None
    except ValueError as e:
        report["too_many"] = str(e)
    return report


def main(root: Path) -> None:
    report: dict = {}
    for name, part in (("runs", lambda: mesh_runs(root)), ("steps", sharded_steps)):
        try:
            report[name] = part()
        except Exception:  # noqa: BLE001 - reported; the test that needs this part fails with it
            report[name + "_error"] = traceback.format_exc()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
