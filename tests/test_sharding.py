"""JAX sharding (`jax_tx.distributed`, `twin train --mesh`): on 8 simulated CPU devices in a fresh process
(tests/sharded_step.py, one for the whole module), the sharded step is the single-device step on the same
global batch, the parameters and Adam moments are really split over the fsdp axis, and runs move between one
device and a mesh through ordinary checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import once
from parity.checkpoint import load_checkpoint
from parity.train import TrainError, parse_mesh

ROOT = Path(__file__).resolve().parent.parent


def _sharded_step(directory: Path) -> dict:
    """tests/sharded_step.py's report: `twin train` runs under `directory`, then the Trainer-level checks."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}  # no device count: the mesh run asks
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_step.py"), str(directory)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def _part(name: str, tmp_path_factory) -> dict:
    report = once(tmp_path_factory, "sharded_step", _sharded_step)
    assert name in report, report.get(f"{name}_error")
    return report[name]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return _part("steps", tmp_path_factory)


def _rows(report: dict, **match) -> list[dict]:
    rows = [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]
    assert rows, match
    return rows


def test_sharded_step_equals_single_device_float64(report):
    """float64 proves the same algorithm: loss sums and grad norms to 1e-12, every weight to 1e-10 after two
    Adam steps with dropout on (threefry keys are partitionable: the masks do not depend on the layout), for
    pure data parallelism, data x fsdp and pure fsdp, and for all three families."""
    assert report["devices"] == 8
    rows = _rows(report, dtype="float64")
    assert {json.dumps(r["mesh"], sort_keys=True) for r in rows if r["arch"] == "seq2seq"} == {
        '{"data": 8, "fsdp": 1}', '{"data": 2, "fsdp": 4}', '{"data": 1, "fsdp": 8}'}
    assert {r["arch"] for r in rows} == {"seq2seq", "encoder", "decoder"}
    for r in rows:
        assert r["tokens_equal"], r["mesh"]
        assert r["loss_rel"] <= 1e-12, (r["arch"], r["mesh"], r["loss_rel"])
        assert r["weights_rel"] <= 1e-10, (r["arch"], r["mesh"], r["weights_rel"])
        assert r["k_proj_bias_vs_all"] <= 1e-9, (r["arch"], r["mesh"], r["k_proj_bias_vs_all"])


def test_sharded_state_resumes_on_another_mesh(report):
    """An fsdp=8 state, exported (gathered to canonical arrays) and loaded on a data=8 mesh, takes the next
    step exactly as the single-device trainer does."""
    resumed = [r["resumed_rel"] for r in report["rows"] if "resumed_rel" in r]
    assert resumed and max(resumed) <= 1e-10, resumed


def test_sharded_step_equals_single_device_float32(report):
    """float32: within float32 rounding (reductions run in another order over 8 devices)."""
    for r in _rows(report, dtype="float32"):
        assert r["loss_rel"] <= 1e-6, (r["mesh"], r["loss_rel"])
        assert r["weights_rel"] <= 1e-5, (r["mesh"], r["weights_rel"])


def test_batches_split_over_every_device(report):
    """Every global batch is split by rows over all data x fsdp devices (13 rows padded to 16)."""
    for r in report["rows"]:
        assert r["batch_spec"] == [["data", "fsdp"]], r["mesh"]


def test_data_parallel_replicates_and_fsdp_shards(report):
    """data=8: every device holds all the weights. fsdp=M: each weight is split M ways along a dimension M
    divides (only those no dimension of which M divides stay whole), the Adam moments exactly like the
    weights, and each device holds about 1/M of the bytes (x data replicas of each shard)."""
    for r in report["rows"]:
        fsdp = r["mesh"]["fsdp"]
        assert r["mu_specs_match"], r["mesh"]
        assert r["param_devices"] == [8]
        if fsdp == 1:
            assert all(spec == [] for spec in r["specs"].values())
            assert r["bytes_per_device"] == [r["bytes_total"]] * 8
            continue
        for path, spec in r["specs"].items():
            shape = r["shapes"][path]
            if any(size % fsdp == 0 for size in shape):
                assert spec.count("fsdp") == 1 and set(spec) <= {"fsdp", None}, (path, shape, spec)
                assert shape[spec.index("fsdp")] == max(s for s in shape if s % fsdp == 0), (path, shape, spec)
            else:
                assert path in r["fsdp_unsharded"], (path, shape)
        unsharded = sum(np.prod(r["shapes"][p]) for p in r["fsdp_unsharded"]) * r["bytes_total"] / sum(
            np.prod(s) for s in r["shapes"].values())
        assert max(r["bytes_per_device"]) <= r["bytes_total"] / fsdp + unsharded + 1, r["mesh"]
        assert len(set(r["bytes_per_device"])) == 1


