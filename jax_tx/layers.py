"""Encoder and decoder layers (Flax twin), post-LN as in the paper or pre-LN by config."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_tx.attention import MultiHeadAttention
from jax_tx.dropout import Dropout
from jax_tx.feed_forward import FeedForward
from parity.config import TransformerConfig


def layer_norm(cfg: TransformerConfig) -> nn.LayerNorm:
    """LayerNorm with the config's eps and torch's two-pass variance."""
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False)


def residual(x: jnp.ndarray, norm: nn.LayerNorm, sublayer: Callable[[jnp.ndarray], jnp.ndarray],
             dropout: Dropout, norm_first: bool, deterministic: bool) -> jnp.ndarray:
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
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout_rate)
        self.self_attn_norm = layer_norm(cfg)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout_rate, cfg.activation)
        self.ff_norm = layer_norm(cfg)
        self.drop = Dropout(cfg.dropout)

    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None, deterministic: bool = True) -> jnp.ndarray:
        det = deterministic
        x = residual(x, self.self_attn_norm, lambda h: self.self_attn(h, h, mask, det), self.drop,
                     self.norm_first, det)  # [B, S, D]
        return residual(x, self.ff_norm, lambda h: self.ff(h, det), self.drop, self.norm_first,
                        det)  # [B, S, D]


class DecoderLayer(nn.Module):
    """x (B, T, D), memory (B, S, D), self_mask (B, 1, T, T), cross_mask (B, 1, T|1, S) -> (B, T, D).

    Without `cross_attention` (DecoderOnly) the layer is causal self-attention and feed-forward only;
    memory and cross_mask are then ignored (pass None).

    With `cache` (this layer's entry of `Transformer.init_cache`): x holds the T new positions from
    `index` on, self_mask is (B, 1, T, L) over the cache's L slots, memory is unused (its keys and
    values are cached), and the result is (x, cache) with the new keys and values written at
    index..index+T-1 (a new cache: nothing is mutated). The cross-attention keys and values may hold B sources
    for B*G rows of x (G hypotheses of each source, in consecutive rows; cross_mask (B, 1, 1, S)): a source's G
    rows then attend as one block of G*T queries.
    """

    cfg: TransformerConfig
    cross_attention: bool = True

    def setup(self):
        cfg = self.cfg
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout_rate)
        self.self_attn_norm = layer_norm(cfg)
        if self.cross_attention:
            self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout_rate)
            self.cross_attn_norm = layer_norm(cfg)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout_rate, cfg.activation)
        self.ff_norm = layer_norm(cfg)
        self.drop = Dropout(cfg.dropout)

    def init_cache(self, memory: jnp.ndarray, length: int) -> dict[str, jnp.ndarray]:
        """Cross-attention keys/values of memory (B, S, D), once; empty self-attention slots for `length` positions.

        Without cross-attention only memory's batch size and dtype are read (pass (B, 0, D)).
        """
        b, h, k = memory.shape[0], self.cfg.num_heads, self.cfg.head_dim
        empty = jnp.zeros((b, h, length, k), memory.dtype)  # [B, H, L, K]
        cache = {"self_k": empty, "self_v": empty}
        if self.cross_attention:
            cache["cross_k"], cache["cross_v"] = self.cross_attn.project_kv(memory)  # [B, H, S, K]
        return cache

    def __call__(self, x: jnp.ndarray, memory: jnp.ndarray | None, self_mask: jnp.ndarray | None,
                 cross_mask: jnp.ndarray | None, cache: dict[str, jnp.ndarray] | None = None,
                 index: int | jnp.ndarray = 0, deterministic: bool = True):
        det = deterministic
        new_cache = None

        def self_attention(h: jnp.ndarray) -> jnp.ndarray:
            nonlocal new_cache
            q, k, v = self.self_attn.project_qkv(h)  # [B, H, T, K]
            if cache is not None:
                k = jax.lax.dynamic_update_slice_in_dim(cache["self_k"], k.astype(cache["self_k"].dtype), index,
                                                        axis=2)  # [B, H, L, K]
                v = jax.lax.dynamic_update_slice_in_dim(cache["self_v"], v.astype(cache["self_v"].dtype), index,
                                                        axis=2)  # [B, H, L, K]
                new_cache = {**cache, "self_k": k, "self_v": v}
            return self.self_attn.attend(q, k, v, self_mask, det)  # [B, T, D]

        def cross_attention(h: jnp.ndarray) -> jnp.ndarray:
            if cache is None:
                return self.cross_attn(h, memory, cross_mask, det)  # [B, T, D]
            q = self.cross_attn.project_q(h)  # [B*G, H, T, K]
            groups = q.shape[0] // cache["cross_k"].shape[0]  # G hypotheses per source (beam search), else 1
            if groups == 1:
                return self.cross_attn.attend(q, cache["cross_k"], cache["cross_v"], cross_mask, det)  # [B, T, D]
            _, heads, t, k = q.shape
            q = q.reshape(-1, groups, heads, t, k).transpose(0, 2, 1, 3, 4).reshape(-1, heads, groups * t, k)  # [B, H, G*T, K]
            out = self.cross_attn.attend(q, cache["cross_k"], cache["cross_v"], cross_mask, det)  # [B, G*T, D]
            return out.reshape(h.shape)  # [B*G, T, D]

        x = residual(x, self.self_attn_norm, self_attention, self.drop, self.norm_first, det)  # [B, T, D]
        if self.cross_attention:
            x = residual(x, self.cross_attn_norm, cross_attention, self.drop, self.norm_first, det)  # [B, T, D]
        x = residual(x, self.ff_norm, lambda h: self.ff(h, det), self.drop, self.norm_first, det)  # [B, T, D]
        return x if cache is None else (x, new_cache)
