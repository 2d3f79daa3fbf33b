"""torch.nn.Transformer and nn.TransformerEncoder: their state dict names <-> canonical names, modules in
and out, and the `nn-transformer` target of `twin convert`.

nn.Transformer holds only the stacks (for arch 'seq2seq'; nn.TransformerEncoder for 'encoder'): q/k/v
packed into one `in_proj_weight` / `in_proj_bias`, sublayers named `linear1`, `norm1`, ... A file with
these names carries the embeddings and output layer (or classification head) beside them under their
canonical names. A decoder-only model has no torch.nn counterpart. Frameworks are imported only inside
the functions here; `parity.convert` re-exports the public names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from parity.config import TransformerConfig
from parity.convert import ConversionError, _check_keys, _check_shape, _check_weights, to_numpy, to_torch
from parity.formats.common import FormatError
from parity.names import canonical_shapes

TARGET = "nn-transformer"
OUTSIDE_STACKS = ("src_embed.", "tgt_embed.", "generator.", "pooler.", "classifier.")
# torch.nn.Transformer layer submodules -> canonical submodules.
_NN_RENAMES = {
    "encoder": {"self_attn": "self_attn", "linear1": "ff.linear1", "linear2": "ff.linear2",
                "norm1": "self_attn_norm", "norm2": "ff_norm"},
    "decoder": {"self_attn": "self_attn", "multihead_attn": "cross_attn", "linear1": "ff.linear1",
                "linear2": "ff.linear2", "norm1": "self_attn_norm", "norm2": "cross_attn_norm",
                "norm3": "ff_norm"},
}
_PACKED = {"in_proj_weight": "weight", "in_proj_bias": "bias"}
# The config fields a torch.nn module carries (from_nn_* overrides may not contradict them).
_NN_FIELDS = ("d_model", "num_heads", "d_ff", "activation", "norm_first", "layer_norm_eps", "num_encoder_layers",
              "num_decoder_layers", "final_norm")


def stack_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The canonical keys torch.nn.Transformer (nn.TransformerEncoder for an encoder) also has: the stacks."""
    return {k: s for k, s in canonical_shapes(cfg).items() if not k.startswith(OUTSIDE_STACKS)}


def nn_name(cfg: TransformerConfig) -> str:
    """The torch.nn module that holds the stacks of cfg.arch: nn.Transformer or nn.TransformerEncoder."""
    if cfg.arch == "decoder":
        raise ConversionError("arch 'decoder' (DecoderOnly) has no torch.nn counterpart: nn.TransformerDecoder "
                              "layers always have cross-attention")
    return "nn.TransformerEncoder" if cfg.arch == "encoder" else "nn.Transformer"


def _nn_activation(layer) -> str:
    import torch.nn.functional as F
    from torch import nn

    kind = getattr(layer, "activation_relu_or_gelu", 0)
    act = layer.activation
    if kind == 1 or act is F.relu or isinstance(act, nn.ReLU):
        return "relu"
    if kind == 2 or act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise ConversionError(f"unsupported activation {act!r}: only relu and exact gelu")


def _nn_layer_settings(layer) -> dict[str, Any]:
    attn = layer.self_attn
    if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or layer.linear1.bias is None \
            or layer.norm1.bias is None:
        raise ConversionError("only nn.Transformer layers with bias=True and equal q/k/v dims are supported")
    return dict(d_model=attn.embed_dim, num_heads=attn.num_heads, d_ff=layer.linear1.out_features,
                dropout=float(layer.dropout.p), activation=_nn_activation(layer),
                norm_first=bool(layer.norm_first), layer_norm_eps=float(layer.norm1.eps))


