"""TransformerConfig: validation with clear errors, JSON round trip, variants by replace."""

from __future__ import annotations

import dataclasses

import pytest

from parity.config import TransformerConfig


def test_defaults_are_the_paper_base_model():
    cfg = TransformerConfig(src_vocab_size=100, tgt_vocab_size=200)
    assert (cfg.d_model, cfg.num_heads, cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.d_ff, cfg.dropout) == \
        (512, 8, 6, 6, 2048, 0.1)
    assert cfg.head_dim == 64 and cfg.activation == "relu" and not cfg.norm_first and cfg.pad_id == 0


def test_frozen_and_replace():
    cfg = TransformerConfig(10, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8  # type: ignore[misc]
    small = cfg.replace(d_model=64, num_heads=4)
    assert small.d_model == 64 and cfg.d_model == 512


def test_json_round_trip():
    cfg = TransformerConfig(10, 12, d_model=16, num_heads=2, activation="gelu", norm_first=True, tie_output=True)
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=10, num_heads=3), "divisible by num_heads"),
    (dict(activation="swish"), "activation must be one of"),
    (dict(d_model=0), "d_model must be positive"),
    (dict(num_heads=-1), "num_heads must be positive"),
    (dict(d_ff=0), "d_ff must be positive"),
    (dict(num_encoder_layers=0), "num_encoder_layers must be at least 1"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps must be positive"),
    (dict(pad_id=10), "pad_id"),
    (dict(max_len=0), "max_len must be positive"),
    (dict(d_model=6.0), "d_model must be an int"),
    (dict(norm_first="yes"), "norm_first must be a bool"),
    (dict(share_embeddings=True, tgt_vocab_size=11), "share_embeddings needs"),
    (dict(d_model=9, num_heads=1), "even"),
])
def test_invalid_configs_raise_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{"src_vocab_size": 10, "tgt_vocab_size": 10, **changes})


def test_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        TransformerConfig.from_dict({"src_vocab_size": 3, "tgt_vocab_size": 3, "colour": "red"})
    with pytest.raises(ValueError, match="missing config keys: tgt_vocab_size"):
        TransformerConfig.from_dict({"src_vocab_size": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        TransformerConfig.from_json("{nope")
