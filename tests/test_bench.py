"""The benchmarks run end to end (no timing is asserted: speed claims live in benchmarks/ and the notes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import torch_tx
from parity import cli
from parity.config import TransformerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_train import train_flops  # noqa: E402


def test_train_flops_equals_torchs_count_of_a_twin_training_step():
    """train_flops is the matmul FLOPs torch's FlopCounterMode sees in one forward and backward pass (SDPA's math
    path, so that attention shows up as matmuls)."""
    cfg = TransformerConfig(src_vocab_size=50, tgt_vocab_size=60, d_model=32, num_heads=4, num_encoder_layers=2,
                            num_decoder_layers=1, d_ff=64, dropout=0.0, max_len=16)
    model = torch_tx.Transformer(cfg)
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(1, 50, (3, 7), generator=gen), torch.randint(1, 60, (3, 5), generator=gen)  # [B, S], [B, T]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(src, tgt).sum().backward()
    assert train_flops(cfg, 3, 7, 5) == counter.get_total_flops()


def test_the_concatenated_projections_of_bench_ablations_compute_the_twins_function():
    """`bench_ablations --parts step` times each twin against itself with q, k, v projected by one matmul on the
    concatenated weights: the two must be the same function (float64), with the one-matmul path really taken
    (k_proj / v_proj never called as modules; q_proj only by cross-attention).

    Tolerance: each output element is the same float64 dot product, only BLAS's blocking may differ, so the error
    is a few ulps of the largest terms: rtol 1e-12 with atol 1e-12 x the output's largest magnitude."""
    import jax.numpy as jnp
    from flax import linen as fnn

    import jax_tx
    from bench_ablations import flax_concatenated, torch_concatenated
    from parity import convert

    cfg = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=16, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(1, 11, (2, 5), generator=gen), torch.randint(1, 13, (2, 4), generator=gen)  # [B, S], [B, T]
    torch.manual_seed(0)
    separate = torch_tx.Transformer(cfg).double().eval()
    concatenated = torch_concatenated(torch_tx.Transformer(cfg).double().eval())
    concatenated.load_state_dict(separate.state_dict())
    calls = []
    for name, module in concatenated.named_modules():
        if name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj"):
            module.register_forward_hook(lambda _m, _a, _o, name=name: calls.append(name))
    expected = separate(src, tgt)  # [B, T, V]
    torch.testing.assert_close(concatenated(src, tgt), expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())
    assert calls == ["decoder.layers.0.cross_attn.q_proj"]
    params = convert.torch_to_flax(separate.state_dict(), cfg)  # float64: conftest turns JAX's 64-bit mode on
    model, args = jax_tx.Transformer(cfg), (jnp.asarray(src.numpy()), jnp.asarray(tgt.numpy()))
    dense_calls = []

    def spy(next_fun, call_args, kwargs, context):
        if context.module.name in ("q_proj", "k_proj", "v_proj") and context.method_name == "__call__":
            dense_calls.append(context.module.name)
        return next_fun(*call_args, **kwargs)

    want = model.apply({"params": params}, *args)  # [B, T, V]
    with fnn.intercept_methods(spy), fnn.intercept_methods(flax_concatenated):
        got = model.apply({"params": params}, *args)
    assert dense_calls == ["q_proj"]  # the decoder's cross-attention query
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * float(np.abs(want).max()))


def test_train_flops_by_hand():
    """One layer each, B = S = T = 1, D = 2, F = 4, V = 3: forward 8*4 + 4*2 + 4*8 (encoder), 8*4 + 4*2 + 4*4 +
    4*4 + 4*2 + 4*8 (decoder), 2*6 (output) = 72 + 112 + 12 = 196; a step is 3 x 196."""
    cfg = TransformerConfig(src_vocab_size=3, tgt_vocab_size=3, d_model=2, num_heads=1, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=4, dropout=0.0, max_len=4)
    assert train_flops(cfg, 1, 1, 1) == 3 * 196


