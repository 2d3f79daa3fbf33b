"""The length / d_model scaling benchmark runs end to end, and its quadratic fit is right (no timing is asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import bench_lengths


def test_fit_quadratic_recovers_known_coefficients():
    # t(1) = a + b = 3, t(2) = 2a + 4b = 10  ->  b = 2, a = 1
    assert bench_lengths.fit_quadratic([1, 2], [3, 10]) == pytest.approx((1.0, 2.0))
    lengths = [64, 128, 256, 512, 1024]
    times = [0.5 * n + 0.002 * n ** 2 for n in lengths]
    a, b = bench_lengths.fit_quadratic(lengths, times)
    assert (a, b) == pytest.approx((0.5, 0.002), rel=1e-9)
    # at L = 250 the two terms are equal: 0.5 * 250 == 0.002 * 250 ** 2
    assert bench_lengths.quadratic_share(a, b, 250) == pytest.approx(0.5)


def test_forward_flops_split():
    cfg = bench_lengths.model_config(bench_lengths.parse_args([]), d_model=256, length=64)
    flops = bench_lengths.forward_flops(cfg, batch=4, length=64)
    weights = 2 * (4 * 256 ** 2 + 2 * 256 * 1024) + 2 * (8 * 256 ** 2 + 2 * 256 * 1024) + 256 * 1000
    assert flops["linear"] == 2 * 4 * 64 * weights
    assert flops["attention"] == 6 * 4 * 4 * 64 ** 2 * 256  # 2 encoder self, 2 decoder self, 2 cross
    assert 0 < flops["attention_share"] < bench_lengths.forward_flops(cfg, 4, 1024)["attention_share"] < 1


TINY = ["--quick", "--lengths", "8", "16", "--d-model", "16", "--d-models", "16", "--length", "8", "--vocab", "50"]


def test_quick_run_writes_rows_fits_and_plot(tmp_path, capsys):
    report, png = tmp_path / "lengths.json", tmp_path / "lengths.png"
    bench_lengths.main([*TINY, "--json", str(report), "--plot", str(png)])
    data = json.loads(report.read_text())
    rows = data["results"]
    assert sorted((r["framework"], r["d_model"], r["length"]) for r in rows) == [
        ("jax", 16, 8), ("jax", 16, 16), ("torch", 16, 8), ("torch", 16, 16)]
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in rows)
    assert all(r["train_mib"] is None for r in rows)  # --quick measures in one process: no per-point memory
    assert all((r["xla_mib"] is not None) == (r["framework"] == "jax") for r in rows)
    assert all(r["xla_mib"]["total"] > 0 for r in rows if r["framework"] == "jax")
    assert all(0 <= r["flops"]["attention_share"] < 1 and "quadratic_share" in r for r in rows)
    assert set(data["fits"]) == {"torch", "jax"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Sweep A" in out and "Sweep B" in out


def test_a_point_in_a_fresh_process():
    row = bench_lengths.launch("torch", 16, 8, bench_lengths.parse_args(TINY))
    assert (row["framework"], row["d_model"], row["length"], row["batch"]) == ("torch", 16, 8, 2)
    assert row["train_mib"] > 0 and row["ms_per_step"] > 0
