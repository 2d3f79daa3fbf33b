"""Encoder and decoder layers (torch twin), post-LN as in the paper or pre-LN by config."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from parity.config import TransformerConfig
from torch_tx.attention import MultiHeadAttention
from torch_tx.dropout import Dropout
from torch_tx.feed_forward import FeedForward


def residual(x: torch.Tensor, norm: nn.LayerNorm, sublayer: Callable[[torch.Tensor], torch.Tensor],
             dropout: Dropout, norm_first: bool) -> torch.Tensor:
    """Post-LN: norm(x + dropout(f(x))); pre-LN: x + dropout(f(norm(x)))."""
    if norm_first:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """x (B, S, D), mask (B, 1, 1, S) -> (B, S, D): self-attention, then feed-forward."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout_rate)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout_rate, cfg.activation)
        self.ff_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = residual(x, self.self_attn_norm, lambda h: self.self_attn(h, h, mask), self.drop,
                     self.norm_first)  # [B, S, D]
        return residual(x, self.ff_norm, self.ff, self.drop, self.norm_first)  # [B, S, D]


class DecoderLayer(nn.Module):
    """x (B, T, D), memory (B, S, D), self_mask (B, 1, T, T), cross_mask (B, 1, T|1, S) -> (B, T, D).

    Without `cross_attention` (DecoderOnly) the layer is causal self-attention and feed-forward only;
    memory and cross_mask are then ignored (pass None).

    With `cache` (this layer's entry of `Transformer.init_cache`): x holds the T new positions from
    `index` on, self_mask is (B, 1, T, index + T), memory is unused (its keys and values are cached),
    and the result is (x, cache) with the new keys and values written in place at index..index+T-1.
    The cross-attention keys and values may hold B sources for B*G rows of x (G hypotheses of each source,
    in consecutive rows; cross_mask (B, 1, 1, S)): a source's G rows then attend as one block of G*T queries.
    """

    def __init__(self, cfg: TransformerConfig, cross_attention: bool = True):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.cross_attention = cross_attention
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout_rate)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout_rate)
            self.cross_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout_rate, cfg.activation)
        self.ff_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)

    def init_cache(self, memory: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """Cross-attention keys/values of memory (B, S, D), once; empty self-attention slots for `length` positions.

        Without cross-attention only memory's batch size, dtype and device are read (pass (B, 0, D)).
        """
        b, h, k = memory.shape[0], self.self_attn.num_heads, self.self_attn.head_dim
        empty = memory.new_zeros(b, h, length, k)  # [B, H, L, K]
        cache = {"self_k": empty, "self_v": empty.clone()}
        if self.cross_attention:
            cache["cross_k"], cache["cross_v"] = self.cross_attn.project_kv(memory)  # [B, H, S, K]
        return cache

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None, cache: dict[str, torch.Tensor] | None = None,
                index: int = 0):
        def self_attention(h: torch.Tensor) -> torch.Tensor:
            q, k, v = self.self_attn.project_qkv(h)  # [B, H, T, K]
            if cache is not None:
                end = index + h.shape[1]
                cache["self_k"][:, :, index:end] = k
                cache["self_v"][:, :, index:end] = v
                k, v = cache["self_k"][:, :, :end], cache["self_v"][:, :, :end]  # [B, H, index + T, K]
            return self.self_attn.attend(q, k, v, self_mask)  # [B, T, D]

        def cross_attention(h: torch.Tensor) -> torch.Tensor:
            if cache is None:
                return self.cross_attn(h, memory, cross_mask)  # [B, T, D]
            q = self.cross_attn.project_q(h)  # [B*G, H, T, K]
            groups = q.shape[0] // cache["cross_k"].shape[0]  # G hypotheses per source (beam search), else 1
            if groups == 1:
                return self.cross_attn.attend(q, cache["cross_k"], cache["cross_v"], cross_mask)  # [B, T, D]
            q = q.unflatten(0, (-1, groups)).transpose(1, 2).flatten(2, 3)  # [B, H, G*T, K]
            out = self.cross_attn.attend(q, cache["cross_k"], cache["cross_v"], cross_mask)  # [B, G*T, D]
            return out.reshape(h.shape)  # [B*G, T, D]

        x = residual(x, self.self_attn_norm, self_attention, self.drop, self.norm_first)  # [B, T, D]
        if self.cross_attention:
            x = residual(x, self.cross_attn_norm, cross_attention, self.drop, self.norm_first)  # [B, T, D]
        x = residual(x, self.ff_norm, self.ff, self.drop, self.norm_first)  # [B, T, D]
        return x if cache is None else (x, cache)
