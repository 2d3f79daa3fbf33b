"""Token embeddings (scaled by sqrt(d_model)) and the sinusoidal positional encoding (Flax twin)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jax_tx.dropout import Dropout
from jax_tx.initializers import embedding_std
from jax_tx.tracing import tracing
from parity.numerics import position_table


def check_token_ids(ids: jnp.ndarray, vocab_size: int) -> None:
    """TypeError unless ids are integers; ValueError when concrete ids fall outside [0, vocab_size)."""
    check_index_range(ids, vocab_size, "token ids", str(vocab_size))


def check_index_range(values: jnp.ndarray, size: int, what: str, bound: str) -> None:
    """TypeError unless `values` are integers; ValueError when they fall outside [0, size) (`bound` is how the
    message writes size). While JAX traces (`jax_tx.tracing`), even captured constants are not looked at."""
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise TypeError(f"{what} must be an integer array, got {values.dtype}")
    if values.size and not tracing():
        host = np.asarray(values)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"{what} must be in [0, {bound}), got values in [{lo}, {hi}]")


class TokenEmbedding(nn.Module):
    """ids (B, L) int -> (B, L, D) = embedding[ids] * sqrt(D) (times 1 without `scale`). `pad_id` (not None):
    that row gets no gradient from lookups (torch's nn.Embedding padding_idx).

    Out-of-range ids raise ValueError when the ids are concrete (plain `apply`). Under `jax.jit`
    they cannot raise; JAX would clamp the gather silently, so they give NaN rows instead.
    """

    vocab_size: int
    d_model: int
    scale: bool = True
    pad_id: int | None = None

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(stddev=embedding_std(self.d_model)),
                                    (self.vocab_size, self.d_model), jnp.float32)

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        check_token_ids(ids, self.vocab_size)
        x = jnp.take(self.embedding, ids, axis=0, mode="fill", fill_value=jnp.nan)  # [B, L, D]
        if self.pad_id is not None:
            x = jnp.where((ids == self.pad_id)[..., None], jax.lax.stop_gradient(x), x)  # [B, L, D]
        return x * math.sqrt(self.d_model) if self.scale else x

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """x (B, L, D) -> x @ embedding.T (B, L, V), for an output layer tied to this embedding."""
        return x @ self.embedding.T.astype(x.dtype)  # [B, L, V]


class PositionalEncoding(nn.Module):
    """x (B, L, D) -> dropout(x + PE[offset:offset + L]), or dropout(x + PE[positions]) with positions (B, L).
    offset + L > max_len, or a concrete position outside [0, max_len), raises ValueError.

    The table is parity.numerics.position_table(positions, ...) in float64, cast to x's dtype (the torch twin
    does the same).
    An array `offset` while JAX traces (cached decoding under jit) cannot raise; callers keep it in range.
    """

    d_model: int
    max_len: int
    dropout: float
    positions: str = "paper"
    pad_id: int = 0

    def setup(self):
        self.drop = Dropout(self.dropout)

    def __call__(self, x: jnp.ndarray, offset: int | jnp.ndarray = 0, deterministic: bool = True,
                 positions: jnp.ndarray | None = None) -> jnp.ndarray:
        """`positions` (B, L) int (packed sequences, per-row offsets) replaces offset..offset + L."""
        length = x.shape[1]
        full = _table(self.positions, self.max_len, self.d_model, self.pad_id)  # [max_len, D] float64
        if positions is not None:
            check_positions(positions, tuple(x.shape[:2]), self.max_len)
            table = jnp.take(jnp.asarray(full, x.dtype), positions, axis=0, mode="fill", fill_value=jnp.nan)  # [B, L, D]
        elif not isinstance(offset, (int, np.integer)) and tracing():
            table = jax.lax.dynamic_slice_in_dim(jnp.asarray(full, x.dtype), offset, length)  # [L, D]
        else:
            offset = int(offset)
            if offset + length > self.max_len:
                raise ValueError(f"sequence length {offset + length} exceeds max_len {self.max_len}")
            table = jnp.asarray(full[offset:offset + length], dtype=x.dtype)  # [L, D]
        return self.drop(x + table, deterministic=deterministic)  # [B, L, D]


def check_positions(positions: jnp.ndarray, expected: tuple[int, ...], max_len: int) -> None:
    """Raise unless `positions` is an integer array of shape `expected` (B, L) with (concrete) values in
    [0, max_len). Traced positions cannot raise: out-of-range ones give NaN rows."""
    if tuple(positions.shape) != expected:
        raise ValueError(f"positions must have shape (B, L) = {expected}, got {tuple(positions.shape)}")
    check_index_range(positions, max_len, "positions", f"max_len={max_len}")


_TABLES: dict[tuple[str, int, int, int], np.ndarray] = {}


def _table(positions: str, max_len: int, d_model: int, pad_id: int) -> np.ndarray:
    key = (positions, max_len, d_model, pad_id)
    if key not in _TABLES:
        _TABLES[key] = position_table(*key)
    return _TABLES[key]  # [max_len, D]
