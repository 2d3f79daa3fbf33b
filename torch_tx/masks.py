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
