"""bfloat16 mixed precision and torch.compile in the trainers.

Weights from one twin converted into the other, dropout off: one mixed-precision step of each on random
configs and batches (loss, gradients, updated weights, evaluation loss), and 20 steps on real batches (loss
curves, gradients, weights). By hand: float32 master weights, gradients and Adam moments with bfloat16
matmuls in both twins. `twin train --dtype bfloat16` in each framework, resumed in the other; a compiled
torch step against the eager one.
"""

from __future__ import annotations

import functools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_tx.train as jt
import torch_tx.train as tt
from parity import cli
from parity.batching import NO_CLASS, Batch, Batcher
from parity.checkpoint import load_checkpoint
from parity.config import TransformerConfig
from parity.data import load_corpus
from parity.suite import ARCHS, TOLERANCES, TWINS, errors, init_canonical
from parity.tokenizer import train_tokenizer
from parity.train import (TrainConfig, checkpoint_dirs, load_training_checkpoint, model_config, read_metrics,
                          run)
from strategies import configs, inputs

TRAINERS = {"torch": tt.Trainer, "jax": jt.Trainer}
TOL = TOLERANCES["bfloat16"]
# Gradients of one bfloat16 step of the tiny random models below (relative, whole model): over 90 draws the
# twins differed by 7e-3 (median) and up to 5.1e-2, and each twin's from its own float32 gradient by up to
# 4.9e-2 (torch.autocast alone). Rounding matmul inputs and outputs to 8 bits of mantissa moves a ReLU's kink
# or a near-degenerate layer norm; no claim tighter than this holds for such models. On real batches of the
# tiny preset the twins agree to TOL (test_mixed_precision_training_parity_20_steps).
GRAD_TOL = 1e-1
SMALL = ["--config", "tiny", "--limit", "2000", "--max-tokens", "256", "--no-progress", "--test-limit", "0",
         "--log-every", "1", "--eval-every", "100", "--save-every", "2"]


def batch_of(cfg: TransformerConfig, draw: st.DrawFn) -> Batch:
    """A right-padded training batch of cfg.arch: random next-token labels at the real target positions, or a
    random class per non-empty source row (NO_CLASS for empty ones)."""
    found = draw(inputs(cfg))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if cfg.arch == "encoder":
        classes = rng.integers(0, cfg.num_classes, len(found.src))  # [B]
        return Batch(found.src.astype(np.int32), None, np.where(found.src_mask.any(1), classes, NO_CLASS)
                     .astype(np.int32), pad_id=cfg.pad_id)
    labels = np.where(found.tgt_mask, rng.integers(1, cfg.tgt_vocab_size, found.tgt.shape), cfg.pad_id)  # [B, T]
    return Batch(None if cfg.arch == "decoder" else found.src.astype(np.int32), found.tgt.astype(np.int32),
                 labels.astype(np.int32), pad_id=cfg.pad_id)


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Every tensor of a canonical dict, in name order, as one float64 vector."""
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in sorted(arrays)])


def relative(got: float, ref: float) -> float:
    return abs(got - ref) / abs(ref)


@settings(max_examples=6)
@given(data=st.data(), source=st.sampled_from(TWINS))
def test_one_mixed_precision_step_matches_across_twins(data, source):
    """Weights from `source`, converted into the other twin; one bfloat16 step each, dropout off. Gradients are
    read back from Adam's first moment after one step: exp_avg = (1 - beta1) * clipped gradient."""
    cfg = data.draw(configs(archs=ARCHS))
    if cfg.arch == "encoder" and cfg.num_classes is None:
        cfg = cfg.replace(num_classes=2)
    batch = batch_of(cfg, data.draw)
    tcfg = TrainConfig()
    weights = init_canonical(cfg, source, 0)
    other = "jax" if source == "torch" else "torch"
    results = {}
    for name in TWINS:
        trainer = TRAINERS[name](cfg, tcfg, weights, dtype="bfloat16")
        metrics = {k: float(v) for k, v in trainer.train_step(batch).items()}
        state = trainer.export_state(1)
        results[name] = {"loss": metrics["loss"] / metrics["tokens"], "grad_norm": metrics["grad_norm"],
                         "grads": flat(state.exp_avg) / (1 - tcfg.betas[0]), "weights": flat(state.weights),
                         "eval": trainer.eval_step(batch)["loss"] / metrics["tokens"]}
    ref, got = results[source], results[other]
    assert relative(got["loss"], ref["loss"]) <= TOL
    assert relative(got["eval"], ref["eval"]) <= TOL
    assert relative(got["grad_norm"], ref["grad_norm"]) <= TOL
    assert errors(got["grads"], ref["grads"])[1] <= GRAD_TOL
    assert errors(got["weights"], ref["weights"])[1] <= TOL
    assert errors(ref["weights"], flat(weights))[1] > 0  # the step did update


