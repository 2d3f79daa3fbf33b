"""torch_tx.quantize: dynamic int8 Linears for decoding (CPU). What is replaced and what is left alone, logits close to
float32's, generate and the cross-attention capture on the quantized model, greedy agreement on the trained tiny run,
refused dtypes, and `twin translate/eval --quantize int8` (refused on JAX and on a CTranslate2 directory)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import torch_tx
from cli_helpers import twin
from parity.checkpoint import load_model_dir
from parity.config import TransformerConfig
from parity.convert import to_torch
from torch_tx.decoding import cross_attention_weights
from torch_tx.quantize import quantize_dynamic_int8, quantized_linears

TINY_RUN = Path(__file__).resolve().parent / "data" / "tiny_run"
SOURCES = ["six hundred and sixty-five thousand, four hundred and eighty-eight", "seven",
           "fifty-two thousand, nine hundred and twenty-six", "four hundred and twelve"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

# Logits tolerance, relative to the float32 logits' norm. One dynamic int8 Linear: the weights are rounded to
# 1/127 of each row's largest |w| (Xavier-uniform rows: a relative error of 1 / (127 * 2) ~ 0.4% of their std),
# the input activations to 1/255 of each call's range (~8 std for roughly Gaussian activations: ~0.9% of their
# std), so ~1% per Linear. A 2+2-layer model has ~10 Linears in series from the source embedding to the logits,
# their errors adding in quadrature to ~3%; measured 2.1-3.4% on the configs below (per-channel and per-tensor).
# 0.08 leaves 2.5x that. Below 1e-4 nothing was quantized (float32 runs agree to ~1e-7).
LOGITS_RTOL, QUANTIZED_AT_LEAST = 0.08, 1e-4


def small_model(seed: int = 0, **fields) -> torch_tx.Transformer:
    cfg = TransformerConfig(src_vocab_size=50, tgt_vocab_size=50, d_model=64, num_heads=4, num_encoder_layers=2,
                            num_decoder_layers=2, d_ff=128, dropout=0.0, max_len=32, **fields)
    torch.manual_seed(seed)
    return torch_tx.Transformer(cfg).eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 50, (4, 10), generator=g)  # [B, S]
    src[1, 6:] = 0  # a padded row
    return src, torch.randint(3, 50, (4, 9), generator=g)  # [B, S], [B, T]


@pytest.fixture(scope="module")
def tiny() -> tuple[torch_tx.Transformer, object]:
    cfg, weights, tokenizer = load_model_dir(TINY_RUN)
    model = torch_tx.Transformer(cfg.without_dropout())
    model.load_state_dict({k: to_torch(v) for k, v in weights.items()})
    return model.eval(), tokenizer


@pytest.mark.parametrize("fields", [{}, {"tie_output": True}, {"share_embeddings": True, "tie_output": True}],
                         ids=["untied", "tied-output", "shared"])
def test_every_linear_is_quantized_and_the_original_is_untouched(fields):
    model = small_model(**fields)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sorted(name for name, m in model.named_modules() if type(m) is nn.Linear)
    quantized = quantize_dynamic_int8(model)
    assert sorted(quantized_linears(quantized)) == linears
    # q/k/v/out and the 2 FFN Linears per encoder layer, 4 more (cross-attention) per decoder layer, the generator
    assert "generator" in linears and len(linears) == 2 * 6 + 2 * 10 + 1
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert not quantized.training
    # the embeddings stay float32, with the float32 values (also where the generator was tied to one)
    for name in ("src_embed", "tgt_embed"):
        emb = getattr(quantized, name)
        assert type(emb) is type(getattr(model, name)) and emb.weight.dtype == torch.float32
        assert torch.equal(emb.weight, before[f"{name}.weight"])
    assert quantized.src_embed.weight is not model.src_embed.weight  # a copy, not the original's parameter
    # the original: same keys, bit-identical values, still float nn.Linears, tied weights still tied
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert sorted(name for name, m in model.named_modules() if type(m) is nn.Linear) == linears
    if fields.get("tie_output"):
        assert model.generator.weight is model.tgt_embed.weight
    if fields.get("share_embeddings"):
        assert quantized.src_embed.weight is quantized.tgt_embed.weight


@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("fields", [{}, {"tie_output": True}, {"norm_first": True, "activation": "gelu"}],
                         ids=["post-ln", "tied", "pre-ln-gelu"])
def test_logits_close_to_float32(weights, fields):
    model = small_model(seed=1, **fields)
    quantized = quantize_dynamic_int8(model, weights=weights)
    src, tgt = batch()
    with torch.no_grad():
        ref, out = model(src, tgt), quantized(src, tgt)  # [B, T, V]
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    error = ((out - ref).norm() / ref.norm()).item()
    assert QUANTIZED_AT_LEAST < error < LOGITS_RTOL, error
    # the cached decode path (what generate runs), one token per call: its activation ranges are each step's own,
    # so it differs from the quantized full pass by about as much as both differ from float32
    with torch.no_grad():
        memory = quantized.encode(src)  # [B, S, D]
        cache = quantized.init_cache(memory, src_mask=src != 0, length=tgt.shape[1])
        steps = []
        for t in range(tgt.shape[1]):
            logits, cache = quantized.decode(tgt[:, t:t + 1], None, cache=cache)  # [B, 1, V]
            steps.append(logits)
    stepwise = torch.cat(steps, dim=1)  # [B, T, V]
    assert QUANTIZED_AT_LEAST < ((stepwise - ref).norm() / ref.norm()).item() < LOGITS_RTOL


def test_generate_greedy_beam_sampling_and_attention_run():
    model = small_model(seed=2)
    quantized = quantize_dynamic_int8(model)
    src, tgt = batch(1)
    kw = dict(max_new_tokens=8, bos_id=1, eos_id=2)
    greedy = torch_tx.generate(quantized, src, **kw)
    beam = torch_tx.generate(quantized, src, beam_size=3, **kw)
    sampled = torch_tx.generate(quantized, src, temperature=0.8, top_k=10, seed=0, **kw)
    again = torch_tx.generate(quantized, src, temperature=0.8, top_k=10, seed=0, **kw)
    for out in (greedy, beam, sampled):
        assert out.shape[0] == 4 and 1 <= out.shape[1] <= 8 and out.dtype == torch.long
        for row in out.tolist():  # generate's contract: no pad or BOS before EOS, pad after it
            end = row.index(2) + 1 if 2 in row else len(row)
            assert 0 not in row[:end] and 1 not in row[:end] and all(t == 0 for t in row[end:])
    assert torch.equal(sampled, again)  # reproducible from the seed
    weights = cross_attention_weights(quantized, src, tgt)  # [L, B, H, T, S]
    ref = cross_attention_weights(model, src, tgt)
    assert weights.shape == ref.shape == (2, 4, 4, 9, 10)
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
    assert (weights - ref).abs().max().item() < 0.05  # probabilities: int8 moves the scores by ~1-3%


def test_greedy_and_beam_agree_with_float32_on_the_trained_tiny_run(tiny):
    """Random models have near-ties everywhere; the trained tiny run (98.5% test exact match) is peaked, so its int8
    greedy tokens match float32's (measured: 2,000 of 2,000 test sentences identical, benchmarks/bench_int8.py)."""
    from parity.data import load_corpus

    model, tokenizer = tiny
    quantized = quantize_dynamic_int8(model)
    sources = [np.append(ids, tokenizer.eos_id) for ids in tokenizer.encode([s for s, _ in
                                                                             load_corpus("builtin").test[:64]])]
    src = torch.zeros(len(sources), max(map(len, sources)), dtype=torch.long)  # [B, S]
    for i, ids in enumerate(sources):
        src[i, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
    kw = dict(max_new_tokens=40, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    for extra in ({}, {"beam_size": 4}):
        ref, out = torch_tx.generate(model, src, **kw, **extra), torch_tx.generate(quantized, src, **kw, **extra)
        n = min(ref.shape[1], out.shape[1])
        same_rows = (ref[:, :n] == out[:, :n]).all(1) & (ref[:, n:] == 0).all(1) & (out[:, n:] == 0).all(1)  # [B]
        assert same_rows.float().mean().item() >= 62 / 64, (extra, same_rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_refused(dtype):
    model = small_model().to(dtype)
    with pytest.raises(ValueError, match=f"float32 models only.*{str(dtype).removeprefix('torch.')}"):
        quantize_dynamic_int8(model)
    with pytest.raises(ValueError, match="weights must be one of per_channel, per_tensor"):
        quantize_dynamic_int8(small_model(), weights="per_row")


# ------------------------------------------------------------------------------------------------ the CLI

def test_translate_and_eval_quantize_int8(capsys, monkeypatch, tmp_path):
    code, ref, err = twin(capsys, monkeypatch, "translate", str(TINY_RUN), *SOURCES)
    assert code == 0 and err == ""
    code, out, err = twin(capsys, monkeypatch, "translate", str(TINY_RUN), "--quantize", "int8", *SOURCES)
    assert code == 0 and err == "" and out == ref and len(out.splitlines()) == len(SOURCES)
    code, out, err = twin(capsys, monkeypatch, "translate", str(TINY_RUN), "--quantize", "int8", "--beam", "4",
                          stdin="\n".join(SOURCES) + "\n")
    assert code == 0 and err == "" and len(out.splitlines()) == len(SOURCES)
    scores = tmp_path / "scores.json"
    code, out, err = twin(capsys, monkeypatch, "eval", str(TINY_RUN), "--quantize", "int8", "--limit", "20",
                          "--json", str(scores))
    assert code == 0 and err == "" and ", torch int8, greedy" in out and "BLEU" in out
    import json
    record = json.loads(scores.read_text())
    assert record["quantize"] == "int8" and record["sentences"] == 20 and record["exact_match"] >= 0.9


@pytest.mark.parametrize("command", ["translate", "eval"])
def test_quantize_is_refused_on_jax(capsys, monkeypatch, command):
    pytest.importorskip("jax")
    args = [command, str(TINY_RUN), "--framework", "jax", "--quantize", "int8"] + (["seven"] if command == "translate"
                                                                                    else ["--limit", "2"])
    code, out, err = twin(capsys, monkeypatch, *args)
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert "--quantize int8" in err and "--framework torch" in err


def test_quantize_is_refused_on_a_ctranslate2_directory(capsys, monkeypatch, tmp_path):
    pytest.importorskip("ctranslate2")
    dst = tmp_path / "ct2"
    code, _, err = twin(capsys, monkeypatch, "convert", str(TINY_RUN), str(dst), "--to", "ctranslate2")
    assert code == 0, err
    for command, rest in (("translate", ["seven"]), ("eval", ["--data", "builtin", "--limit", "2"])):
        code, out, err = twin(capsys, monkeypatch, command, str(dst), "--quantize", "int8", *rest)
        assert code == 1 and out == "" and len(err.splitlines()) == 1
        assert "--quantize" in err and "--quantization int8" in err


def test_bench_int8_reports_agreement(tmp_path, capsys):
    """benchmarks/bench_int8.py on the first test sentences: a row per decoder, float32 the reference."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_int8

    assert bench_int8.main(["--limit", "16", "--torch-threads", "1", "--json", str(tmp_path / "int8.json")]) == 0
    rows = {r["model"]: r for r in json.loads((tmp_path / "int8.json").read_text())["results"]}
    assert {"torch float32", "torch int8"} <= set(rows)
    assert rows["torch float32"]["identical_to_float32"] == 1.0 and rows["torch float32"]["bleu_delta"] == 0.0
    assert rows["torch int8"]["sentences"] == 16 and rows["torch int8"]["identical_to_float32"] >= 14 / 16
    assert "torch int8" in capsys.readouterr().out
