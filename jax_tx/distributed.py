"""Spreading a JAX run over devices: a `jax.sharding.Mesh` with axes ("data", "fsdp").

Mirrors `torch_tx/distributed.py`: `setup` returns this process's `Context`, or None for one device.
"""

from __future__ import annotations


def setup(device: str, *, mesh: dict[str, int] | None = None):
    """The Context of a mesh of {"data": N, "fsdp": M} devices; None without a mesh."""
    return None
