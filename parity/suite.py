"""The cross-framework parity checks, shared by the test suite and `twin parity`.

One comparison takes canonical weights that came out of one twin (through the converter), loads
them into both twins, runs the same inputs, and compares the outputs of the config's arch (seq2seq:
encoder memory and logits; encoder: hidden states and class logits; decoder: logits) and the
gradient of `sum(output * W)` w.r.t. every parameter (Flax gradients mapped back through the
converter; float32 and float64 only). Inputs may be packed (segment ids). Errors are relative to the
norm of the source twin's result. Dropout is off.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from parity.config import TransformerConfig
from parity.convert import canonical_to_flax, check_canonical, flax_to_canonical, to_numpy

TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}
TWINS = ("torch", "jax")
ARCHS = ("seq2seq", "encoder", "decoder")
OUTPUTS = {"seq2seq": ("memory", "logits"), "encoder": ("hidden", "class_logits"), "decoder": ("logits",)}

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
    "num_classes": (None, 2, 5),
    "batch": (1, 2, 3),
    "src_len": (1, 4, 7),
    "tgt_len": (1, 3, 6),
}


def build_config(choose: Callable[[str, Sequence[Any]], Any], archs: Sequence[str] = ("seq2seq",)) -> TransformerConfig:
    """A config (dropout off, max_len 16) whose fields come from `choose(name, options)` over SPACE; the arch
    from `archs` (fields the arch has no weights for are dropped: `TransformerConfig.for_arch`)."""
    d_model = choose("d_model", SPACE["d_model"])
    share = choose("share_embeddings", SPACE["share_embeddings"])
    src_vocab = choose("vocab_size", SPACE["vocab_size"])
    cfg = TransformerConfig(
        src_vocab_size=src_vocab, tgt_vocab_size=src_vocab if share else choose("vocab_size", SPACE["vocab_size"]),
        d_model=d_model, num_heads=choose("num_heads", [h for h in SPACE["num_heads"] if d_model % h == 0]),
        num_encoder_layers=choose("num_layers", SPACE["num_layers"]),
        num_decoder_layers=choose("num_layers", SPACE["num_layers"]), d_ff=choose("d_ff", SPACE["d_ff"]),
        dropout=0.0, activation=choose("activation", SPACE["activation"]),
        norm_first=choose("norm_first", SPACE["norm_first"]),
        layer_norm_eps=choose("layer_norm_eps", SPACE["layer_norm_eps"]), max_len=16,
        final_norm=choose("final_norm", SPACE["final_norm"]), tie_output=choose("tie_output", SPACE["tie_output"]),
        share_embeddings=share, output_bias=choose("output_bias", SPACE["output_bias"]))
    arch = choose("arch", tuple(archs)) if len(archs) > 1 else archs[0]
    if arch == "seq2seq":
        return cfg
    return cfg.for_arch(arch, choose("num_classes", SPACE["num_classes"]) if arch == "encoder" else None)


def random_config(rng: np.random.Generator, archs: Sequence[str] = ARCHS) -> TransformerConfig:
    """A config drawn uniformly from SPACE, of one of `archs`."""
    return build_config(lambda _, options: options[int(rng.integers(len(options)))], archs)


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
    """One batch: src (B, S), tgt (B, T) int64, masks (B, S) / (B, T) bool, and loss weights W for the arch's
    outputs (same shapes; the loss is the sum of sum(output * W); seq2seq: logits only). Packed rows: segment ids
    src_segments (B, S) / tgt_segments (B, T), 0 = padding (None: one example per row)."""

    src: np.ndarray
    tgt: np.ndarray
    src_mask: np.ndarray
    tgt_mask: np.ndarray
    loss_weights: Mapping[str, np.ndarray]
    src_segments: np.ndarray | None = None
    tgt_segments: np.ndarray | None = None

    @property
    def packed(self) -> bool:
        return self.src_segments is not None


def errors(got: np.ndarray, ref: np.ndarray, denom: float | None = None) -> tuple[float, float]:
    """(max |got - ref|, ||got - ref|| / ||ref||) in float64; `denom` replaces ||ref||."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    diff = got - ref
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    norm = float(np.linalg.norm(ref)) if denom is None else denom
    num = float(np.linalg.norm(diff))
    return max_abs, (0.0 if num == 0.0 else num / norm if norm > 0 else float("inf"))


