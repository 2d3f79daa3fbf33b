"""The decoding benchmark runs end to end (no timing is asserted: speed claims live in benchmarks/ and the notes)."""

from __future__ import annotations

import json

from parity import cli


def test_bench_decode_quick_writes_a_report(tmp_path, capsys):
    report = tmp_path / "decode.json"
    assert cli.main(["bench", "--decode", "--quick", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    rows = data["results"]
    assert {(r["model"], r["decoding"]) for r in rows} == {
        ("torch.nn.Transformer", "greedy, prefix recomputed"),
        ("torch.nn.Transformer, fast path", "greedy, prefix recomputed"),
        *((model, mode) for model in ("torch_tx.generate", "jax_tx.generate")
          for mode in ("greedy, KV cache", "beam 4, KV cache", "sample T=1 top-k 50, KV cache")),
    }
    settings = data["settings"]
    assert all(r["tokens"] == settings["batch"] * settings["new_tokens"] for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["ms_per_token_step"] > 0 for r in rows)
    greedy_twins = [r for r in rows if r["role"] == "twin" and r["decoding"] == "greedy, KV cache"]
    assert len(greedy_twins) == 2 and all(r["ratio"] > 0 for r in greedy_twins)
    assert all(r["ratio"] is None for r in rows if r not in greedy_twins)
    assert {a["model"] for a in data["greedy_agreement"]} == {"torch_tx.generate", "jax_tx.generate",
                                                              "torch.nn.Transformer, fast path"}
    assert "twin/peer" in capsys.readouterr().out
