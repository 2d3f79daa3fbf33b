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
    src, tgt = torch.randint(1, 50, (3, 7)), torch.randint(1, 60, (3, 5))  # [B, S], [B, T]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(src, tgt).sum().backward()
    assert train_flops(cfg, 3, 7, 5) == counter.get_total_flops()


def test_the_separate_projections_of_bench_ablations_compute_the_fused_function():
    """`bench_ablations --parts step` times each twin against itself with q, k, v projected one block at a time:
    the two must be the same function (float64), with the separate path really taken (one call per block)."""
    import jax.numpy as jnp
    from flax import linen as fnn

    import jax_tx
    from bench_ablations import flax_separate, torch_separate
    from parity import convert

    cfg = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=16, dropout=0.0)
    src, tgt = torch.randint(1, 11, (2, 5)), torch.randint(1, 13, (2, 4))  # [B, S], [B, T]
    fused = torch_tx.Transformer(cfg).double().eval()
    separate = torch_separate(torch_tx.Transformer(cfg).double().eval())
    separate.load_state_dict(fused.state_dict())
    calls = []
    separate.decoder.layers[0].cross_attn.in_proj.register_forward_hook(lambda _m, args, _o: calls.append(args[1:]))
    torch.testing.assert_close(separate(src, tgt), fused(src, tgt), rtol=1e-12, atol=0)
    assert calls == [(0, 1), (1, 2), (2, 3)]
    params = convert.torch_to_flax(fused.state_dict(), cfg)  # float64: conftest turns JAX's 64-bit mode on
    model, args = jax_tx.Transformer(cfg), (jnp.asarray(src.numpy()), jnp.asarray(tgt.numpy()))
    blocks = []

    def spy(next_fun, call_args, kwargs, context):
        if context.module.name == "in_proj" and context.method_name == "__call__":
            blocks.append(tuple(call_args[1:]))
        return next_fun(*call_args, **kwargs)

    with fnn.intercept_methods(spy), fnn.intercept_methods(flax_separate):
        got = model.apply({"params": params}, *args)
    assert blocks == [(0, 1), (1, 2), (2, 3)] * 2 + [(0, 1), (1, 2), (2, 3)]  # encoder, decoder self, cross
    np.testing.assert_allclose(got, model.apply({"params": params}, *args), rtol=1e-12, atol=0)


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
    assert all(r["peak_memory"]["model_bytes"] > 0 for r in rows)
    report = (tmp_path / "report.md").read_text()
    assert "| d_model | model | tokens/s | vs peer | model GFLOP/s | of ceiling | peak MB |" in report
    assert report.count("\n| 128 |") == len(rows)
    assert "twin/peer" in capsys.readouterr().out


def test_twin_bench_rejects_two_benchmarks(capsys):
    try:
        cli.main(["bench", "--train", "--decode"])
    except SystemExit as e:
        assert "choose one of --train, --decode" in str(e)
    else:
        raise AssertionError("twin bench --train --decode ran")
