"""The embedded corpus, user data files, the tokenizer and the bucketed batches."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parity.batching import Batcher, Position
from parity.data import NUMBERS_FILE, DataError, load_corpus, number_rank, read_examples, read_pairs
from parity.tokenizer import Tokenizer, TokenizerError, train_tokenizer


@pytest.fixture(scope="module")
def builtin():
    return load_corpus("builtin")


@pytest.fixture(scope="module")
def tokenizer(builtin):
    return train_tokenizer((s for pair in builtin.train[:5000] for s in pair), vocab_size=400)


def _numbers():
    rows = lzma.decompress(NUMBERS_FILE.read_bytes()).decode().splitlines()
    return [int(row.split("\t")[0]) for row in rows]


def test_builtin_splits_are_disjoint_and_fixed(builtin):
    assert (len(builtin.train), len(builtin.valid), len(builtin.test)) == (196_000, 2_000, 2_000)
    numbers = _numbers()
    assert len(set(numbers)) == len(numbers) == 200_000
    assert numbers == sorted(numbers, key=number_rank)
    assert all(0 <= n < 1_000_000 for n in numbers)
    train, held_out = {p[0] for p in builtin.train}, {p[0] for p in builtin.valid + builtin.test}
    assert not train & held_out
    assert not {p[0] for p in builtin.valid} & {p[0] for p in builtin.test}
    assert load_corpus("builtin").fingerprint() == builtin.fingerprint()


def test_builtin_text_is_num2words(builtin):
    num2words = pytest.importorskip("num2words").num2words
    rows = lzma.decompress(NUMBERS_FILE.read_bytes()).decode().splitlines()
    for row in rows[::4999]:
        n, en, fr = row.split("\t")
        assert (en, fr) == (num2words(int(n), lang="en"), num2words(int(n), lang="fr"))
    assert builtin.test[0] == ("six hundred and sixty-five thousand, four hundred and eighty-eight",
                               "six cent soixante-cinq mille quatre cent quatre-vingt-huit")


def test_tsv_jsonl_and_directory(tmp_path):
    (tmp_path / "a.tsv").write_text("hello\tbonjour\n\n  cat \tchat\n")
    assert read_pairs(tmp_path / "a.tsv") == [("hello", "bonjour"), ("cat", "chat")]
    (tmp_path / "a.jsonl").write_text(json.dumps({"src": "dog", "tgt": "chien"}) + "\n")
    assert read_pairs(tmp_path / "a.jsonl") == [("dog", "chien")]
    for split in ("train", "valid", "test"):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"{split}.tsv").write_text(f"{split} one\t{split} un\n")
    corpus = load_corpus(tmp_path / "d")
    assert corpus.valid == [("valid one", "valid un")]


def test_single_file_is_split_by_source(tmp_path):
    lines = [f"sentence {i % 300}\tphrase {i % 300}" for i in range(1000)]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines))
    corpus = load_corpus(tmp_path / "pairs.tsv")
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 1000
    assert corpus.valid and corpus.test
    sources = [{p[0] for p in split} for split in (corpus.train, corpus.valid, corpus.test)]
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])


@pytest.mark.parametrize("name, text, message", [
    ("bad.tsv", "one\tun\ntwo un\n", "bad.tsv:2: expected 2 tab-separated fields (source, target), found 1"),
    ("bad.tsv", "one\tun\ttrois\n", "bad.tsv:1: expected 2 tab-separated fields"),
    ("bad.tsv", "one\tun\n\t deux\n", "bad.tsv:2: empty source or target"),
    ("bad.jsonl", '{"src": "a", "tgt": "b"}\n{"src": "a"\n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"src": "a", "target": "b"}\n', 'bad.jsonl:1: expected an object with exactly the keys'),
    ("bad.jsonl", '{"src": "a", "tgt": 3}\n', 'bad.jsonl:1: "src" and "tgt" must be strings'),
    ("empty.tsv", "\n\n", "empty.tsv: no sentence pairs"),
    ("latin1.tsv", None, "latin1.tsv: not UTF-8 text"),
])
def test_malformed_rows_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_bytes("caf\u00e9\tcoffee\n".encode("latin-1") if text is None else text.encode())
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_corpus(path)


def test_missing_data_and_empty_split(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_corpus(tmp_path / "nope.tsv")
    (tmp_path / "train.tsv").write_text("a\tb\n")
    (tmp_path / "valid.tsv").write_text("c\td\n")
    with pytest.raises(DataError, match="expected exactly one of test.tsv, test.jsonl, found 0"):
        load_corpus(tmp_path)


def test_tokenizer_specials_round_trip_and_unknown(tokenizer, builtin, tmp_path):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    texts = [s for pair in builtin.test[:200] for s in pair]
    for text, ids in zip(texts, tokenizer.encode(texts)):
        assert tokenizer.decode(ids) == text
    ids = tokenizer.encode(["seven \u2603 mille"])[0]
    assert tokenizer.unk_id in ids
    assert tokenizer.decode([*tokenizer.encode(["deux"])[0], tokenizer.eos_id, 7, 8]) == "deux"
    tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint() == tokenizer.fingerprint() and again.vocab_size == tokenizer.vocab_size
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json: not a tokenizers JSON file"):
        Tokenizer.load(tmp_path / "bad.json")


def _batcher(tokenizer, pairs, **kw):
    args = dict(pad_id=0, bos_id=1, eos_id=2, max_tokens=256, max_len=32, bucket_step=8, seed=3)
    return Batcher(tokenizer.encode([p[0] for p in pairs]), tokenizer.encode([p[1] for p in pairs]), **{**args, **kw})


def test_batch_layout_by_hand():
    batcher = Batcher([np.array([5, 6]), np.array([7])], [np.array([8]), np.array([9, 10, 11, 12])], pad_id=0,
                      bos_id=1, eos_id=2, max_tokens=8, max_len=8, bucket_step=4, shuffle=False)
    a, b = batcher.once()
    assert batcher.rows((4, 4)) == 2 and batcher.rows((4, 8)) == 1 and len(batcher) == 2
    np.testing.assert_array_equal(a.src, [[5, 6, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(a.tgt_in, [[1, 8, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(a.labels, [[8, 2, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b.src, [[7, 2, 0, 0]])
    np.testing.assert_array_equal(b.tgt_in, [[1, 9, 10, 11, 12, 0, 0, 0]])
    np.testing.assert_array_equal(b.labels, [[9, 10, 11, 12, 2, 0, 0, 0]])
    assert a.tokens == 2 and b.tokens == 5


def test_shared_length_buckets_by_hand():
    """The same two pairs as above with shared_length: both sides of a pair take the longer side's bucket."""
    batcher = Batcher([np.array([5, 6]), np.array([7])], [np.array([8]), np.array([9, 10, 11, 12])], pad_id=0,
                      bos_id=1, eos_id=2, max_tokens=8, max_len=8, bucket_step=4, shuffle=False, shared_length=True)
    a, b = batcher.once()
    assert list(batcher.buckets) == [(4, 4), (8, 8)]
    np.testing.assert_array_equal(a.src, [[5, 6, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b.src, [[7, 2, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b.tgt_in, [[1, 9, 10, 11, 12, 0, 0, 0]])


def test_shared_length_bounds_the_batch_shapes():
    """Pairs of 3..126 tokens, max_len 128, step 8: separate buckets make up to 16 x 16 shapes, shared ones 16."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, 3000)  # [N]
    targets = np.clip((lengths * rng.uniform(0.8, 1.25, 3000)).astype(int), 2, 126)  # [N]
    src, tgt = [rng.integers(4, 100, n) for n in lengths], [rng.integers(4, 100, n) for n in targets]
    args = dict(pad_id=0, bos_id=1, eos_id=2, max_tokens=4096, max_len=128, bucket_step=8)
    separate, shared = Batcher(src, tgt, **args), Batcher(src, tgt, **args, shared_length=True)
    assert len(shared.buckets) <= 16 < len(separate.buckets)
    assert all(s == t for s, t in shared.buckets)
    assert sum(len(ids) for ids in shared.buckets.values()) == shared.num_examples == 3000


@given(epoch=st.integers(0, 5), cut=st.integers(0, 40))
def test_batches_cover_epoch_and_resume_exactly(tokenizer, builtin, epoch, cut):
    batcher = _batcher(tokenizer, builtin.train[:600])
    plan = batcher.epoch(epoch)
    seen = np.sort(np.concatenate([ids for _, ids in plan]))
    np.testing.assert_array_equal(seen, np.arange(batcher.num_examples))
    shapes = {batch.src.shape + batch.labels.shape for _, (_, batch) in zip(range(len(plan)), batcher.stream())}
    assert len(shapes) <= 4 and all(r * max(s, t) <= 256 for r, s, _, t in shapes)
    straight = [b for _, (_, b) in zip(range(cut + 10), batcher.stream(Position(epoch, 0)))]
    position = Position(epoch, 0)
    for _, (position, _) in zip(range(cut), batcher.stream(Position(epoch, 0))):
        pass
    resumed = straight[:cut] + [b for _, (_, b) in zip(range(10), batcher.stream(position))]
    for x, y in zip(straight, resumed):
        np.testing.assert_array_equal(x.src, y.src)
        np.testing.assert_array_equal(x.labels, y.labels)
    assert _batcher(tokenizer, builtin.train[:600]).epoch(epoch)[0][1].tolist() == plan[0][1].tolist()


def test_overlong_pairs_are_dropped_and_counted(tokenizer, builtin):
    batcher = _batcher(tokenizer, builtin.train[:300], max_len=8)
    assert batcher.dropped > 0 and batcher.num_examples + batcher.dropped == 300
    with pytest.raises(ValueError, match="no example fits max_len=2"):
        _batcher(tokenizer, builtin.train[:30], max_len=2)


def test_builtin_classification_and_language_model_corpora(builtin):
    numbers = _numbers()
    encoder = load_corpus("builtin", arch="encoder")
    assert encoder.labels == tuple("123456789")
    assert (len(encoder.train), len(encoder.valid), len(encoder.test)) == (392_000, 4_000, 4_000)
    assert encoder.test[:2] == [(builtin.test[0][0], str(numbers[0])[0]), (builtin.test[0][1], str(numbers[0])[0])]
    assert {text for text, _ in encoder.valid} == {s for pair in builtin.valid for s in pair}
    assert not {text for text, _ in encoder.train[::50]} & {text for text, _ in encoder.test}
    decoder = load_corpus("builtin", arch="decoder")
    assert (len(decoder.train), len(decoder.valid), len(decoder.test)) == (196_000, 2_000, 2_000)
    assert decoder.test[0] == (f"{builtin.test[0][0]} = {builtin.test[0][1]}",)
    assert list(decoder.texts())[:1] == [f"{builtin.train[0][0]} = {builtin.train[0][1]}"]
    assert list(encoder.texts())[:2] == list(builtin.train[0])
    assert len({c.fingerprint() for c in (builtin, encoder, decoder)}) == 3


def test_classification_and_text_files(tmp_path):
    (tmp_path / "labels.tsv").write_text("".join(f"text {i}\t{'ab'[i % 2]}\n" for i in range(300)))
    corpus = load_corpus(tmp_path / "labels.tsv", arch="encoder")
    assert corpus.labels == ("a", "b") and corpus.train[0] == ("text 0", "a")
    (tmp_path / "labels.jsonl").write_text(json.dumps({"text": "x", "label": "1"}) + "\n")
    assert read_examples(tmp_path / "labels.jsonl", ("text", "label")) == [("x", "1")]
    (tmp_path / "lines.txt").write_text("one line\twith a tab\n\n second \n")
    assert read_examples(tmp_path / "lines.txt", ("text",)) == [("one line\twith a tab",), ("second",)]
    (tmp_path / "lines.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
    assert read_examples(tmp_path / "lines.jsonl", ("text",)) == [("a b",)]
    for split in ("train", "valid", "test"):
        (tmp_path / "lm").mkdir(exist_ok=True)
        (tmp_path / "lm" / f"{split}.txt").write_text(f"{split} text\n")
    assert load_corpus(tmp_path / "lm", arch="decoder").valid == [("valid text",)]


@pytest.mark.parametrize("files, message", [
    ({"train.tsv": "a\tx\nb\tx\n", "valid.tsv": "c\tx\n", "test.tsv": "d\tx\n"}, "at least 2 labels"),
    ({"train.tsv": "a\tx\nb\ty\n", "valid.tsv": "c\tx\n", "test.tsv": "d\tz\n"},
     "the test split has labels the training split lacks: 'z'"),
    ({"train.tsv": "a\tx\nb\n"}, "train.tsv:2: expected 2 tab-separated fields (text, label), found 1"),
    ({"train.jsonl": '{"text": "a"}\n'}, 'train.jsonl:1: expected an object with exactly the keys "text" and "label"'),
    ({"train.tsv": "a\t \n"}, "train.tsv:1: empty text or label"),
])
def test_bad_classification_data(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_corpus(tmp_path if len(files) > 1 else tmp_path / next(iter(files)), arch="encoder")


def test_bad_language_model_data(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match='bad.jsonl:1: "text" must be a string'):
        load_corpus(tmp_path / "bad.jsonl", arch="decoder")
    (tmp_path / "train.txt").write_text("a\n")
    with pytest.raises(DataError, match="expected exactly one of valid.txt, valid.jsonl, found 0"):
        load_corpus(tmp_path, arch="decoder")
    with pytest.raises(DataError, match="unknown arch 'gpt'"):
        load_corpus("builtin", arch="gpt")
