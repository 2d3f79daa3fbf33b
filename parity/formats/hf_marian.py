"""Hugging Face Marian (opus-mt): `MarianConfig` + state dict <-> TransformerConfig + canonical weights.

The twins express transformers' `modeling_marian.py` (5.x) exactly: post-LN, no final norms, LayerNorm eps
1e-5, positions "marian" ([sin | cos], kept in float32), embeddings scaled by sqrt(D) when
`scale_embedding`, `final_logits_bias` as `generator.bias`. A config the twins cannot express is refused
with the field named. Embedding ties follow transformers 5: `tie_word_embeddings` false unties everything
(a `model.shared.weight` is then unused), `share_encoder_decoder_embeddings` shares the encoder's and the
decoder's matrix, and `tie_word_embeddings` ties `lm_head` to the decoder's.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from parity.config import TransformerConfig

MODEL_TYPE = "marian"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which modeling_marian uses; not a config field there
# MarianConfig's defaults in transformers 5.24, for fields a config.json leaves out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 58101, "decoder_vocab_size": None, "max_position_embeddings": 1024, "encoder_layers": 12,
    "encoder_ffn_dim": 4096, "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096,
    "decoder_attention_heads": 16, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "activation_function": "gelu",
    "d_model": 1024, "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "decoder_start_token_id": 58100, "scale_embedding": False, "pad_token_id": 58100, "eos_token_id": 0,
    "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True, "is_encoder_decoder": True,
}
ACTIVATIONS_IN = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu"}  # transformers' ACT2FN names
ACTIVATIONS_OUT = {"relu": "relu", "gelu": "gelu", "silu": "swish"}
# Per layer: canonical name -> transformers name (both stacks), then the decoder's cross-attention.
_LAYER = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
          "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.out_proj",
          "self_attn_norm": "self_attn_layer_norm", "ff.linear1": "fc1", "ff.linear2": "fc2",
          "ff_norm": "final_layer_norm"}
_CROSS = {"cross_attn.q_proj": "encoder_attn.q_proj", "cross_attn.k_proj": "encoder_attn.k_proj",
          "cross_attn.v_proj": "encoder_attn.v_proj", "cross_attn.out_proj": "encoder_attn.out_proj",
          "cross_attn_norm": "encoder_attn_layer_norm"}
POSITION_KEYS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")


class MarianError(ValueError):
    """A Marian config or state dict the twins cannot take; the message names the field or key."""


def _field(hf: Mapping[str, Any], name: str) -> Any:
    return hf.get(name, DEFAULTS.get(name))


def _int_field(hf: Mapping[str, Any], name: str, where: str) -> int:
    value = _field(hf, name)
    if isinstance(value, list) and len(value) == 1:  # eos_token_id may be a one-element list
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise MarianError(f"{where}: {name} must be an integer, got {value!r}")
    return value


def special_ids(hf: Mapping[str, Any], where: str = "config.json") -> dict[str, int]:
    """{"pad_id", "eos_id", "decoder_start_id"} of a Marian config (decoder_start is the twins' bos_id)."""
    return {"pad_id": _int_field(hf, "pad_token_id", where), "eos_id": _int_field(hf, "eos_token_id", where),
            "decoder_start_id": _int_field(hf, "decoder_start_token_id", where)}


def embedding_layout(hf: Mapping[str, Any]) -> tuple[bool, bool]:
    """(share_embeddings, tie_output) that transformers 5 computes with for this config."""
    tie = bool(_field(hf, "tie_word_embeddings"))
    return bool(_field(hf, "share_encoder_decoder_embeddings")) and tie, tie


def check_stacks(hf: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
    """MarianError unless the encoder and decoder share heads and FFN size, layerdrop is 0 and the activation is
    one the twins have (Marian and FSMT alike); `defaults` fill fields the config leaves out."""
    def get(name: str) -> Any:
        return hf.get(name, defaults.get(name))

    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if get(a) != get(b):
            raise MarianError(f"{where}: {a} ({get(a)}) != {b} ({get(b)}): the twins use one value for both stacks")
    for name in ("encoder_layerdrop", "decoder_layerdrop"):
        if get(name) not in (0, 0.0):
            raise MarianError(f"{where}: {name} = {get(name)!r}: the twins have no layerdrop; set it to 0")
    if get("activation_function") not in ACTIVATIONS_IN:
        raise MarianError(f"{where}: activation_function {get('activation_function')!r} cannot be expressed: the "
                          f"twins have {', '.join(sorted(ACTIVATIONS_IN))}")


def config_from_marian(hf: Mapping[str, Any], where: str = "config.json") -> TransformerConfig:
    """The TransformerConfig that computes what transformers' MarianMTModel computes for config dict `hf`."""
    model_type = hf.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise MarianError(f"{where}: model_type {model_type!r} is not Marian")
    if hf.get("is_encoder_decoder", True) is not True or hf.get("is_decoder", False):
        raise MarianError(f"{where}: is_encoder_decoder must be true and is_decoder false (the seq2seq model)")
    check_stacks(hf, DEFAULTS, where)
    activation = _field(hf, "activation_function")
    share, tie = embedding_layout(hf)
    vocab = _int_field(hf, "vocab_size", where)
    tgt_vocab = vocab if _field(hf, "share_encoder_decoder_embeddings") or _field(hf, "decoder_vocab_size") is None \
        else _int_field(hf, "decoder_vocab_size", where)
    fields = dict(src_vocab_size=vocab, tgt_vocab_size=tgt_vocab, d_model=_field(hf, "d_model"),
                  num_heads=_field(hf, "encoder_attention_heads"), num_encoder_layers=_field(hf, "encoder_layers"),
                  num_decoder_layers=_field(hf, "decoder_layers"), d_ff=_field(hf, "encoder_ffn_dim"),
                  dropout=float(_field(hf, "dropout")), attention_dropout=float(_field(hf, "attention_dropout")),
                  activation_dropout=float(_field(hf, "activation_dropout")), activation=ACTIVATIONS_IN[activation],
                  norm_first=False, layer_norm_eps=LAYER_NORM_EPS, max_len=_field(hf, "max_position_embeddings"),
                  pad_id=special_ids(hf, where)["pad_id"], final_norm=False, tie_output=tie, share_embeddings=share,
                  output_bias=True, arch="seq2seq", positions="marian", scale_embedding=bool(_field(hf, "scale_embedding")),
                  freeze_pad_embedding=True)
    try:
        return TransformerConfig(**fields)
    except (ValueError, TypeError) as e:
        raise MarianError(f"{where}: {e}") from None


def marian_config_fields(cfg: TransformerConfig, *, eos_id: int, decoder_start_id: int | None = None) -> dict[str, Any]:
    """The MarianConfig fields of a twin config; MarianError names the field that Marian cannot express
    and what would make the model exportable."""
    why = []
    if cfg.arch != "seq2seq":
        why.append(f"arch is {cfg.arch!r} (Marian is the encoder-decoder model)")
    if cfg.norm_first:
        why.append("norm_first is true (Marian is post-LN)")
    if cfg.final_norm:
        why.append("final_norm is true (Marian has no final encoder/decoder LayerNorm)")
    if cfg.positions != "marian":
        why.append(f"positions is {cfg.positions!r} (Marian's table is 'marian')")
    if cfg.layer_norm_eps != LAYER_NORM_EPS:
        why.append(f"layer_norm_eps is {cfg.layer_norm_eps} (Marian's LayerNorm has eps {LAYER_NORM_EPS})")
    if cfg.activation not in ACTIVATIONS_OUT:
        why.append(f"activation is {cfg.activation!r} (Marian has {', '.join(sorted(ACTIVATIONS_OUT))})")
    if why:
        raise MarianError("cannot export to hf-marian: " + "; ".join(why)
                          + " - train with --config marian, or set these fields to Marian's layout")
    start = cfg.pad_id if decoder_start_id is None else decoder_start_id
    return {
        "model_type": MODEL_TYPE, "architectures": ["MarianMTModel"], "vocab_size": cfg.src_vocab_size,
        "decoder_vocab_size": cfg.tgt_vocab_size, "max_position_embeddings": cfg.max_len, "d_model": cfg.d_model,
        "encoder_layers": cfg.num_encoder_layers, "decoder_layers": cfg.num_decoder_layers,
        "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "activation_function": ACTIVATIONS_OUT[cfg.activation], "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout_rate, "activation_dropout": cfg.activation_dropout_rate,
        "scale_embedding": cfg.scale_embedding, "pad_token_id": cfg.pad_id, "eos_token_id": eos_id,
        "forced_eos_token_id": eos_id, "decoder_start_token_id": start, "bos_token_id": None,
        # transformers 5 unties everything when tie_word_embeddings is false, so a shared input matrix with
        # an untied output layer is written as two equal matrices: the same function.
        "share_encoder_decoder_embeddings": cfg.share_embeddings and cfg.tie_output,
        "tie_word_embeddings": cfg.tie_output, "is_encoder_decoder": True, "use_cache": True,
    }


def layer_key_map(cfg: TransformerConfig) -> dict[str, str]:
    """Canonical -> transformers names of every stack parameter (weights and biases)."""
    names = {}
    for stack, count, table in (("encoder", cfg.num_encoder_layers, _LAYER),
                                ("decoder", cfg.num_decoder_layers, {**_LAYER, **_CROSS})):
        for i in range(count):
            for ours, theirs in table.items():
                for leaf in ("weight", "bias"):
                    names[f"{stack}.layers.{i}.{ours}.{leaf}"] = f"model.{stack}.layers.{i}.{theirs}.{leaf}"
    return names


def _embedding_keys(share: bool, tie: bool) -> dict[str, tuple[str, ...]]:
    """Canonical embedding/output name -> the transformers keys that hold it (first: the one saved)."""
    if share:
        return {name: ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                       "lm_head.weight") for name in ("src_embed.weight", "tgt_embed.weight", "generator.weight")}
    dec = ("model.decoder.embed_tokens.weight",) + (("lm_head.weight",) if tie else ())
    return {"src_embed.weight": ("model.encoder.embed_tokens.weight",), "tgt_embed.weight": dec,
            "generator.weight": dec if tie else ("lm_head.weight",)}


def take_layers(hf_weights: Mapping[str, Any], cfg: TransformerConfig,
                where: str) -> tuple[dict[str, np.ndarray], set[str]]:
    """(canonical weights of every layer's key, the transformers keys used), by `layer_key_map` (Marian and FSMT
    alike); MarianError naming the first missing key."""
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for ours, theirs in layer_key_map(cfg).items():
        if theirs not in hf_weights:
            raise MarianError(f"{where}: missing key {theirs}")
        out[ours] = np.asarray(hf_weights[theirs])
        used.add(theirs)
    return out, used


def check_leftovers(hf_weights: Mapping[str, Any], used: set[str], table: np.ndarray, rows, label: str,
                    where: str) -> None:
    """MarianError unless every key of `hf_weights` is in `used` or is a stored position table (POSITION_KEYS)
    whose rows (`rows(stored)`) equal `table` [max_len, D] (Marian and FSMT alike): the twins compute the table,
    so a trained one cannot be taken; the first unexpected key is named."""
    for key in POSITION_KEYS:
        if key in hf_weights:
            stored = np.asarray(hf_weights[key])
            got = rows(stored)
            if _shape(got) != _shape(table) or not np.array_equal(got, table.astype(stored.dtype)):
                raise MarianError(f"{where}: {key} is not {label} sinusoidal table (shape {_shape(stored)}); the "
                                  f"twins compute it and cannot take a trained one")
            used.add(key)
    unknown = sorted(set(hf_weights) - used)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise MarianError(f"{where}: unexpected key {unknown[0]}{more}")


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in a.shape)


