"""CTranslate2 deployment: `twin convert --to ctranslate2` and `parity.ct2` against the twins.

CTranslate2 is the reference here only in the sense that it runs the exported weights: every check compares it
with a twin (torch, float64) on the weights it was converted from. Score and logit tolerances: 1e-4 relative
(`parity.ct2.SCORE_TOLERANCE`: CTranslate2's float32 kernels against float64); greedy tokens identical, or
diverging only at a near tie of the twin's own log-probabilities (`parity.ct2.greedy_agreement`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("ctranslate2")
pytest.importorskip("torch")  # the reference twin

from parity import ct2  # noqa: E402
from parity.config import TransformerConfig  # noqa: E402
from parity.data import load_corpus  # noqa: E402
from parity.formats import FormatError, write_checkpoint  # noqa: E402
from parity.formats.ctranslate2 import (CT2Error, IdVocabulary, build_spec, vocabularies,  # noqa: E402
                                        write_ct2)
from parity.translate import DecodeOptions, Translator  # noqa: E402
from strategies import configs, random_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ROOT / "tests" / "data" / "tiny_run"
ALL_ARCHS = ("seq2seq", "encoder", "decoder")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def export(tmp: Path, cfg: TransformerConfig, weights, quantization: str | None = None) -> ct2.CT2Model:
    """`weights` written with IdVocabulary and opened with one CTranslate2 thread."""
    write_ct2(tmp, cfg, weights, IdVocabulary(cfg), "ids", quantization=quantization)
    return ct2.CT2Model.load(tmp, threads=1)


def f64(weights):
    return {k: np.asarray(v, np.float64) for k, v in weights.items()}


def twin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})


def one_line_error(result: subprocess.CompletedProcess, start: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(start), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- every family and variant

@given(cfg=configs(archs=ALL_ARCHS), seed=st.integers(0, 2**16))
def test_every_family_and_variant_matches_the_twin(tmp_path_factory, cfg, seed):
    """Random float32 models of the three families, with every variant the config space holds (post- and pre-LN,
    final norm or not, relu/gelu/silu, tied, shared and untied embeddings, output bias or not, the three position
    tables, scaled embeddings or not): log-probabilities, logits or hidden states (and class logits) within 1e-4
    of the torch twin in float64, and greedy tokens identical but at near ties."""
    cfg = cfg.replace(max_len=32)
    weights = random_weights(cfg, "float32", seed)
    model = export(tmp_path_factory.mktemp("ct2") / "model", cfg, weights)
    rows = ct2.compare(model, f64(weights), bos_id=1, eos_id=2, seed=seed, batch=6, length=8)
    assert len(rows) == (1 + (cfg.num_classes is not None) if cfg.arch == "encoder" else 2)
    for row in rows:
        assert row.passed, (row, cfg)


def test_compare_uses_either_twin_as_reference(tmp_path):
    """The reference twin is a choice: jax_tx in float64 gives the same verdict as torch_tx."""
    pytest.importorskip("jax")
    import jax

    jax.config.update("jax_enable_x64", True)
    cfg = TransformerConfig(src_vocab_size=13, tgt_vocab_size=13, d_model=16, num_heads=2, num_encoder_layers=2,
                            num_decoder_layers=2, d_ff=32, dropout=0.0, max_len=32, activation="silu")
    weights = random_weights(cfg, "float32", 3)
    model = export(tmp_path / "model", cfg, weights)
    rows = ct2.compare(model, f64(weights), bos_id=1, eos_id=2, twin="jax")
    assert all(r.passed for r in rows) and "vs jax" in rows[0].what


# --------------------------------------------------------------------------- the spec, by hand

def test_spec_of_a_post_ln_model_with_final_norms(tmp_path):
    """tiny_run's layout (post-LN, final norms, as torch.nn.Transformer): the spec is made pre-norm so that
    `{encoder,decoder}.layer_norm` exist, then set post-norm; q/k/v are fused rows q | k | v, cross-attention's k/v
    rows k | v; the position table is the twins' (row 0 at step 0)."""
    from parity.checkpoint import load_model_dir
    from parity.numerics import position_table

    cfg, weights, tokenizer = load_model_dir(TINY_RUN)
    spec = build_spec(cfg, weights, vocabularies(cfg, tokenizer, "tiny_run"),
                      {"unk_id": tokenizer.unk_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id})
    assert spec.encoder.pre_norm is False and spec.decoder.pre_norm is False
    np.testing.assert_array_equal(spec.encoder.layer_norm.gamma, weights["encoder.norm.weight"])
    np.testing.assert_array_equal(spec.decoder.layer_norm.beta, weights["decoder.norm.bias"])
    d = cfg.d_model
    fused = spec.encoder.layer[0].self_attention.linear[0].weight  # [3D, D]
    assert fused.shape == (3 * d, d)
    np.testing.assert_array_equal(fused[d:2 * d], weights["encoder.layers.0.self_attn.k_proj.weight"])
    kv = spec.decoder.layer[0].attention.linear[1].weight  # [2D, D]
    np.testing.assert_array_equal(kv[d:], weights["decoder.layers.0.cross_attn.v_proj.weight"])
    np.testing.assert_array_equal(spec.decoder.position_encodings.encodings,
                                  position_table("paper", cfg.max_len, d).astype(np.float32))
    assert spec.config.decoder_start_token == "<bos>" and spec.config.unk_token == "<unk>"
    assert spec.config.layer_norm_epsilon == cfg.layer_norm_eps


