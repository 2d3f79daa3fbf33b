"""Hugging Face FSMT (fairseq's WMT19 models, `FSMTForConditionalGeneration`) -> TransformerConfig + canonical
weights. The layers are named as in Marian (`hf_marian.layer_key_map`); what differs is fairseq's: positions
"fairseq" (tensor2tensor frequencies, [sin | cos], from pad_id + 1; the stored tables are checked against the
twins' own), separate source and target vocabularies, no logits bias, ReLU by default, and the decoder
starting from eos. Import only (export back to FSMT is not written).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from parity.config import TransformerConfig
from parity.formats.hf_marian import (ACTIVATIONS_IN, LAYER_NORM_EPS, MarianError, check_leftovers, check_stacks,
                                      layer_key_map, take_layers)

MODEL_TYPE = "fsmt"
# FSMTConfig's defaults in transformers 5.24, for fields a config.json leaves out.
DEFAULTS: dict[str, Any] = {
    "src_vocab_size": 42024, "tgt_vocab_size": 42024, "activation_function": "relu", "d_model": 1024,
    "max_position_embeddings": 1024, "encoder_ffn_dim": 4096, "encoder_layers": 12, "encoder_attention_heads": 16,
    "encoder_layerdrop": 0.0, "decoder_ffn_dim": 4096, "decoder_layers": 12, "decoder_attention_heads": 16,
    "decoder_layerdrop": 0.0, "attention_dropout": 0.0, "dropout": 0.1, "activation_dropout": 0.0,
    "decoder_start_token_id": 2, "scale_embedding": True, "tie_word_embeddings": False, "pad_token_id": 1,
    "eos_token_id": 2,
}
FSMTError = MarianError
PAD_POSITIONS_DIFFER = True  # fairseq's pad tokens get a zero position vector; only padded outputs differ


def _field(hf: Mapping[str, Any], name: str) -> Any:
    return hf.get(name, DEFAULTS.get(name))


def special_ids(hf: Mapping[str, Any], where: str = "config.json") -> dict[str, int]:
    """{"pad_id", "eos_id", "decoder_start_id"} of an FSMT config (decoder_start is the twins' bos_id)."""
    out = {}
    for key, name in (("pad_id", "pad_token_id"), ("eos_id", "eos_token_id"), ("decoder_start_id", "decoder_start_token_id")):
        value = _field(hf, name)
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        if isinstance(value, bool) or not isinstance(value, int):
            raise FSMTError(f"{where}: {name} must be an integer, got {value!r}")
        out[key] = value
    return out


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> TransformerConfig:
    """The TransformerConfig that computes what transformers' FSMTForConditionalGeneration computes."""
    if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise FSMTError(f"{where}: model_type {hf.get('model_type')!r} is not FSMT")
    check_stacks(hf, DEFAULTS, where)
    activation = _field(hf, "activation_function")
    tie = bool(_field(hf, "tie_word_embeddings"))
    fields = dict(src_vocab_size=_field(hf, "src_vocab_size"), tgt_vocab_size=_field(hf, "tgt_vocab_size"),
                  d_model=_field(hf, "d_model"), num_heads=_field(hf, "encoder_attention_heads"),
                  num_encoder_layers=_field(hf, "encoder_layers"), num_decoder_layers=_field(hf, "decoder_layers"),
                  d_ff=_field(hf, "encoder_ffn_dim"), dropout=float(_field(hf, "dropout")),
                  attention_dropout=float(_field(hf, "attention_dropout")),
                  activation_dropout=float(_field(hf, "activation_dropout")), activation=ACTIVATIONS_IN[activation],
                  norm_first=False, layer_norm_eps=LAYER_NORM_EPS, max_len=_field(hf, "max_position_embeddings"),
                  pad_id=special_ids(hf, where)["pad_id"], final_norm=False, tie_output=tie, share_embeddings=tie,
                  output_bias=False, arch="seq2seq", positions="fairseq",
                  scale_embedding=bool(_field(hf, "scale_embedding")), freeze_pad_embedding=True)
    try:
        return TransformerConfig(**fields)
    except (ValueError, TypeError) as e:
        raise FSMTError(f"{where}: {e}") from None


def _embedding_keys(tie: bool) -> dict[str, tuple[str, ...]]:
    """Canonical embedding/output name -> the transformers keys that hold it (first: the one it converts from)."""
    if tie:
        keys = ("model.decoder.embed_tokens.weight", "model.encoder.embed_tokens.weight",
                "model.decoder.output_projection.weight")
        return {name: keys for name in ("src_embed.weight", "tgt_embed.weight", "generator.weight")}
    return {"src_embed.weight": ("model.encoder.embed_tokens.weight",),
            "tgt_embed.weight": ("model.decoder.embed_tokens.weight",),
            "generator.weight": ("model.decoder.output_projection.weight",)}


def canonical_sources(hf: Mapping[str, Any]) -> dict[str, str]:
    """Canonical name -> the transformers parameter name it comes from."""
    cfg = config_from_hf(hf)
    return {**layer_key_map(cfg), **{k: v[0] for k, v in _embedding_keys(cfg.tie_output).items()}}


def from_state_dict(hf_weights: Mapping[str, Any], hf: Mapping[str, Any], where: str = "the state dict",
                    ) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """transformers' FSMT state dict (numpy) + config dict -> (cfg, canonical weights); strict, keys named."""
    from parity.convert import check_canonical
    from parity.numerics import position_table

    cfg = config_from_hf(hf)
    out, used = take_layers(hf_weights, cfg, where)
    for ours, keys in _embedding_keys(cfg.tie_output).items():
        present = [k for k in keys if k in hf_weights]
        if not present:
            raise FSMTError(f"{where}: missing key {keys[0]}")
        first = np.asarray(hf_weights[present[0]])
        for k in present[1:]:
            if np.shape(hf_weights[k]) != first.shape or not np.array_equal(np.asarray(hf_weights[k]), first):
                raise FSMTError(f"{where}: {k} is tied to {present[0]} by the config but holds different values")
        out[ours] = first
        used.update(present)
    table = position_table("fairseq", cfg.max_len, cfg.d_model, cfg.pad_id)  # [max_len, D]: rows pad+1..
    check_leftovers(hf_weights, used, table, lambda stored: stored[cfg.pad_id + 1:cfg.pad_id + 1 + cfg.max_len]
                    if stored.ndim == 2 else stored, "fairseq's", where)
    try:
        check_canonical(out, cfg)
    except ValueError as e:
        raise FSMTError(f"{where}: {e}") from None
    return cfg, out


def from_hf_fsmt(model_or_dir: Any) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """An `FSMTForConditionalGeneration` (or its `save_pretrained` directory) -> (cfg, canonical state dict)."""
    if hasattr(model_or_dir, "state_dict") and hasattr(model_or_dir, "config"):
        from parity.convert import to_numpy

        return from_state_dict({k: to_numpy(v) for k, v in model_or_dir.state_dict().items()},
                               model_or_dir.config.to_dict(), f"{type(model_or_dir).__name__}.state_dict()")
    from parity.formats.hf_dir import read_hf_dir

    loaded = read_hf_dir(model_or_dir, MODEL_TYPE)
    return loaded.cfg, loaded.weights


def reference_forward(model: Any, src: Any, src_mask: Any, tgt: Any, tgt_mask: Any) -> tuple[Any, Any]:
    """(encoder memory, logits) of transformers' FSMT on torch tensors, the way its forward with use_cache=False
    computes them, but with the causal mask filled in the model's dtype: transformers' `fill_with_neg_inf`
    fills a float32 copy with the dtype's minimum, which overflows for float64 (a transformers bug)."""
    import torch

    dtype = model.model.decoder.embed_tokens.weight.dtype
    t = tgt.shape[1]
    causal = torch.triu(torch.full((t, t), torch.finfo(dtype).min, dtype=dtype), diagonal=1)  # [T, T]
    memory = model.model.encoder(input_ids=src, attention_mask=src_mask.long()).last_hidden_state  # [B, S, D]
    out = model.model.decoder(tgt, memory, src_mask.long(), ~tgt_mask, decoder_causal_mask=causal, use_cache=False)
    return memory, out.last_hidden_state  # [B, T, V]: FSMT's decoder ends with its output projection
