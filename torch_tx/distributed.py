"""Spreading a torch run over processes: torchrun's process group, DDP or FSDP2 (`fully_shard`).

Mirrors `jax_tx/distributed.py`: `setup` returns this process's `Context`, or None for one process.
Every process builds the same model from the same seed and feeds its equal share of the rows of each
global batch (`Batch.pad_rows(devices).part(rank, devices)`). DDP keeps a whole replica per process and
averages the gradients; FSDP2 (`--fsdp`) shards each encoder/decoder layer and the rest of the model (the
root) over the processes along dim 0, so parameters, gradients and Adam moments are split, and gathers a
layer's parameters for its forward and backward. CPU processes talk over gloo, CUDA ones over nccl (one
GPU per process, `cuda:LOCAL_RANK`).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

STRATEGIES = {"ddp": "DDP", "fsdp": "FSDP2"}
TORCHRUN_HINT = "torchrun --nproc-per-node N -m parity.cli train --framework torch"


class Context:
    """This process's place in the process group: rank, size, strategy, and the collectives the run needs.

    `devices` is the number of ways a global batch is split (one share per process). `device` is where this
    process computes; `mesh` the 1-D device mesh of FSDP2 (None for DDP).
    """

    def __init__(self, device: torch.device, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.device, self.strategy = device, strategy
        self.rank, self.processes = dist.get_rank(), dist.get_world_size()
        self.devices = self.processes
        self.backend = dist.get_backend()
        self.mesh = None
        if strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (self.processes,))

    def describe(self) -> str:
        what = ("parameters, gradients and Adam moments sharded" if self.strategy == "fsdp" else
                "a whole replica per process, gradients averaged")
        return (f"{STRATEGIES[self.strategy]} over {self.processes} process{'es' if self.processes > 1 else ''} "
                f"({self.backend}, {self.device.type}): batch rows split over the processes, {what}")

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls. DDP: a `DistributedDataParallel` around `model` (which it
        broadcasts from process 0). FSDP2: `model` itself, each encoder/decoder layer and then the root
        sharded in place by `fully_shard` (tied weights stay one parameter, in the root's group).

        FSDP2 warns that the root returns a view (the output layer's logits): an in-place op on it would skip
        the backward all-gather. The loss never modifies the logits, so that warning is silenced."""
        if self.strategy == "ddp":
            return nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        from torch.distributed.fsdp import fully_shard

        from torch_tx.layers import DecoderLayer, EncoderLayer

        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor",
                                category=UserWarning)
        for layer in [m for m in model.modules() if isinstance(m, (EncoderLayer, DecoderLayer))]:
            fully_shard(layer, mesh=self.mesh)
        return fully_shard(model, mesh=self.mesh)

    def check_same(self, name: str, value: int) -> None:
        """Raise ValueError unless every process passes the same `value`."""
        values = self.all_gather(torch.tensor([value], dtype=torch.int64)).ravel().tolist()  # [P]
        if len(set(values)) > 1:
            raise ValueError(f"processes disagree on {name}: {values} (by process)")

    def any(self, flag: bool) -> bool:
        """True when `flag` is True in any process."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the processes of `tensor` (a new tensor on every process; the input is left alone)."""
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total)
        return total

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` (the same shape everywhere), stacked by rank on the CPU: (P, ...)."""
        local = tensor.detach().to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.processes)]
        dist.all_gather(parts, local)
        return torch.stack(parts).cpu()  # [P, ...]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the process group (idempotent)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str, *, fsdp: bool = False) -> Context | None:
    """The Context of this torchrun process (DDP, or FSDP2 with `fsdp`); None when not launched by torchrun.

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the process group is gloo for
    `device` "cpu" and nccl for "cuda" (this process's GPU: cuda:LOCAL_RANK).
    """
    if not all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        if fsdp:
            raise ValueError(f"--fsdp runs under torchrun: {TORCHRUN_HINT} --fsdp ...")
        return None
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda under torchrun, but torch sees no GPU")
        place = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(place)
        backend = "nccl"
    elif kind == "cpu":
        place, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"torchrun training runs on cpu (gloo) or cuda (nccl), not {device!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=place if kind == "cuda" else None)
    return Context(place, "fsdp" if fsdp else "ddp")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter, gradient or moment in full: a DTensor's shards gathered (collective), else `tensor`."""
    if isinstance(tensor, DTensor):
        with torch.no_grad():
            return tensor.full_tensor()
    return tensor


def laid_out_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full `tensor` in the dtype, device and layout of `like`: for a DTensor, process 0's copy split the
    way `like` is (collective), each process keeping its shard."""
    if isinstance(like, DTensor):
        return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements)
    return tensor.to(like.device, like.dtype)


def local_bytes(tensors) -> int:
    """Bytes this process holds of `tensors` (a DTensor: its local shard); each tensor counted once."""
    seen, total = set(), 0
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total
