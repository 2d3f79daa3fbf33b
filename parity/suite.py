"""The cross-framework parity checks, shared by the test suite and `twin parity`.

One comparison takes canonical weights that came out of one twin (through the converter), loads
them into both twins, runs the same inputs, and compares encoder memory, logits and the gradient of
`sum(logits * W)` w.r.t. every parameter (Flax gradients mapped back through the converter;
float32 and float64 only). Errors are relative to the norm of the source twin's result. Dropout is off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from parity.config import TransformerConfig
from parity.convert import canonical_to_flax, check_canonical, flax_to_canonical, to_numpy

TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}
TWINS = ("torch", "jax")

# The small fixed sets that random configs and inputs draw from (few shapes: JAX compiles each once).
SPACE: dict[str, tuple[Any, ...]] = {
    "d_model": (8, 16, 32),
    "num_heads": (1, 2, 4),
    "num_layers": (1, 2, 3),
    "d_ff": (16, 64),
    "activation": ("relu", "gelu"),
    "norm_first": (False, True),
    "layer_norm_eps": (1e-5, 1e-6, 1e-3),
    "vocab_size": (7, 13, 32),
    "final_norm": (True, False),
    "tie_output": (False, True),
    "share_embeddings": (False, True),
    "output_bias": (True, False),
    "batch": (1, 2, 3),
    "src_len": (1, 4, 7),
    "tgt_len": (1, 3, 6),
}


def build_config(choose: Callable[[str, Sequence[Any]], Any]) -> TransformerConfig:
    """A config (dropout off, max_len 16) whose fields come from `choose(name, options)` over SPACE."""
    d_model = choose("d_model", SPACE["d_model"])
    share = choose("share_embeddings", SPACE["share_embeddings"])
    src_vocab = choose("vocab_size", SPACE["vocab_size"])
    return TransformerConfig(
        src_vocab_size=src_vocab, tgt_vocab_size=src_vocab if share else choose("vocab_size", SPACE["vocab_size"]),
        d_model=d_model, num_heads=choose("num_heads", [h for h in SPACE["num_heads"] if d_model % h == 0]),
        num_encoder_layers=choose("num_layers", SPACE["num_layers"]),
        num_decoder_layers=choose("num_layers", SPACE["num_layers"]), d_ff=choose("d_ff", SPACE["d_ff"]),
        dropout=0.0, activation=choose("activation", SPACE["activation"]),
        norm_first=choose("norm_first", SPACE["norm_first"]),
        layer_norm_eps=choose("layer_norm_eps", SPACE["layer_norm_eps"]), max_len=16,
        final_norm=choose("final_norm", SPACE["final_norm"]), tie_output=choose("tie_output", SPACE["tie_output"]),
        share_embeddings=share, output_bias=choose("output_bias", SPACE["output_bias"]))


def random_config(rng: np.random.Generator) -> TransformerConfig:
    """A config drawn uniformly from SPACE."""
    return build_config(lambda _, options: options[int(rng.integers(len(options)))])


def np_dtype(name: str) -> np.dtype:
    """numpy dtype by name; bfloat16 through ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class Check:
    """One row of the parity table."""

    what: str
    dtype: str
    max_abs: float
    rel: float
    tol: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.tol)


@dataclass(frozen=True)
class Inputs:
    """One batch: src (B, S), tgt (B, T) int64, masks (B, S) / (B, T) bool, loss weights (B, T, V)."""

    src: np.ndarray
    tgt: np.ndarray
    src_mask: np.ndarray
    tgt_mask: np.ndarray
    loss_weights: np.ndarray


