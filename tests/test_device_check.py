"""The device check (issue 22, scripts/device_check.sh) runs here on the CPU, so that it cannot rot before a GPU
is there: the whole script at its tiny size (every section, the JSON report and the summary), and its
orchestration by hand (a section that fails is recorded and the next one runs; the budget skips sections with
the reason; the exit status says whether every asserted check passed; a killed run is marked aborted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import once

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
SECTIONS = ["devices", "parity", "cache", "tokens", "train_step", "throughput"]


def driver():
    """scripts/device_check.py as a module (it imports no framework at the top)."""
    if "device_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["device_check"] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules["device_check"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """scripts/device_check.sh with DEVICE=cpu at the tiny size (about 45 s on 2 cores), run once per session even
    when pytest-xdist spreads this module's tests over several workers: (result, OUT directory, wall seconds)."""
    def make(out: Path) -> dict:
        env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable, "DEVICE_CHECK_SIZE": "tiny",
               "DEVICE_CHECK_BUDGET": "100"}
        env.pop("DEVICE_CHECK_SECTIONS", None)
        started = time.monotonic()
        done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        return {"rc": done.returncode, "output": done.stdout[-4000:] + done.stderr[-2000:], "out": str(out),
                "wall": time.monotonic() - started}

    result = once(tmp_path_factory, "device_check_tiny", make)
    return result, Path(result["out"]), result["wall"]


def test_device_check_runs_every_section_on_the_cpu(tiny):
    done, out, wall = tiny
    assert done["rc"] == 0, done["output"]
    report = json.loads((out / "report.json").read_text())
    assert report["device_mode"] == "cpu" and report["size"] == "tiny" and report["exit_status"] == 0
    assert report["started"] and report["finished"] and report["device_name"]
    versions = report["environment"]["versions"]
    assert all(versions[name][0].isdigit() for name in ("torch", "jax", "flax"))
    assert [s["name"] for s in report["sections"]] == SECTIONS
    statuses = {s["name"]: s["status"] for s in report["sections"]}
    assert statuses == {**dict.fromkeys(SECTIONS[:-1], "pass"), "throughput": "reported"}, \
        {s["name"]: s["reason"] for s in report["sections"]}
    assert all(s["wall_s"] > 0 for s in report["sections"])
    assert sum(s["wall_s"] for s in report["sections"]) <= report["wall_s"] < wall


def test_the_report_holds_each_check(tiny):
    _, out, _ = tiny
    sections = {s["name"]: s for s in json.loads((out / "report.json").read_text())["sections"]}
    table = sections["parity"]["details"]["table"]
    modes = {(e["arch"], e["mode"]) for e in table if e["examples"]}
    assert modes == {(arch, mode) for arch in ("seq2seq", "encoder", "decoder")
                     for mode in ("float64", "float32", "bfloat16 forward", "float32 TF32")}
    assert all(e["asserted"] == (e["mode"] != "float32 TF32") for e in table)
    assert {c["what"].split(":")[0] for c in sections["cache"]["checks"]} == {"cache float64", "cache float32"}
    assert any(c["what"].startswith("tokens float64") for c in sections["tokens"]["checks"])
    train = {c["what"] for c in sections["train_step"]["checks"]}
    for dtype in ("float64", "float32", "bfloat16"):
        assert f"train step seq2seq {dtype}: grads" in train
    assert any(c["what"].startswith("repeatability") and not c["asserted"] for c in sections["train_step"]["checks"])
    details = sections["throughput"]["details"]
    assert details["matmul_ceiling_tflops"]["machine"]["bfloat16"] > 0
    rows = {(r["dtype"], r["model"]): r for r in details["train"]}
    for name in ("torch_tx trainer", "jax_tx trainer"):
        row = rows["bfloat16", name]
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and row["of_bf16_ceiling"] > 0 and row["vs_peer"] > 0
    assert {r["model"] for r in details["decode"] if r.get("tokens_per_s")} == {"torch_tx.generate", "jax_tx.generate"}
    summary = (out / "summary.md").read_text()
    for line in ("| parity | pass |", "| throughput | reported |", "## Throughput", "| bfloat16 | jax_tx trainer |"):
        assert line in summary
    assert (out / "device_check.log").read_text().count("[device_check]") >= len(SECTIONS)