def test_twin_bench_quick_writes_one_report(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--parts", "train", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "report.json").read_text())["parts"]["train"]
    rows = data["results"]
    assert {r["model"] for r in rows} == {"torch_tx.Transformer", "torch.nn.Transformer", "jax_tx.Transformer",
                                          "flax.linen layers", "torch_tx trainer", "jax_tx trainer"}
    assert all(r["tokens_per_s"] > 0 and r["gflops_per_s"] > 0 for r in rows)
    assert all(r["ratio"] > 0 for r in rows if r["role"] == "twin")
    ceiling = data["matmul_ceiling_gflops"]
    assert ceiling["machine"] == max(ceiling["torch"], ceiling["jax"]) > 0
    assert all(0 < r["ceiling_fraction"] == r["gflops_per_s"] / ceiling["machine"] for r in rows)
    assert all("peak_memory" not in r for r in rows)  # --quick: no fresh process per model
    report = (tmp_path / "report.md").read_text()
    assert "| d_model | model | tokens/s | vs peer | model GFLOP/s | of ceiling | peak MB |" in report
    assert report.count("\n| 128 |") == len(rows)
    assert "twin/peer" in capsys.readouterr().out


def test_peak_memory_of_one_model_training_alone_in_a_fresh_process():
    import bench_train

    args = bench_train.parse_args(["--quick"])
    peak = bench_train.peak_memory(args, 128, "torch_tx.Transformer")
    assert peak["model_bytes"] > 0 and peak["peak_rss_bytes"] == peak["before_model_rss_bytes"] + peak["model_bytes"]


def test_twin_bench_rejects_two_benchmarks(capsys):
    try:
        cli.main(["bench", "--train", "--decode"])
    except SystemExit as e:
        assert "choose one of --train, --decode" in str(e)
    else:
        raise AssertionError("twin bench --train --decode ran")


def bench_race_bf16_cpu() -> bool:
    return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()


def test_bench_race_runs_make_demos_settings_and_reads_every_row():
    """bench_race's demo runs `make demo-args` (bfloat16 only for torch on a CPU with AVX512-BF16), and its table has
    one row per figure of issue 21, met or not by the goal's direction."""
    import bench_race

    for framework in ("torch", "jax"):
        args = bench_race.demo_args(framework)
        assert args[:6] == ["--data", "builtin", "--config", "small", "--pack", "--warmup"]
        assert ("--dtype" in args) == (framework == "torch" and bench_race_bf16_cpu())
    decode = {"results": [{"d_model": 512, "model": m, "mode": mode, "ratio_to_ct2_float32": r, "tokens_per_s": 1.0}
                          for m, mode, r in (("jax_tx.generate", "greedy", 1.9), ("jax_tx.generate", "beam", 1.1),
                                             ("torch_tx.generate", "greedy", 1.3), ("torch_tx.generate", "beam", 1.0))],
              "int8": [{"d_model": 512, "mode": "greedy", "ratio_to_ct2_int8": 1.01, "tokens_per_s": 1.0,
                        "same_tokens_as_torch_float32": 0.9, "ct2_int8_same_tokens_as_ct2_float32": 0.9}]}
    hf = {"decoding": {"rows": [{"role": "twin", "model": "torch_tx.generate", "decoding": "greedy", "ratio": 1.2,
                                 "tokens_per_s": 1.0, "same_tokens_as_hf": 1.0}]},
          "training": {"rows": [{"role": "twin", "model": "torch_tx trainer", "ratio": 1.3, "tokens_per_s": 1.0}]}}
    train = {"settings": {"vocab": 8000}, "results": [{"d_model": 256, "model": "jax_tx trainer", "ratio": 1.1,
                                                       "tokens_per_s": 1.0}]}
    demo = [{"framework": "torch", "wall_seconds": 190.0, "exact_match": 0.985, "args": ["--pack"]},
            {"framework": "jax", "wall_seconds": 190.0, "exact_match": 0.97, "args": ["--pack"]}]
    rows = bench_race.table({"decode": decode, "hf": hf, "train": train, "demo": demo})
    assert [r["met"] for r in rows] == [True, False, True, False, True, False, True, False]
    assert "| torch_tx int8 greedy / CTranslate2 int8 greedy (d_model 512) | 1.01x | >= 1.0x | yes |" in \
        bench_race.render(rows, "header")
