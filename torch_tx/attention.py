"""Multi-head attention (torch twin): separate q/k/v/out projections, scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_tx.initializers import linear


class MultiHeadAttention(nn.Module):
    """query (B, T, D), key_value (B, S, D), mask (B|1, 1, T|1, S) bool True = attend -> (B, T, D).

    A query row whose keys are all masked gives zeros (SDPA's behaviour since torch 2.5).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q_proj = linear(d_model, d_model)
        self.k_proj = linear(d_model, d_model)
        self.v_proj = linear(d_model, d_model)
        self.out_proj = linear(d_model, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, K]

    def project_kv(self, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key_value (B, S, D) -> keys and values (B, H, S, K): what a KV cache stores."""
        return self._split_heads(self.k_proj(key_value)), self._split_heads(self.v_proj(key_value))  # [B, H, S, K]

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, T, D) against projected k, v (B, H, S, K) -> (B, T, D)."""
        q = self._split_heads(self.q_proj(query))  # [B, H, T, K]
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # [B, H, T, K]
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, D]
        return self.out_proj(out)  # [B, T, D]

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(query, *self.project_kv(key_value), mask)  # [B, T, D]