def _fake_sections(calls: list[str]):
    def ok(ctx, section):
        calls.append(section.name)
        section.check("fine", True, rel=0.0, tol=1.0)

    def broken(ctx, section):
        calls.append(section.name)
        raise ValueError("broken on purpose")

    def mismatch(ctx, section):
        calls.append(section.name)
        section.check("within tolerance", False, rel=1.0, tol=1e-5)
        section.check("only reported", False, asserted=False)

    return [("devices", "d", True, ok), ("parity", "p", True, broken), ("cache", "c", True, mismatch),
            ("tokens", "t", True, ok), ("throughput", "speed", False, ok)]


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    dc = driver()
    calls: list[str] = []
    report = {"schema": dc.SCHEMA, "sections": []}
    rc = dc.run(_fake_sections(calls), dc.Context("cpu", "tiny", 100.0, tmp_path, time.monotonic()), report)
    assert rc == 1 and calls == ["devices", "parity", "cache", "tokens", "throughput"]
    saved = json.loads((tmp_path / "report.json").read_text())
    status = {s["name"]: s for s in saved["sections"]}
    assert status["parity"]["status"] == "error"
    assert status["parity"]["reason"].startswith("ValueError: broken on purpose (at tests/test_device_check.py:")
    assert status["cache"]["status"] == "fail" and status["tokens"]["status"] == "pass"
    assert status["throughput"]["status"] == "reported" and saved["exit_status"] == 1 and saved["finished"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| parity | error |" in summary and "| cache | fail |" in summary
    failed = summary.split("Failed in cache")[1].split("\n\n")[1]  # the list of failed asserted checks
    assert "within tolerance" in failed and "only reported" not in failed


def test_the_budget_skips_sections_with_the_reason(tmp_path):
    dc = driver()
    calls: list[str] = []
    report = {"schema": dc.SCHEMA, "sections": []}
    spent = dc.Context("cpu", "tiny", 20.0, tmp_path, time.monotonic() - 30.0)
    assert dc.run(_fake_sections(calls), spent, report) == 2 and calls == []
    assert all(s["status"] == "skipped" and s["reason"].startswith("budget:") for s in report["sections"])
    # a device check that does not pass stops the rest: no figure is claimed for a device not seen
    def no_gpu(ctx, section):
        section.check("torch sees a GPU", False)

    sections = [("devices", "d", True, no_gpu), *_fake_sections(calls)[1:]]
    rc = dc.run(sections, dc.Context("cpu", "tiny", 100.0, tmp_path, time.monotonic()), report)
    assert rc == 1 and calls == []
    assert [s["status"] for s in report["sections"]] == ["fail", "skipped", "skipped", "skipped", "skipped"]
    assert report["sections"][1]["reason"].startswith("the devices check did not pass")
    rc = dc.run(_fake_sections(calls)[:1], dc.Context("cpu", "tiny", 100.0, tmp_path, time.monotonic()), report,
                selected={"parity"})
    assert rc == 2 and report["sections"][0]["reason"].startswith("not selected")


def test_hypothesis_examples_stop_at_the_deadline(tmp_path):
    from hypothesis import strategies as st

    dc = driver()
    ctx = dc.Context("cpu", "tiny", 100.0, tmp_path, time.monotonic())
    ctx.deadline = time.monotonic() + 0.5
    seen: list[int] = []
    counter: dict = {}
    dc.hypothesis_run(ctx, lambda x: (seen.append(x), time.sleep(0.1)), {"x": st.integers(0, 9)}, 1000, counter)
    assert counter["stopped"] == "deadline" and 1 <= counter["examples"] == len(seen) <= 10


def test_a_killed_run_is_marked_aborted(tmp_path):
    dc = driver()
    report = {"schema": dc.SCHEMA, "started": dc.now_iso(), "finished": None, "current_section": "throughput",
              "sections": [{"name": "devices", "title": "d", "asserted": True, "status": "pass", "wall_s": 1.0,
                            "reason": None, "checks": [], "details": {}, "notes": []},
                           {"name": "throughput", "title": "t", "asserted": False, "status": "pending", "wall_s": 0.0,
                            "reason": None, "checks": [], "details": {}, "notes": []}]}
    dc.write_report(report, tmp_path)
    assert dc.finalize(tmp_path, 124) == 3
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["aborted"] == "killed by the hard timeout during section 'throughput'"
    assert saved["sections"][1]["status"] == "error" and saved["exit_status"] == 3
    assert "**Aborted**" in (tmp_path / "summary.md").read_text()


def test_the_cuda_sync_probe_counts_by_line(monkeypatch):
    """count_syncs (CUDA only) with torch.cuda's calls stubbed: each warning counted at its Python line."""
    import torch

    dc = driver()
    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def call():
        if modes and modes[-1] == "warn":
            for _ in range(3):
                warnings.warn("called a synchronizing CUDA operation")

    found = dc.count_syncs(call)
    assert modes == ["warn", 0] and found["count"] == 3
    assert list(found["where"].values()) == [3] and next(iter(found["where"])).startswith("tests/test_device_check.py:")