def test_the_final_norms_are_applied(tmp_path):
    """The same tiny_run spec without its final norms (as a post-norm from_config makes it) scores far from the
    twin: CTranslate2 applies the final norms that the pre-norm trick keeps, and they matter."""
    from parity.checkpoint import load_model_dir
    from parity.formats.ctranslate2 import make_converter

    cfg, weights, tokenizer = load_model_dir(TINY_RUN)
    good = export(tmp_path / "good", cfg, weights)
    spec = build_spec(cfg, weights, vocabularies(cfg, IdVocabulary(cfg), "ids"),
                      {"unk_id": 3, "bos_id": 1, "eos_id": 2})
    for stack in (spec.encoder, spec.decoder):
        delattr(stack, "layer_norm")
    make_converter(spec).convert(str(tmp_path / "bad"))
    (tmp_path / "bad" / "twin_config.json").write_text(cfg.to_json())
    bad = ct2.CT2Model.load(tmp_path / "bad", threads=1)
    good_rows = ct2.compare(good, f64(weights), bos_id=1, eos_id=2)
    bad_rows = ct2.compare(bad, f64(weights), bos_id=1, eos_id=2)
    assert good_rows[0].passed and good_rows[0].rel < 1e-5
    assert bad_rows[0].rel > 1e-2


def test_forbidden_ids_are_suppressed_like_the_twins(tmp_path):
    """An output bias pushed towards pad and BOS: CTranslate2 never emits them (suppress_sequences), and its
    greedy tokens are the twin's, EOS included and pad after it."""
    cfg = TransformerConfig(src_vocab_size=13, tgt_vocab_size=13, d_model=16, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=32, dropout=0.0, max_len=32)
    weights = random_weights(cfg, "float32", 11)
    weights["generator.bias"] = weights["generator.bias"].copy()
    weights["generator.bias"][[0, 1]] += 50.0
    weights["generator.bias"][2] += 3.0  # EOS likely at some step
    model = export(tmp_path / "model", cfg, weights)
    src = np.array([[4, 5, 6, 7, 2], [8, 9, 2, 0, 0], [10, 2, 0, 0, 0]])
    ours = ct2.generate(model, src, max_new_tokens=12, bos_id=1, eos_id=2)
    ref = ct2.twin_generate("torch", cfg, f64(weights), src, max_new_tokens=12, bos_id=1, eos_id=2)
    assert ours.shape[1] <= 12
    for a, b in zip(ours, ref):
        a, b = a.tolist(), b.tolist()
        end = a.index(2) + 1 if 2 in a else len(a)
        assert not {0, 1} & set(a[:end]) and set(a[end:]) <= {0}
        assert a[:end] == b[:b.index(2) + 1 if 2 in b else len(b)]


