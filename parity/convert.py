"""Weight conversion between the twins: the rule table between canonical names and Flax params.

The canonical names are the torch twin's state_dict keys (`parity.names.canonical_shapes`). The
Flax param tree uses the same module names, nested, list items as `layers_0`. One strict rule table
maps every leaf; every conversion checks that the key sets are equal and every shape matches, and
names the offending key when they do not. Frameworks are imported only inside the functions here.

The outside formats' mappings live in `parity.formats` (torch.nn.Transformer / nn.TransformerEncoder:
`parity.formats.nn_transformer`); their public functions are importable from here too (`ELSEWHERE`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from parity.config import TransformerConfig
from parity.names import aliases, canonical_shapes


class ConversionError(ValueError):
    """A weight set does not match the config: a missing, unexpected or mis-shaped key."""


# (module-name pattern, canonical leaf, Flax leaf, transpose): first match wins.
RULES: tuple[tuple[str, str, str, bool], ...] = (
    (r".*_embed", "weight", "embedding", False),
    (r".*norm", "weight", "scale", False),
    (r".*norm", "bias", "bias", False),
    (r".*", "weight", "kernel", True),
    (r".*", "bias", "bias", False),
)


def _rule_for_canonical(key: str) -> tuple[tuple[str, ...], bool]:
    """A canonical key -> (its Flax param path, transposed). One key, one param: the twins hold no fused layout."""
    module, _, leaf = key.rpartition(".")
    for pattern, torch_leaf, flax_leaf, transpose in RULES:
        if leaf == torch_leaf and re.fullmatch(pattern, module):
            path = tuple(re.sub(r"\.(\d+)(?=\.|$)", r"_\1", module).split(".")) + (flax_leaf,)
            return path, transpose
    raise ConversionError(f"no conversion rule for key {key!r}")


def flax_key_map(cfg: TransformerConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """{Flax param path: (canonical key, transposed)} for every param of `jax_tx.model_for(cfg)`."""
    tied = aliases(cfg)
    out = {}
    for key in canonical_shapes(cfg):
        if key not in tied:
            path, transpose = _rule_for_canonical(key)
            out[path] = (key, transpose)
    return out


def _check_keys(got: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {', '.join(repr(k) for k in missing[:8])}")
        if unexpected:
            parts.append(f"unexpected key(s) {', '.join(repr(k) for k in unexpected[:8])}")
        raise ConversionError(f"{what} does not match the config: " + "; ".join(parts))


def _check_shape(key: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise ConversionError(f"shape mismatch for {key!r}: expected {tuple(expected)}, got {tuple(shape)}")


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor, jax array or numpy array -> numpy array of the same dtype (bfloat16 kept)."""
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def to_torch(a: np.ndarray):
    """numpy array (bfloat16 via ml_dtypes allowed) -> torch tensor of the same dtype (a copy)."""
    import torch

    a = np.array(a, order="C", copy=True)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def contiguous(a: np.ndarray) -> np.ndarray:
    """`a` in C order (itself when it already is); a transposed matrix is copied in row blocks, which
    keeps both sides in cache (about 4x faster than `np.ascontiguousarray(a)` on large matrices)."""
    if a.flags.c_contiguous:
        return a
    if a.ndim != 2 or not a.T.flags.c_contiguous:
        return np.ascontiguousarray(a)
    out = np.empty(a.shape, a.dtype)
    for i in range(0, a.shape[1], 64):
        out[:, i:i + 64] = a[:, i:i + 64]
    return out


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def _check_weights(weights: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    _check_keys(set(weights), set(expected), what)
    for key, shape in expected.items():
        _check_shape(key, tuple(weights[key].shape), shape)


def check_canonical(weights: Mapping[str, Any], cfg: TransformerConfig) -> None:
    """Raise ConversionError unless `weights` has exactly the canonical keys and shapes of `cfg`."""
    _check_weights(weights, canonical_shapes(cfg), "state dict")


def rename_to_flax(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the rule table to canonical-style keys of any module (e.g. one MultiHeadAttention's
    state_dict) -> nested Flax params of numpy arrays. No key-set check: see `canonical_to_flax`."""
    params: dict[str, Any] = {}
    for key, value in weights.items():
        path, transpose = _rule_for_canonical(key)
        array = to_numpy(value)
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array.T if transpose else array
    return params


def canonical_to_flax(weights: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
    """Canonical {name: array} -> nested Flax params of numpy arrays. Tied copies must be equal."""
    check_canonical(weights, cfg)
    arrays = {k: to_numpy(v) for k, v in weights.items()}
    check_ties(arrays, cfg)
    tied = aliases(cfg)
    return rename_to_flax({k: v for k, v in arrays.items() if k not in tied})


def check_ties(weights: Mapping[str, Any], cfg: TransformerConfig) -> None:
    """Raise ConversionError unless tied names (tie_output / share_embeddings) hold equal arrays."""
    for alias, owner in aliases(cfg).items():
        if not np.array_equal(to_numpy(weights[alias]), to_numpy(weights[owner])):
            raise ConversionError(f"{alias!r} differs from {owner!r}, but the config ties them "
                                  "(tie_output / share_embeddings)")


def _pop_leaf(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path[:-1]:
        tree = tree[name]
    return tree.pop(path[-1])


def flax_to_canonical(params: Mapping[str, Any], cfg: TransformerConfig,
                      consume: bool = False) -> dict[str, np.ndarray]:
    """Nested Flax params (or gradients) -> canonical {name: numpy array}, tied names included.

    With `consume`, leaves are popped out of `params` (nested dicts) as they are converted, so a large
    tree is never held twice (a transposed kernel is a copy).
    """
    if set(params) == {"params"}:
        params = params["params"]
    flat = _flatten(params)
    key_map = flax_key_map(cfg)
    _check_keys({"/".join(p) for p in flat}, {"/".join(p) for p in key_map}, "Flax params")
    shapes = canonical_shapes(cfg)
    out: dict[str, np.ndarray] = {}
    for path, (key, transpose) in key_map.items():
        value = to_numpy(flat.pop(path))
        if consume:
            _pop_leaf(params, path)
        _check_shape("/".join(path), value.shape, shapes[key][::-1] if transpose else shapes[key])
        out[key] = contiguous(value.T if transpose else value)
    for alias, owner in aliases(cfg).items():
        out[alias] = out[owner]
    return {key: out[key] for key in shapes}


def torch_to_flax(state_dict: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
    """`torch_tx.model_for(cfg).state_dict()` -> Flax params tree (jax arrays, same dtypes)."""
    import jax
    import jax.numpy as jnp

    params = canonical_to_flax(state_dict, cfg)
    if not jax.config.jax_enable_x64 and any(v.dtype == np.float64 for v in _flatten(params).values()):
        raise ConversionError("float64 weights need JAX's 64-bit mode: jax.config.update('jax_enable_x64', True)")
    return jax.tree_util.tree_map(jnp.asarray, params)


def flax_to_torch(params: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
    """Flax params tree -> {canonical name: torch.Tensor}, loadable by `torch_tx.model_for(cfg)`."""
    canonical = flax_to_canonical(params, cfg)
    tensors: dict[str, Any] = {}
    owners = aliases(cfg)
    for key, value in canonical.items():
        tensors[key] = tensors[owners[key]] if key in owners else to_torch(value)
    return tensors


# Public names of the outside formats' modules, importable from here as before (`convert.from_nn_transformer`):
# {name: module}, imported on first use, so that `import parity.convert` imports no format module.
ELSEWHERE = {name: "parity.formats.nn_transformer" for name in (
    "OUTSIDE_STACKS", "stack_shapes", "nn_name", "nn_key_map", "from_nn_state_dict", "to_nn_state_dict",
    "from_nn_transformer", "from_nn_encoder", "build_nn_encoder", "build_nn_transformer", "build_nn",
    "to_nn_transformer")}
ELSEWHERE.update({"from_hf_marian": "parity.formats.hf_marian", "to_hf_marian": "parity.formats.hf_marian",
                  "from_hf_fsmt": "parity.formats.fsmt"})


def __getattr__(name: str) -> Any:
    if name not in ELSEWHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(ELSEWHERE[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *ELSEWHERE})
