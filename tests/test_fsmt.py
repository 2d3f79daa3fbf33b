"""Hugging Face FSMT (fairseq's WMT19 lineage) into both twins: transformers' FSMTForConditionalGeneration is
the reference, in the same process (float64 <= 1e-10, float32 <= 1e-5 relative at the real positions: memory,
logits, every parameter's gradient), and the stored fairseq position tables equal the twins' own bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from hf_fixtures import fsmt_model  # noqa: E402
from parity.formats import fsmt  # noqa: E402
from parity.formats.hf_dir import read_hf_dir  # noqa: E402
from parity.hf_reference import compare_reference, reference_inputs  # noqa: E402


@settings(max_examples=4)
@given(activation=st.sampled_from(["relu", "gelu"]), tie=st.booleans(), scale=st.booleans(),
       seed=st.integers(0, 2**16))
def test_both_twins_compute_what_transformers_fsmt_computes(activation, tie, scale, seed):
    vocab = dict(src_vocab_size=41, tgt_vocab_size=41) if tie else {}
    model = fsmt_model(seed, activation_function=activation, tie_word_embeddings=tie, scale_embedding=scale, **vocab)
    cfg, weights = fsmt.from_hf_fsmt(model)
    assert cfg.positions == "fairseq" and cfg.output_bias is False and cfg.share_embeddings is tie
    inputs = reference_inputs(cfg, model.config.decoder_start_token_id, 3, 6, 5, np.random.default_rng(seed))
    rows = compare_reference(model, cfg, weights, inputs, "float32", "fsmt")
    rows += compare_reference(model, cfg, weights, inputs, "float64", "fsmt")
    failed = [r for r in rows if not r.passed]
    assert len(rows) == 12 and not failed, "\n".join(f"{r.what} {r.dtype}: rel {r.rel:.3e} > {r.tol:.0e}" for r in failed)


def test_a_saved_directory_reads_like_the_model(tmp_path):
    model = fsmt_model(5)
    model.save_pretrained(tmp_path)
    loaded = read_hf_dir(tmp_path)
    cfg, weights = fsmt.from_hf_fsmt(model)
    assert loaded.cfg == cfg and loaded.container == "fsmt"
    assert all(np.array_equal(loaded.weights[k], weights[k]) for k in weights)


def test_a_position_table_that_is_not_fairseqs_is_refused(tmp_path):
    model = fsmt_model(0)
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    sd["model.decoder.embed_positions.weight"][5, 0] += 1e-3
    with pytest.raises(ValueError, match=r"model\.decoder\.embed_positions\.weight is not fairseq's sinusoidal table"):
        fsmt.from_state_dict(sd, model.config.to_dict())


def test_differing_encoder_and_decoder_sizes_are_refused_by_field(tmp_path):
    from parity.formats import FormatError

    model = fsmt_model(0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder_ffn_dim"] = 2 * config["encoder_ffn_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="encoder_ffn_dim .* != decoder_ffn_dim"):
        read_hf_dir(tmp_path)


def test_greedy_and_beam_tokens_equal_transformers_generate():
    from parity.hf_reference import compare_generate

    model = fsmt_model(7)
    cfg, weights = fsmt.from_hf_fsmt(model)
    inputs = reference_inputs(cfg, 2, 4, 7, 2, np.random.default_rng(7))
    rows = compare_generate(model, cfg, weights, inputs.src, inputs.src_mask, fsmt.special_ids(model.config.to_dict()),
                            12, "fsmt")
    assert len(rows) == 4 and all(r.passed for r in rows), rows