def test_decoding_options_map_onto_ctranslate2(tmp_path):
    """Every argument explicit: max_new_tokens bounds the output (EOS counted), sampling repeats from the seed on a
    freshly loaded model, beam search runs by CTranslate2's rule, and what CTranslate2 cannot do is refused by name."""
    cfg = TransformerConfig(src_vocab_size=13, tgt_vocab_size=13, d_model=16, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=32, dropout=0.0, max_len=32)
    model = export(tmp_path / "model", cfg, random_weights(cfg, "float32", 5))
    src = np.array([[4, 5, 6, 2], [7, 8, 2, 0]])
    kw = dict(bos_id=1, eos_id=2)
    assert ct2.generate(model, src, max_new_tokens=3, **kw).shape[1] <= 3
    sampled = [[ct2.generate(m, src, max_new_tokens=10, temperature=1.0, top_k=5, seed=7, **kw) for _ in range(2)]
               for m in (model, ct2.CT2Model.load(tmp_path / "model", threads=1))]  # a fresh load repeats the calls
    assert all(np.array_equal(a, b) for a, b in zip(*sampled)) and sampled[0][0].shape[1] <= 10
    beams = ct2.generate(model, src, max_new_tokens=10, beam_size=4, **kw)
    assert beams.shape[0] == 2 and not np.isin(beams, [1]).any()
    settings_ = ct2.decoding_kwargs(model, max_new_tokens=10, bos_id=1, eos_id=2, beam_size=1, length_penalty=0.6,
                                    temperature=0.0, top_k=0, top_p=1.0, beam_rule=None, forced_eos=False)
    assert settings_["max_input_length"] == 0 and settings_["min_decoding_length"] == 0
    assert settings_["max_decoding_length"] == 10 and settings_["sampling_topk"] == 1
    assert settings_["suppress_sequences"] == [["<pad>"], ["<bos>"]] and settings_["end_token"] == "<eos>"
    for bad, message in ((dict(beam_size=2, beam_rule="hf"), "beam_rule 'hf'"), (dict(forced_eos=True), "forced_eos"),
                         (dict(bos_id=3), "bos_id 3")):
        with pytest.raises(ValueError, match=message):
            ct2.generate(model, src, max_new_tokens=4, **{**kw, **bad})


@pytest.mark.parametrize("quantization, stored", [(None, "float32"), ("float32", "float32"), ("int8", "int8"),
                                                   ("int8_float32", "int8"), ("int16", "int16"),
                                                   ("float16", "float16"), ("bfloat16", "bfloat16")])
def test_quantized_exports_load_decode_and_are_reported(tmp_path, quantization, stored):
    """Every --quantization writes that weight type (read back from model.bin's headers), loads, decodes, and
    compare() holds float32 to the tolerance and reports the others."""
    from parity.formats.ctranslate2 import stored_weight_type

    cfg = TransformerConfig(src_vocab_size=32, tgt_vocab_size=32, d_model=32, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=64, dropout=0.0, max_len=32)
    weights = random_weights(cfg, "float32", 2)
    model = export(tmp_path / "model", cfg, weights, quantization)
    assert stored_weight_type(tmp_path / "model") == stored
    rows = ct2.compare(model, f64(weights), bos_id=1, eos_id=2)
    assert all(r.passed for r in rows)
    assert all((r.tol == float("inf")) == (stored != "float32") for r in rows), rows


# --------------------------------------------------------------------------- the trained model, end to end

@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "tiny-ct2"
    result = twin("convert", TINY_RUN, out, "--to", "ctranslate2", "--verify")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "2 passed, 0 failed" in result.stdout
    return out


@pytest.fixture(scope="module")
def test_split():
    return load_corpus("builtin").test


def test_tiny_run_translates_its_test_split_identically(tiny_ct2, test_split):
    """The trained tiny_run through CTranslate2 (twin translate's Translator on the converted directory, its
    tokenizer copied along): the torch twin's greedy translation of every test sentence."""
    assert sorted(p.name for p in tiny_ct2.iterdir()) == ["config.json", "model.bin", "shared_vocabulary.json",
                                                          "tokenizer.json", "twin_config.json"]
    sources = [s for s, _ in test_split]
    ours = Translator.load(tiny_ct2).translate(sources)
    ref = Translator.load(TINY_RUN, "torch").translate(sources)
    assert len(sources) >= 500 and ours == ref


