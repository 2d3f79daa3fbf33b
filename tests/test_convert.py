"""The converter's strictness: equal key sets, every shape checked, the bad key named; tied weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jax_tx
import torch_tx
from parity import convert
from parity.config import TransformerConfig

CFG = TransformerConfig(src_vocab_size=9, tgt_vocab_size=9, d_model=8, num_heads=2, num_encoder_layers=2,
                        num_decoder_layers=1, d_ff=16, dropout=0.0)


@pytest.fixture()
def state_dict():
    torch.manual_seed(0)
    return torch_tx.Transformer(CFG).state_dict()


def test_rule_table_maps_each_kind_of_leaf(state_dict):
    params = convert.torch_to_flax(state_dict, CFG)
    layer = params["encoder"]["layers_1"]
    np.testing.assert_array_equal(layer["self_attn"]["q_proj"]["kernel"],
                                  state_dict["encoder.layers.1.self_attn.q_proj.weight"].numpy().T)
    np.testing.assert_array_equal(layer["ff_norm"]["scale"], state_dict["encoder.layers.1.ff_norm.weight"].numpy())
    np.testing.assert_array_equal(params["src_embed"]["embedding"], state_dict["src_embed.weight"].numpy())
    np.testing.assert_array_equal(params["generator"]["kernel"], state_dict["generator.weight"].numpy().T)
    assert set(params) == {"src_embed", "tgt_embed", "encoder", "decoder", "generator"}


def test_missing_unexpected_and_misshaped_keys_are_named(state_dict):
    missing = dict(state_dict)
    del missing["decoder.layers.0.cross_attn.v_proj.bias"]
    with pytest.raises(convert.ConversionError, match=r"missing key\(s\) 'decoder.layers.0.cross_attn.v_proj.bias'"):
        convert.torch_to_flax(missing, CFG)
    extra = {**state_dict, "encoder.layers.2.ff.linear1.weight": torch.zeros(16, 8)}
    with pytest.raises(convert.ConversionError, match=r"unexpected key\(s\) 'encoder.layers.2.ff.linear1.weight'"):
        convert.torch_to_flax(extra, CFG)
    bad = {**state_dict, "encoder.layers.0.ff.linear2.weight": torch.zeros(16, 8)}
    with pytest.raises(convert.ConversionError,
                       match=r"shape mismatch for 'encoder.layers.0.ff.linear2.weight': expected \(8, 16\), got \(16, 8\)"):
        convert.torch_to_flax(bad, CFG)


def test_flax_side_errors_name_the_param_path(state_dict):
    params = convert.torch_to_flax(state_dict, CFG)
    del params["decoder"]["layers_0"]["ff_norm"]
    with pytest.raises(convert.ConversionError, match="decoder/layers_0/ff_norm/bias"):
        convert.flax_to_torch(params, CFG)
    params = convert.torch_to_flax(state_dict, CFG)
    params["generator"]["kernel"] = params["generator"]["kernel"].T
    with pytest.raises(convert.ConversionError, match=r"shape mismatch for 'generator/kernel': expected \(8, 9\)"):
        convert.flax_to_torch(params, CFG)
    wrapped = {"params": convert.torch_to_flax(state_dict, CFG)}
    assert set(convert.flax_to_torch(wrapped, CFG)) == set(state_dict)


def test_a_config_that_does_not_match_the_weights_is_refused(state_dict):
    with pytest.raises(convert.ConversionError, match="missing key"):
        convert.torch_to_flax(state_dict, CFG.replace(num_decoder_layers=2))
    with pytest.raises(convert.ConversionError, match="shape mismatch for 'src_embed.weight'"):
        convert.torch_to_flax(state_dict, CFG.replace(src_vocab_size=10))


def test_tied_and_shared_weights_convert_to_one_param_and_back():
    cfg = CFG.replace(tie_output=True, share_embeddings=True, output_bias=False)
    model = torch_tx.Transformer(cfg)
    assert model.generator.weight is model.tgt_embed.weight is model.src_embed.weight
    state_dict = model.state_dict()
    params = convert.torch_to_flax(state_dict, cfg)
    assert "tgt_embed" not in params and "generator" not in params
    init = jax_tx.Transformer(cfg).init(jax.random.key(0), np.ones((1, 2), np.int32), np.ones((1, 2), np.int32))
    assert jax.tree_util.tree_structure(init["params"]) == jax.tree_util.tree_structure(params)
    back = convert.flax_to_torch(params, cfg)
    assert back["generator.weight"] is back["tgt_embed.weight"]
    fresh = torch_tx.Transformer(cfg)
    fresh.load_state_dict(back)
    assert fresh.generator.weight is fresh.src_embed.weight

    untied = {k: v.clone() for k, v in state_dict.items()}
    untied["generator.weight"] += 1.0
    with pytest.raises(convert.ConversionError, match="'generator.weight' differs from 'src_embed.weight'"):
        convert.torch_to_flax(untied, cfg)


def test_tied_output_with_bias_keeps_only_the_bias_in_flax():
    cfg = CFG.replace(tie_output=True)
    params = convert.torch_to_flax(torch_tx.Transformer(cfg).state_dict(), cfg)
    assert set(params["generator"]) == {"bias"}


def test_bfloat16_weights_convert_both_ways_bit_exactly(state_dict):
    bf16 = {k: v.to(torch.bfloat16) for k, v in state_dict.items()}
    params = convert.torch_to_flax(bf16, CFG)
    assert params["src_embed"]["embedding"].dtype == jax.numpy.bfloat16
    back = convert.flax_to_torch(params, CFG)
    for key, value in bf16.items():
        assert back[key].dtype == torch.bfloat16 and torch.equal(back[key], value), key


def test_numpy_weights_are_accepted(state_dict):
    arrays = {k: v.numpy() for k, v in state_dict.items()}
    params = convert.canonical_to_flax(arrays, CFG)
    assert isinstance(params["encoder"]["layers_0"]["ff"]["linear1"]["kernel"], np.ndarray)
