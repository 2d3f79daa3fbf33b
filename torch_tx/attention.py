"""Multi-head attention (torch twin): separate q/k/v/out projections, scaled_dot_product_attention.

The projections are plain `nn.Linear`s named `q_proj`, `k_proj`, `v_proj`, `out_proj`, so `named_parameters()`,
`state_dict()` and the canonical names are one set (no hooks). One fused q/k/v matmul was measured against three
(`benchmarks/bench_ablations.py --parts step`) and did not pay for a whole training step, so it is not used.
"""

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
        """x (B, L, D) -> (B, H, L, K) (a view)."""
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, K]

    def project_q(self, query: torch.Tensor) -> torch.Tensor:
        """query (B, T, D) -> queries (B, H, T, K)."""
        return self._split_heads(self.q_proj(query))  # [B, H, T, K]

    def project_kv(self, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key_value (B, S, D) -> keys and values (B, H, S, K): what a KV cache stores."""
        return self._split_heads(self.k_proj(key_value)), self._split_heads(self.v_proj(key_value))  # [B, H, S, K]

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> queries, keys and values (B, H, T, K) of self-attention."""
        return (self.project_q(x), *self.project_kv(x))  # 3 x [B, H, T, K]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected q (B, H, T, K) against k, v (B, H, S, K) -> (B, T, D)."""
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # [B, H, T, K]
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, D]
        return self.out_proj(out)  # [B, T, D]

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_value is query:
            return self.attend(*self.project_qkv(query), mask)  # [B, T, D]
        return self.attend(self.project_q(query), *self.project_kv(key_value), mask)  # [B, T, D]