@pytest.mark.parametrize("framework, alphas", [("torch", (0.0, 0.6, 1.0)), ("jax", (0.6,))])
def test_beam_search_is_ctranslate2s_in_both_twins(tiny_ct2, test_split, framework, alphas):
    """Beam 4 through CTranslate2 is the twins' beam_rule "ctranslate2": the same translations of 300 test sentences,
    with length penalty 0 (CTranslate2's early exit once the best extension ends), 0.6 and 1."""
    sources = [s for s, _ in test_split[:300]]
    ours, ref = Translator.load(tiny_ct2), Translator.load(TINY_RUN, framework)
    for alpha in alphas:
        assert ours.translate(sources, beam_size=4, length_penalty=alpha) == \
            ref.translate(sources, beam_size=4, length_penalty=alpha, beam_rule="ctranslate2"), alpha


def test_twin_translate_and_eval_on_the_directory(tiny_ct2):
    result = twin("translate", tiny_ct2, "one hundred and five", "twenty two", "--batch-size", "1")
    assert result.returncode == 0 and result.stdout.splitlines() == \
        twin("translate", TINY_RUN, "one hundred and five", "twenty two").stdout.splitlines()
    result = twin("eval", tiny_ct2, "--data", "builtin", "--limit", "50", "--beam", "4")
    assert result.returncode == 0 and "ctranslate2, beam 4" in result.stdout, result.stderr


def test_int8_export_loads_decodes_and_reports_its_agreement(tiny_ct2, tmp_path, test_split):
    """int8 weights: --verify reports (no tolerance claimed), and on the test split BLEU stays within 2 points of
    float32's; the share of identical sentences is printed."""
    out = tmp_path / "int8"
    result = twin("convert", TINY_RUN, out, "--to", "ctranslate2", "--quantization", "int8", "--verify")
    assert result.returncode == 0 and "reported" in result.stdout, result.stderr + result.stdout
    pairs = test_split[:300]
    exact = Translator.load(tiny_ct2).evaluate(pairs)
    int8 = Translator.load(out).evaluate(pairs)
    same = np.mean([a["hyp"] == b["hyp"] for a, b in zip(exact["translations"], int8["translations"])])
    print(f"int8 vs float32 on {len(pairs)} sentences: {same:.1%} identical, BLEU {int8['bleu']:.2f} vs "
          f"{exact['bleu']:.2f}")
    assert int8["bleu"] > exact["bleu"] - 2.0


# --------------------------------------------------------------------------- Hugging Face Marian, deployed

