"""Mask construction (torch twin). Boolean, True = may attend; built once at the top of encode/decode."""

from __future__ import annotations

import torch


def padding_mask(ids: torch.Tensor, pad_id: int, mask: torch.Tensor | None = None,
                 name: str = "mask") -> torch.Tensor:
    """The (B, L) padding mask, True = real token: `mask` checked, or derived from `pad_id`."""
    if mask is None:
        return ids != pad_id  # [B, L]
    return check_padding_mask(mask, tuple(ids.shape), name).to(ids.device)


def check_padding_mask(mask: torch.Tensor, expected: tuple[int, ...], name: str) -> torch.Tensor:
    """Raise unless `mask` is a boolean tensor of shape `expected` (B, L)."""
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape (B, L) = {expected}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be boolean (True = attend), got {mask.dtype}")
    return mask


def first_position_real(pad: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """A derived (B, T) decoder padding mask for positions offset.. with position 0 real: the encoder-decoder's
    first decoder input is the decoder start, never padding, even where it is the pad id (Marian's is)."""
    return pad | (offset + torch.arange(pad.shape[1], device=pad.device) == 0)[None, :]  # [B, T]


def key_mask(pad_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, 1, L) attention mask over keys."""
    return pad_mask[:, None, None, :]  # [B, 1, 1, L]


def causal_mask(length: int, device: torch.device | str | None = None, offset: int = 0,
                keys: int | None = None) -> torch.Tensor:
    """(1, 1, T, L) mask: query t, at position offset + t, may attend to keys 0..offset + t.

    L = `keys` (default offset + T); with offset 0 and L = T it is the lower-triangular (T, T) mask.
    """
    keys = offset + length if keys is None else keys
    query_pos = offset + torch.arange(length, device=device)  # [T]
    return (torch.arange(keys, device=device)[None, :] <= query_pos[:, None])[None, None]  # [1, 1, T, L]


def decoder_self_mask(tgt_pad: torch.Tensor) -> torch.Tensor:
    """(B, T) target padding mask -> (B, 1, T, T) causal self-attention mask."""
    return key_mask(tgt_pad) & causal_mask(tgt_pad.shape[1], tgt_pad.device)  # [B, 1, T, T]


def self_attention_masks(ids: torch.Tensor, pad_id: int, mask: torch.Tensor | None, segments: torch.Tensor | None,
                         positions: torch.Tensor | None, causal: bool, name: str,
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
        segments = check_segments(segments, tuple(ids.shape), f"{name}_segments").to(ids.device)  # [B, L]
        attn = attn & segment_mask(segments, segments)  # [B, 1, L, L]
        positions = segment_positions(segments) if positions is None else positions  # [B, L]
    if causal:
        attn = attn & causal_mask(ids.shape[1], ids.device)  # [B, 1, L, L]
    return pad, attn, segments, positions


def check_segments(segments: torch.Tensor, expected: tuple[int, ...], name: str) -> torch.Tensor:
    """Raise unless `segments` is an integer tensor of shape `expected` (B, L) with ids >= 0 (0 = padding)."""
    if tuple(segments.shape) != expected:
        raise ValueError(f"{name} must have shape (B, L) = {expected}, got {tuple(segments.shape)}")
    if segments.dtype.is_floating_point or segments.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"{name} must be an integer tensor (0 = padding), got {segments.dtype}")
    if segments.numel() and not torch.compiler.is_compiling() and int(segments.min()) < 0:
        raise ValueError(f"{name} must be >= 0 (0 = padding), got {int(segments.min())}")
    return segments


def segment_mask(query_segments: torch.Tensor, key_segments: torch.Tensor) -> torch.Tensor:
    """(B, T), (B, S) segment ids (0 = padding) -> (B, 1, T, S): a query attends only to keys of its own segment."""
    same = query_segments[:, :, None] == key_segments[:, None, :]  # [B, T, S]
    return (same & (key_segments != 0)[:, None, :])[:, None]  # [B, 1, T, S]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids, each segment contiguous -> (B, L) positions counted from 0 at each segment's start."""
    length = segments.shape[1]
    index = torch.arange(length, device=segments.device).expand_as(segments)  # [B, L]
    starts = torch.ones_like(segments, dtype=torch.bool)  # [B, L]
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values  # [B, L]
