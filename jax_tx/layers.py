"""Encoder and decoder layers (Flax twin), post-LN as in the paper or pre-LN by config."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import linen as nn

from jax_tx.attention import MultiHeadAttention
from jax_tx.feed_forward import FeedForward
from parity.config import TransformerConfig


def layer_norm(cfg: TransformerConfig) -> nn.LayerNorm:
    """LayerNorm with the config's eps and torch's two-pass variance."""
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False)


def residual(x: jnp.ndarray, norm: nn.LayerNorm, sublayer: Callable[[jnp.ndarray], jnp.ndarray],
             dropout: nn.Dropout, norm_first: bool, deterministic: bool) -> jnp.ndarray:
    """Post-LN: norm(x + dropout(f(x))); pre-LN: x + dropout(f(norm(x)))."""
    if norm_first:
        return x + dropout(sublayer(norm(x)), deterministic=deterministic)
    return norm(x + dropout(sublayer(x), deterministic=deterministic))


class EncoderLayer(nn.Module):
    """x (B, S, D), mask (B, 1, 1, S) -> (B, S, D): self-attention, then feed-forward."""

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.self_attn_norm = layer_norm(cfg)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.ff_norm = layer_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None, deterministic: bool = True) -> jnp.ndarray:
        det = deterministic
        x = residual(x, self.self_attn_norm, lambda h: self.self_attn(h, h, mask, det), self.drop,
                     self.norm_first, det)  # [B, S, D]
        return residual(x, self.ff_norm, lambda h: self.ff(h, det), self.drop, self.norm_first,
                        det)  # [B, S, D]


class DecoderLayer(nn.Module):
    """x (B, T, D), memory (B, S, D), self_mask (B, 1, T, T), cross_mask (B, 1, 1, S) -> (B, T, D)."""

    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.self_attn_norm = layer_norm(cfg)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.cross_attn_norm = layer_norm(cfg)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.ff_norm = layer_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def __call__(self, x: jnp.ndarray, memory: jnp.ndarray, self_mask: jnp.ndarray | None,
                 cross_mask: jnp.ndarray | None, deterministic: bool = True) -> jnp.ndarray:
        det = deterministic
        x = residual(x, self.self_attn_norm, lambda h: self.self_attn(h, h, self_mask, det), self.drop,
                     self.norm_first, det)  # [B, T, D]
        x = residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, memory, cross_mask, det),
                     self.drop, self.norm_first, det)  # [B, T, D]
        return residual(x, self.ff_norm, lambda h: self.ff(h, det), self.drop, self.norm_first,
                        det)  # [B, T, D]
