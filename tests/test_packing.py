"""Packed batches: the same tokens and labels as unpacked ones, the same loss (both frameworks, float64),
padding shares checked by hand, examples longer than a row."""

from __future__ import annotations

import numpy as np
import pytest

import jax_tx.train as jt
import torch_tx.train as tt
from parity.batching import NO_CLASS, Batcher, pack_rows
from parity.data import load_corpus
from parity.suite import init_canonical
from parity.tokenizer import train_tokenizer
from parity.train import TrainConfig, model_config, padding_report

TRAINERS = {"torch": tt.Trainer, "jax": jt.Trainer}
ARCHS = ("seq2seq", "encoder", "decoder")
MAX_LEN = 64


@pytest.fixture(scope="module")
def corpora():
    return {arch: load_corpus("builtin", arch=arch, limit=200) for arch in ARCHS}


@pytest.fixture(scope="module")
def tokenizer(corpora):
    texts = [t for arch in ("seq2seq", "decoder") for t in corpora[arch].texts()]
    return train_tokenizer(texts, vocab_size=150)


def _batcher(corpus, tokenizer, examples, **kw) -> Batcher:
    first = tokenizer.encode([e[0] for e in examples])
    if corpus.arch == "seq2seq":
        sides = (first, tokenizer.encode([e[1] for e in examples]), None)
    elif corpus.arch == "encoder":
        sides = (first, None, [corpus.labels.index(e[1]) for e in examples])
    else:
        sides = (None, first, None)
    args = dict(pad_id=0, bos_id=1, eos_id=2, max_tokens=4 * MAX_LEN, max_len=MAX_LEN, seed=5)
    return Batcher(*sides[:2], classes=sides[2], **{**args, **kw})


def _examples(batcher: Batcher) -> list[tuple]:
    """Every example of an epoch as (src, tgt_in, labels) token tuples, packed rows cut at their segments."""
    found = []
    for batch in batcher.once():
        for row in range(batch.labels.shape[0]):
            if batcher.pack:
                side = batch.src_segments if batch.src is not None else batch.tgt_segments
                ids = sorted(set(side[row]) - {0})
                assert ids == list(range(1, len(ids) + 1))
                cuts = [side[row] == i for i in ids]
            else:
                cuts = [None] if (batch.labels[row] != batch.ignore).any() else []
            for i, cut in enumerate(cuts, start=1):
                parts = []
                if batch.src is not None:
                    where = batch.src_segments[row] == i if cut is not None else batch.src[row] != 0
                    parts.append(tuple(batch.src[row][where]))
                    if cut is not None:
                        assert list(batch.src_positions[row][where]) == list(range(where.sum()))
                        assert np.ptp(np.flatnonzero(where)) == where.sum() - 1  # contiguous
                if batch.tgt_in is not None:
                    where = batch.tgt_segments[row] == i if cut is not None else batch.labels[row] != 0
                    parts += [tuple(batch.tgt_in[row][where]), tuple(batch.labels[row][where])]
                    if cut is not None:
                        assert list(batch.tgt_positions[row][where]) == list(range(where.sum()))
                else:
                    labels = batch.labels[row]
                    if cut is not None:
                        start = np.flatnonzero(batch.src_segments[row] == i)[0]
                        assert (labels[batch.src_segments[row] == i][1:] == NO_CLASS).all()
                        parts.append(int(labels[start]))
                    else:
                        parts.append(int(labels))
                found.append(tuple(parts))
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_batches_hold_the_same_tokens_and_labels(corpora, tokenizer, arch):
    corpus = corpora[arch]
    unpacked = _batcher(corpus, tokenizer, corpus.train)
    packed = _batcher(corpus, tokenizer, corpus.train, pack=True)
    assert sorted(_examples(packed)) == sorted(_examples(unpacked))
    assert len(_examples(packed)) == packed.num_examples == unpacked.num_examples > 150
    assert sum(b.tokens for b in packed.once()) == sum(b.tokens for b in unpacked.once())
    shapes = {tuple(a.shape for a in b.arrays().values()) for _, (_, b) in zip(range(len(packed)), packed.stream())}
    assert len(shapes) == 1
    if arch == "seq2seq":
        for batch in packed.once():
            for row in range(batch.labels.shape[0]):
                src_ids = [i for i in dict.fromkeys(batch.src_segments[row]) if i]
                assert src_ids == [i for i in dict.fromkeys(batch.tgt_segments[row]) if i]


@pytest.mark.parametrize("framework", sorted(TRAINERS))
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_loss_equals_unpacked_loss(corpora, tokenizer, arch, framework):
    """Float64, one update on the packed batch and one on the same examples unpacked (one batch each): the
    same label count, loss sums to 1e-12 and gradient norm to 1e-10."""
    corpus = corpora[arch]
    cfg = model_config("tiny", tokenizer.vocab_size, arch, None if corpus.labels is None else len(corpus.labels))
    cfg = cfg.replace(dropout=0.0, max_len=MAX_LEN)
    weights = {k: v.astype(np.float64) for k, v in init_canonical(cfg, "torch", 0).items()}
    examples = corpus.train[:24]
    packed = _batcher(corpus, tokenizer, examples, pack=True, max_tokens=24 * MAX_LEN, shuffle=False)
    unpacked = _batcher(corpus, tokenizer, examples, bucket_step=MAX_LEN, max_tokens=24 * MAX_LEN, shuffle=False)
    assert len(packed) == len(unpacked) == 1
    batches = [next(iter(batcher.once())) for batcher in (packed, unpacked)]
    assert (batches[0].src_segments if batches[0].src is not None else batches[0].tgt_segments).max() >= 2
    a, b = ({k: float(v) for k, v in TRAINERS[framework](cfg, TrainConfig(), weights, dtype="float64")
             .train_step(batch).items()} for batch in batches)
    assert a["tokens"] == b["tokens"] == batches[1].tokens
    assert a["correct"] == b["correct"]
    for key in ("loss", "nll"):
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=0)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-10, abs=0)


