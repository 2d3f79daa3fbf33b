"""Hugging Face Marian in and out: transformers' MarianMTModel is the reference, both twins run on the weights
converted from it in the same process (float64 <= 1e-10, float32 <= 1e-5 relative: memory, logits, every
parameter's gradient), round trips are bit-exact, and what the twins cannot express is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import jax_tx  # noqa: E402
import torch_tx  # noqa: E402
from hf_fixtures import marian_config, marian_model  # noqa: E402
from parity import convert  # noqa: E402
from parity.formats import hf_marian  # noqa: E402
from parity.formats.hf_dir import read_hf_dir  # noqa: E402
from parity.hf_reference import compare_reference, reference_inputs  # noqa: E402

LAYOUTS = {"shared+tied": dict(share_encoder_decoder_embeddings=True, tie_word_embeddings=True),
           "separate+tied": dict(share_encoder_decoder_embeddings=False, tie_word_embeddings=True, decoder_vocab_size=67),
           "untied": dict(share_encoder_decoder_embeddings=True, tie_word_embeddings=False)}


def _assert_all_pass(rows) -> None:
    failed = [r for r in rows if not r.passed]
    assert rows and not failed, "\n".join(f"{r.what} {r.dtype}: max abs {r.max_abs:.3e}, rel {r.rel:.3e} > {r.tol:.0e}"
                                          for r in failed)


@settings(max_examples=6)
@given(activation=st.sampled_from(["swish", "gelu", "relu"]), layout=st.sampled_from(sorted(LAYOUTS)),
       scale=st.booleans(), seed=st.integers(0, 2**16), lengths=st.sampled_from([(5, 4), (7, 6)]))
def test_both_twins_compute_what_transformers_marian_computes(activation, layout, scale, seed, lengths):
    model = marian_model(seed, activation_function=activation, scale_embedding=scale, **LAYOUTS[layout])
    cfg, weights = convert.from_hf_marian(model)
    assert cfg.positions == "marian" and cfg.final_norm is False and cfg.scale_embedding is scale
    inputs = reference_inputs(cfg, model.config.decoder_start_token_id, 3, *lengths, np.random.default_rng(seed))
    rows = compare_reference(model, cfg, weights, inputs, "float32", "marian")
    rows += compare_reference(model, cfg, weights, inputs, "float64", "marian")  # exact upcast of the same weights
    assert len(rows) == 12
    _assert_all_pass(rows)


def test_called_as_transformers_users_call_it_with_labels():
    """model(input_ids, attention_mask, labels): transformers shifts the labels right behind decoder_start (= pad),
    with no decoder mask; the twins on the same ids (their first decoder position is never padding) give the same
    logits at every label position, float64."""
    model = marian_model(3).double()
    cfg, weights = convert.from_hf_marian(model)
    pad = cfg.pad_id
    src = torch.tensor([[5, 6, 7, 0], [8, 9, 0, pad]])
    labels = torch.tensor([[11, 12, 13, 0], [14, 0, -100, -100]])
    with torch.no_grad():
        ref = model(input_ids=src, attention_mask=(src != pad).long(), labels=labels).logits.numpy()
    tgt = torch.cat([torch.full((2, 1), pad), labels[:, :-1].clamp(min=0).masked_fill(labels[:, :-1] < 0, pad)], 1)
    tm = torch_tx.Transformer(cfg.without_dropout()).double().eval()
    tm.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in weights.items()})
    with torch.no_grad():
        got_torch = tm(src, tgt).numpy()
    fm = jax_tx.Transformer(cfg.without_dropout())
    params = convert.torch_to_flax({k: np.asarray(v, np.float64) for k, v in weights.items()}, cfg)
    got_jax = np.asarray(fm.apply({"params": params}, src.numpy(), tgt.numpy(), deterministic=True))
    keep = (labels != -100).numpy()  # [B, T]: the positions transformers' loss reads
    scale = np.abs(ref[keep]).max()
    for got in (got_torch, got_jax):
        np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-10, atol=1e-10 * scale)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_to_torch_to_flax_to_hf_is_bit_exact(dtype, layout):
    model = marian_model(1, **LAYOUTS[layout]).to(getattr(torch, dtype))
    cfg, weights = convert.from_hf_marian(model)
    tm = torch_tx.Transformer(cfg).to(getattr(torch, dtype))
    tm.load_state_dict({k: convert.to_torch(v) for k, v in weights.items()}, strict=True)
    params = convert.torch_to_flax(tm.state_dict(), cfg)
    back = {k: convert.to_numpy(v) for k, v in convert.flax_to_torch(params, cfg).items()}
    marian_cfg, hf_sd = convert.to_hf_marian(back, cfg)
    saved = {k: v for k, v in model.state_dict().items() if k not in hf_marian.POSITION_KEYS}
    assert set(hf_sd) <= set(saved)
    for key, value in hf_sd.items():
        ref = saved[key].view(torch.int16 if value.itemsize == 2 else torch.uint8).numpy()
        assert np.array_equal(np.ascontiguousarray(value).view(ref.dtype), ref), key
    reloaded = transformers.MarianMTModel(marian_cfg).to(getattr(torch, dtype))
    missing, unexpected = reloaded.load_state_dict({k: convert.to_torch(v) for k, v in hf_sd.items()}, strict=False)
    assert not unexpected and set(missing) <= set(model.state_dict()) - set(hf_sd)  # tied copies, position tables
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_a_saved_directory_reads_like_the_model(tmp_path):
    model = marian_model(2)
    model.save_pretrained(tmp_path)
    loaded = read_hf_dir(tmp_path)
    cfg, weights = convert.from_hf_marian(model)
    assert loaded.cfg == cfg and loaded.container == "hf-marian" and set(loaded.weights) == set(weights)
    for k in weights:
        assert np.array_equal(loaded.weights[k], weights[k]), k


def _dir(tmp_path, **overrides):
    model = marian_model(0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "bart"}, "model_type 'bart' is not supported: twin reads Hugging Face marian, fsmt"),
    ({"model_type": "t5"}, "model_type 't5' is not supported"),
    ({"activation_function": "gelu_new"}, "activation_function 'gelu_new' cannot be expressed"),
    ({"decoder_attention_heads": 4}, "encoder_attention_heads (2) != decoder_attention_heads (4)"),
    ({"decoder_ffn_dim": 64}, "encoder_ffn_dim (32) != decoder_ffn_dim (64)"),
    ({"encoder_layerdrop": 0.1}, "encoder_layerdrop = 0.1: the twins have no layerdrop"),
    ({"pad_token_id": 10**6}, "pad_id (1000000) must be a valid id"),
])
def test_a_config_the_twins_cannot_express_is_refused_by_field(tmp_path, overrides, message):
    from parity.formats import FormatError

    with pytest.raises(FormatError) as info:
        read_hf_dir(_dir(tmp_path, **overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_shape_or_key_mismatch_names_the_hf_key():
    model = marian_model(0)
    hf = model.config.to_dict()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    bad = dict(sd, **{"model.encoder.layers.1.fc1.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"model\.encoder\.layers\.1\.fc1\.weight"):
        hf_marian.from_marian_state_dict(bad, hf)
    with pytest.raises(ValueError, match=r"missing key model\.decoder\.layers\.0\.encoder_attn\.k_proj\.bias"):
        hf_marian.from_marian_state_dict({k: v for k, v in sd.items()
                                          if k != "model.decoder.layers.0.encoder_attn.k_proj.bias"}, hf)
    with pytest.raises(ValueError, match=r"unexpected key model\.decoder\.layers\.9\.fc1\.weight"):
        hf_marian.from_marian_state_dict(dict(sd, **{"model.decoder.layers.9.fc1.weight": sd["lm_head.weight"]}), hf)
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to model\.shared\.weight by the config"):
        hf_marian.from_marian_state_dict(dict(sd, **{"lm_head.weight": sd["lm_head.weight"] + 1}), hf)
    with pytest.raises(ValueError, match=r"model\.encoder\.embed_positions\.weight is not Marian's sinusoidal table"):
        hf_marian.from_marian_state_dict(dict(sd, **{"model.encoder.embed_positions.weight":
                                                     sd["model.encoder.embed_positions.weight"] * 2}), hf)


@pytest.mark.parametrize("change, field", [(dict(norm_first=True), "norm_first is true"),
                                           (dict(final_norm=True), "final_norm is true"),
                                           (dict(positions="paper"), "positions is 'paper'"),
                                           (dict(layer_norm_eps=1e-6), "layer_norm_eps is 1e-06")])
def test_export_refuses_what_marian_cannot_express(change, field):
    model = marian_model(0)
    cfg, weights = convert.from_hf_marian(model)
    with pytest.raises(ValueError) as info:
        convert.to_hf_marian(weights, cfg.replace(**change))
    assert field in str(info.value) and "train with --config marian" in str(info.value)


def test_the_fixture_is_what_opus_mt_configs_say():
    cfg = marian_config()
    assert cfg.activation_function == "swish" and cfg.scale_embedding and cfg.pad_token_id == cfg.vocab_size - 1


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), bias=st.sampled_from([None, "pad", "eos"]), beam=st.sampled_from([2, 4]),
       length_penalty=st.sampled_from([1.0, 0.6, 0.0]))
def test_greedy_and_beam_tokens_equal_transformers_generate(seed, bias, beam, length_penalty):
    """generate(num_beams=1 and K) with the checkpoint's generation config (bad_words_ids [[pad]], forced EOS at
    the last step, length_penalty) against both twins' greedy and beam search (beam_rule "hf", forced_eos);
    with a bias the logits favour pad, which neither may emit, or EOS, so that hypotheses finish at many
    lengths and the stopping rule decides."""
    from parity.hf_reference import compare_generate

    model = marian_model(seed)
    model.generation_config.length_penalty = length_penalty
    if bias is not None:
        with torch.no_grad():
            row = model.config.pad_token_id if bias == "pad" else model.config.eos_token_id
            model.final_logits_bias[0, row] += 50.0 if bias == "pad" else 1.5
    cfg, weights = convert.from_hf_marian(model)
    rng = np.random.default_rng(seed)
    inputs = reference_inputs(cfg, model.config.decoder_start_token_id, 4, 7, 2, rng)
    ids = {"pad_id": cfg.pad_id, "eos_id": 0, "decoder_start_id": model.config.decoder_start_token_id}
    rows = compare_generate(model, cfg, weights, inputs.src, inputs.src_mask, ids, 12, "marian", beams=(1, beam))
    assert len(rows) == 4
    _assert_all_pass(rows)
