"""Initialization shared by every jax_tx module (the same distributions as torch_tx/initializers.py).

Dense kernels: Xavier uniform (torch.nn.Transformer's rule); biases: zeros; LayerNorm: ones/zeros;
token embeddings: normal(0, d_model ** -0.5), so that after the sqrt(d_model) scale they have unit variance.
"""

from __future__ import annotations

from flax import linen as nn


def linear(features: int, use_bias: bool = True) -> nn.Dense:
    """nn.Dense with Xavier-uniform kernel and zero bias."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.zeros)


def embedding_std(d_model: int) -> float:
    return d_model ** -0.5
