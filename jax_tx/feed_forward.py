"""Position-wise feed-forward block (Flax twin): linear2(dropout(act(linear1(x))))."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jax_tx.initializers import linear


class FeedForward(nn.Module):
    """x (B, L, D) -> (B, L, D); activation "relu" or "gelu" (exact erf form, not flax's tanh default)."""

    d_model: int
    d_ff: int
    dropout: float
    activation: str

    def setup(self):
        self.linear1 = linear(self.d_ff)
        self.linear2 = linear(self.d_model)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        h = self.linear1(x)  # [B, L, F]
        h = nn.relu(h) if self.activation == "relu" else nn.gelu(h, approximate=False)
        return self.linear2(self.drop(h, deterministic=deterministic))  # [B, L, D]