def make_inputs(cfg: TransformerConfig, src_lengths: Sequence[int], tgt_lengths: Sequence[int], src_len: int,
                tgt_len: int, rng: np.random.Generator, segments: Sequence[int] | None = None) -> Inputs:
    """Random non-pad ids, right-padded to the given per-row lengths (0 = an empty row), and loss weights.

    `segments` (one count per row): pack each row's tokens into that many examples, split at random
    (each example non-empty on a side with at least that many tokens; example i is segment i + 1 on both sides).
    """
    batch = len(src_lengths)

    def ids_and_mask(vocab: int, length: int, lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]  # [B, L]
        ids = rng.integers(0, vocab, size=(batch, length))  # [B, L]
        ids = np.where(ids == cfg.pad_id, (cfg.pad_id + 1) % vocab, ids)
        return np.where(mask, ids, cfg.pad_id).astype(np.int64), mask

    src, src_mask = ids_and_mask(cfg.src_vocab_size, src_len, src_lengths)
    tgt, tgt_mask = ids_and_mask(cfg.tgt_vocab_size, tgt_len, tgt_lengths)
    src_segments = tgt_segments = None
    if segments is not None:
        src_segments = split_segments(src_lengths, segments, src_len, rng)
        tgt_segments = split_segments(tgt_lengths, segments, tgt_len, rng)
    shapes = {"logits": (batch, tgt_len, cfg.tgt_vocab_size), "hidden": (batch, src_len, cfg.d_model)}
    if cfg.num_classes is not None:
        shapes["class_logits"] = (batch, src_len, cfg.num_classes) if segments is not None else (batch, cfg.num_classes)
    weights = {name: rng.standard_normal(shapes[name]) for name in OUTPUTS[cfg.arch] if name in shapes}
    return Inputs(src, tgt, src_mask, tgt_mask, weights, src_segments, tgt_segments)


def split_segments(lengths: Sequence[int], counts: Sequence[int], length: int, rng: np.random.Generator) -> np.ndarray:
    """(B, length) segment ids: row b's first lengths[b] positions cut into min(counts[b], lengths[b]) contiguous
    non-empty segments 1, 2, ..., the rest 0 (padding)."""
    out = np.zeros((len(lengths), length), dtype=np.int64)  # [B, L]
    for row, (n, count) in enumerate(zip(lengths, counts)):
        count = min(count, n)
        if count:
            cuts = np.sort(rng.choice(np.arange(1, n), size=count - 1, replace=False)) if count > 1 else []
            out[row, :n] = np.searchsorted(cuts, np.arange(n), side="right") + 1
    return out


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
        return {k: to_numpy(v) for k, v in torch_tx.model_for(cfg).state_dict().items()}
    import jax

    import jax_tx

    variables = jax_tx.model_for(cfg).init(jax.random.key(seed), *jax_tx.model.init_inputs(cfg))
    return flax_to_canonical(variables["params"], cfg)


@contextlib.contextmanager
def _jax_device(device: str) -> Iterator[Any]:
    import jax

    dev = jax.devices("gpu")[0] if device == "cuda" else jax.devices("cpu")[0]
    with jax.default_device(dev), jax.default_matmul_precision("highest"):
        yield dev


def forward_kwargs(cfg: TransformerConfig, inputs: Inputs, to_array: Callable[[np.ndarray], Any]) -> dict[str, Any]:
    """The inputs of cfg.arch's model call, by keyword (the same names in both twins), as arrays of `to_array`."""
    src = {"src": inputs.src, "src_mask": inputs.src_mask, "src_segments": inputs.src_segments}
    tgt = {"tgt": inputs.tgt, "tgt_mask": inputs.tgt_mask, "tgt_segments": inputs.tgt_segments}
    chosen = {"seq2seq": {**src, **tgt}, "encoder": src, "decoder": tgt}[cfg.arch]
    return {k: to_array(v) for k, v in chosen.items() if v is not None}


def _outputs(cfg: TransformerConfig, model_outputs: Any, memory: Any) -> dict[str, Any]:
    """The model call's result -> {output name: array} in OUTPUTS order."""
    if cfg.arch == "seq2seq":
        return {"memory": memory, "logits": model_outputs}
    if cfg.arch == "decoder":
        return {"logits": model_outputs}
    if cfg.num_classes is None:
        return {"hidden": model_outputs}
    return dict(zip(("hidden", "class_logits"), model_outputs))


def run_torch(cfg: TransformerConfig, weights: Mapping[str, np.ndarray], inputs: Inputs, dtype: str,
              device: str = "cpu", grads: bool = True) -> dict[str, Any]:
    """Torch twin on canonical weights: its outputs (OUTPUTS[cfg.arch]) and {canonical name: grad} (`grads`),
    all numpy."""
    import torch

    import torch_tx
    from parity.convert import to_torch

    tdtype = getattr(torch, dtype)
    model = torch_tx.model_for(cfg).to(device=device, dtype=tdtype).eval()
    model.load_state_dict({k: to_torch(v) for k, v in weights.items()}, strict=True)
    kwargs = forward_kwargs(cfg, inputs, lambda a: torch.from_numpy(a).to(device))
    memory = None
    with torch.set_grad_enabled(grads):
        if cfg.arch == "seq2seq":
            memory = model.encode(kwargs["src"], kwargs["src_mask"],
                                  src_segments=kwargs.get("src_segments"))  # [B, S, D]
        outputs = _outputs(cfg, model(**kwargs), memory)
    if not grads:
        return {k: to_numpy(v) for k, v in outputs.items()}
    loss = sum((outputs[name] * torch.from_numpy(w).to(device=device, dtype=tdtype)).sum()
               for name, w in inputs.loss_weights.items())  # []
    loss.backward()
    grads = {name: to_numpy(p.grad) for name, p in model.named_parameters(remove_duplicate=False)}
    return {**{k: to_numpy(v) for k, v in outputs.items()}, "grads": grads}


