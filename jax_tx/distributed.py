"""Spreading a JAX run over devices: a `jax.sharding.Mesh` with axes ("data", "fsdp").

Mirrors `torch_tx/distributed.py`: `setup` returns this process's `Context`, or None for one device.
Every batch is split by rows over all data x fsdp devices (`batch_sharding`); the parameters and the
Adam moments are split over the fsdp axis and replicated over data (`param_sharding`: each array along
its largest dimension that the fsdp size divides). The jitted step is the single-device one: XLA's SPMD
partitioner inserts the all-gathers and reduce-scatters, so the update is the same function of the same
global batch. Multi-host: `jax.distributed.initialize` first; every process feeds the same global batch and
keeps the shards on its own devices.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")


class Context:
    """One process's view of the mesh: its rank, the shardings, and host <-> device transfers."""

    def __init__(self, mesh: Mesh, *, multihost: bool = False) -> None:
        self.mesh = mesh
        self.rank, self.processes = jax.process_index(), jax.process_count()
        self.devices = mesh.size
        self.strategy = "fsdp" if mesh.shape["fsdp"] > 1 else "data"
        self._multihost = multihost

    def describe(self) -> str:
        platform = self.mesh.devices.flat[0].platform
        sharded = ("parameters and Adam moments sharded over fsdp" if self.strategy == "fsdp" else
                   "parameters replicated")
        return (f"mesh data={self.mesh.shape['data']} fsdp={self.mesh.shape['fsdp']} over {self.devices} {platform} "
                f"devices in {self.processes} process{'es' if self.processes > 1 else ''}; batch rows split over "
                f"all devices, {sharded}")

    @property
    def batch_sharding(self) -> NamedSharding:
        """Rows (axis 0) over every device of the mesh."""
        return NamedSharding(self.mesh, PartitionSpec(AXES))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """Split over fsdp along the largest dimension it divides (the first of equals); replicated when none
        does (and over the data axis always)."""
        size = self.mesh.shape["fsdp"]
        candidates = [d for d in range(len(shape)) if size > 1 and shape[d] % size == 0]
        if not candidates:
            return self.replicated
        axis = max(candidates, key=lambda d: (shape[d], -d))
        return NamedSharding(self.mesh, PartitionSpec(*(("fsdp" if d == axis else None) for d in range(len(shape)))))

    def shardings(self, tree: Any) -> Any:
        """`param_sharding` of every array (or `jax.ShapeDtypeStruct`) of a pytree: params, Adam moments, step."""
        return jax.tree_util.tree_map(lambda leaf: self.param_sharding(tuple(leaf.shape)), tree)

    def put(self, tree: Any, shardings: Any) -> Any:
        """Host arrays (the same on every process) -> global jax.Arrays laid out as `shardings` (a matching tree,
        or one sharding for all); each process places only its own devices' shards."""
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

        def place(host, sharding):
            host = np.asarray(host)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree_util.tree_map(place, tree, shardings)

    def put_batch(self, arrays: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch (rows a multiple of `devices`) split by rows over the mesh."""
        return self.put(dict(arrays), self.batch_sharding)

    def gather(self, tree: Any) -> Any:
        """Global jax.Arrays -> whole numpy arrays on every process (collective when there are several)."""
        if self.processes == 1:
            return jax.device_get(tree)
        return multihost_utils.process_allgather(tree, tiled=True)

    def check_same(self, name: str, value: int) -> None:
        """Raise ValueError unless every process passes the same `value`."""
        if self.processes == 1:
            return
        values = np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64)))  # [P, 1]
        if len(set(values.ravel().tolist())) > 1:
            raise ValueError(f"processes disagree on {name}: {values.ravel().tolist()} (by process)")

    def any(self, flag: bool) -> bool:
        """True when `flag` is True in any process."""
        if self.processes == 1:
            return flag
        return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag]))).any())

    def barrier(self) -> None:
        if self.processes > 1:
            multihost_utils.sync_global_devices("twin barrier")

    def close(self) -> None:
        if self._multihost:
            jax.distributed.shutdown()


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of the shards of `tree`'s arrays held by each addressable device."""
    held: dict[Any, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def _ensure_cpu_devices(count: int) -> None:
    """Ask for `count` CPU devices (simulated, sharing the host's cores) unless XLA_FLAGS already says how many;
    only possible before JAX starts its backends."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", max(count, jax.config.jax_num_cpu_devices))
    except RuntimeError:
        pass  # backends already started: the device count check below says what to do


def setup(device: str, *, mesh: Mapping[str, int] | None = None, coordinator: str | None = None,
          num_processes: int | None = None, process_id: int | None = None) -> Context | None:
    """The Context of a mesh of {"data": N, "fsdp": M} devices (None without a mesh).

    Multi-host: pass `coordinator` ("host:port" of process 0), `num_processes` and `process_id` (what
    `jax.distributed.initialize` takes); the mesh then spans the devices of all processes (on CPU each process
    gets N*M / num_processes simulated devices).
    """
    if mesh is None:
        if coordinator is not None or num_processes is not None:
            raise ValueError("--coordinator/--num-processes need --mesh data=N,fsdp=M: the mesh spans the devices "
                             "of all processes")
        return None
    sizes = {axis: int(mesh.get(axis, 1)) for axis in AXES}
    if set(mesh) - set(AXES) or min(sizes.values()) < 1:
        raise ValueError(f"mesh {dict(mesh)}: expected axis sizes >= 1 for {' and '.join(AXES)}")
    needed = sizes["data"] * sizes["fsdp"]
    multihost = coordinator is not None or num_processes is not None
    if multihost:
        if device == "cpu":
            _ensure_cpu_devices(-(-needed // max(num_processes or 1, 1)))
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    platform = "gpu" if device == "cuda" else device
    if platform == "cpu" and not multihost:
        _ensure_cpu_devices(needed)
    devices = jax.devices(platform)
    if len(devices) < needed:
        hint = (f" (on CPU: set XLA_FLAGS=--xla_force_host_platform_device_count={needed} before JAX starts)"
                if platform == "cpu" else "")
        raise ValueError(f"--mesh data={sizes['data']},fsdp={sizes['fsdp']} needs {needed} {platform} devices; "
                         f"{len(devices)} are visible{hint}")
    grid = np.asarray(devices[:needed], dtype=object).reshape(sizes["data"], sizes["fsdp"])  # [data, fsdp]
    return Context(Mesh(grid, AXES), multihost=multihost)


def single_device(device: str) -> Context:
    """A 1 x 1 mesh of the first `device` device: the layout of an ordinary one-device run."""
    first = jax.devices("gpu" if device == "cuda" else device)[0]
    return Context(Mesh(np.asarray([first], dtype=object).reshape(1, 1), AXES))
