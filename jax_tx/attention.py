"""Multi-head attention (Flax twin): separate q/k/v/out projections, masked softmax attention.

The projections are `nn.Dense` submodules named `q_proj`, `k_proj`, `v_proj`, `out_proj`, as in the torch twin,
so the rule table maps every canonical weight to one Flax param (no fused layout: see torch_tx/attention.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_tx.initializers import linear


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
        from jax_tx.dropout import dropout  # a leaf module; attention imports only initializers at module level

        weights = dropout(weights, dropout_rate, dropout_rng)  # [B, H, T, S]
    return jnp.einsum("bhts,bhsk->bhtk", weights.astype(v.dtype), v)  # [B, H, T, K]


class MultiHeadAttention(nn.Module):
    """query (B, T, D), key_value (B, S, D), mask (B|1, 1, T|1, S) bool True = attend -> (B, T, D).

    A query row whose keys are all masked gives zeros (as torch's SDPA since 2.5).
    """

    d_model: int
    num_heads: int
    dropout: float

    def setup(self):
        self.head_dim = self.d_model // self.num_heads
        self.q_proj = linear(self.d_model)
        self.k_proj = linear(self.d_model)
        self.v_proj = linear(self.d_model)
        self.out_proj = linear(self.d_model)

    def _split_heads(self, x: jnp.ndarray) -> jnp.ndarray:
        """x (B, L, D) -> (B, H, L, K)."""
        b, length, _ = x.shape
        return x.reshape(b, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # [B, H, L, K]

    def project_q(self, query: jnp.ndarray) -> jnp.ndarray:
        """query (B, T, D) -> queries (B, H, T, K)."""
        return self._split_heads(self.q_proj(query))  # [B, H, T, K]

    def project_kv(self, key_value: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """key_value (B, S, D) -> keys and values (B, H, S, K): what a KV cache stores."""
        return self._split_heads(self.k_proj(key_value)), self._split_heads(self.v_proj(key_value))  # [B, H, S, K]

    def project_qkv(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """x (B, T, D) -> queries, keys and values (B, H, T, K) of self-attention."""
        return (self.project_q(x), *self.project_kv(x))  # 3 x [B, H, T, K]

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
