"""The benchmark against transformers' MarianMTModel runs end to end on a tiny model (no timing is asserted: speed
claims live in benchmarks/ and the notes), the twins decode transformers' tokens and the round trip is bit-exact."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from parity import cli  # noqa: E402

MODELS = {"transformers MarianMTModel", "torch_tx.generate", "jax_tx.generate"}


def test_bench_hf_quick_writes_a_report(tmp_path, capsys):
    report = tmp_path / "hf.json"
    assert cli.main(["bench", "--hf", "--quick", "--workdir", str(tmp_path / "work"), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert {"settings", "environment", "model", "decoding", "training", "conversion"} <= set(data)
    assert data["environment"]["transformers"] and data["model"]["parameters"] > 0

    decoding = data["decoding"]["rows"]
    assert {(r["decoding"], r["model"]) for r in decoding} == {(d, m) for d in ("greedy", "beam 4") for m in MODELS}
    for r in decoding:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["ms_per_call"] > 0
        if r["role"] == "twin":
            assert r["ratio"] > 0
            assert r["same_tokens_as_hf"] == 1.0, r  # the quick model decodes exactly as transformers does
            assert r["own_real_tokens"] == r["tokens"]
        else:
            assert r["ratio"] is None and r["same_tokens_as_hf"] is None
    assert data["decoding"]["options"]["beam_rule"] == "hf" and data["decoding"]["options"]["forced_eos"]

    training = data["training"]["rows"]
    assert [r["model"] for r in training] == ["transformers MarianMTModel", "torch_tx trainer", "jax_tx trainer"]
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["tokens_per_step"] > 0 for r in training)
    assert all(r["ratio"] > 0 for r in training if r["role"] == "twin")
    assert data["training"]["dropout"] == {"dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0}
    before = [r["eval_loss_before"] for r in training]  # the same model in all three, before any update
    assert max(before) - min(before) < 1e-4 * max(before)

    conversion = data["conversion"]
    rows = {r["command"]: r for r in conversion["rows"]}
    assert len(rows) == 4 and sum(r["role"] == "peer" for r in rows.values()) == 1
    for r in rows.values():
        assert r["seconds"] > 0 and r["max_rss_bytes"] > 0 and r["src_bytes"] > 0 and r["dst_bytes"] > 0
        assert (r["time_ratio"] is None) == (r["role"] == "peer") == (r["rss_ratio"] is None)
    assert conversion["checkpoint_bytes"] > 0
    assert conversion["round_trip"]["bit_identical"]
    assert conversion["round_trip"]["files_equal"] and conversion["round_trip"]["state_dicts_equal"]

    out = capsys.readouterr().out
    assert "twin/peer" in out and "same tokens as HF" in out and "bit-identical" in out


def test_bench_hf_only_runs_the_chosen_sections(tmp_path):
    report = tmp_path / "hf.json"
    assert cli.main(["bench", "--hf", "--quick", "--only", "convert", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert "conversion" in data and "decoding" not in data and "training" not in data
    assert data["conversion"]["round_trip"]["bit_identical"]
