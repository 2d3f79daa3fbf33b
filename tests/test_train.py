"""Training: loss and schedule by hand, torch vs JAX training parity, exact resume, bad input."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_tx.train as jt
import torch_tx.train as tt
from parity.batching import Batcher
from parity.checkpoint import load_checkpoint
from parity.data import load_corpus
from parity.suite import init_canonical
from parity.tokenizer import train_tokenizer
from parity.train import (TrainConfig, TrainError, checkpoint_dirs, learning_rate, load_training_checkpoint,
                          model_config, read_metrics, run)
from strategies import configs

TRAINERS = {"torch": tt.Trainer, "jax": jt.Trainer}
TINY = dict(steps=12, max_tokens=256, warmup_steps=4, log_every=2, eval_every=6, save_every=6, keep=2, bucket_step=16)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("builtin", limit=3000)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer((s for pair in corpus.train for s in pair), vocab_size=200)


@pytest.fixture(scope="module")
def batches(corpus, tokenizer):
    batcher = Batcher(tokenizer.encode([p[0] for p in corpus.train]), tokenizer.encode([p[1] for p in corpus.train]),
                      pad_id=0, bos_id=1, eos_id=2, max_tokens=192, max_len=32, bucket_step=16, seed=0)
    return [batch for _, (_, batch) in zip(range(50), batcher.stream())]


def test_loss_terms_by_hand():
    logits = np.array([[[0.0, math.log(3.0), 0.0], [1.0, 1.0, 1.0]]])  # [1, 2, 3]; p = (1/5, 3/5, 1/5)
    labels = np.array([[1, 0]])  # the second position is padding
    nll = -math.log(0.6)
    smooth = -(math.log(0.2) * 2 + math.log(0.6)) / 3
    expected = {"loss": 0.9 * nll + 0.1 * smooth, "nll": nll, "correct": 1, "tokens": 1}
    got_t = tt.loss_terms(torch.tensor(logits), torch.tensor(labels), 0, 0.1)
    got_j = jt.loss_terms(jnp.asarray(logits), jnp.asarray(labels), 0, 0.1)
    for name, value in expected.items():
        assert float(got_t[name]) == pytest.approx(value, rel=1e-12)
        assert float(got_j[name]) == pytest.approx(value, rel=1e-12)
    reference = F.cross_entropy(torch.tensor(logits[0]), torch.tensor(labels[0]), ignore_index=0,
                                label_smoothing=0.1, reduction="sum")
    assert float(reference) == pytest.approx(expected["loss"], rel=1e-12)
    smoothed = optax.smooth_labels(jnp.eye(3)[1], 0.1)
    assert float(optax.softmax_cross_entropy(jnp.asarray(logits[0, 0]), smoothed)) == pytest.approx(expected["loss"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_gradient_is_cross_entropys_and_the_jax_twins(smoothing):
    """SmoothedLoss's hand-written backward: F.cross_entropy's gradient and jax.grad of the JAX twin's loss, float64."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)) * 3  # [B, T, V]
    labels = rng.integers(1, 7, size=(3, 5))
    labels[0, :2] = 0  # padding
    x = torch.tensor(logits, requires_grad=True)
    tt.loss_terms(x, torch.tensor(labels), 0, smoothing)["loss"].backward()
    reference = torch.tensor(logits, requires_grad=True)
    F.cross_entropy(reference.flatten(0, 1), torch.tensor(labels).flatten(), ignore_index=0, label_smoothing=smoothing,
                    reduction="sum").backward()
    grad_j = jax.grad(lambda z: jt.loss_terms(z, jnp.asarray(labels), 0, smoothing)["loss"])(jnp.asarray(logits))
    np.testing.assert_allclose(x.grad.numpy(), reference.grad.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(x.grad.numpy(), np.asarray(grad_j), rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda z: tt.loss_terms(z, torch.tensor(labels), 0, smoothing)["loss"],
                                    (torch.tensor(logits, requires_grad=True),))


def test_schedule_torch_and_optax_agree():
    tcfg = TrainConfig(warmup_steps=10, lr_factor=2.0)
    cfg = model_config("tiny", 50)
    model = torch.nn.Linear(2, 2)
    model.cfg = cfg
    optimizer, schedule = tt.make_optimizer(model, tcfg)
    torch_lrs = []
    for _ in range(30):
        torch_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    optax_lrs = [float(jt.lr_schedule(cfg, tcfg)(step)) for step in range(30)]
    np.testing.assert_allclose(torch_lrs, optax_lrs, rtol=1e-12)
    assert torch_lrs[0] == pytest.approx(2.0 * 32 ** -0.5 * 10 ** -1.5)
    assert int(np.argmax(torch_lrs)) == 9
    assert torch_lrs[9] == pytest.approx(2.0 * 32 ** -0.5 * 10 ** -0.5)
    assert torch_lrs[29] == pytest.approx(2.0 * 32 ** -0.5 * 30 ** -0.5)
    assert learning_rate(99, d_model=32, tcfg=tcfg) == pytest.approx(2.0 * 32 ** -0.5 * 100 ** -0.5)


def _relative(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest per-tensor ||a - b|| / ||a|| (floored at 1e-3 of the whole model's norm)."""
    total = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in a.values()))
    return max(float(np.linalg.norm((a[k] - b[k]).astype(np.float64))) / max(float(np.linalg.norm(a[k])), 1e-3 * total)
               for k in a)


def _without_key_biases(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the k_proj biases: their gradient is zero in exact arithmetic (softmax ignores adding q.b_k to a
    whole row of scores), so Adam, dividing by sqrt(v) + eps, walks them on rounding noise that differs
    between any two implementations (about lr per step in float32). They do not change the function."""
    return {k: v for k, v in weights.items() if not k.endswith("k_proj.bias")}


def _train_both(cfg, tcfg, weights, batches, dtype):
    trainers = {name: cls(cfg, tcfg, weights, dtype=dtype) for name, cls in TRAINERS.items()}
    curves = {name: [] for name in trainers}
    for batch in batches:
        for name, trainer in trainers.items():
            m = trainer.train_step(batch)
            curves[name].append(float(m["loss"]) / float(m["tokens"]))
    return trainers, {name: np.array(c) for name, c in curves.items()}


TRAINING_TOLERANCES = {"float64": 1e-5, "float32": 1e-3}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_parity_50_steps(tokenizer, batches, dtype):
    """Same initial weights, same 50 batches, dropout off: equal loss curves and final weights."""
    cfg = model_config("tiny", tokenizer.vocab_size).replace(dropout=0.0, max_len=32)
    tcfg = TrainConfig(warmup_steps=100, clip_norm=0.5)
    weights = {k: v.astype(dtype) for k, v in init_canonical(cfg, "torch", 0).items()}
    trainers, curves = _train_both(cfg, tcfg, weights, batches, dtype)
    assert curves["torch"][-1] < 0.8 * curves["torch"][0]
    rel = np.max(np.abs(curves["torch"] - curves["jax"]) / np.abs(curves["torch"]))
    assert rel <= TRAINING_TOLERANCES[dtype], rel
    if dtype == "float64":
        assert rel <= 1e-12, rel
    weights = [_without_key_biases(t.weights()) for t in trainers.values()]
    assert _relative(*weights) <= {"float64": 1e-12, "float32": 1e-4}[dtype]
    moments = [t.export_state(50) for t in trainers.values()]
    for name in ("exp_avg", "exp_avg_sq"):
        assert _relative(*(_without_key_biases(getattr(m, name)) for m in moments)) <= {"float64": 1e-12,
                                                                                        "float32": 1e-3}[dtype]
    evals = [t.eval_step(batches[0]) for t in trainers.values()]
    assert evals[1]["loss"] == pytest.approx(evals[0]["loss"], rel={"float64": 1e-12, "float32": 1e-5}[dtype])


@settings(max_examples=3)
@given(cfg=configs(), source=st.sampled_from(sorted(TRAINERS)))
def test_training_parity_random_configs(tokenizer, batches, cfg, source):
    """Random architectures (pre/post-LN, gelu, tied/shared, final norm or not), float64, 10 steps."""
    cfg = cfg.replace(src_vocab_size=tokenizer.vocab_size, tgt_vocab_size=tokenizer.vocab_size, dropout=0.0,
                      max_len=32, pad_id=0)
    tcfg = TrainConfig(warmup_steps=5, clip_norm=0.5)
    weights = {k: v.astype(np.float64) for k, v in init_canonical(cfg, source, 1).items()}
    _, curves = _train_both(cfg, tcfg, weights, batches[:10], "float64")
    rel = np.max(np.abs(curves["torch"] - curves["jax"]) / np.abs(curves["torch"]))
    assert rel <= 1e-10, rel


@pytest.mark.parametrize("framework", sorted(TRAINERS))
def test_trainer_round_trips_weights(tokenizer, framework):
    cfg = model_config("tiny", tokenizer.vocab_size)
    weights = init_canonical(cfg, "torch" if framework == "jax" else "jax", 3)
    got = TRAINERS[framework](cfg, TrainConfig(), weights).weights()
    assert all(np.array_equal(got[k], weights[k]) for k in weights)


@pytest.mark.parametrize("framework", sorted(TRAINERS))
def test_exported_state_is_a_snapshot(tokenizer, batches, framework):
    """weights() and export_state() are copies: the next step leaves them as they were (on CPU torch's .cpu() of a
    CPU tensor is the tensor itself, so a view would be rewritten in place by the optimizer)."""
    cfg = model_config("tiny", tokenizer.vocab_size).replace(dropout=0.0, max_len=32)
    trainer = TRAINERS[framework](cfg, TrainConfig(warmup_steps=1), init_canonical(cfg, "torch", 4))
    trainer.train_step(batches[0])
    weights, state = trainer.weights(), trainer.export_state(1)
    frozen = {k: v.copy() for k, v in weights.items()}
    moments = {k: v.copy() for k, v in state.exp_avg.items()}
    trainer.train_step(batches[1])
    assert all(np.array_equal(weights[k], frozen[k]) and np.array_equal(state.weights[k], frozen[k]) for k in frozen)
    assert all(np.array_equal(state.exp_avg[k], moments[k]) for k in moments)
    assert any(not np.array_equal(v, frozen[k]) for k, v in trainer.weights().items())


def _run(framework, out, steps, resume=False, **kw):
    return run(framework, "builtin", out, model=kw.pop("model", "tiny"), tcfg=TrainConfig(**{**TINY, "steps": steps}),
               resume=resume, limit=3000, test_limit=0, progress=False, echo=lambda s: None, **kw)


@pytest.mark.parametrize("framework", sorted(TRAINERS))
def test_resume_is_exact(tmp_path, framework):
    """12 steps straight == 6 steps + resume + 6 steps, bit for bit (dropout on)."""
    _run(framework, tmp_path / "straight", 12)
    _run(framework, tmp_path / "split", 6)
    _run(framework, tmp_path / "split", 12, resume=True)
    a, b = load_checkpoint(tmp_path / "straight")[1], load_checkpoint(tmp_path / "split")[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "straight") == [
        {**r, "tokens_per_s": s["tokens_per_s"]} if "tokens_per_s" in r else r
        for r, s in zip(read_metrics(tmp_path / "split"), read_metrics(tmp_path / "straight"))]
    assert [p.name for p in checkpoint_dirs(tmp_path / "split")] == ["step_0000006", "step_0000012"]
    files = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert files == ["checkpoints", "config.json", "loss.png", "metrics.jsonl", "model.safetensors",
                     "tokenizer.json", "train_config.json"]


def test_resume_in_the_other_framework(tmp_path):
    """A torch run resumed in JAX (and the other way) follows the uninterrupted run (float64, no dropout)."""
    for first, second in (("torch", "jax"), ("jax", "torch")):
        _run(first, tmp_path / f"{first}-straight", 12, dtype="float64", dropout=0.0)
        _run(first, tmp_path / f"{first}-{second}", 6, dtype="float64", dropout=0.0)
        _run(second, tmp_path / f"{first}-{second}", 12, resume=True, dtype="float64")
        a = load_checkpoint(tmp_path / f"{first}-straight")[1]
        b = load_checkpoint(tmp_path / f"{first}-{second}")[1]
        assert _relative(_without_key_biases(a), _without_key_biases(b)) <= 1e-12
        losses = [[r["loss"] for r in read_metrics(tmp_path / name) if r["split"] == "train"]
                  for name in (f"{first}-straight", f"{first}-{second}")]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-10)


def test_checkpoint_holds_moments_in_canonical_names(tmp_path, tokenizer):
    _run("jax", tmp_path / "run", 6)
    step_dir = checkpoint_dirs(tmp_path / "run")[-1]
    cfg = load_checkpoint(tmp_path / "run")[0]
    state, meta = load_training_checkpoint(step_dir, cfg)
    assert state.step == 6 and meta["framework"] == "jax" and meta["position"][0] == 0
    assert set(state.exp_avg) == set(state.weights) and all(np.any(v != 0) for k, v in state.exp_avg_sq.items()
                                                             if "k_proj.bias" not in k)


def test_bad_input_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(TrainError, match="empty.tsv: no sentence pairs"):
        run("torch", tmp_path / "empty.tsv", tmp_path / "a", model="tiny", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainError, match="cannot write to output directory"):
        _run("torch", tmp_path / "file" / "run", 2)
    _run("torch", tmp_path / "run", 6)
    with pytest.raises(TrainError, match="is not empty; pass --resume"):
        _run("torch", tmp_path / "run", 6)
    with pytest.raises(TrainError, match="holds no checkpoint to resume from"):
        _run("torch", tmp_path / "fresh", 6, resume=True)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(TrainError, match="not the training data of the run"):
        run("torch", "builtin", tmp_path / "run", model="tiny", tcfg=TrainConfig(**TINY), resume=True, limit=2000,
            progress=False, echo=lambda s: None)
    other = train_tokenizer(["un deux trois", "quatre cinq"], vocab_size=60, min_frequency=1)
    tokenizer_json = (tmp_path / "run" / "tokenizer.json").read_bytes()
    other.save(tmp_path / "run" / "tokenizer.json")
    with pytest.raises(TrainError, match="vocabulary mismatch"):
        _run("torch", tmp_path / "run", 12, resume=True)
    (tmp_path / "run" / "tokenizer.json").write_bytes(tokenizer_json)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    with pytest.raises(TrainError, match="vocabulary mismatch: the config's src_vocab_size is 7"):
        model_config(model_config("tiny", 7), 9)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    step_fn = tt.Trainer.train_step
    calls = []

    def poisoned(self, batch):
        calls.append(1)
        metrics = step_fn(self, batch)
        return {**metrics, "loss": float("nan")} if len(calls) == 9 else metrics

    monkeypatch.setattr(tt.Trainer, "train_step", poisoned)
    with pytest.raises(TrainError, match=r"loss became nan at step 9; stopped, the last good checkpoint is .*step_0000006"):
        _run("torch", tmp_path / "run", 12)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_0000006"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6
    cfg, weights = load_checkpoint(tmp_path / "run")
    assert all(np.isfinite(v).all() for v in weights.values())
    monkeypatch.setattr(tt.Trainer, "train_step", step_fn)
    _run("torch", tmp_path / "run", 12, resume=True)
    assert checkpoint_dirs(tmp_path / "run")[-1].name == "step_0000012"


def test_model_config_presets_and_files(tmp_path):
    base = model_config("base", 100)
    assert (base.d_model, base.num_encoder_layers, base.src_vocab_size, base.tgt_vocab_size) == (512, 6, 100, 100)
    (tmp_path / "m.json").write_text(json.dumps({"d_model": 64, "num_heads": 4, "norm_first": True}))
    cfg = model_config(str(tmp_path / "m.json"), 50)
    assert (cfg.d_model, cfg.num_heads, cfg.norm_first, cfg.tgt_vocab_size) == (64, 4, True, 50)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(TrainError, match="bad.json: not valid JSON"):
        model_config(str(tmp_path / "bad.json"), 50)
    (tmp_path / "typo.json").write_text(json.dumps({"d_modle": 64}))
    with pytest.raises(TrainError, match="unknown config keys: d_modle"):
        model_config(str(tmp_path / "typo.json"), 50)
    (tmp_path / "heads.json").write_text(json.dumps({"d_model": 64, "num_heads": 5}))
    with pytest.raises(TrainError, match=r"d_model \(64\) must be divisible by num_heads \(5\)"):
        model_config(str(tmp_path / "heads.json"), 50)


def test_torch_trainer_checks_a_batchs_ids_once_on_the_host():
    """The trainer range-checks each batch's ids before the step (one line naming the range; no update made), and
    the step itself runs in `ids_checked`, where the embeddings read no min/max back from the device."""
    from parity.batching import Batch
    from parity.config import TransformerConfig
    from torch_tx.embeddings import TokenEmbedding, ids_checked

    cfg = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, d_ff=16, max_len=16)
    trainer = tt.Trainer(cfg, TrainConfig(seed=0))
    before = {k: v.copy() for k, v in trainer.weights().items()}
    good = Batch(np.array([[3, 4, 0]], np.int32), np.array([[1, 5, 6]], np.int32), np.array([[5, 6, 2]], np.int32))
    bad = Batch(np.array([[3, 11, 0]], np.int32), good.tgt_in, good.labels)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 11\), got values in \[0, 11\]"):
        trainer.train_step(bad)
    assert all(np.array_equal(v, before[k]) for k, v in trainer.weights().items())
    assert float(trainer.train_step(good)["tokens"]) == 3
    embed = TokenEmbedding(5, 4)
    with pytest.raises(ValueError, match="token ids must be in"):
        embed(torch.tensor([[5]]))
    with ids_checked(), pytest.raises(IndexError):  # unchecked: the lookup's own bounds check is what is left
        embed(torch.tensor([[5]]))
