"""Hugging Face directories through the user commands: `twin translate` / `twin eval` on an opus-mt-like directory
(MarianTokenizer, the decoder starting from pad) give transformers' own greedy tokens in both frameworks;
`twin train --init-from HF_DIR` fine-tunes it in JAX, and its run translates as the model it exports with
`--to hf-marian` does in transformers; beam search with --beam-rule hf --forced-eos is transformers' own
`generate(num_beams=4)` under the directory's generation config."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from hf_fixtures import marian_model, marian_vocab_size, save_marian_dir  # noqa: E402
from parity import cli  # noqa: E402
from parity.data import load_corpus  # noqa: E402
from parity.hf_tokenizer import HFTokenizer  # noqa: E402
from parity.translate import DecodeOptions, Translator  # noqa: E402

STEPS = 9  # new tokens per sentence
SENTENCES = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def texts():
    return [source for source, _ in load_corpus("builtin").test[:SENTENCES]]


@pytest.fixture(scope="module")
def opus_dir(tmp_path_factory):
    model = marian_model(5, vocab_size=marian_vocab_size())
    with torch.no_grad():  # eos early in some rows, so that both the stop rule and the pad after it are checked
        model.final_logits_bias[0, model.config.eos_token_id] = 2.9  # 5 of the 12 rows stop at once
    return save_marian_dir(tmp_path_factory.mktemp("opus-mt"), model=model)


def hf_greedy(directory, texts: list[str], steps: int = STEPS, beams: int = 1, forced: bool = False) -> list[list[int]]:
    """transformers' greedy (or beam) ids of each text (what follows the decoder start, up to and with the first
    eos), from the directory's own MarianMTModel, MarianTokenizer and generation_config.json (its forced EOS
    only with `forced`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(directory), local_files_only=True).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, num_beams=beams, do_sample=False,
                             **({} if forced else {"forced_eos_token_id": None}))
    assert (out[:, 0] == model.config.decoder_start_token_id).all()
    return [_until_eos(row[1:].tolist(), model.config.eos_token_id) for row in out]


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def twin_greedy(directory, texts: list[str], framework: str, steps: int = STEPS, **options) -> list[list[int]]:
    translator = Translator.load(directory, framework)
    rows = translator.generate_ids(translator.encode(texts), DecodeOptions(max_new_tokens=steps, **options),
                                   batch_size=5)
    return [_until_eos(row.tolist(), translator.tokenizer.eos_id) for row in rows]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_translate_on_an_opus_mt_directory_gives_transformers_greedy_tokens(opus_dir, texts, framework):
    expected = hf_greedy(opus_dir, texts)
    got = twin_greedy(opus_dir, texts, framework)
    assert got == expected
    eos = HFTokenizer.load(opus_dir).eos_id
    assert 0 < sum(row[-1] == eos for row in expected) < len(expected)  # some rows stop early, some run on
    translator = Translator.load(opus_dir, framework)
    assert isinstance(translator.tokenizer, HFTokenizer) and translator.tokenizer.bos_id == translator.cfg.pad_id
    assert translator.translate(texts, max_new_tokens=STEPS) == [translator.tokenizer.decode(r) for r in expected]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_beam_search_with_the_hf_rule_gives_transformers_beam_tokens(opus_dir, texts, framework):
    """generate(num_beams=4) with opus-mt's generation config (forced EOS, length_penalty 1.0, bad_words_ids)
    against Translator with beam_rule "hf" and forced_eos: the same tokens, every row ending in EOS."""
    expected = hf_greedy(opus_dir, texts, beams=4, forced=True)
    got = twin_greedy(opus_dir, texts, framework, beam_size=4, beam_rule="hf", forced_eos=True, length_penalty=1.0)
    assert got == expected
    assert all(row[-1] == 0 for row in expected)
    assert got != twin_greedy(opus_dir, texts, framework, beam_size=4, forced_eos=True)  # the twin rule differs


