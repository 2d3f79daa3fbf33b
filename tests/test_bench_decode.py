"""The decoding benchmark runs end to end (no timing is asserted: speed claims live in benchmarks/ and the notes)."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest

from parity import cli

CT2 = ("ctranslate2 float32", "ctranslate2 int8")
TWINS = ("torch_tx.generate", "jax_tx.generate")


def quick_report(path) -> tuple[dict, str]:
    """`twin bench --decode --quick --json path`: the JSON report and the printed output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["bench", "--decode", "--quick", "--json", str(path)]) == 0
    return json.loads(path.read_text()), out.getvalue()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str]:
    return quick_report(tmp_path_factory.mktemp("bench") / "decode.json")


def test_bench_decode_quick_writes_a_report(report):
    data, out = report
    rows = [r for r in data["results"] if r["role"] != "ctranslate2"]
    assert {(r["model"], r["decoding"]) for r in rows} == {
        ("torch.nn.Transformer", "greedy, prefix recomputed"),
        ("torch.nn.Transformer, fast path", "greedy, prefix recomputed"),
        *((model, mode) for model in TWINS
          for mode in ("greedy, KV cache", "beam 4, KV cache, CTranslate2's rule", "sample T=1 top-k 50, KV cache")),
    }
    settings = data["settings"]
    assert all(r["tokens"] == settings["batch"] * settings["new_tokens"] for r in data["results"])
    assert all(r["tokens_per_s"] > 0 and r["ms_per_token_step"] > 0 for r in data["results"])
    greedy_twins = [r for r in rows if r["role"] == "twin" and r["decoding"] == "greedy, KV cache"]
    assert len(greedy_twins) == 2 and all(r["ratio"] > 0 for r in greedy_twins)
    assert all(r["ratio"] is None for r in data["results"] if r not in greedy_twins)
    assert {"torch_tx.generate", "jax_tx.generate", "torch.nn.Transformer, fast path"} <= {
        a["model"] for a in data["greedy_agreement"]}
    assert "twin/peer" in out


def test_bench_decode_quick_has_ctranslate2_rows(report):
    pytest.importorskip("ctranslate2")
    data, out = report
    rows = {(r["model"], r["mode"]): r for r in data["results"]}
    ct2_rows = [r for r in data["results"] if r["role"] == "ctranslate2"]
    assert {(r["model"], r["mode"]) for r in ct2_rows} == {(m, mode) for m in CT2 for mode in ("greedy", "beam")}
    assert rows["ctranslate2 float32", "greedy"]["compute_type"] == "float32"
    assert rows["ctranslate2 int8", "greedy"]["compute_type"].startswith("int8")
    assert data["ctranslate2"]["intra_threads"] == data["environment"]["torch_threads"] == 1
    for mode in ("greedy", "beam"):
        assert all(rows[name, mode]["ratio_to_ct2_float32"] > 0 for name in (*TWINS, "ctranslate2 int8"))
        assert rows["ctranslate2 float32", mode]["ratio_to_ct2_float32"] is None
    for name in (*TWINS, "ctranslate2 int8"):
        assert 0 <= rows[name, "greedy"]["same_greedy_tokens_as_ct2_float32"] <= 1
    (comparison,) = data["ctranslate2_comparison"]
    assert comparison["d_model"] == data["settings"]["d_model"][0]
    assert set(comparison["ratios_to_ct2_float32"]) == {"greedy", "beam"}
    assert set(comparison["same_greedy_tokens_as_ct2_float32"]) == {*TWINS, "ctranslate2 int8"}
    assert set(comparison["same_beam_tokens_as_ct2_float32"]) == {*TWINS, "ctranslate2 int8"}
    assert "vs CT2 f32" in out and "ctranslate2 int8" in out


def test_bench_decode_runs_without_ctranslate2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 -> ImportError
    data, out = quick_report(tmp_path / "decode.json")
    assert not [r for r in data["results"] if r["role"] == "ctranslate2"]
    assert data["ctranslate2"] is None and data["ctranslate2_comparison"] == []
    assert [line for line in out.splitlines() if "ctranslate2" in line] == [
        "ctranslate2 is not installed (the optional [deploy] extra): no CTranslate2 rows"]


def test_the_peer_builds_its_causal_mask_on_the_inputs_device():
    """TorchPeer.forward makes its causal mask on the device of its inputs (on a GPU a CPU mask is an error): run on
    the meta device, where a CPU tensor would not mix (train mode, dropout 0: nn.Transformer's eval-mode
    nested-tensor path has no meta kernel). The tutorials' loop got the same fix; it reads `done` on the host every
    step, which a meta tensor cannot give."""
    import torch

    from benchmarks.bench_train import TorchPeer
    from parity.config import TransformerConfig

    cfg = TransformerConfig(src_vocab_size=11, tgt_vocab_size=11, d_model=16, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=32, dropout=0.0, max_len=16)
    peer = TorchPeer(cfg).train().to("meta")
    src = torch.zeros(2, 5, dtype=torch.long, device="meta")
    assert peer(src, torch.zeros(2, 4, dtype=torch.long, device="meta")).shape == (2, 4, 11)
