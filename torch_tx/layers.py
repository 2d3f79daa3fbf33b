"""Encoder and decoder layers (torch twin), post-LN as in the paper or pre-LN by config."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from parity.config import TransformerConfig
from torch_tx.attention import MultiHeadAttention
from torch_tx.feed_forward import FeedForward


def residual(x: torch.Tensor, norm: nn.LayerNorm, sublayer: Callable[[torch.Tensor], torch.Tensor],
             dropout: nn.Dropout, norm_first: bool) -> torch.Tensor:
    """Post-LN: norm(x + dropout(f(x))); pre-LN: x + dropout(f(norm(x)))."""
    if norm_first:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """x (B, S, D), mask (B, 1, 1, S) -> (B, S, D): self-attention, then feed-forward."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.ff_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = residual(x, self.self_attn_norm, lambda h: self.self_attn(h, h, mask), self.drop,
                     self.norm_first)  # [B, S, D]
        return residual(x, self.ff_norm, self.ff, self.drop, self.norm_first)  # [B, S, D]


class DecoderLayer(nn.Module):
    """x (B, T, D), memory (B, S, D), self_mask (B, 1, T, T), cross_mask (B, 1, 1, S) -> (B, T, D)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        self.cross_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, cfg.activation)
        self.ff_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None) -> torch.Tensor:
        x = residual(x, self.self_attn_norm, lambda h: self.self_attn(h, h, self_mask), self.drop,
                     self.norm_first)  # [B, T, D]
        x = residual(x, self.cross_attn_norm, lambda h: self.cross_attn(h, memory, cross_mask),
                     self.drop, self.norm_first)  # [B, T, D]
        return residual(x, self.ff_norm, self.ff, self.drop, self.norm_first)  # [B, T, D]
