"""Initialization shared by every torch_tx module (the same distributions as jax_tx/initializers.py).

Linear weights: Xavier uniform (torch.nn.Transformer's rule); biases: zeros; LayerNorm: ones/zeros;
token embeddings: normal(0, d_model ** -0.5), so that after the sqrt(d_model) scale they have unit variance.
"""

from __future__ import annotations

from torch import nn


def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """nn.Linear with Xavier-uniform weight and zero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def embedding_std(d_model: int) -> float:
    return d_model ** -0.5
