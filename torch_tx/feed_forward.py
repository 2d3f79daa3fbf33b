"""Position-wise feed-forward block (torch twin): linear2(dropout(act(linear1(x))))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_tx.initializers import linear


class FeedForward(nn.Module):
    """x (B, L, D) -> (B, L, D); activation "relu" or "gelu" (exact erf form)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.activation = activation
        self.linear1 = linear(d_model, d_ff)
        self.linear2 = linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)  # [B, L, F]
        h = F.relu(h) if self.activation == "relu" else F.gelu(h, approximate="none")
        return self.linear2(self.drop(h))  # [B, L, D]