def from_marian_state_dict(hf_weights: Mapping[str, Any], hf: Mapping[str, Any], where: str = "the state dict",
                           ) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """transformers' Marian state dict (numpy arrays, any float dtype) + its config dict -> (cfg, canonical
    weights in the checkpoint's dtype). Strict: every key used or a known redundant copy, shapes checked, tied
    copies equal, stored position tables equal to the one the twins compute; the offending key is named."""
    from parity.convert import check_canonical
    from parity.numerics import position_table

    cfg = config_from_marian(hf)
    share, tie = embedding_layout(hf)
    out, used = take_layers(hf_weights, cfg, where)
    for ours, keys in _embedding_keys(share, tie).items():
        present = [k for k in keys if k in hf_weights]
        if not present:
            raise MarianError(f"{where}: missing key {keys[0]}")
        first = np.asarray(hf_weights[present[0]])
        for k in present[1:]:
            other = np.asarray(hf_weights[k])
            if _shape(other) != _shape(first) or not np.array_equal(other, first):
                raise MarianError(f"{where}: {k} is tied to {present[0]} by the config but holds different values")
        out[ours] = first
        used.update(present)
    if "final_logits_bias" not in hf_weights:
        raise MarianError(f"{where}: missing key final_logits_bias")
    bias = np.asarray(hf_weights["final_logits_bias"])
    if _shape(bias) != (1, cfg.tgt_vocab_size):
        raise MarianError(f"{where}: final_logits_bias has shape {_shape(bias)}, expected (1, {cfg.tgt_vocab_size})")
    out["generator.bias"] = bias[0]
    used.add("final_logits_bias")
    if not share and "model.shared.weight" in hf_weights and _field(hf, "share_encoder_decoder_embeddings"):
        used.add("model.shared.weight")  # transformers 5 leaves it unused when tie_word_embeddings is false
    table = position_table("marian", cfg.max_len, cfg.d_model, cfg.pad_id)  # [max_len, D] float64
    check_leftovers(hf_weights, used, table, lambda stored: stored, "Marian's", where)
    try:
        check_canonical(out, cfg)
    except ValueError as e:
        hf_names = {**layer_key_map(cfg), **{k: v[0] for k, v in _embedding_keys(share, tie).items()},
                    "generator.bias": "final_logits_bias"}
        message = str(e)
        for ours, theirs in sorted(hf_names.items(), key=lambda kv: -len(kv[0])):
            if ours in message:
                message = message.replace(ours, theirs)
                break
        raise MarianError(f"{where}: {message}") from None
    return cfg, out