def _nn_settings(stacks: list) -> dict[str, Any]:
    """The config fields shared by every layer and final norm of torch.nn encoder/decoder `stacks`."""
    from torch import nn

    layers = [layer for stack in stacks for layer in stack.layers]
    settings = [_nn_layer_settings(layer) for layer in layers]
    for s, layer in zip(settings, layers):
        if s != settings[0]:
            raise ConversionError(f"all layers must share one configuration; {s} != {settings[0]}")
        for norm in ("norm1", "norm2", "norm3"):
            if hasattr(layer, norm) and getattr(layer, norm).eps != settings[0]["layer_norm_eps"]:
                raise ConversionError("all LayerNorms must share one eps")
    norms = [stack.norm for stack in stacks]
    if len({norm is None for norm in norms}) > 1:
        raise ConversionError("the encoder and decoder must both have a final norm or both lack one")
    for norm in norms:
        if norm is not None and not (isinstance(norm, nn.LayerNorm) and norm.bias is not None):
            raise ConversionError(f"the final norm must be an nn.LayerNorm with a bias, got {norm!r}")
        if norm is not None and norm.eps != settings[0]["layer_norm_eps"]:
            raise ConversionError(f"the final norm's eps ({norm.eps}) differs from the layers' "
                                  f"({settings[0]['layer_norm_eps']}): all LayerNorms must share one eps")
    return {**settings[0], "final_norm": norms[0] is not None}


def _nn_config(module_fields: dict[str, Any], overrides: dict[str, Any], **fields: Any) -> TransformerConfig:
    """The config of a torch.nn module: its own fields, then `overrides` (which may not contradict them)."""
    for name, value in overrides.items():
        if name in _NN_FIELDS and name in module_fields and value != module_fields[name]:
            raise ConversionError(f"{name}={value!r} disagrees with the module, which has "
                                  f"{name}={module_fields[name]!r}")
    return TransformerConfig(**{**fields, **module_fields, **overrides})


def nn_key_map(cfg: TransformerConfig) -> dict[str, tuple[str, ...]]:
    """{torch.nn state_dict key: the canonical keys it holds}, in the module's order: nn.Transformer's keys
    for arch 'seq2seq', nn.TransformerEncoder's (`layers.0.…`, `norm.…`) for 'encoder'.

    A packed `in_proj_weight` / `in_proj_bias` holds q_proj, k_proj, v_proj stacked along dim 0.
    """
    nn_name(cfg)
    out: dict[str, tuple[str, ...]] = {}
    stacks = (("encoder", cfg.num_encoder_layers),) if cfg.arch == "encoder" else \
        (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers))
    for stack, num_layers in stacks:
        nn_prefix = "" if cfg.arch == "encoder" else f"{stack}."
        for i in range(num_layers):
            for sub, canonical in _NN_RENAMES[stack].items():
                prefix, module = f"{nn_prefix}layers.{i}.{sub}", f"{stack}.layers.{i}.{canonical}"
                if sub.endswith("attn"):
                    for leaf, part in _PACKED.items():
                        out[f"{prefix}.{leaf}"] = tuple(f"{module}.{p}.{part}" for p in ("q_proj", "k_proj", "v_proj"))
                    for leaf in ("weight", "bias"):
                        out[f"{prefix}.out_proj.{leaf}"] = (f"{module}.out_proj.{leaf}",)
                else:
                    for leaf in ("weight", "bias"):
                        out[f"{prefix}.{leaf}"] = (f"{module}.{leaf}",)
        if cfg.final_norm:
            for leaf in ("weight", "bias"):
                out[f"{nn_prefix}norm.{leaf}"] = (f"{stack}.norm.{leaf}",)
    return out