@pytest.fixture(scope="module")
def corpus_batches():
    """20 length-bucketed batches (about 110 target tokens each) of the builtin corpus, and its tokenizer."""
    corpus = load_corpus("builtin", limit=3000)
    tokenizer = train_tokenizer((s for pair in corpus.train for s in pair), vocab_size=200)
    batcher = Batcher(tokenizer.encode([p[0] for p in corpus.train]), tokenizer.encode([p[1] for p in corpus.train]),
                      pad_id=0, bos_id=1, eos_id=2, max_tokens=192, max_len=32, bucket_step=16, seed=0)
    return tokenizer, [batch for _, (_, batch) in zip(range(20), batcher.stream())]


@pytest.mark.parametrize("source", TWINS)
def test_mixed_precision_training_parity_20_steps(corpus_batches, source):
    """The tiny preset (d_model 32, ReLU) on real batches, weights from `source`: the first step's gradients,
    20 steps of losses and the final weights agree to the bfloat16 tolerance (measured: 1.2e-2, 4e-4, 4e-3)."""
    tokenizer, batches = corpus_batches
    cfg = model_config("tiny", tokenizer.vocab_size).replace(dropout=0.0, max_len=32)
    tcfg = TrainConfig(warmup_steps=100, clip_norm=0.5)
    trainers = {name: TRAINERS[name](cfg, tcfg, init_canonical(cfg, source, 0), dtype="bfloat16") for name in TWINS}
    other = "jax" if source == "torch" else "torch"
    curves = {name: [] for name in TWINS}
    for step, batch in enumerate(batches):
        for name, trainer in trainers.items():
            metrics = trainer.train_step(batch)
            curves[name].append(float(metrics["loss"]) / float(metrics["tokens"]))
        if step == 0:
            grads = {name: flat(trainer.export_state(1).exp_avg) for name, trainer in trainers.items()}
            assert errors(grads[other], grads[source])[1] <= TOL
    assert curves[source][-1] < 0.8 * curves[source][0]
    assert max(relative(got, ref) for got, ref in zip(curves[other], curves[source])) <= TOL
    weights = {name: flat(trainer.weights()) for name, trainer in trainers.items()}
    assert errors(weights[other], weights[source])[1] <= TOL


def tiny_config(arch: str = "seq2seq", num_classes: int | None = None) -> TransformerConfig:
    return TransformerConfig(src_vocab_size=13, tgt_vocab_size=13, d_model=16, num_heads=2, num_encoder_layers=1,
                             num_decoder_layers=1, d_ff=32, dropout=0.0, max_len=16).for_arch(arch, num_classes)