def to_marian_state_dict(weights: Mapping[str, Any], cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """Canonical weights -> transformers' Marian state dict as `save_pretrained` writes it (tied copies once,
    no position tables). The config must pass `marian_config_fields`."""
    from parity.convert import check_canonical

    check_canonical(weights, cfg)
    fields = marian_config_fields(cfg, eos_id=0)
    share, tie = fields["share_encoder_decoder_embeddings"], fields["tie_word_embeddings"]
    out = {theirs: np.asarray(weights[ours]) for ours, theirs in layer_key_map(cfg).items()}
    for ours, keys in _embedding_keys(share, tie).items():
        out.setdefault(keys[0], np.asarray(weights[ours]))
    bias = weights.get("generator.bias")
    dtype = np.asarray(weights["generator.weight"]).dtype
    out["final_logits_bias"] = (np.zeros((1, cfg.tgt_vocab_size), dtype) if bias is None
                                else np.asarray(bias).reshape(1, cfg.tgt_vocab_size))
    return out


def _numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from parity.convert import to_numpy

    return {k: to_numpy(v) for k, v in state_dict.items()}


def from_hf_marian(model_or_dir: Any) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """A `MarianMTModel` (or a `save_pretrained` directory) -> (cfg, canonical state dict of numpy arrays)."""
    if hasattr(model_or_dir, "state_dict") and hasattr(model_or_dir, "config"):
        hf = model_or_dir.config.to_dict()
        return from_marian_state_dict(_numpy_state_dict(model_or_dir.state_dict()), hf,
                                      f"{type(model_or_dir).__name__}.state_dict()")
    from parity.formats.hf_dir import read_hf_dir

    loaded = read_hf_dir(model_or_dir, MODEL_TYPE)
    return loaded.cfg, loaded.weights


def to_hf_marian(state_dict: Mapping[str, Any], cfg: TransformerConfig, *, eos_id: int = 0,
                 decoder_start_id: int | None = None):
    """Canonical weights + cfg -> (transformers.MarianConfig, its state dict as numpy arrays, as `save_pretrained`
    writes it). `eos_id` / `decoder_start_id` (default: pad_id, Marian's convention) come from the tokenizer."""
    from parity.extras import require

    require("to_hf_marian", ["hf"], "transformers' MarianConfig")
    from transformers import MarianConfig

    weights = _numpy_state_dict(state_dict)
    fields = marian_config_fields(cfg, eos_id=eos_id, decoder_start_id=decoder_start_id)
    return MarianConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "architectures")}), \
        to_marian_state_dict(weights, cfg)



def canonical_sources(hf: Mapping[str, Any]) -> dict[str, str]:
    """Canonical name -> the transformers parameter name it comes from (final_logits_bias is a buffer in
    transformers, so `generator.bias` has none: transformers never trains it)."""
    cfg = config_from_marian(hf)
    share, tie = embedding_layout(hf)
    return {**layer_key_map(cfg), **{k: v[0] for k, v in _embedding_keys(share, tie).items()}}


config_from_hf = config_from_marian  # the names parity.formats.hf_dir calls for every model type
from_state_dict = from_marian_state_dict
