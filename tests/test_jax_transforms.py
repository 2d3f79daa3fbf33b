"""The Flax twin under JAX's transformations: jit, grad, vmap and lax.scan, with the batch passed as an argument
and captured by the traced function as a constant, for every family.

Inside a trace even a captured concrete array must not be read on the host (operations on it are staged out), so
the twin's value checks (token ids, positions, segments, cache index) ask JAX whether a trace is running
(`jax_tx.tracing`) and then leave the values alone; eager calls still raise. Values are compared in float64 with
the parity suite's float64 tolerance (1e-10 relative to the reference's largest magnitude): the traced and eager
programs compute the same sums, only XLA's fusion may reorder them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_tx
from jax_tx.tracing import tracing
from parity.config import TransformerConfig

CFG = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=1,
                        num_decoder_layers=1, d_ff=16, dropout=0.0, max_len=16)
FAMILIES = ("seq2seq", "encoder", "decoder")
RTOL = 1e-10


def _batch(family: str, seed: int) -> dict[str, np.ndarray]:
    """Two packed rows: two examples in row 0, one (with padding) in row 1."""
    rng = np.random.default_rng(seed)
    segments = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])  # [B, L]
    src = np.where(segments > 0, rng.integers(1, CFG.src_vocab_size, segments.shape), 0)  # [B, S]
    tgt = np.where(segments > 0, rng.integers(1, CFG.tgt_vocab_size, segments.shape), 0)  # [B, T]
    return {"seq2seq": {"src": src, "tgt": tgt, "src_segments": segments, "tgt_segments": segments},
            "encoder": {"src": src, "src_segments": segments},
            "decoder": {"tgt": tgt, "tgt_segments": segments}}[family]


def _model(family: str):
    cfg = CFG.replace(arch=family, num_classes=3 if family == "encoder" else None)
    model = jax_tx.model_for(cfg)
    init = {k: jnp.asarray(v) for k, v in _batch(family, 0).items()}
    params = model.init(jax.random.PRNGKey(0), *[init[k] for k in ("src", "tgt") if k in init])["params"]
    return model, jax.tree.map(lambda x: x.astype(jnp.float64), params)  # conftest turns on 64-bit mode


def _loss(model, family: str):
    """params, batch -> a scalar that depends on every output (a fixed-weight sum)."""
    def loss(params, batch):
        kwargs = {k: v for k, v in batch.items() if k.endswith("segments")}
        if family == "seq2seq":
            out = model.apply({"params": params}, batch["src"], batch["tgt"], **kwargs)  # [B, T, V]
        elif family == "encoder":
            hidden, logits = model.apply({"params": params}, batch["src"], **kwargs)  # [B, S, D], [B, S, C]
            out = jnp.concatenate([hidden, logits], axis=-1)  # [B, S, D + C]
        else:
            out = model.apply({"params": params}, batch["tgt"], **kwargs)  # [B, T, V]
        return (out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))).sum()
    return loss


def _close(got, want, scale: float | None = None):
    """`scale` (default: want's largest magnitude) sets atol = RTOL * scale."""
    got, want = np.asarray(got), np.asarray(want)
    scale = float(np.abs(want).max()) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


def _close_grads(got, want):
    """Gradients, atol scaled to the whole gradient's largest entry: some (the k_proj biases') are zero in exact
    arithmetic, and their float64 rounding noise (~1e-16) differs between any two programs."""
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
    jax.tree.map(lambda a, b: _close(a, b, scale), got, want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("captured", [False, True], ids=["argument", "captured"])
def test_jit_and_grad(family, captured):
    model, params = _model(family)
    loss = _loss(model, family)
    batch = {k: jnp.asarray(v) for k, v in _batch(family, 1).items()}
    want = loss(params, batch)
    if captured:
        value = jax.jit(lambda p: loss(p, batch))(params)
        value_and_grad = jax.value_and_grad(lambda p: loss(p, batch))(params)
        jit_grad = jax.jit(jax.grad(lambda p: loss(p, batch)))(params)
    else:
        value = jax.jit(loss)(params, batch)
        value_and_grad = jax.value_and_grad(loss)(params, batch)
        jit_grad = jax.jit(jax.grad(loss))(params, batch)
    _close(value, want)
    _close(value_and_grad[0], want)
    _close_grads(jit_grad, value_and_grad[1])
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(jit_grad)) > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("captured", [False, True], ids=["argument", "captured"])
def test_vmap_and_scan(family, captured):
    model, params = _model(family)
    loss = _loss(model, family)
    batches = [{k: jnp.asarray(v) for k, v in _batch(family, seed).items()} for seed in (2, 3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)  # each [G, B, L]
    each = jnp.stack([loss(params, b) for b in batches])  # [G]
    if captured:  # the batches are constants of the traced function; the mapped/scanned value is an index
        mapped = jax.vmap(lambda g: jnp.stack([loss(params, b) for b in batches])[g])(jnp.arange(2))  # [G]
        total, _ = jax.lax.scan(lambda c, g: (c + jnp.stack([loss(params, b) for b in batches])[g], None),
                                jnp.zeros(()), jnp.arange(2))
    else:
        mapped = jax.vmap(loss, in_axes=(None, 0))(params, stacked)  # [G]
        total, _ = jax.lax.scan(lambda c, b: (c + loss(params, b), None), jnp.zeros(()), stacked)
    _close(mapped, each)
    _close(total, each.sum())


def test_cached_decoding_under_jit_with_a_captured_cache():
    """encode / init_cache / decode with the memory and cache captured by the jitted function."""
    model, params = _model("seq2seq")
    batch = {k: jnp.asarray(v) for k, v in _batch("seq2seq", 4).items()}
    memory = model.apply({"params": params}, batch["src"], method=model.encode)  # [B, S, D]
    cache = model.apply({"params": params}, memory, batch["src"] != 0, 4, method=model.init_cache)
    tok = jnp.full((2, 1), 1)  # [B, 1]
    want, _ = model.apply({"params": params}, tok, None, cache=cache, method=model.decode)  # [B, 1, V]
    got, new_cache = jax.jit(lambda p: model.apply({"params": p}, tok, None, cache=cache, method=model.decode))(params)
    _close(got, want)
    assert int(new_cache["index"]) == 1
    jit_memory = jax.jit(lambda p: model.apply({"params": p}, batch["src"], method=model.encode))(params)
    _close(jit_memory, memory)


@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_range_ids_raise_eagerly_and_give_nan_rows_under_a_trace(family):
    model, params = _model(family)
    loss = _loss(model, family)
    batch = {k: np.array(v) for k, v in _batch(family, 5).items()}
    key = "tgt" if family == "decoder" else "src"
    batch[key][0, 1] = 99  # beyond every vocabulary
    bad = {k: jnp.asarray(v) for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1[13]\), got values in \[0, 99\]"):
        loss(params, bad)
    assert np.isnan(float(jax.jit(lambda p: loss(p, bad))(params)))  # captured: NaN, not a crash
    assert np.isnan(float(jax.jit(loss)(params, bad)))


def test_negative_segment_ids_raise_eagerly_only():
    model, params = _model("encoder")
    batch = {k: np.array(v) for k, v in _batch("encoder", 6).items()}
    batch["src_segments"][1, 5] = -1
    bad = {k: jnp.asarray(v) for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"src_segments must be >= 0 \(0 = padding\), got -1"):
        _loss(model, "encoder")(params, bad)
    jax.jit(lambda p: _loss(model, "encoder")(p, bad))(params)  # traced: no host read, no error


def test_tracing_is_true_inside_every_transformation_and_false_outside():
    seen = []

    def probe(x):
        seen.append(tracing())
        return x.sum()

    x = jnp.ones(2)
    probe(x)
    jax.jit(probe)(x)
    jax.grad(probe)(x)
    jax.vmap(probe)(jnp.ones((2, 2)))
    jax.lax.scan(lambda c, y: (c + probe(y), None), 0.0, jnp.ones((2, 2)))
    jax.eval_shape(lambda y: probe(y), x)  # a new function: eval_shape would reuse jit(probe)'s trace
    assert seen == [False, True, True, True, True, True]
