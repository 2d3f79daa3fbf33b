"""Training the encoder (classifier) and decoder (language model): one step of each loop in each framework,
resume across frameworks, torch vs JAX losses from the same weights (float64), wrong --arch."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax_tx.train as jt
import torch_tx.train as tt
from parity.batching import Batcher
from parity.checkpoint import load_checkpoint
from parity.data import load_corpus
from parity.names import canonical_shapes
from parity.suite import init_canonical
from parity.tokenizer import train_tokenizer
from parity.train import TrainConfig, TrainError, checkpoint_dirs, model_config, read_metrics, run

TRAINERS = {"torch": tt.Trainer, "jax": jt.Trainer}
TINY = dict(max_tokens=256, warmup_steps=4, log_every=1, eval_every=1, save_every=1, keep=2, vocab_size=200, bucket_step=64)
EXTENSIONS = {"seq2seq": ".tsv", "encoder": ".tsv", "decoder": ".txt"}


@pytest.fixture(scope="module")
def corpora():
    return {arch: load_corpus("builtin", arch=arch, limit=300) for arch in EXTENSIONS}


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpora):
    """A small train/valid/test directory per arch, cut from the builtin corpora."""
    root = tmp_path_factory.mktemp("data")
    for arch, ext in EXTENSIONS.items():
        corpus = corpora[arch]
        (root / arch).mkdir()
        for split, examples in (("train", corpus.train), ("valid", corpus.valid[:12]), ("test", corpus.test[:6])):
            (root / arch / f"{split}{ext}").write_text("".join("\t".join(e) + "\n" for e in examples))
    return root


def _run(framework, data, out, steps, arch=None, **kw):
    tcfg = TrainConfig(**{**TINY, "steps": steps, "pack": kw.pop("pack", False)})
    lines = []
    last = run(framework, str(data), out, model="tiny", tcfg=tcfg, arch=arch, progress=False, test_limit=4, show=1,
               echo=lines.append, **kw)
    return last, "\n".join(lines)


@pytest.mark.parametrize("arch, first, pack", [("encoder", "torch", False), ("decoder", "jax", True),
                                               ("seq2seq", "torch", True)])
def test_one_step_in_each_framework_and_resume_in_the_other(data, tmp_path, arch, first, pack):
    """One step in `first`, one more after resuming in the other framework: the run directory keeps the arch."""
    second = "jax" if first == "torch" else "torch"
    out = tmp_path / "run"
    last, printed = _run(first, data / arch, out, 1, arch=arch, pack=pack)
    cfg, weights = load_checkpoint(out)
    assert cfg.arch == arch and cfg.num_classes == (9 if arch == "encoder" else None)
    assert {k: v.shape for k, v in weights.items()} == canonical_shapes(cfg)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["arch"] == arch and saved["train"]["pack"] is pack
    assert saved["labels"] == ([str(d) for d in range(1, 10)] if arch == "encoder" else None)
    padding = saved["padding"]
    assert f"padding: {padding['unpacked']:.1%}" in printed and ("packed" in padding) is pack
    if pack:
        assert f" -> {padding['packed']:.1%} of positions (packed rows of 64)" in printed
        assert padding["packed"] < padding["unpacked"]
    test = last["test"]
    if arch == "encoder":
        assert {"accuracy", "chance", "examples"} <= set(test) and "test accuracy:" in printed
    elif arch == "decoder":
        assert {"ppl", "exact_match", "sample"} <= set(test) and "(no prompt)" in printed
        assert " =\n    -> " in printed and "test perplexity:" in printed
    else:
        assert "test exact match:" in printed

    last, printed = _run(second, data / arch, out, 2, resume=True)
    assert f"resuming {out} at step 1 ({second})" in printed
    assert [p.name for p in checkpoint_dirs(out)] == ["step_0000001", "step_0000002"]
    assert json.loads((checkpoint_dirs(out)[-1] / "trainer_state.json").read_text())["framework"] == second
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2]
    assert np.isfinite(last["train"]["loss"]) and load_checkpoint(out)[0] == cfg

    wrong = "decoder" if arch == "encoder" else "encoder"
    with pytest.raises(TrainError, match=f"--arch {wrong}: the run in .* holds a {arch} model"):
        _run(first, data / arch, out, 3, arch=wrong, resume=True)
    with pytest.raises(TrainError, match=f"--arch {wrong}: the checkpoint .* holds a {arch} model"):
        _run(first, data / wrong, tmp_path / "other", 1, arch=wrong, init_from=out)


def _batches(arch, tokenizer, corpus, pack):
    """Two batches of one shape (bucketed, or packed)."""
    first = tokenizer.encode([e[0] for e in corpus.train[:64]])
    classes = [corpus.labels.index(e[1]) for e in corpus.train[:64]] if arch == "encoder" else None
    batcher = Batcher(None if arch == "decoder" else first, first if arch == "decoder" else None, classes=classes,
                      pad_id=0, bos_id=1, eos_id=2, max_tokens=192, max_len=48, bucket_step=48, seed=1, pack=pack)
    return [batch for _, (_, batch) in zip(range(2), batcher.stream())]


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_torch_and_jax_train_the_same(corpora, arch):
    """Same converted weights, same batches (bucketed, then packed), float64, dropout off: equal losses at every
    step and equal weights after (the k_proj biases aside: zero gradient, Adam walks them on rounding noise)."""
    corpus = corpora[arch]
    tokenizer = train_tokenizer(corpus.texts(), vocab_size=200)
    cfg = model_config("tiny", tokenizer.vocab_size, arch, 9 if arch == "encoder" else None)
    cfg = cfg.replace(dropout=0.0, max_len=48)
    weights = {k: v.astype(np.float64) for k, v in init_canonical(cfg, "jax", 2).items()}
    trainers = {name: cls(cfg, TrainConfig(warmup_steps=2), weights, dtype="float64") for name, cls in TRAINERS.items()}
    for batch in _batches(arch, tokenizer, corpus, False) + _batches(arch, tokenizer, corpus, True):
        metrics = {name: {k: float(v) for k, v in t.train_step(batch).items()} for name, t in trainers.items()}
        assert metrics["torch"]["tokens"] == metrics["jax"]["tokens"] == batch.tokens
        assert metrics["jax"]["loss"] == pytest.approx(metrics["torch"]["loss"], rel=1e-12, abs=0)
        assert metrics["jax"]["grad_norm"] == pytest.approx(metrics["torch"]["grad_norm"], rel=1e-10, abs=0)
    after = [{k: v for k, v in t.weights().items() if not k.endswith("k_proj.bias")} for t in trainers.values()]
    for key in after[0]:
        np.testing.assert_allclose(after[1][key], after[0][key], rtol=1e-10, atol=1e-12)
