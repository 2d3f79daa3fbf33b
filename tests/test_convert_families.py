"""`twin convert` for EncoderOnly and DecoderOnly checkpoints: bit-exact round trips through every format,
--verify per target, the config's arch and num_classes carried by every format that carries a config,
and hostile input specific to the archs (one clear line naming the offending key, nothing written).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from parity import formats
from parity.cli import main
from parity.config import TransformerConfig
from parity.names import aliases
from parity.suite import np_dtype
from parity.convert import build_nn_encoder, canonical_to_flax, rename_to_flax
from strategies import random_weights
from test_convert_cli import assert_bit_exact
from test_convert_hostile import case, refused  # noqa: F401  (case is a fixture)

BASE = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=2,
                         num_decoder_layers=2, d_ff=16, max_len=16, dropout=0.0, tie_output=True)
FAMILIES = {"encoder": BASE.for_arch("encoder", 3), "encoder-no-head": BASE.for_arch("encoder"),
            "decoder": BASE.for_arch("decoder")}
# (--to, DST name): each step reads the previous step's DST; nn-transformer only for the encoders
CHAIN = (("torch", "torch_dir"), ("flax", "orbax"), ("flax", "model.msgpack"), ("nn-transformer", "nn.pt"),
         ("safetensors", "back.safetensors"))
CARRIES_NO_CONFIG = (".pt", ".msgpack")


def weights(cfg: TransformerConfig, dtype: str) -> dict[str, np.ndarray]:
    """`random_weights` at std 0.3: at std 1 attention saturates and float32 gradients of two-layer models
    miss the 1e-5 of --verify (float64 still agrees), which is the weights' conditioning, not a conversion."""
    drawn = random_weights(cfg, "float64")
    out = {k: (v * 0.3).astype(np_dtype(dtype)) for k, v in drawn.items() if k not in aliases(cfg)}
    return {k: out[aliases(cfg).get(k, k)] for k in drawn}


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_format_round_trips_bit_exactly_and_keeps_the_arch(tmp_path, capsys, family, dtype):
    cfg = FAMILIES[family]
    want = weights(cfg, dtype)
    config = tmp_path / "config.json"
    config.write_text(cfg.to_json())
    src = formats.write_checkpoint(tmp_path / "start.safetensors", "safetensors", cfg, want)
    verify = dtype == "float32" and family != "encoder-no-head"  # each target verified for each arch
    for to, name in CHAIN:
        if to == "nn-transformer" and cfg.arch == "decoder":
            continue
        dst = tmp_path / name
        args = ["--config", config] if src.suffix in CARRIES_NO_CONFIG else []
        assert convert(src, dst, "--to", to, *args, *["--verify"] * verify) == 0
        out = capsys.readouterr().out
        assert f"{cfg.arch}{f' ({cfg.num_classes} classes)' if cfg.num_classes else ''}, " in out
        if verify:
            assert f"{to} reload bit-exact" in out and " 0 failed" in out and f"{cfg.arch} d=8" in out
            direction = "jax->torch" if to == "flax" else "torch->jax"
            assert all(f"{direction} {output}" in out for output in
                       {"encoder": ("hidden", "class_logits"), "decoder": ("logits",)}[cfg.arch])
        own_config = dst.suffix not in CARRIES_NO_CONFIG
        loaded = formats.read_checkpoint(dst, config=None if own_config else config)
        assert loaded.cfg == cfg  # arch and num_classes survive
        if own_config:
            assert loaded.config_source != str(config)  # the file's own
        assert_bit_exact(loaded.weights, want)
        src = dst


