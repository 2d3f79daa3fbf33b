"""The fused q/k/v projection (`in_proj`) in both twins: one matmul for self-attention, two for cross-attention,
and a layout only: state dicts, conversion, errors and trainer state keep the canonical q_proj/k_proj/v_proj."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_tx
import torch_tx
from jax_tx.attention import InProjection
from parity import convert
from parity.config import TransformerConfig
from parity.names import canonical_shapes
from torch_tx.attention import join_in_proj, split_in_proj

CFG = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, d_ff=16, dropout=0.0)
SRC, TGT = np.array([[3, 4, 5, 0]]), np.array([[1, 6, 7]])


def test_state_dict_has_the_canonical_keys_in_order_as_views_of_in_proj():
    model = torch_tx.Transformer(CFG)
    state_dict = model.state_dict()
    assert list(state_dict) == list(canonical_shapes(CFG))
    attn = model.encoder.layers[0].self_attn
    assert [name for name, _ in attn.named_parameters()] == ["in_proj.weight", "in_proj.bias", "out_proj.weight",
                                                             "out_proj.bias"]
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        weight = state_dict[f"encoder.layers.0.self_attn.{proj}.weight"]
        assert torch.equal(weight, attn.in_proj.weight[i * 8:(i + 1) * 8])
        assert weight.data_ptr() == attn.in_proj.weight[i * 8].data_ptr()  # a view, no copy


def test_load_state_dict_joins_the_canonical_keys():
    weights = {k: torch.randn(shape, dtype=torch.float64) for k, shape in canonical_shapes(CFG).items()}
    weights["generator.weight"] = weights["tgt_embed.weight"]
    model = torch_tx.Transformer(CFG).double()
    model.load_state_dict(weights)
    attn = model.decoder.layers[0].cross_attn
    expected = torch.cat([weights[f"decoder.layers.0.cross_attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn.in_proj.bias, expected)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_missing_and_unexpected_keys_are_named_canonically():
    weights = torch_tx.Transformer(CFG).state_dict()
    del weights["decoder.layers.0.cross_attn.k_proj.bias"]
    with pytest.raises(RuntimeError) as error:
        torch_tx.Transformer(CFG).load_state_dict(weights)
    message = str(error.value)
    assert 'Missing key(s) in state_dict: "decoder.layers.0.cross_attn.k_proj.bias"' in message
    assert "in_proj" not in message and "Unexpected" not in message
    result = torch_tx.Transformer(CFG).load_state_dict(weights, strict=False)
    assert result.missing_keys == ["decoder.layers.0.cross_attn.k_proj.bias"] and result.unexpected_keys == []
    arrays = {k: v.numpy() for k, v in weights.items() if k.startswith("decoder.layers.0.cross_attn.")}
    with pytest.raises(convert.ConversionError, match=r"missing key\(s\) 'decoder.layers.0.cross_attn.k_proj.bias'"):
        convert.rename_to_flax(arrays)


def test_split_and_join_are_inverse_on_any_named_dict():
    named = {"a.in_proj.weight": torch.arange(12.0).view(6, 2), "a.in_proj.bias": torch.arange(6.0),
             "a.out_proj.weight": torch.zeros(2, 2), "in_proj.weight": torch.ones(6, 2)}
    canonical = split_in_proj(named)
    assert list(canonical) == ["a.q_proj.weight", "a.q_proj.bias", "a.k_proj.weight", "a.k_proj.bias",
                               "a.v_proj.weight", "a.v_proj.bias", "a.out_proj.weight", "q_proj.weight",
                               "k_proj.weight", "v_proj.weight"]
    assert canonical["a.k_proj.weight"].tolist() == [[4.0, 5.0], [6.0, 7.0]]
    assert canonical["a.v_proj.bias"].tolist() == [4.0, 5.0]
    joined = join_in_proj(canonical)
    assert set(joined) == set(named) and all(torch.equal(joined[k], named[k]) for k in named)


def test_flax_in_proj_holds_q_k_v_as_column_blocks():
    torch.manual_seed(0)
    model = torch_tx.Transformer(CFG)
    state_dict = model.state_dict()
    params = convert.torch_to_flax(state_dict, CFG)
    fused = params["decoder"]["layers_0"]["self_attn"]["in_proj"]
    assert set(fused) == {"kernel", "bias"} and fused["kernel"].shape == (8, 24)
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        np.testing.assert_array_equal(fused["kernel"][:, i * 8:(i + 1) * 8],
                                      state_dict[f"decoder.layers.0.self_attn.{proj}.weight"].numpy().T)
    back = convert.flax_to_torch(params, CFG)
    assert all(torch.equal(back[k], v) for k, v in state_dict.items())


def _torch_blocks(model: torch.nn.Module) -> dict[str, list]:
    calls: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch_tx.attention.InProjection):
            module.register_forward_hook(lambda _m, args, _o, name=name: calls.setdefault(name, []).append(
                tuple(args[1:]) or (0, 3)))
    return calls


def _flax_blocks(model: nn.Module, params, *args) -> dict[str, list]:
    calls: dict[str, list] = {}

    def spy(call, call_args, kwargs, context):
        if isinstance(context.module, InProjection) and context.method_name == "__call__":
            calls.setdefault(".".join(context.module.scope.path[:-1]), []).append(tuple(call_args[1:]) or (0, 3))
        return call(*call_args, **kwargs)

    with nn.intercept_methods(spy):
        model.apply({"params": params}, *args)
    return {k.replace("layers_", "layers."): v for k, v in calls.items()}


def test_self_attention_projects_with_one_matmul_and_cross_attention_with_two():
    model = torch_tx.Transformer(CFG).eval()
    calls = _torch_blocks(model)
    model(torch.from_numpy(SRC), torch.from_numpy(TGT))
    expected = {"encoder.layers.0.self_attn.in_proj": [(0, 3)], "decoder.layers.0.self_attn.in_proj": [(0, 3)],
                "decoder.layers.0.cross_attn.in_proj": [(0, 1), (1, 3)]}
    assert calls == expected
    params = convert.torch_to_flax(model.state_dict(), CFG)
    flax_calls = _flax_blocks(jax_tx.Transformer(CFG), params, jnp.asarray(SRC), jnp.asarray(TGT))
    assert flax_calls == {k.rpartition(".")[0]: v for k, v in expected.items()}


def test_both_twins_draw_each_block_from_its_own_xavier_range():
    d = 64
    bound = (6 / (2 * d)) ** 0.5  # Xavier uniform of one (D, D) projection, not of the (3D, D) whole
    weight = torch_tx.attention.InProjection(d).weight.detach().numpy()  # [3D, D]
    kernel = np.asarray(InProjection(d).init(jax.random.key(0), jnp.ones((1, d)))["params"]["kernel"]).T  # [3D, D]
    for fused in (weight, kernel):
        for block in np.split(fused, 3):
            assert np.abs(block).max() <= bound and np.abs(block).max() > 0.95 * bound
            assert abs(block.std() - bound / 3 ** 0.5) < 0.05 * bound
        assert not np.array_equal(fused[:d], fused[d:2 * d])
