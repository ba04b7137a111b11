"""Device mesh over every device (axis 'data'), batch / replicated shardings, multi-host setup.

One process per host; each process feeds the rows of a global batch that live on its own devices
(`process_rows`) and `global_batch` assembles the global `jax.Array`s without any cross-host copy. The other
way, `local_rows` takes the rows of a step's output that live on this process's devices (no cross-host copy),
`Gathered` gathers a small array from every process without waiting for it, and `gather_bytes` moves byte
strings of any length (serialised accumulators) from every process to every process.
"""
from __future__ import annotations

import functools
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


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0; every other process computes alongside)."""
    return jax.process_index() == 0


def start_copy_to_host(tree: Any) -> Any:
    """Starts the device-to-host copy of this process's shards of every array of `tree` (returns at once), so
    that reading them later (`local_rows`, `to_host`) does not wait for the transfer."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            leaf.copy_to_host_async()
    return tree


def _split_rows(x: jax.Array) -> tuple[int, list[tuple[int, int]]] | None:
    """(axis, sorted distinct [start, stop) ranges) of this process's shards of `x` along the one axis they split;
    None when every shard holds the whole array."""
    for axis in range(x.ndim):
        ranges = sorted({s.index[axis].indices(x.shape[axis])[:2] for s in x.addressable_shards})
        if ranges != [(0, x.shape[axis])]:
            return axis, ranges
    return None


def row_axes(fn: Any, batch: Any, out: Any) -> Any:
    """The image axis of each array of `out = fn(batch)`: the one axis whose size follows the batch's (an abstract
    evaluation of `fn` at twice the batch; nothing is computed)."""
    double = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2 * x.shape[0], *x.shape[1:]), x.dtype), batch)
    twice = jax.eval_shape(fn, double)

    def axis(x: Any, y: Any) -> int:
        grown = [i for i, (a, b) in enumerate(zip(x.shape, y.shape)) if a != b]
        if len(grown) != 1:
            raise RuntimeError(f"a device-step output of shape {x.shape} has no single image axis (at twice the "
                               f"batch: {y.shape}): per-image values must have one")
        return grown[0]

    return jax.tree.map(axis, out, twice)


def local_rows(tree: Any, axes: Any = None) -> Any:
    """This process's rows of each global array of `tree`, as numpy, in global row order: the rows of the batch
    this process fed. With one process: every row (`to_host`). The first leaf must be split by rows (a batch
    field: `valid`, `index`) and sets the rows; a leaf split the same way gives its own shards (no cross-host
    copy); a leaf that XLA left whole on every device gives those rows along its image axis (`axes`: a pytree
    like `tree` of axes, e.g. from `row_axes`). Anything else is an error, never a silent all-gather."""
    if jax.process_count() == 1:
        return to_host(tree)
    leaves, treedef = jax.tree.flatten(tree)
    along = treedef.flatten_up_to(axes) if axes is not None else [None] * len(leaves)
    rows, out = None, []
    for leaf, axis in zip(leaves, along):
        split = _split_rows(leaf)
        if split is None:
            if rows is None or axis is None:
                raise RuntimeError(f"an array of shape {leaf.shape} is whole on every device and its image axis is "
                                   "not known: pass `axes` (parallel.row_axes)")
            whole = np.asarray(leaf.addressable_data(0))
            out.append(np.concatenate([np.take(whole, np.arange(lo, hi), axis=axis) for lo, hi in rows], axis=axis))
            continue
        at, ranges = split
        rows = ranges if rows is None else rows
        if ranges != rows or (axis is not None and at != axis):
            raise RuntimeError(f"an array of shape {leaf.shape} holds rows {ranges} of axis {at} on this process, "
                               f"the batch {rows} (image axis {axis}): the device step must keep the batch's rows")
        parts = {}
        for shard in leaf.addressable_shards:
            lo = shard.index[at].indices(leaf.shape[at])[0]
            if lo not in parts:
                parts[lo] = np.asarray(shard.data)
        out.append(np.concatenate([parts[lo] for lo in sorted(parts)], axis=at))
    return jax.tree.unflatten(treedef, out)


@functools.cache
def _gather_program(processes: int, local: int) -> tuple[NamedSharding, Any]:
    devices = np.array(jax.devices()).reshape(processes, local)
    mesh = Mesh(devices, ("processes", "local"))
    return NamedSharding(mesh, P("processes")), jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))


class Gathered:
    """Every process's `value` (the same shape and dtype on every process), stacked (P, ...) in process order,
    started at once and read later (`result()`): the collective runs behind the device work already queued,
    and reading it one batch later does not stall the pipeline. Collective: every process starts it at the
    same point. With one process it is the value itself, stacked."""

    def __init__(self, value: Any):
        value = np.asarray(value)
        self._local = value[None]
        self._out = None
        if jax.process_count() > 1:
            sharding, program = _gather_program(jax.process_count(), jax.local_device_count())
            shape = (jax.process_count(), *value.shape)
            arrays = [jax.device_put(self._local, d) for d in jax.local_devices()]
            self._out = program(jax.make_array_from_single_device_arrays(shape, sharding, arrays))

    def result(self) -> np.ndarray:
        if self._out is None:
            return self._local
        return np.asarray(self._out.addressable_data(0))


def gather_bytes(data: bytes) -> list[bytes]:
    """Every process's byte string (any length), in process order, on every process. Collective: every process
    calls it at the same point (two gathers: the lengths, then the bytes padded to the longest)."""
    if jax.process_count() == 1:
        return [data]
    sizes = Gathered(np.int64(len(data))).result().reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    every = Gathered(padded).result()
    return [every[p, :int(n)].tobytes() for p, n in enumerate(sizes)]
