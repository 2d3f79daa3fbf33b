"""Mask construction (Flax twin). Boolean, True = may attend; built once at the top of encode/decode."""

from __future__ import annotations

import jax.numpy as jnp


def padding_mask(ids: jnp.ndarray, pad_id: int, mask: jnp.ndarray | None = None,
                 name: str = "mask") -> jnp.ndarray:
    """The (B, L) padding mask, True = real token: `mask` checked, or derived from `pad_id`."""
    if mask is None:
        return ids != pad_id  # [B, L]
    return check_padding_mask(mask, tuple(ids.shape), name)


def check_padding_mask(mask: jnp.ndarray, expected: tuple[int, ...], name: str) -> jnp.ndarray:
    """Raise unless `mask` is a boolean array of shape `expected` (B, L)."""
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape (B, L) = {expected}, got {tuple(mask.shape)}")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{name} must be boolean (True = attend), got {mask.dtype}")
    return jnp.asarray(mask)


def key_mask(pad_mask: jnp.ndarray) -> jnp.ndarray:
    """(B, L) padding mask -> (B, 1, 1, L) attention mask over keys."""
    return pad_mask[:, None, None, :]  # [B, 1, 1, L]


def causal_mask(length: int, offset: int | jnp.ndarray = 0, keys: int | None = None) -> jnp.ndarray:
    """(1, 1, T, L) mask: query t, at position offset + t, may attend to keys 0..offset + t.

    L = `keys` (default offset + T; give it when offset is traced); with offset 0 and L = T it is the
    lower-triangular (T, T) mask.
    """
    keys = offset + length if keys is None else keys
    query_pos = offset + jnp.arange(length)  # [T]
    return (jnp.arange(keys)[None, :] <= query_pos[:, None])[None, None]  # [1, 1, T, L]


def decoder_self_mask(tgt_pad: jnp.ndarray) -> jnp.ndarray:
    """(B, T) target padding mask -> (B, 1, T, T) causal self-attention mask."""
    return key_mask(tgt_pad) & causal_mask(tgt_pad.shape[1])  # [B, 1, T, T]