def errors(got: np.ndarray, ref: np.ndarray, denom: float | None = None) -> tuple[float, float]:
    """(max |got - ref|, ||got - ref|| / ||ref||) in float64; `denom` replaces ||ref||."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    diff = got - ref
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    norm = float(np.linalg.norm(ref)) if denom is None else denom
    num = float(np.linalg.norm(diff))
    return max_abs, (0.0 if num == 0.0 else num / norm if norm > 0 else float("inf"))


def make_inputs(cfg: TransformerConfig, src_lengths: Sequence[int], tgt_lengths: Sequence[int], src_len: int,
                tgt_len: int, rng: np.random.Generator) -> Inputs:
    """Random non-pad ids, right-padded to the given per-row lengths (0 = an empty row), and loss weights."""
    batch = len(src_lengths)

    def ids_and_mask(vocab: int, length: int, lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]  # [B, L]
        ids = rng.integers(0, vocab, size=(batch, length))  # [B, L]
        ids = np.where(ids == cfg.pad_id, (cfg.pad_id + 1) % vocab, ids)
        return np.where(mask, ids, cfg.pad_id).astype(np.int64), mask

    src, src_mask = ids_and_mask(cfg.src_vocab_size, src_len, src_lengths)
    tgt, tgt_mask = ids_and_mask(cfg.tgt_vocab_size, tgt_len, tgt_lengths)
    weights = rng.standard_normal((batch, tgt_len, cfg.tgt_vocab_size))  # [B, T, V]
    return Inputs(src, tgt, src_mask, tgt_mask, weights)


def random_inputs(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int,
                  rng: np.random.Generator, empty_source_row: bool = False) -> Inputs:
    """Random lengths (at least 1) per row; with `empty_source_row`, source row 0 is all padding."""
    src_lengths = rng.integers(1, src_len + 1, size=batch)  # [B]
    if empty_source_row:
        src_lengths[0] = 0
    return make_inputs(cfg, src_lengths, rng.integers(1, tgt_len + 1, size=batch), src_len, tgt_len, rng)


def init_canonical(cfg: TransformerConfig, twin: str, seed: int) -> dict[str, np.ndarray]:
    """Fresh weights from one twin's own initializer, as canonical numpy arrays (via the converter)."""
    if twin == "torch":
        import torch

        import torch_tx

        torch.manual_seed(seed)
        return {k: to_numpy(v) for k, v in torch_tx.Transformer(cfg).state_dict().items()}
    import jax
    import jax.numpy as jnp

    import jax_tx

    dummy = jnp.ones((1, 1), dtype=jnp.int32)
    variables = jax_tx.Transformer(cfg).init(jax.random.key(seed), dummy, dummy)
    return flax_to_canonical(variables["params"], cfg)


@contextlib.contextmanager
def _jax_device(device: str) -> Iterator[Any]:
    import jax

    dev = jax.devices("gpu")[0] if device == "cuda" else jax.devices("cpu")[0]
    with jax.default_device(dev), jax.default_matmul_precision("highest"):
        yield dev


def run_torch(cfg: TransformerConfig, weights: Mapping[str, np.ndarray], inputs: Inputs, dtype: str,
              device: str = "cpu") -> dict[str, Any]:
    """Torch twin on canonical weights: memory, logits, {canonical name: grad}, all numpy."""
    import torch

    import torch_tx
    from parity.convert import to_torch

    tdtype = getattr(torch, dtype)
    model = torch_tx.Transformer(cfg).to(device=device, dtype=tdtype).eval()
    model.load_state_dict({k: to_torch(v) for k, v in weights.items()}, strict=True)
    src, tgt = (torch.from_numpy(a).to(device) for a in (inputs.src, inputs.tgt))
    src_mask, tgt_mask = (torch.from_numpy(a).to(device) for a in (inputs.src_mask, inputs.tgt_mask))
    memory = model.encode(src, src_mask)  # [B, S, D]
    logits = model(src, tgt, src_mask, tgt_mask)  # [B, T, V]
    loss = (logits * torch.from_numpy(inputs.loss_weights).to(device=device, dtype=tdtype)).sum()  # []
    loss.backward()
    grads = {name: to_numpy(p.grad) for name, p in model.named_parameters(remove_duplicate=False)}
    return {"memory": to_numpy(memory), "logits": to_numpy(logits), "grads": grads}


def run_jax(cfg: TransformerConfig, weights: Mapping[str, np.ndarray], inputs: Inputs, dtype: str,
            device: str = "cpu") -> dict[str, Any]:
    """Flax twin on canonical weights (through the converter): memory, logits, canonical grads."""
    import jax
    import jax.numpy as jnp

    import jax_tx

    jdtype = jnp.dtype(dtype)
    if jdtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 needs JAX's 64-bit mode: jax.config.update('jax_enable_x64', True)")
    model = jax_tx.Transformer(cfg)
    with _jax_device(device) as dev:
        params = jax.tree_util.tree_map(lambda a: jax.device_put(jnp.asarray(a, dtype=jdtype), dev),
                                        canonical_to_flax(weights, cfg))
        src, tgt = jnp.asarray(inputs.src), jnp.asarray(inputs.tgt)
        src_mask, tgt_mask = jnp.asarray(inputs.src_mask), jnp.asarray(inputs.tgt_mask)
        w = jnp.asarray(inputs.loss_weights, dtype=jdtype)

        def loss_fn(p):
            logits = model.apply({"params": p}, src, tgt, src_mask, tgt_mask)  # [B, T, V]
            return (logits * w).sum(), logits

        (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        memory = model.apply({"params": params}, src, src_mask, method=model.encode)  # [B, S, D]
    return {"memory": np.asarray(memory), "logits": np.asarray(logits),
            "grads": flax_to_canonical(grads, cfg)}


RUNNERS = {"torch": run_torch, "jax": run_jax}


# Gradient floors: per tensor, error = ||got - ref|| / max(||ref_t||, floor * ||ref_all||). A gradient
# that vanishes in exact arithmetic (k_proj biases: softmax ignores a shift of a whole row; q/k
# projections when every query sees one key) comes out as rounding noise of size ~eps * ||ref_all||,
# which no two implementations share; the floor measures such tensors against the whole gradient.
GRAD_FLOORS = {"float64": 1e-5, "float32": 3e-2}


def _grad_denominators(grads: Mapping[str, np.ndarray], dtype: str) -> dict[str, float]:
    total = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values())))
    return {k: max(float(np.linalg.norm(np.asarray(g, np.float64))), GRAD_FLOORS[dtype] * total)
            for k, g in grads.items()}


