"""Hugging Face tokenizers behind the project's tokenizer interface: HFTokenizer gives exactly transformers' ids
(MarianTokenizer: sources through source.spm, targets through target.spm) and decodes them back, fingerprints follow
the files, incomplete directories are one-line errors, and save_fast_tokenizer writes the project's tokenizer as a
directory transformers loads with the ids the twins feed the model. Offline: the fixtures train SentencePiece at test
time."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from hf_fixtures import marian_vocab_size, save_marian_dir, save_marian_tokenizer  # noqa: E402
from parity.data import load_corpus  # noqa: E402
from parity.hf_tokenizer import HFTokenizer, HFTokenizerError, save_fast_tokenizer  # noqa: E402
from parity.tokenizer import Tokenizer, TokenizerError, load_any, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("builtin")


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    return save_marian_dir(tmp_path_factory.mktemp("opus-mt"), seed=0)


@pytest.fixture(scope="module")
def reference(marian_dir):
    """transformers' own MarianTokenizer of the fixture directory."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        return transformers.AutoTokenizer.from_pretrained(str(marian_dir), local_files_only=True)


@pytest.fixture(scope="module")
def project_tokenizer(corpus):
    return train_tokenizer([text for pair in corpus.train[:2000] for text in pair], vocab_size=120)


def _ids(rows) -> list[list[int]]:
    return [row.tolist() for row in rows]


def test_encode_gives_exactly_marian_tokenizers_ids_and_decode_round_trips(marian_dir, reference, corpus):
    tok = HFTokenizer.load(marian_dir)
    assert type(reference).__name__ == "MarianTokenizer"
    sources, targets = [s for s, _ in corpus.test], [t for _, t in corpus.test]
    src, tgt = tok.encode(sources), tok.encode(targets, target=True)
    assert all(row.dtype == np.int32 for row in src + tgt)
    assert [[*row, 0] for row in _ids(src)] == reference(sources)["input_ids"]  # transformers appends eos (0)
    assert [[*row, 0] for row in _ids(tgt)] == reference(text_target=targets)["input_ids"]
    assert _ids(src) != _ids(tok.encode(sources, target=True))  # the two SentencePiece models differ
    assert tok.eos_id == 0 and all(tok.eos_id not in row for row in src + tgt)
    assert [tok.decode(row) for row in tgt] == targets
    assert [tok.decode(row) for row in src] == sources
    assert [tok.decode(row) for row in tgt] == reference.batch_decode(_ids(tgt), skip_special_tokens=True)
    assert tok.encode([]) == []


def test_ids_follow_the_checkpoint_and_the_model_loads_offline(marian_dir, reference):
    """pad = decoder start = the last id, eos 0, unk 1; the model directory loads with from_pretrained offline and
    its vocabulary is the tokenizer's."""
    tok = HFTokenizer.load(marian_dir)
    model = transformers.MarianMTModel.from_pretrained(str(marian_dir), local_files_only=True)
    config = model.config
    assert tok.vocab_size == tok.tgt_vocab_size == len(reference) == config.vocab_size == marian_vocab_size()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (config.pad_token_id, config.decoder_start_token_id,
                                                                config.eos_token_id, 1)
    assert tok.pad_id == tok.vocab_size - 1
    assert model.generation_config.bad_words_ids == [[tok.pad_id]]
    assert model.get_input_embeddings().weight.shape[0] == tok.vocab_size
    assert not model.training
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    row = tok.encode(["deux"], target=True)[0]
    assert tok.decode(np.concatenate([[bos], row, [eos, pad, 5]])) == "deux"  # stops at eos, skips the decoder start
    assert tok.token_strings([eos, 1, pad, tok.vocab_size]) == ["</s>", "<unk>", "<pad>", f"<{tok.vocab_size}?>"]


def test_unknown_characters_are_reported(marian_dir, project_tokenizer, tmp_path):
    save_fast_tokenizer(project_tokenizer, tmp_path)
    for tok in (HFTokenizer.load(marian_dir), HFTokenizer.load(tmp_path)):
        assert tok.unknown_characters(["one € thousand €", "two"]) == [["€"], []]
        assert tok.unknown_characters(["deux ¤"], target=True) == [["¤"]]