def test_pack_rows_by_hand():
    # rows of 8, two open at most: 0 -> A; 1 fits nowhere -> B; 2 -> A (1 left); 3 fits nowhere, the pool is
    # full: A (the fullest) closes and 3 opens C in its place; 4 -> B (0 left); 5 fits nowhere: B closes, D.
    rows = pack_rows([4, 6, 3, 7, 2, 2], 8, 2)
    assert [r.tolist() for r in rows] == [[0, 2], [1, 4], [3], [5]]
    two_sides = pack_rows([[3, 5], [5, 3], [4, 3]], 8, 4)
    assert [r.tolist() for r in two_sides] == [[0, 1], [2]]


def test_padding_by_hand():
    """A decoder batcher of lengths 3, 5, 2, 6, 1, 1 (+1 for <bos>: 24 positions), rows of 8, 32 per batch."""
    tgt = [np.arange(3, 3 + n, dtype=np.int32) for n in (3, 5, 2, 6, 1, 1)]
    args = dict(pad_id=0, bos_id=1, eos_id=2, max_tokens=32, max_len=8, bucket_step=4, shuffle=False)
    unpacked = Batcher(None, tgt, **args)
    # buckets: length 4 (examples 0, 2, 4, 5) in one batch of 8 rows of 4; length 8 (1, 3) in 4 rows of 8
    assert [(shape, ids.tolist()) for shape, ids in unpacked.epoch(0)] == [((4,), [0, 2, 4, 5]), ((8,), [1, 3])]
    assert unpacked.padding() == pytest.approx(1 - 24 / 64)
    packed = Batcher(None, tgt, **args, pack=True)
    # one batch of 4 rows of 8: [0, 2] (7 positions), [1, 4] (8), [3] (7), [5] (2)
    (shape, rows), = packed.epoch(0)
    assert shape == (8,) and [r.tolist() for r in rows] == [[0, 2], [1, 4], [3], [5]]
    assert packed.padding() == pytest.approx(1 - 24 / 32)
    assert padding_report(packed) == pytest.approx({"unpacked": 0.625, "packed": 0.25})
    batch = packed.make(shape, rows)
    np.testing.assert_array_equal(batch.tgt_in[0], [1, 3, 4, 5, 1, 3, 4, 0])
    np.testing.assert_array_equal(batch.labels[0], [3, 4, 5, 2, 3, 4, 2, 0])
    np.testing.assert_array_equal(batch.tgt_segments[0], [1, 1, 1, 1, 2, 2, 2, 0])
    np.testing.assert_array_equal(batch.tgt_positions[0], [0, 1, 2, 3, 0, 1, 2, 0])
    np.testing.assert_array_equal(batch.tgt_segments[3], [1, 1, 0, 0, 0, 0, 0, 0])
    assert batch.tokens == 24 and batch.src is None and batch.src_segments is None


def test_encoder_packed_labels_by_hand():
    src = [np.array([5, 6]), np.array([7]), np.array([8, 9, 10])]
    batcher = Batcher(src, None, classes=[2, 0, 1], pad_id=0, bos_id=1, eos_id=2, max_tokens=16, max_len=8,
                      shuffle=False, pack=True)
    batch, = batcher.once()
    np.testing.assert_array_equal(batch.src, [[5, 6, 2, 7, 2, 0, 0, 0], [8, 9, 10, 2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.labels, [[2, -1, -1, 0, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(batch.src_segments, [[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    assert batch.tokens == 3 and batch.tgt_in is None
    unpacked, = Batcher(src, None, classes=[2, 0, 1], pad_id=0, bos_id=1, eos_id=2, max_tokens=16, max_len=8,
                        bucket_step=4, shuffle=False).once()
    np.testing.assert_array_equal(unpacked.labels, [2, 0, 1, NO_CLASS])
    assert unpacked.tokens == 3


def test_examples_longer_than_a_row():
    with pytest.raises(ValueError, match=r"example 1 takes 9 positions, more than a packed row of 8 \(2 examples too "
                                         r"long\)"):
        pack_rows([3, 9, 10], 8, 4)
    tgt = [np.arange(3, 3 + n, dtype=np.int32) for n in (3, 9, 2)]
    batcher = Batcher(None, tgt, pad_id=0, bos_id=1, eos_id=2, max_tokens=32, max_len=8, pack=True)
    assert batcher.dropped == 1 and batcher.num_examples == 2
    assert sum(batch.tokens for batch in batcher.once()) == 4 + 3
    with pytest.raises(ValueError, match="no example fits max_len=2"):
        Batcher(None, tgt, pad_id=0, bos_id=1, eos_id=2, max_tokens=32, max_len=2, pack=True)
