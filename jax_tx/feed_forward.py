"""Position-wise feed-forward block (Flax twin): linear2(dropout(act(linear1(x))))."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from jax_tx.dropout import Dropout
from jax_tx.initializers import linear

ACTIVATIONS = {"relu": nn.relu, "gelu": lambda h: nn.gelu(h, approximate=False), "silu": nn.silu}


class FeedForward(nn.Module):
    """x (B, L, D) -> (B, L, D); activation "relu", "gelu" (exact erf form, not flax's tanh default) or "silu"
    (x * sigmoid(x)); `dropout` is the rate after the activation (the config's activation_dropout_rate)."""

    d_model: int
    d_ff: int
    dropout: float
    activation: str

    def setup(self):
        self.linear1 = linear(self.d_ff)
        self.linear2 = linear(self.d_model)
        self.drop = Dropout(self.dropout)

    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        h = self.linear1(x)  # [B, L, F]
        h = ACTIVATIONS[self.activation](h)  # [B, L, F]
        return self.linear2(self.drop(h, deterministic=deterministic))  # [B, L, D]
