"""Device mesh over every device (axis 'data'), batch / replicated shardings, multi-host setup.

One process per host; each process feeds the rows of a global batch that live on its own devices
(`process_rows`) and `global_batch` assembles the global `jax.Array`s without any cross-host copy.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False,
                           local_device_ids: Sequence[int] | None = None,
                           timeout_s: int = 300) -> int:
    """Joins a multi-process JAX job; returns this process's index.

    Single process (the default): does nothing. With `coordinator` ('host:port' of process 0) and
    `num_processes` / `process_id`: calls `jax.distributed.initialize` with them. `auto=True` lets JAX
    detect the cluster itself (TPU pods, SLURM, Open MPI). Must run before anything touches a device.
    """
    coordinator = coordinator or None  # '' (a config's "unset") = single process
    if jax.distributed.is_initialized():
        return jax.process_index()
    if coordinator is None and not auto:
        if num_processes not in (None, 1):
            raise ValueError(f"num_processes={num_processes} needs a coordinator address 'host:port' "
                             "(or auto=True on a cluster JAX can detect)")
        return 0
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
    return jax.process_index()


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D mesh with axis 'data' over all devices (of every process) or the given ones.

    Axis type Auto: model code needs no sharding annotations; jit propagates the batch sharding.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the 'data' axis, the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Full copy on every device (parameters, masks shared by all images)."""
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host arrays (identical on every process) on every device of `mesh`."""
    sharding = replicated_sharding(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
    if batch_size <= 0 or batch_size % mesh.size:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the number of devices "
                         f"in the mesh ({mesh.size}); e.g. {max(1, batch_size // mesh.size) * mesh.size}")


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """Sorted global row indices of a batch that live on this process's devices.

    `jax.make_array_from_process_local_data` expects the local data as exactly these rows, in order.
    """
    check_batch_size(mesh, batch_size)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = {r for (sl,) in index_map.values() for r in range(*sl.indices(batch_size))}
    return np.array(sorted(rows), dtype=np.int64)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, batch_size: int) -> dict[str, jax.Array]:
    """Global arrays of leading size `batch_size`, sharded on 'data', from this process's rows."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
            for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """Every process gets the full value of each global array (an all-gather across processes)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return multihost_utils.process_allgather(tree, tiled=True)


def from_first(tree: Any) -> Any:
    """Process 0's value of a pytree of host arrays, on every process (as it is with one process).
    Collective: every process calls it at the same point."""
    if jax.process_count() == 1:
        return tree
    out = multihost_utils.broadcast_one_to_all(tree)
    return jax.tree.map(lambda new, old: np.asarray(new).astype(np.asarray(old).dtype), out, tree)


def agree(ok: bool) -> bool:
    """True on every process iff every process passes True (collective with several processes)."""
    if jax.process_count() == 1:
        return bool(ok)
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(ok)))).min())
