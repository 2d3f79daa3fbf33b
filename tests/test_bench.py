"""The benchmark runs end to end (no timing is asserted: speed claims live in benchmarks/ and the notes)."""

from __future__ import annotations

import json

from parity import cli


def test_twin_bench_quick_writes_a_report(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    models = {r["model"] for r in data["results"]}
    assert models == {"torch_tx.Transformer", "torch.nn.Transformer", "jax_tx.Transformer", "flax.linen layers",
                      "torch_tx trainer", "jax_tx trainer"}
    assert all(r["tokens_per_s"] > 0 for r in data["results"])
    assert all(r["ratio"] > 0 for r in data["results"] if r["role"] == "twin")
    assert "twin/peer" in capsys.readouterr().out