def test_too_few_devices_is_one_clear_line(report):
    assert report["too_many"].startswith("--mesh data=4,fsdp=4 needs 16 cpu devices; 8 are visible")
    assert "xla_force_host_platform_device_count=16" in report["too_many"]


@pytest.mark.parametrize("spec, sizes", [("data=2,fsdp=4", {"data": 2, "fsdp": 4}), ("fsdp=8", {"data": 1, "fsdp": 8}),
                                         ("data=3", {"data": 3, "fsdp": 1}), (" data=1 , fsdp=2", {"data": 1, "fsdp": 2})])
def test_parse_mesh(spec, sizes):
    assert parse_mesh(spec) == sizes


@pytest.mark.parametrize("spec", ["", "data", "data=0", "model=2", "data=2,data=2", "data=x", "data=-1", "data=2;fsdp=2"])
def test_parse_mesh_refuses(spec):
    with pytest.raises(TrainError, match="expected data=N,fsdp=M"):
        parse_mesh(spec)


# ------------------------------------------------------------------------------------------- twin train --mesh

def _rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest difference of a weight, relative to the size of all of b's weights (k_proj.bias moves by rounding
    noise that Adam scales up: see tests/sharded_step.py)."""
    scale = np.sqrt(sum(np.sum(np.square(w)) for w in b.values()))
    return max(float(np.linalg.norm(a[k] - b[k])) for k in b) / scale


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path | str]:
    """`twin train` (tests/sharded_step.py): three steps on `--mesh data=2,fsdp=4` (8 simulated devices, asked
    for by the command itself), five on one device, and the mesh run resumed on one device for two more."""
    return {name: value if name.endswith("_log") else Path(value)
            for name, value in _part("runs", tmp_path_factory).items()}


def test_train_mesh_equals_one_device(runs):
    """`twin train --mesh data=2,fsdp=4` trains the same weights as one device (dropout on), says how it is
    laid out, and decodes the test sentences at the end."""
    assert "distributed: mesh data=2 fsdp=4 over 8 cpu devices in 1 process" in runs["mesh_log"]
    assert "test exact match" in runs["mesh_log"]
    _, single = load_checkpoint(runs["single"] / "checkpoints" / "step_0000003")
    cfg, mesh = load_checkpoint(runs["mesh"])
    assert cfg.dropout > 0
    assert _rel(mesh, single) <= 1e-10


def test_mesh_checkpoints_are_ordinary_and_resume_on_one_device(runs):
    """The sharded run's checkpoint is the canonical one (the same files and keys as one device's); resumed on
    one device it lands on the weights of the uninterrupted single-device run."""
    assert sorted(p.name for p in (runs["mesh"] / "checkpoints" / "step_0000003").iterdir()) == sorted(
        p.name for p in (runs["single"] / "checkpoints" / "step_0000003").iterdir())
    assert sorted(p.name for p in runs["mesh"].iterdir()) == sorted(p.name for p in runs["single"].iterdir())
    _, a = load_checkpoint(runs["mesh_then_single"])
    _, b = load_checkpoint(runs["single"])
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert _rel(a, b) <= 1e-10
    steps = [json.loads(line)["step"] for line in (runs["mesh_then_single"] / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_mesh_checkpoint_passes_the_parity_suite(runs):
    """The sharded run's checkpoint loads as it is in both twins, which compute the same outputs and gradients."""
    from parity import suite

    cfg, weights = load_checkpoint(runs["mesh"])
    inputs = suite.random_inputs(cfg, 2, 5, 4, np.random.default_rng(0))
    checks = suite.compare_twins(cfg, weights, inputs, "float64", source="jax")
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_mesh_with_torch_and_fsdp_with_jax_are_refused(tmp_path):
    from parity.train import run

    with pytest.raises(TrainError, match="--mesh is for --framework jax"):
        run("torch", "builtin", tmp_path / "a", mesh="data=2")
    with pytest.raises(TrainError, match="--fsdp is for --framework torch"):
        run("jax", "builtin", tmp_path / "b", fsdp=True)
