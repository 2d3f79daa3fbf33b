"""Mask construction (Flax twin). Boolean, True = may attend; built once at the top of encode/decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_tx.tracing import tracing


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


def first_position_real(pad: jnp.ndarray, offset: int | jnp.ndarray = 0) -> jnp.ndarray:
    """A derived (B, T) decoder padding mask for positions offset.. with position 0 real: the encoder-decoder's
    first decoder input is the decoder start, never padding, even where it is the pad id (Marian's is)."""
    return pad | (offset + jnp.arange(pad.shape[1]) == 0)[None, :]  # [B, T]


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


def self_attention_masks(ids: jnp.ndarray, pad_id: int, mask: jnp.ndarray | None, segments: jnp.ndarray | None,
                         positions: jnp.ndarray | None, causal: bool, name: str,
                         first_real: bool = False):
    """What a stack's self-attention needs for ids (B, L), built once: (padding mask (B, L), attention mask
    (B, 1, L|1, L), segments (B, L) or None, positions (B, L) or None).

    With `segments` (packed rows, 0 = padding) attention stays inside each segment and, unless given,
    positions restart at each segment. `name` ("src"/"tgt") names the arguments in errors. `first_real`: a
    mask derived from pad ids keeps position 0 real (`first_position_real`; the encoder-decoder's decoder).
    """
    pad = padding_mask(ids, pad_id, mask, f"{name}_mask")  # [B, L]
    if first_real and mask is None:
        pad = first_position_real(pad)  # [B, L]
    attn = key_mask(pad)  # [B, 1, 1, L]
    if segments is not None:
        segments = check_segments(segments, tuple(ids.shape), f"{name}_segments")  # [B, L]
        attn = attn & segment_mask(segments, segments)  # [B, 1, L, L]
        positions = segment_positions(segments) if positions is None else positions  # [B, L]
    if causal:
        attn = attn & causal_mask(ids.shape[1])  # [B, 1, L, L]
    return pad, attn, segments, positions


def check_segments(segments: jnp.ndarray, expected: tuple[int, ...], name: str) -> jnp.ndarray:
    """Raise unless `segments` is an integer array of shape `expected` (B, L) with ids >= 0 (0 = padding)."""
    if tuple(segments.shape) != expected:
        raise ValueError(f"{name} must have shape (B, L) = {expected}, got {tuple(segments.shape)}")
    if not jnp.issubdtype(segments.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array (0 = padding), got {segments.dtype}")
    if segments.size and not tracing() and int(np.asarray(segments).min()) < 0:
        raise ValueError(f"{name} must be >= 0 (0 = padding), got {int(np.asarray(segments).min())}")
    return jnp.asarray(segments)


def segment_mask(query_segments: jnp.ndarray, key_segments: jnp.ndarray) -> jnp.ndarray:
    """(B, T), (B, S) segment ids (0 = padding) -> (B, 1, T, S): a query attends only to keys of its own segment."""
    same = query_segments[:, :, None] == key_segments[:, None, :]  # [B, T, S]
    return (same & (key_segments != 0)[:, None, :])[:, None]  # [B, 1, T, S]


def segment_positions(segments: jnp.ndarray) -> jnp.ndarray:
    """(B, L) segment ids, each segment contiguous -> (B, L) positions counted from 0 at each segment's start."""
    index = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)  # [B, L]
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], dtype=jnp.bool_),
                              segments[:, 1:] != segments[:, :-1]], axis=1)  # [B, L]
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # [B, L]