def tiny_batch(arch: str = "seq2seq", seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    src, tgt, labels = (rng.integers(1, 13, shape).astype(np.int32) for shape in ((2, 5), (2, 4), (2, 4)))
    return Batch(None if arch == "decoder" else src, tgt, labels)


def test_torch_mixed_precision_by_hand():
    """Under the bfloat16 trainer: the matmuls (and their backward) in bfloat16, embeddings and layer norms in
    float32; weights, gradients and Adam moments float32, and so are the exported weights and moments."""
    seen: dict[str, set[torch.dtype]] = {"linear": set(), "logits": set(), "grad_logits": set(), "norm": set(),
                                         "embed": set()}
    trainer = tt.Trainer(tiny_config(), TrainConfig(), dtype="bfloat16")
    model = trainer.model
    model.generator.register_forward_hook(lambda m, i, o: seen["logits"].add(o.dtype))
    model.generator.register_full_backward_hook(lambda m, gi, go: seen["grad_logits"].add(go[0].dtype))
    model.encoder.layers[0].ff.linear1.register_forward_hook(lambda m, i, o: seen["linear"].add(o.dtype))
    model.encoder.layers[0].ff_norm.register_forward_hook(lambda m, i, o: seen["norm"].add(o.dtype))
    model.src_embed.register_forward_hook(lambda m, i, o: seen["embed"].add(o.dtype))
    trainer.train_step(tiny_batch())
    assert seen == {"linear": {torch.bfloat16}, "logits": {torch.bfloat16}, "grad_logits": {torch.bfloat16},
                    "norm": {torch.float32}, "embed": {torch.float32}}
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.float32}
    moments = {v.dtype for slot in trainer.optimizer.state.values() for k, v in slot.items() if k != "step"}
    assert moments == {torch.float32}
    state = trainer.export_state(1)
    assert {a.dtype for m in (state.weights, state.exp_avg, state.exp_avg_sq) for a in m.values()} == {np.dtype(np.float32)}
    plain = tt.Trainer(tiny_config(), TrainConfig())
    plain.model.generator.register_forward_hook(lambda m, i, o: seen["logits"].add(o.dtype))
    seen["logits"].clear()
    plain.train_step(tiny_batch())
    assert seen["logits"] == {torch.float32}


def dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot_general in `jaxpr` and the jaxprs nested in it (pjit, custom_jvp, ...)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += dot_dtypes(sub)
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_jax_mixed_precision_by_hand(arch):
    """Every matmul of the bfloat16 step (forward and backward, attention and output layer included) takes
    bfloat16 operands, every one of the float32 step float32; params and Adam moments stay float32."""
    cfg = tiny_config(arch, num_classes=3) if arch == "encoder" else tiny_config(arch)
    batch = tiny_batch(arch)
    if arch == "encoder":
        batch = Batch(batch.src, None, np.array([0, 2], np.int32))
    for dtype, compute in (("bfloat16", "bfloat16"), ("float32", "float32")):
        trainer = jt.Trainer(cfg, TrainConfig(), dtype=dtype)
        step = functools.partial(jt.train_step, cfg=cfg, tcfg=trainer.tcfg,
                                 compute_dtype=trainer.precision.compute_dtype)
        jaxpr = jax.make_jaxpr(step)(trainer.train_state, batch.arrays(), jax.random.key(0))
        dots = dot_dtypes(jaxpr.jaxpr)
        assert len(dots) >= 6 and set(dots) == {(compute, compute)}, dots
        read = flax.traverse_util.flatten_dict(jt.compute_params(trainer.train_state.params,
                                                                 trainer.precision.compute_dtype))
        assert {str(leaf.dtype) for path, leaf in read.items() if path[-1] == "kernel"} == {compute}
        assert {str(leaf.dtype) for path, leaf in read.items() if path[-1] in ("embedding", "scale")} == {"float32"}
        trainer.train_step(batch)
        mu, nu = (optax.tree_utils.tree_get(trainer.train_state.opt_state, name) for name in ("mu", "nu"))
        leaves = jax.tree_util.tree_leaves((trainer.train_state.params, mu, nu))
        assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
        state = trainer.export_state(1)
        assert {a.dtype for m in (state.weights, state.exp_avg, state.exp_avg_sq) for a in m.values()} == {np.dtype(np.float32)}


def test_compute_params_casts_the_matmul_weights_only():
    params = {"src_embed": {"embedding": np.ones((3, 2), np.float32)},
              "norm": {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)},
              "ff": {"linear1": {"kernel": np.ones((2, 4), np.float32), "bias": np.zeros(4, np.float32)}},
              "generator": {"bias": np.zeros(3, np.float32)}}
    cast = jt.compute_params(params, jnp.bfloat16)
    dtypes = jax.tree_util.tree_map(lambda a: str(a.dtype), cast)
    assert dtypes == {"src_embed": {"embedding": "float32"}, "norm": {"scale": "float32", "bias": "float32"},
                      "ff": {"linear1": {"kernel": "bfloat16", "bias": "bfloat16"}}, "generator": {"bias": "float32"}}
    assert jt.compute_params(params, None) is params