def test_twin_translate_and_eval_commands_read_the_directory(opus_dir, texts, tmp_path, capsys):
    assert cli.main(["translate", str(opus_dir), *texts[:3], "--max-new-tokens", str(STEPS)]) == 0
    tokenizer = HFTokenizer.load(opus_dir)
    assert capsys.readouterr().out.splitlines() == [tokenizer.decode(r) for r in hf_greedy(opus_dir, texts[:3])]
    assert cli.main(["translate", str(opus_dir), *texts[:3], "--max-new-tokens", str(STEPS), "--beam", "4",
                     "--beam-rule", "hf", "--forced-eos", "--length-penalty", "1", "--framework", "jax"]) == 0
    assert capsys.readouterr().out.splitlines() == [tokenizer.decode(r) for r in
                                                    hf_greedy(opus_dir, texts[:3], beams=4, forced=True)]
    assert cli.main(["translate", str(opus_dir), *texts[:3], "--max-new-tokens", str(STEPS), "--hf-generation"]) == 0
    assert capsys.readouterr().out.splitlines() == [tokenizer.decode(r) for r in  # num_beams 4 in the file
                                                    hf_greedy(opus_dir, texts[:3], beams=4, forced=True)]
    report = tmp_path / "eval.json"
    assert cli.main(["eval", str(opus_dir), "--data", "builtin", "--limit", "6", "--framework", "jax", "--json",
                     str(report)]) == 0
    record = json.loads(report.read_text())
    assert record["sentences"] == 6 and 0 <= record["bleu"] <= 100 and record["framework"] == "jax"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    capsys.readouterr()
    assert cli.main(["eval", str(bare), "--hf-generation"]) == 1
    assert capsys.readouterr().err == (f"twin eval: {bare / 'generation_config.json'}: no such file (--hf-generation "
                                       "reads the decoding settings of a Hugging Face directory, or of a run "
                                       "converted or fine-tuned from one)\n")
    (bare / "generation_config.json").write_text('{"early_stopping": true, "num_beams": 4}')
    assert cli.main(["translate", str(bare), "x", "--hf-generation"]) == 1
    assert "generation_config.json: early_stopping True" in capsys.readouterr().err


def test_fine_tune_in_jax_from_hf_dir_then_export_translates_as_transformers_does(opus_dir, texts, tmp_path):
    """--init-from HF_DIR keeps the MarianTokenizer and the Marian layout, 20 JAX steps move the weights, and the
    run exported --to hf-marian decodes in transformers exactly as the run decodes in both twins."""
    run, exported = tmp_path / "run", tmp_path / "exported"
    assert cli.main(["train", "--framework", "jax", "--init-from", str(opus_dir), "--out", str(run), "--steps", "20",
                     "--limit", "400", "--max-tokens", "256", "--test-limit", "0", "--no-progress", "--show",
                     "0"]) == 0
    for name in ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        assert (run / name).read_bytes() == (opus_dir / name).read_bytes(), name
    assert json.loads((run / "train_config.json").read_text())["tokenizer"] == "MarianTokenizer"
    tokenizer = HFTokenizer.load(run)
    assert (tokenizer.bos_id, tokenizer.pad_id) == (HFTokenizer.load(opus_dir).bos_id,) * 2
    from parity.checkpoint import load_model_dir

    before = load_model_dir(opus_dir, tokenizer=False)[1]
    cfg, after, _ = load_model_dir(run)
    assert cfg.positions == "marian" and cfg.freeze_pad_embedding
    moved = [k for k in before if not np.array_equal(np.asarray(before[k], np.float32), after[k])]
    assert len(moved) > len(before) // 2
    assert cli.main(["convert", str(run), str(exported), "--to", "hf-marian"]) == 0
    expected = hf_greedy(exported, texts)
    for framework in ("torch", "jax"):
        assert twin_greedy(run, texts, framework) == expected, framework
    assert cli.main(["train", "--framework", "jax", "--out", str(run), "--resume", "--steps", "22", "--limit", "400",
                     "--max-tokens", "256", "--test-limit", "0", "--no-progress", "--show", "0"]) == 0
    (run / "vocab.json").write_text((run / "vocab.json").read_text().replace('"<unk>": 1', '"<unk>": 2', 1))
    assert cli.main(["train", "--framework", "jax", "--out", str(run), "--resume", "--steps", "24", "--limit", "400",
                     "--max-tokens", "256", "--test-limit", "0", "--no-progress", "--show", "0"]) == 1