def test_an_encoder_as_nn_transformer_is_an_nn_transformer_encoder_state_dict(tmp_path):
    cfg = FAMILIES["encoder"]
    want = weights(cfg, "float64")
    formats.write_checkpoint(tmp_path / "nn.pt", "nn-transformer", cfg, want)
    state_dict = torch.load(tmp_path / "nn.pt", weights_only=True)
    beside = {"src_embed.weight", "pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"}
    module = build_nn_encoder(cfg).double()
    module.load_state_dict({k: v for k, v in state_dict.items() if k not in beside}, strict=True)
    assert set(state_dict) - set(module.state_dict()) == beside
    assert np.array_equal(module.layers[1].self_attn.in_proj_weight.detach().numpy(),
                          np.concatenate([want[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    loaded = formats.read_checkpoint(tmp_path / "nn.pt", config=cfg)
    assert loaded.names == "nn-transformer"
    assert_bit_exact(loaded.weights, want)


def test_a_decoder_has_no_nn_transformer_target(case, capsys):  # noqa: F811
    src, out = case
    path = formats.write_checkpoint(src / "dec.safetensors", "safetensors", FAMILIES["decoder"],
                                    weights(FAMILIES["decoder"], "float32"))
    line = refused(capsys, path, out, to="nn-transformer", dst_name="nn.pt")
    assert f"{out / 'nn.pt'}: --to nn-transformer needs arch 'seq2seq' (nn.Transformer) or 'encoder'" in line
    assert "no torch.nn counterpart" in line


def save(path: Path, cfg: TransformerConfig, arrays: dict[str, np.ndarray]) -> Path:
    """Weights in safetensors with `cfg` in its metadata."""
    save_file(arrays, path, metadata={"config": cfg.to_json()})
    return path


@pytest.mark.parametrize("flax", [False, True], ids=["safetensors", "msgpack"])
def test_a_decoder_checkpoint_with_cross_attention(case, capsys, flax):  # noqa: F811
    """The decoder half of a seq2seq checkpoint, labelled arch 'decoder'."""
    src, out = case
    decoder = FAMILIES["decoder"].replace(tie_output=False)
    arrays = {k: v for k, v in weights(BASE.replace(tie_output=False), "float32").items()
              if not k.startswith(("encoder.", "src_embed."))}
    if flax:
        formats._save_msgpack(src / "m.msgpack", {"params": rename_to_flax(arrays)})
        (src / "config.json").write_text(decoder.to_json())
        path = src / "m.msgpack"
    else:
        path = save(src / "m.safetensors", decoder, arrays)
    line = refused(capsys, path, out)
    key = "decoder/layers_0/cross_attn/k_proj/bias" if flax else "decoder.layers.0.cross_attn.k_proj.bias"
    assert f"unexpected key(s) '{key}'" in line
    assert "arch 'decoder' has no cross-attention" in line


@pytest.mark.parametrize("flax", [False, True], ids=["safetensors", "msgpack"])
def test_an_encoder_whose_classifier_disagrees_with_num_classes(case, capsys, flax):  # noqa: F811
    src, out = case
    arrays = weights(FAMILIES["encoder"], "float32")
    wrong = FAMILIES["encoder"].replace(num_classes=5)
    if flax:
        path = src / "m.msgpack"
        formats._save_msgpack(path, {"params": canonical_to_flax(arrays, FAMILIES["encoder"])})
        (src / "config.json").write_text(wrong.to_json())
        key, shape = "classifier/kernel", "(8, 3)"
    else:
        path, key, shape = save(src / "m.safetensors", wrong, arrays), "classifier.weight", "(3, 8)"
    line = refused(capsys, path, out)
    assert f"the config's num_classes is 5 but {key!r} has shape {shape} (3 entries)" in line


@pytest.mark.parametrize("weights_arch,config_arch,named", [
    ("seq2seq", "encoder", "unexpected key(s) 'decoder.layers.0.cross_attn.k_proj.bias'"),
    ("encoder", "decoder", "missing key(s) 'decoder.layers.0.ff.linear1.bias'"),
    ("decoder", "seq2seq", "missing key(s) 'decoder.layers.0.cross_attn.k_proj.bias'"),
])
def test_a_config_whose_arch_does_not_match_the_weights(case, capsys, weights_arch, config_arch, named):  # noqa: F811
    src, out = case
    cfg = {"seq2seq": BASE, "encoder": FAMILIES["encoder-no-head"], "decoder": FAMILIES["decoder"]}
    path = save(src / "m.safetensors", cfg[config_arch], weights(cfg[weights_arch], "float32"))
    line = refused(capsys, path, out)
    assert named in line
    assert f"(the config's arch is {config_arch!r}; the weights look like arch {weights_arch!r})" in line


def test_a_classification_head_without_num_classes(case, capsys):  # noqa: F811
    src, out = case
    path = save(src / "m.safetensors", FAMILIES["encoder-no-head"], weights(FAMILIES["encoder"], "float32"))
    line = refused(capsys, path, out)
    assert "unexpected key(s) 'classifier.bias', 'classifier.weight', 'pooler.bias', 'pooler.weight'" in line
    assert "the config needs num_classes" in line


def test_an_encoder_in_nn_transformer_names_is_refused_by_key(case, capsys):  # noqa: F811
    """nn.Transformer's `encoder.`-prefixed names are not nn.TransformerEncoder's own."""
    src, out = case
    cfg = FAMILIES["encoder-no-head"]
    module = build_nn_encoder(cfg)
    sd = {f"encoder.{k}": v for k, v in module.state_dict().items()}
    torch.save({**sd, "src_embed.weight": torch.zeros(11, 8)}, src / "nn.pt")
    (src / "config.json").write_text(cfg.to_json())
    line = refused(capsys, src / "nn.pt", out)
    assert "unexpected nn.TransformerEncoder key(s) 'encoder.layers.0." in line