def test_fingerprint_is_stable_and_follows_the_files(marian_dir, tmp_path):
    tok = HFTokenizer.load(marian_dir)
    assert HFTokenizer.load(marian_dir).fingerprint() == tok.fingerprint()
    tok.save(tmp_path / "copy" / "tokenizer.json")  # as a run directory saves its tokenizer
    copy = tmp_path / "copy"
    for name in ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        assert (copy / name).read_bytes() == (marian_dir / name).read_bytes()
    assert not (copy / "tokenizer.json").exists()
    assert HFTokenizer.load(copy).fingerprint() == tok.fingerprint()
    assert json.loads((copy / "generation_config.json").read_text())["decoder_start_token_id"] == tok.bos_id
    moved = HFTokenizer.load(marian_dir, decoder_start_id=3)  # a decoder start the files alone do not say
    moved.save(tmp_path / "moved")
    assert HFTokenizer.load(tmp_path / "moved").bos_id == 3
    changed = save_marian_tokenizer(tmp_path / "changed")
    vocab = json.loads((changed / "vocab.json").read_text())
    a, b = [piece for piece in vocab if piece not in ("</s>", "<unk>", "<pad>")][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (changed / "vocab.json").write_text(json.dumps(vocab))
    assert HFTokenizer.load(changed).fingerprint() != tok.fingerprint()
    assert HFTokenizer.load(marian_dir, decoder_start_id=0).fingerprint() != tok.fingerprint()


@pytest.mark.parametrize("missing", ["source.spm", "target.spm", "vocab.json"])
def test_a_missing_file_is_a_one_line_error_naming_it(tmp_path, missing):
    directory = save_marian_tokenizer(tmp_path / "tok")
    (directory / missing).unlink()
    for load in (HFTokenizer.load, load_any):
        with pytest.raises(HFTokenizerError) as info:
            load(directory)
        message = str(info.value)
        assert isinstance(info.value, TokenizerError) and isinstance(info.value, ValueError)
        assert "\n" not in message and str(directory) in message and f"missing {missing}" in message


def test_incomplete_or_absent_directories_are_one_line_errors(tmp_path, project_tokenizer):
    with pytest.raises(HFTokenizerError, match="no such directory"):
        HFTokenizer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFTokenizerError, match="missing tokenizer_config.json"):
        HFTokenizer.load(tmp_path / "empty")
    save_fast_tokenizer(project_tokenizer, tmp_path / "fast")
    (tmp_path / "fast" / "tokenizer.json").unlink()
    with pytest.raises(HFTokenizerError, match="missing tokenizer.json") as info:
        load_any(tmp_path / "fast")
    assert "\n" not in str(info.value)
    directory = save_marian_tokenizer(tmp_path / "broken")
    (directory / "source.spm").write_bytes(b"not a sentencepiece model")
    with pytest.raises(HFTokenizerError, match="transformers cannot load the tokenizer") as info:
        HFTokenizer.load(directory)
    assert "\n" not in str(info.value)


def test_save_fast_tokenizer_gives_transformers_the_ids_the_twins_feed_the_model(project_tokenizer, corpus, tmp_path):
    """AutoTokenizer loads the exported directory offline; its ids are the project's + [eos] (what the twins' batches
    and `translate` feed the model), for sources and targets, and decode gives the text back."""
    save_fast_tokenizer(project_tokenizer, tmp_path, model_max_length=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    fast = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (fast.pad_token_id, fast.bos_token_id, fast.eos_token_id, fast.unk_token_id) == (0, 1, 2, 3)
    assert len(fast) == project_tokenizer.vocab_size and fast.model_max_length == 64
    sources, targets = [s for s, _ in corpus.test], [t for _, t in corpus.test]
    expected = [[*row.tolist(), project_tokenizer.eos_id] for row in project_tokenizer.encode(sources)]
    assert fast(sources)["input_ids"] == expected
    assert fast(text_target=targets)["input_ids"] == \
        [[*row.tolist(), project_tokenizer.eos_id] for row in project_tokenizer.encode(targets)]
    assert fast.batch_decode(expected, skip_special_tokens=True) == sources
    tok = load_any(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == \
        (project_tokenizer.pad_id, project_tokenizer.bos_id, project_tokenizer.eos_id, project_tokenizer.unk_id,
         project_tokenizer.vocab_size)
    assert [[*row, tok.eos_id] for row in _ids(tok.encode(sources))] == expected
    assert [tok.decode(row) for row in tok.encode(targets, target=True)] == targets
    assert tok.token_strings([1, 2]) == project_tokenizer.token_strings([1, 2])


def test_load_any_dispatches_and_keeps_the_project_tokenizer(project_tokenizer, marian_dir, tmp_path):
    project_tokenizer.save(tmp_path / "tokenizer.json")
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = load_any(path)
        assert type(loaded) is Tokenizer and loaded.fingerprint() == project_tokenizer.fingerprint()
    assert isinstance(load_any(marian_dir), HFTokenizer)
    shutil.copyfile(marian_dir / "vocab.json", tmp_path / "vocab.json")  # a Marian file beside it: a Hugging Face dir
    with pytest.raises(HFTokenizerError, match="missing source.spm"):
        load_any(tmp_path)
    assert type(Tokenizer.load(tmp_path)) is Tokenizer  # Tokenizer.load itself is unchanged