def test_a_directory_without_tokenizer_files_is_one_line_and_exit_1(opus_dir, tmp_path, capsys):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (bare / name).write_bytes((opus_dir / name).read_bytes())
    capsys.readouterr()
    assert cli.main(["translate", str(bare), "one"]) == 1
    assert capsys.readouterr().err == (f"twin translate: {bare}: not a run directory, no tokenizer.json and no "
                                       "Hugging Face tokenizer files (twin train writes config.json, "
                                       "model.safetensors and tokenizer.json)\n")
    (bare / "vocab.json").write_bytes((opus_dir / "vocab.json").read_bytes())  # a Marian tokenizer, incomplete
    assert cli.main(["eval", str(bare), "--data", "builtin"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing source.spm" in err


@pytest.fixture(scope="module")
def marian_run(tmp_path_factory):
    """A run trained here: --config marian, 200 torch steps on the first 20,000 pairs of the builtin corpus (its
    tokenizer trained on them), exported --to hf-marian with its tokenizer as a PreTrainedTokenizerFast."""
    root = tmp_path_factory.mktemp("marian-run")
    run, exported = root / "run", root / "exported"
    assert cli.main(["train", "--framework", "torch", "--config", "marian", "--data", "builtin", "--limit", "20000",
                     "--out", str(run), "--steps", "200", "--max-tokens", "512", "--test-limit", "0", "--no-progress",
                     "--show", "0"]) == 0
    assert cli.main(["convert", str(run), str(exported), "--to", "hf-marian"]) == 0
    return run, exported


def test_a_run_trained_here_translates_the_test_split_as_transformers_does(marian_run):
    """The exported run in transformers (AutoTokenizer + AutoModelForSeq2SeqLM + generate under its
    generation_config.json) against `twin translate` of the run in both twins, on the whole builtin test split:
    the same tokens and the same text, sentence for sentence, greedy (and beam 4 on its first 400 sentences)."""
    run, exported = marian_run
    assert (exported / "tokenizer.json").is_file() and (exported / "tokenizer_config.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    test = load_corpus("builtin").test
    for beams, pairs in ((4, test[:400]), (1, test)):
        texts = [source for source, _ in pairs]
        expected = hf_greedy(exported, texts, steps=40, beams=beams, forced=True)
        options = dict(forced_eos=True, beam_size=beams, beam_rule="hf", length_penalty=1.0)
        text = tokenizer.batch_decode(expected, skip_special_tokens=True)
        for framework in ("torch", "jax"):
            assert twin_greedy(run, texts, framework, steps=40, **options) == expected, (framework, beams)
        translator = Translator.load(run, "jax")
        assert translator.translate(texts, max_new_tokens=40, **options) == text, beams
    assert sum(h == r for h, (_, r) in zip(text, test)) > len(test) // 2  # a model that learned something


def test_the_export_imports_back_bit_for_bit_and_fine_tunes_in_jax(marian_run, tmp_path):
    """The exported directory imports back to the run's weights exactly, and 20 JAX steps fine-tune it through
    its fast tokenizer (--init-from HF_DIR), keeping the tokenizer files and the decoder start."""
    run, exported = marian_run
    back, tuned = tmp_path / "back", tmp_path / "tuned"
    assert cli.main(["convert", str(exported), str(back), "--to", "safetensors"]) == 0
    from parity.checkpoint import load_model_dir
    from parity.train import read_metrics

    _, original, _ = load_model_dir(run)
    _, imported, _ = load_model_dir(back, tokenizer=False)
    for key, value in original.items():
        assert np.array_equal(value, imported[key]), key
    assert cli.main(["train", "--framework", "jax", "--init-from", str(exported), "--data", "builtin", "--out",
                     str(tuned), "--steps", "20", "--limit", "2000", "--max-tokens", "512", "--test-limit", "0",
                     "--no-progress", "--show", "0"]) == 0
    assert (tuned / "tokenizer.json").read_bytes() == (exported / "tokenizer.json").read_bytes()
    assert HFTokenizer.load(tuned).bos_id == HFTokenizer.load(exported).bos_id == 1  # the project's <bos>
    valid = [r for r in read_metrics(run) if r["split"] == "valid"][-1]
    tuned_valid = [r for r in read_metrics(tuned) if r["split"] == "valid"][-1]
    assert [r["step"] for r in read_metrics(tuned) if r["split"] == "train"][-1] == 20
    assert np.isfinite(tuned_valid["loss"]) and tuned_valid["accuracy"] > 0.9 * valid["accuracy"]
