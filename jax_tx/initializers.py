"""Initialization shared by every jax_tx module (the same distributions as torch_tx/initializers.py).

Dense kernels: Xavier uniform (torch.nn.Transformer's rule; each q/k/v block of the fused projection as
its own weight); biases: zeros; LayerNorm: ones/zeros; token embeddings: normal(0, d_model ** -0.5), so that
after the sqrt(d_model) scale they have unit variance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


def linear(features: int, use_bias: bool = True) -> nn.Dense:
    """nn.Dense with Xavier-uniform kernel and zero bias."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.zeros)


def xavier_blocks(blocks: int) -> nn.initializers.Initializer:
    """Xavier uniform for a kernel (in, out) of `blocks` column blocks (a fused projection), each initialized
    as its own (in, out / blocks) kernel."""
    xavier = nn.initializers.xavier_uniform()

    def init(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, blocks)
        return jnp.concatenate([xavier(k, (shape[0], shape[1] // blocks), dtype) for k in keys], axis=1)

    return init


def embedding_std(d_model: int) -> float:
    return d_model ** -0.5