def from_nn_state_dict(state_dict: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """torch.nn.Transformer (seq2seq) or nn.TransformerEncoder (encoder) state dict (tensors or arrays)
    -> canonical {name: numpy array} of its stacks; the key set and every shape checked in the module's names.

    Packed q/k/v come out as row slices of the packed array (views, no copies). Keys outside the
    stacks (e.g. `src_embed.weight` saved beside them) pass through unchanged.
    """
    nn_map, what = nn_key_map(cfg), nn_name(cfg)
    outside = {k for k in canonical_shapes(cfg) if k.startswith(OUTSIDE_STACKS)}
    unexpected = sorted(k for k in state_dict if k not in nn_map and k not in outside)
    if unexpected:
        raise ConversionError(f"unexpected {what} key(s) {', '.join(repr(k) for k in unexpected[:8])}")
    _check_keys({k for k in state_dict if k in nn_map}, set(nn_map), f"{what} state dict")
    shapes, d = canonical_shapes(cfg), cfg.d_model
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        array, parts = to_numpy(value), nn_map.get(key, (key,))
        if len(parts) == 3:
            _check_shape(key, array.shape, (3 * d,) + shapes[parts[0]][1:])
            for i, part in enumerate(parts):
                out[part] = array[i * d:(i + 1) * d]  # [D, D] / [D]
        else:
            if key in nn_map:
                _check_shape(key, array.shape, shapes[parts[0]])
            out[parts[0]] = array
    return out


def to_nn_state_dict(weights: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """Canonical weights (full, or the stacks only) -> nn.Transformer (nn.TransformerEncoder) state dict of arrays.

    q/k/v are packed into `in_proj_weight` / `in_proj_bias` (new arrays); keys outside the stacks
    (embeddings, `generator.*`, `pooler.*`, `classifier.*`) are not the module's and are left out.
    """
    given = {k: v for k, v in weights.items() if not k.startswith(OUTSIDE_STACKS)}
    _check_weights(given, stack_shapes(cfg), "state dict")
    out = {}
    for key, parts in nn_key_map(cfg).items():
        arrays = [to_numpy(given[p]) for p in parts]
        out[key] = np.concatenate(arrays) if len(parts) == 3 else arrays[0]  # [3D, D] / [3D] when packed
    return out


def from_nn_transformer(module, *, src_vocab_size: int, tgt_vocab_size: int,
                        **overrides: Any) -> tuple[TransformerConfig, dict[str, Any]]:
    """torch.nn.Transformer -> (config, state dict of its stacks in canonical names).

    The state dict lacks only `src_embed`, `tgt_embed` and `generator` (nn.Transformer has none):
    load it with `torch_tx.Transformer(cfg).load_state_dict(sd, strict=False)`. `overrides` sets
    config fields nn.Transformer does not carry (max_len, pad_id, tie_output, ...).
    """
    if not module.encoder.layers or not module.decoder.layers:
        raise ConversionError("nn.Transformer needs at least one encoder and one decoder layer")
    fields = {**_nn_settings([module.encoder, module.decoder]), "num_encoder_layers": len(module.encoder.layers),
              "num_decoder_layers": len(module.decoder.layers)}
    cfg = _nn_config(fields, overrides, src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size)
    arrays = from_nn_state_dict(module.state_dict(), cfg)
    return cfg, {k: to_torch(arrays[k]) for k in stack_shapes(cfg)}


def from_nn_encoder(module, *, src_vocab_size: int, **overrides: Any) -> tuple[TransformerConfig, dict[str, Any]]:
    """torch.nn.TransformerEncoder -> (config with arch 'encoder', state dict of its stack in canonical names).

    norm_first, activation, eps and the final norm (`module.norm`, or None) come from the module; batch_first
    does not matter (the weights are the same). The state dict lacks `src_embed` (and `pooler` / `classifier`
    when `num_classes=` is given): load it with `torch_tx.EncoderOnly(cfg).load_state_dict(sd, strict=False)`.
    `overrides` sets fields the module does not carry (max_len, pad_id, num_classes, ...).
    """
    from torch import nn

    if not isinstance(module, nn.TransformerEncoder):
        raise ConversionError(f"expected a torch.nn.TransformerEncoder, got {type(module).__name__}")
    if not module.layers:
        raise ConversionError("nn.TransformerEncoder needs at least one layer")
    fields = {**_nn_settings([module]), "num_encoder_layers": len(module.layers)}
    cfg = _nn_config(fields, overrides, src_vocab_size=src_vocab_size, tgt_vocab_size=src_vocab_size, arch="encoder")
    arrays = from_nn_state_dict(module.state_dict(), cfg)
    return cfg, {k: to_torch(arrays[k]) for k in stack_shapes(cfg)}


def _nn_layer_kwargs(cfg: TransformerConfig) -> dict[str, Any]:
    return dict(d_model=cfg.d_model, nhead=cfg.num_heads, dim_feedforward=cfg.d_ff, dropout=cfg.dropout,
                activation=cfg.activation, layer_norm_eps=cfg.layer_norm_eps, batch_first=True,
                norm_first=cfg.norm_first)


def build_nn_encoder(cfg: TransformerConfig):
    """An untrained torch.nn.TransformerEncoder (batch_first=True) with the encoder stack of `cfg`."""
    from torch import nn

    norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.final_norm else None
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(**_nn_layer_kwargs(cfg)), cfg.num_encoder_layers,
                                 norm=norm, enable_nested_tensor=False)


def build_nn_transformer(cfg: TransformerConfig):
    """An untrained torch.nn.Transformer(batch_first=True) with the stacks of `cfg` (same state_dict keys)."""
    from torch import nn

    if cfg.arch != "seq2seq":
        raise ConversionError(f"nn.Transformer has an encoder and a decoder; arch is {cfg.arch!r}")
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**_nn_layer_kwargs(cfg)), cfg.num_decoder_layers,
                                    norm=nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.final_norm else None)
    return nn.Transformer(d_model=cfg.d_model, nhead=cfg.num_heads, custom_encoder=build_nn_encoder(cfg),
                          custom_decoder=decoder, dim_feedforward=cfg.d_ff, dropout=cfg.dropout, batch_first=True)


