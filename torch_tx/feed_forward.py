"""Position-wise feed-forward block (torch twin): linear2(dropout(act(linear1(x))))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_tx.dropout import Dropout
from torch_tx.initializers import linear

ACTIVATIONS = {"relu": F.relu, "gelu": lambda h: F.gelu(h, approximate="none"), "silu": F.silu}


class FeedForward(nn.Module):
    """x (B, L, D) -> (B, L, D); activation "relu", "gelu" (exact erf form) or "silu" (x * sigmoid(x));
    `dropout` is the rate after the activation (the config's activation_dropout_rate)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.activation = activation
        self.linear1 = linear(d_model, d_ff)
        self.linear2 = linear(d_ff, d_model)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear1(x)  # [B, L, F]
        h = ACTIVATIONS[self.activation](h)  # [B, L, F]
        return self.linear2(self.drop(h))  # [B, L, D]
