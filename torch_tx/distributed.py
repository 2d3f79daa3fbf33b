"""Spreading a torch run over processes: torchrun's process group, DDP or FSDP2 (`fully_shard`).

Mirrors `jax_tx/distributed.py`: `setup` returns this process's `Context`, or None for one process.
"""

from __future__ import annotations


def setup(device: str, *, fsdp: bool = False):
    """The Context of this torchrun process; None when not launched by torchrun."""
    if fsdp:
        raise ValueError("--fsdp runs under torchrun: torchrun --nproc-per-node N -m parity.cli train "
                         "--framework torch --fsdp ...")
    return None