def compare_twins(cfg: TransformerConfig, weights: Mapping[str, np.ndarray], inputs: Inputs, dtype: str,
                  source: str, device: str = "cpu") -> list[Check]:
    """Run both twins on the same canonical weights; rows for memory, logits and gradients.

    `source` names the twin the weights came from; its results are the reference.
    """
    check_canonical(weights, cfg)
    other = "jax" if source == "torch" else "torch"
    weights = {k: np.asarray(v).astype(np_dtype(dtype)) for k, v in weights.items()}
    ref = RUNNERS[source](cfg, weights, inputs, dtype, device)
    got = RUNNERS[other](cfg, weights, inputs, dtype, device)
    tol = TOLERANCES[dtype]
    tag = f"{source}->{other}"
    rows = [Check(f"{tag} {name}", dtype, *errors(got[name], ref[name]), tol) for name in ("memory", "logits")]
    if dtype == "bfloat16":
        return rows  # bfloat16 gradients are accumulated in bfloat16 in framework-specific orders: no claim
    denoms = _grad_denominators(ref["grads"], dtype)
    per_param = {k: errors(got["grads"][k], ref["grads"][k], denoms[k]) for k in ref["grads"]}
    worst = max(per_param, key=lambda k: per_param[k][1])
    max_abs = max(v[0] for v in per_param.values())
    rows.append(Check(f"{tag} grads ({len(per_param)} params, worst {worst})", dtype, max_abs,
                      per_param[worst][1], tol))
    return rows


def round_trip_checks(cfg: TransformerConfig, weights: Mapping[str, np.ndarray]) -> list[Check]:
    """canonical -> Flax -> canonical must be lossless (bit-exact)."""
    back = flax_to_canonical(canonical_to_flax(weights, cfg), cfg)
    diffs = [errors(back[k], weights[k]) for k in weights]
    max_abs = max(d[0] for d in diffs)
    exact = all(np.array_equal(back[k], weights[k]) and back[k].dtype == np.asarray(weights[k]).dtype
                for k in weights)
    return [Check("round trip canonical->flax->canonical", str(next(iter(weights.values())).dtype),
                  max_abs, 0.0 if exact else float("inf"), 0.0)]


def compare_nn_transformer(cfg: TransformerConfig, module, weights: Mapping[str, np.ndarray], inputs: Inputs,
                           rng: np.random.Generator) -> Check:
    """torch.nn.Transformer `module` against the torch twin's stacks on canonical `weights`, float64.

    The same random embedded inputs (B, S, D) / (B, T, D) and masks go through both; nn.Transformer's
    masks are True = ignore. Its fast path is turned off for the comparison (it zeroes padded rows).
    """
    import torch

    import torch_tx
    from parity.convert import to_torch

    model = torch_tx.Transformer(cfg).double().eval()
    model.load_state_dict({k: to_torch(np.asarray(v, dtype=np.float64)) for k, v in weights.items()}, strict=True)
    module = module.double().eval()
    b, s, t = inputs.src.shape + inputs.tgt.shape[1:]
    x = torch.from_numpy(rng.standard_normal((b, s, cfg.d_model)))  # [B, S, D]
    y = torch.from_numpy(rng.standard_normal((b, t, cfg.d_model)))  # [B, T, D]
    src_mask, tgt_mask = torch.from_numpy(inputs.src_mask), torch.from_numpy(inputs.tgt_mask)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            causal = torch.ones(t, t, dtype=torch.bool).triu(1)  # [T, T], True = masked
            ref = module(x, y, tgt_mask=causal, src_key_padding_mask=~src_mask, tgt_key_padding_mask=~tgt_mask,
                         memory_key_padding_mask=~src_mask)  # [B, T, D]
            cross = torch_tx.masks.key_mask(src_mask)  # [B, 1, 1, S]
            memory = model.encoder(x, cross)  # [B, S, D]
            got = model.decoder(y, memory, torch_tx.masks.decoder_self_mask(tgt_mask), cross)  # [B, T, D]
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return Check("nn.Transformer->torch stacks", "float64", *errors(got.numpy(), ref.numpy()), TOLERANCES["float64"])
