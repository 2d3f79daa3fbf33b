"""Initialization shared by every torch_tx module (the same distributions as jax_tx/initializers.py).

Linear weights: Xavier uniform (torch.nn.Transformer's rule; each q/k/v block of the fused projection as
its own weight); biases: zeros; LayerNorm: ones/zeros; token embeddings: normal(0, d_model ** -0.5), so that
after the sqrt(d_model) scale they have unit variance.
"""

from __future__ import annotations

import torch
from torch import nn


def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """nn.Linear with Xavier-uniform weight and zero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def xavier_blocks_(weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """Xavier uniform, in place, for a weight (out, in) of `blocks` row blocks (a fused projection), each
    initialized as its own (out / blocks, in) weight."""
    with torch.no_grad():
        for block in weight.chunk(blocks):
            nn.init.xavier_uniform_(block)
    return weight


def embedding_std(d_model: int) -> float:
    return d_model ** -0.5