def test_twin_train_bfloat16_in_each_framework_and_resumed_in_the_other(tmp_path):
    """`twin train --dtype bfloat16`: a torch run of 4 steps resumed in JAX to 6; the checkpoints hold float32
    weights and moments in canonical names, and the losses stay finite."""
    out = tmp_path / "run"
    assert cli.main(["train", "--framework", "torch", "--dtype", "bfloat16", "--out", str(out), "--steps", "4",
                     *SMALL]) == 0
    assert cli.main(["train", "--framework", "jax", "--dtype", "bfloat16", "--out", str(out), "--steps", "6",
                     "--resume", *SMALL]) == 0
    assert [p.name for p in checkpoint_dirs(out)] == ["step_0000002", "step_0000004", "step_0000006"]
    cfg, weights = load_checkpoint(out)
    state, meta = load_training_checkpoint(checkpoint_dirs(out)[-1], cfg)
    assert meta["dtype"] == "bfloat16" and meta["framework"] == "jax"
    assert {a.dtype for m in (weights, state.weights, state.exp_avg, state.exp_avg_sq) for a in m.values()} == \
        {np.dtype(np.float32)}
    train = [r["loss"] for r in read_metrics(out) if r["split"] == "train"]
    assert len(train) == 6 and all(np.isfinite(train))


def test_compile_is_for_torch(tmp_path, capsys):
    assert cli.main(["train", "--framework", "jax", "--compile", "--out", str(tmp_path / "run"), *SMALL]) == 1
    assert "--compile is for --framework torch" in capsys.readouterr().err


def test_run_passes_compile_to_the_torch_trainer(tmp_path, monkeypatch):
    """run(compile=True) compiles the torch trainer's step model (torch.compile stubbed: the plumbing only)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    run("torch", "builtin", tmp_path / "run", model="tiny", tcfg=TrainConfig(steps=2, max_tokens=256, save_every=2),
        limit=2000, test_limit=0, progress=False, echo=lambda s: None, compile=True)
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["framework"] == "torch"


@pytest.fixture(scope="module")
def torch_compile():
    """Skip when torch.compile cannot compile here (no C++ compiler, unsupported platform)."""
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - any failure means: not available here
        pytest.skip(f"torch.compile is not available: {type(e).__name__}: {e}")


def test_compiled_step_equals_eager_step(torch_compile):
    """Two float32 steps of the compiled trainer (a tiny decoder: a short compile) equal the eager ones to
    float32 tolerance; the weights and moments keep their canonical names. The k_proj biases are left out of
    the weights: their gradient is zero in exact arithmetic, so Adam walks them by +-lr on rounding noise, whose
    sign differs between any two implementations."""
    cfg = tiny_config("decoder")
    weights = init_canonical(cfg, "jax", 0)
    tcfg = TrainConfig(warmup_steps=4)
    eager, compiled = (tt.Trainer(cfg, tcfg, weights, compile=flag) for flag in (False, True))
    assert compiled.step_model is not compiled.model
    for seed in (0, 1):
        batch = tiny_batch("decoder", seed)
        got, ref = compiled.train_step(batch), eager.train_step(batch)
        assert float(got["loss"]) == pytest.approx(float(ref["loss"]), rel=TOLERANCES["float32"])
    got, ref = compiled.export_state(2), eager.export_state(2)
    for name in ("weights", "exp_avg", "exp_avg_sq"):
        assert list(getattr(got, name)) == list(getattr(ref, name)) == list(weights)
        kept = [k for k in weights if name != "weights" or not k.endswith("k_proj.bias")]
        assert errors(flat({k: getattr(got, name)[k] for k in kept}),
                      flat({k: getattr(ref, name)[k] for k in kept}))[1] <= TOLERANCES["float32"]