def test_an_imported_opus_mt_model_deploys(tmp_path):
    """An opus-mt-like directory (MarianTokenizer, decoder start = pad) converts straight to CTranslate2: the same
    greedy translations as the torch twin reading the directory (which equal transformers' own, tests/
    test_hf_translate.py), beam 4 as the twin's beam_rule "ctranslate2", and the same greedy tokens as
    CTranslate2's own TransformersConverter."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from hf_fixtures import save_marian_dir

    opus = save_marian_dir(tmp_path / "opus-mt", seed=4)
    out = tmp_path / "opus-ct2"
    result = twin("convert", opus, out, "--to", "ctranslate2", "--verify")
    assert result.returncode == 0 and "0 failed" in result.stdout, result.stderr + result.stdout
    texts = [s for s, _ in load_corpus("builtin").test[:16]]
    options = DecodeOptions(max_new_tokens=12)
    ours = Translator.load(out)
    ref = Translator.load(opus, "torch")
    sources = ours.encode(texts)
    ids = ours.generate_ids(sources, options)
    assert [r.tolist() for r in ids] == [r.tolist() for r in ref.generate_ids(sources, options)]
    beams = DecodeOptions(max_new_tokens=12, beam_size=4, length_penalty=1.0)
    assert [r.tolist() for r in ours.generate_ids(sources, beams)] == \
        [r.tolist() for r in ref.generate_ids(sources, DecodeOptions(**{**beams.__dict__, "beam_rule": "ctranslate2"}))]
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    theirs_dir = TransformersConverter(str(opus)).convert(str(tmp_path / "their-ct2"))
    theirs = ctranslate2.Translator(theirs_dir, intra_threads=1)
    tokens = [ours.tokenizer.token_strings(s) for s in sources]
    results = theirs.translate_batch(tokens, beam_size=1, max_decoding_length=12, min_decoding_length=0,
                                     max_input_length=0, return_end_token=True)
    for row, result in zip(ids, results):
        assert ours.tokenizer.token_strings(row[row != ours.tokenizer.pad_id]) == result.hypotheses[0]


# --------------------------------------------------------------------------- bad input

def test_a_config_ctranslate2_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    cfg = TransformerConfig(src_vocab_size=8, tgt_vocab_size=8, d_model=2 * 40000, num_heads=40000)
    with pytest.raises(FormatError, match=r"out: num_heads 40000: a CTranslate2 spec stores num_heads as int16"):
        write_checkpoint(tmp_path / "out", "ctranslate2", cfg, {})
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_needs_force(tiny_ct2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_line_error(twin("convert", TINY_RUN, out, "--to", "ctranslate2"), "twin convert: error: ")
    assert line.endswith(f"{out}: exists (pass --force to replace it)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_a_tokenizer_without_unk_is_refused(tmp_path):
    """A run whose tokenizer (a PreTrainedTokenizerFast) has no unknown token: CTranslate2 would append one at load
    time and shift the vocabulary off the weights, so the export is refused, naming the tokenizer."""
    pytest.importorskip("transformers")
    from parity.hf_tokenizer import save_fast_tokenizer
    from parity.tokenizer import Tokenizer

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(TINY_RUN / name, run / name)
    save_fast_tokenizer(Tokenizer.load(TINY_RUN / "tokenizer.json"), run)
    config = json.loads((run / "tokenizer_config.json").read_text())
    del config["unk_token"]
    (run / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = one_line_error(twin("convert", run, out, "--to", "ctranslate2"), "twin convert: error: ")
    assert f"{run}: the tokenizer has no unknown token" in line and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_checkpoint_without_a_tokenizer_is_refused(tmp_path):
    out = tmp_path / "out"
    line = one_line_error(twin("convert", TINY_RUN / "model.safetensors", out, "--to", "ctranslate2"),
                          "twin convert: error: ")
    assert "--to ctranslate2 needs the model's tokenizer" in line and list(tmp_path.iterdir()) == []


def test_duplicate_token_strings_are_refused():
    cfg = TransformerConfig(src_vocab_size=6, tgt_vocab_size=6, d_model=8, num_heads=2)

    class Duplicates(IdVocabulary):
        def tokens(self, *, target=False):
            return ["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"]

    with pytest.raises(CT2Error, match="token 'a' has ids 4 and 5"):
        vocabularies(cfg, Duplicates(cfg), "dup")


def test_options_that_do_not_apply_are_one_line(tiny_ct2, tmp_path):
    cases = [
        (("convert", TINY_RUN, tmp_path / "a", "--to", "ctranslate2", "--dtype", "float16"),
         "--dtype does not apply to --to ctranslate2"),
        (("convert", TINY_RUN, tmp_path / "b", "--to", "safetensors", "--quantization", "int8"),
         "--quantization is for --to ctranslate2"),
        (("convert", tiny_ct2, tmp_path / "c", "--to", "safetensors"),
         "is a CTranslate2 model, which twin convert writes but does not read"),
        (("translate", tiny_ct2, "one", "--beam", "2", "--beam-rule", "hf"), "beam_rule 'hf'"),
        (("translate", tiny_ct2, "one", "--forced-eos"), "forced_eos"),
        (("translate", tiny_ct2, "one", "--framework", "torch"), "a CTranslate2 model runs in CTranslate2"),
        (("translate", tiny_ct2, "one", "--plot-attention", tmp_path / "a.png"), "--plot-attention needs"),
    ]
    for args, message in cases:
        line = one_line_error(twin(*args), f"twin {args[0]}: ")
        assert message in line, line
    assert list(tmp_path.iterdir()) == []
