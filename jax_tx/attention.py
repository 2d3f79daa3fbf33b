"""Multi-head attention (Flax twin): one fused q/k/v projection (`in_proj`), out projection, masked softmax.

The fused kernel is a layout, not a name: `parity.convert` splits `in_proj` into the canonical `q_proj`,
`k_proj`, `v_proj` weights and joins them back.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_tx.initializers import linear, xavier_blocks


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None = None,
                          dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jnp.ndarray:
    """q (B, H, T, K), k/v (B, H, S, K), mask (B|1, 1, T|1, S) -> (B, H, T, K), like torch's SDPA.

    Masked logits take dtype's most negative finite value; a row with no key to attend gives zeros.
    The softmax runs in at least float32. Dropout on the weights when `dropout_rng` is given.
    """
    logits = jnp.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)  # [B, H, T, S]
    if mask is not None:
        weights = jnp.where(mask.any(axis=-1, keepdims=True), weights, 0.0)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)  # [B, H, T, S]
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bhsk->bhtk", weights.astype(v.dtype), v)  # [B, H, T, K]


class InProjection(nn.Module):
    """The q, k and v projections as one kernel (D, 3D): columns [0, D) q, [D, 2D) k, [2D, 3D) v (the transpose
    of torch's in_proj weight). `__call__(x, first, last)` applies blocks first..last-1: x (..., D) -> (..., n D)."""

    d_model: int

    def setup(self):
        self.kernel = self.param("kernel", xavier_blocks(3), (self.d_model, 3 * self.d_model))  # [D, 3D]
        self.bias = self.param("bias", nn.initializers.zeros, (3 * self.d_model,))  # [3D]

    def __call__(self, x: jnp.ndarray, first: int = 0, last: int = 3) -> jnp.ndarray:
        cols = slice(first * self.d_model, last * self.d_model)
        x, kernel, bias = nn.dtypes.promote_dtype(x, self.kernel[:, cols], self.bias[cols])
        return x @ kernel + bias  # [..., (last - first) * D]


class MultiHeadAttention(nn.Module):
    """query (B, T, D), key_value (B, S, D), mask (B|1, 1, T|1, S) bool True = attend -> (B, T, D).

    Self-attention (`key_value is query`) projects q, k, v with one matmul; cross-attention projects q
    and k, v (two). A query row whose keys are all masked gives zeros (as torch's SDPA since 2.5).
    """

    d_model: int
    num_heads: int
    dropout: float

    def setup(self):
        self.head_dim = self.d_model // self.num_heads
        self.in_proj = InProjection(self.d_model)
        self.out_proj = linear(self.d_model)

    def _split_heads(self, x: jnp.ndarray, n: int) -> tuple[jnp.ndarray, ...]:
        """x (B, L, n D) -> n blocks (B, H, L, K)."""
        b, length, _ = x.shape
        return tuple(part.reshape(b, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
                     for part in jnp.split(x, n, axis=-1))  # n x [B, H, L, K]

    def project_q(self, query: jnp.ndarray) -> jnp.ndarray:
        """query (B, T, D) -> queries (B, H, T, K)."""
        return self._split_heads(self.in_proj(query, 0, 1), 1)[0]  # [B, H, T, K]

    def project_kv(self, key_value: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """key_value (B, S, D) -> keys and values (B, H, S, K): what a KV cache stores."""
        return self._split_heads(self.in_proj(key_value, 1, 3), 2)  # 2 x [B, H, S, K]

    def project_qkv(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """x (B, T, D) -> queries, keys and values (B, H, T, K) of self-attention, one matmul."""
        return self._split_heads(self.in_proj(x), 3)  # 3 x [B, H, T, K]

    def attend(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
        """Projected q (B, H, T, K) against k, v (B, H, S, K) -> (B, T, D)."""
        rng = None if deterministic or self.dropout == 0.0 else self.make_rng("dropout")
        out = dot_product_attention(q, k, v, mask, self.dropout, rng)  # [B, H, T, K]
        b, _, t, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, D]
        return self.out_proj(out)  # [B, T, D]

    def __call__(self, query: jnp.ndarray, key_value: jnp.ndarray, mask: jnp.ndarray | None = None,
                 deterministic: bool = True) -> jnp.ndarray:
        if key_value is query:
            return self.attend(*self.project_qkv(query), mask, deterministic)  # [B, T, D]
        return self.attend(self.project_q(query), *self.project_kv(key_value), mask, deterministic)  # [B, T, D]
