"""The canonical weight names: the torch twin's state_dict keys and shapes, computed from a config.

These names are the interchange format (safetensors checkpoints, conversion between the twins).
"""

from __future__ import annotations

from parity.config import TransformerConfig

Shape = tuple[int, ...]


def _linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict[str, Shape]:
    shapes = {f"{prefix}.weight": (n_out, n_in)}
    if bias:
        shapes[f"{prefix}.bias"] = (n_out,)
    return shapes


def _norm(prefix: str, d: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def _attention(prefix: str, d: int) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes.update(_linear(f"{prefix}.{proj}", d, d))
    return shapes


def _feed_forward(prefix: str, d: int, f: int) -> dict[str, Shape]:
    return {**_linear(f"{prefix}.linear1", d, f), **_linear(f"{prefix}.linear2", f, d)}


def _layer(prefix: str, d: int, f: int, cross: bool) -> dict[str, Shape]:
    shapes = {**_attention(f"{prefix}.self_attn", d), **_norm(f"{prefix}.self_attn_norm", d)}
    if cross:
        shapes.update({**_attention(f"{prefix}.cross_attn", d), **_norm(f"{prefix}.cross_attn_norm", d)})
    return {**shapes, **_feed_forward(f"{prefix}.ff", d, f), **_norm(f"{prefix}.ff_norm", d)}


def canonical_shapes(cfg: TransformerConfig) -> dict[str, Shape]:
    """Every state_dict key of the torch twin's model for `cfg.arch` with its shape, in registration order:
    `Transformer` (seq2seq), `EncoderOnly` (encoder) or `DecoderOnly` (decoder).

    Tied and shared weights appear under each of their names (as in `state_dict()`).
    """
    d = cfg.d_model
    shapes: dict[str, Shape] = {}
    if cfg.arch != "decoder":
        shapes["src_embed.weight"] = (cfg.src_vocab_size, d)
    if cfg.arch != "encoder":
        shapes["tgt_embed.weight"] = (cfg.tgt_vocab_size, d)
    stacks = {"seq2seq": ("encoder", "decoder"), "encoder": ("encoder",), "decoder": ("decoder",)}[cfg.arch]
    for stack in stacks:
        num_layers = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
        for i in range(num_layers):
            shapes.update(_layer(f"{stack}.layers.{i}", d, cfg.d_ff, cross=stack == "decoder" and cfg.arch == "seq2seq"))
        if cfg.final_norm:
            shapes.update(_norm(f"{stack}.norm", d))
    if cfg.arch != "encoder":
        shapes.update(_linear("generator", d, cfg.tgt_vocab_size, bias=cfg.output_bias))
    elif cfg.num_classes is not None:
        shapes.update({**_linear("pooler", d, d), **_linear("classifier", d, cfg.num_classes)})
    return shapes


def aliases(cfg: TransformerConfig) -> dict[str, str]:
    """Canonical keys that are another key's weight (tied or shared): {alias: owner}."""
    out = {}
    tgt_owner = "src_embed.weight" if cfg.share_embeddings else "tgt_embed.weight"
    if cfg.share_embeddings:
        out["tgt_embed.weight"] = tgt_owner
    if cfg.tie_output:
        out["generator.weight"] = tgt_owner
    return out