def run_jax(cfg: TransformerConfig, weights: Mapping[str, np.ndarray], inputs: Inputs, dtype: str,
            device: str = "cpu", grads: bool = True) -> dict[str, Any]:
    """Flax twin on canonical weights (through the converter): its outputs and canonical grads (`grads`)."""
    import jax
    import jax.numpy as jnp

    jdtype = jnp.dtype(dtype)
    if jdtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 needs JAX's 64-bit mode: jax.config.update('jax_enable_x64', True)")
    with _jax_device(device) as dev:
        params = jax.tree_util.tree_map(lambda a: jax.device_put(jnp.asarray(a, dtype=jdtype), dev),
                                        canonical_to_flax(weights, cfg))
        kwargs = forward_kwargs(cfg, inputs, jnp.asarray)
        w = {name: jnp.asarray(v, dtype=jdtype) for name, v in inputs.loss_weights.items()}
        outputs, g = _jax_step()(cfg, params, kwargs, w, grads)
    out = {k: np.asarray(v) for k, v in outputs.items()}
    return {**out, "grads": flax_to_canonical(g, cfg)} if grads else out


@functools.cache
def _jax_step():
    """The jitted Flax side of a comparison: (cfg, params, model kwargs, loss weights, grads) -> (outputs, grads
    or None). One XLA program per config and shapes (jitted: op-by-op dispatch took 2-8 s per call on tiny models).
    The matmul precision is set by the caller's `jax.default_matmul_precision`, which jit's cache keys on."""
    import jax

    import jax_tx

    def step(cfg, params, kwargs, w, grads):
        model = jax_tx.model_for(cfg)
        memory = None
        if cfg.arch == "seq2seq":
            memory = model.apply({"params": params}, kwargs["src"], kwargs["src_mask"], method=model.encode,
                                 src_segments=kwargs.get("src_segments"))  # [B, S, D]

        def loss_fn(p):
            outputs = _outputs(cfg, model.apply({"params": p}, **kwargs), memory)
            return sum((outputs[name] * w[name]).sum() for name in w), outputs

        if not grads:
            return loss_fn(params)[1], None
        (_, outputs), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return outputs, g

    return jax.jit(step, static_argnums=(0, 4))


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
    """Run both twins on the same canonical weights; rows for the arch's outputs (OUTPUTS) and gradients.

    `source` names the twin the weights came from; its results are the reference.
    """
    check_canonical(weights, cfg)
    other = "jax" if source == "torch" else "torch"
    weights = {k: np.asarray(v).astype(np_dtype(dtype)) for k, v in weights.items()}
    grads = dtype != "bfloat16"  # bfloat16 gradients accumulate in framework-specific orders: no claim, not computed
    ref = RUNNERS[source](cfg, weights, inputs, dtype, device, grads)
    got = RUNNERS[other](cfg, weights, inputs, dtype, device, grads)
    tol = TOLERANCES[dtype]
    tag = f"{source}->{other}"
    rows = [Check(f"{tag} {name}", dtype, *errors(got[name], ref[name]), tol) for name in OUTPUTS[cfg.arch]
            if name in ref]
    if not grads:
        return rows
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
    """torch.nn.Transformer `module` against the torch twin's stacks on canonical `weights`, float64
    (arch 'encoder': torch.nn.TransformerEncoder against EncoderOnly's encoder).

    The same random embedded inputs (B, S, D) / (B, T, D) and masks go through both; nn.Transformer's
    masks are True = ignore. Its fast path is turned off for the comparison (it zeroes padded rows).
    """
    import torch

    import torch_tx
    from parity.convert import to_torch

    model = torch_tx.model_for(cfg).double().eval()
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
            cross = torch_tx.masks.key_mask(src_mask)  # [B, 1, 1, S]
            if cfg.arch == "encoder":
                ref = module(x, src_key_padding_mask=~src_mask)  # [B, S, D]
                got = model.encoder(x, cross)  # [B, S, D]
                return Check("nn.TransformerEncoder->torch encoder", "float64", *errors(got.numpy(), ref.numpy()),
                             TOLERANCES["float64"])
            causal = torch.ones(t, t, dtype=torch.bool).triu(1)  # [T, T], True = masked
            ref = module(x, y, tgt_mask=causal, src_key_padding_mask=~src_mask, tgt_key_padding_mask=~tgt_mask,
                         memory_key_padding_mask=~src_mask)  # [B, T, D]
            memory = model.encoder(x, cross)  # [B, S, D]
            got = model.decoder(y, memory, torch_tx.masks.decoder_self_mask(tgt_mask), cross)  # [B, T, D]
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return Check("nn.Transformer->torch stacks", "float64", *errors(got.numpy(), ref.numpy()), TOLERANCES["float64"])