def build_nn(cfg: TransformerConfig):
    """The untrained torch.nn module of cfg.arch (`nn_name`): nn.Transformer or nn.TransformerEncoder."""
    return build_nn_encoder(cfg) if nn_name(cfg) == "nn.TransformerEncoder" else build_nn_transformer(cfg)


def to_nn_transformer(state_dict: Mapping[str, Any], cfg: TransformerConfig):
    """Canonical state dict (full, or the stacks only) -> torch.nn.Transformer(batch_first=True), or for arch
    'encoder' torch.nn.TransformerEncoder(batch_first=True).

    Embeddings and the output layer / classification head have no place there and are left out.
    """
    module = build_nn(cfg)
    nn_sd = {k: to_torch(v) for k, v in to_nn_state_dict(state_dict, cfg).items()}
    module.to(next(iter(nn_sd.values())).dtype)
    module.load_state_dict(nn_sd, strict=True)
    return module


# ---------------------------------------------------------------------------------------------- files

def has_nn_names(keys: Mapping[str, Any]) -> bool:
    """Whether a state dict read from a file is in nn.Transformer names (packed q/k/v)."""
    return any(k.endswith("in_proj_weight") for k in keys)


def missing_hint(cfg: TransformerConfig) -> str:
    """What to add when an nn.Transformer-named file lacks keys: the parts the torch.nn module has no place for."""
    return (" (nn.TransformerEncoder has no embedding or classification head" if cfg.arch == "encoder"
            else " (nn.Transformer has no embeddings or output layer") + \
        ": save them beside its state dict under these canonical names)"


def check_target(dst: Path, cfg: TransformerConfig) -> None:
    """A FormatError naming `dst` unless cfg.arch has a torch.nn counterpart (--to nn-transformer)."""
    if cfg.arch == "decoder":
        raise FormatError(f"{dst}: --to nn-transformer needs arch 'seq2seq' (nn.Transformer) or 'encoder' "
                    "(nn.TransformerEncoder); a decoder-only model has no torch.nn counterpart "
                    "(nn.TransformerDecoder layers always have cross-attention)")


def file_arrays(weights: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """What an nn-transformer file holds: the module's state dict, with the canonical weights outside the
    stacks (embeddings, output layer or classification head) beside it."""
    outside = {k: v for k, v in weights.items() if k.startswith(OUTSIDE_STACKS)}
    return {**to_nn_state_dict(weights, cfg), **outside}
