"""parallel.py: the 'data' mesh, per-process rows, replication, single-process distributed setup."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vitsparse_jax.runtime import parallel


def test_mesh_spans_every_device_on_the_data_axis():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count() == 4
    assert parallel.make_mesh(jax.devices()[:2]).size == 2


def test_single_process_holds_every_row():
    mesh = parallel.make_mesh()
    np.testing.assert_array_equal(parallel.process_rows(mesh, 8), np.arange(8))
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        parallel.process_rows(mesh, 10)


def test_global_batch_and_replicate():
    mesh = parallel.make_mesh()
    batch = parallel.global_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh, 8)
    assert batch["x"].sharding.spec == P("data") and batch["x"].addressable_shards[1].data.shape == (2, 2)
    params = parallel.replicate({"w": np.ones((3, 3)), "b": np.zeros(3)}, mesh)
    assert params["w"].sharding.is_fully_replicated and len(params["w"].addressable_shards) == 4
    np.testing.assert_array_equal(parallel.to_host(batch)["x"], np.arange(16.0).reshape(8, 2))


def test_initialize_distributed_is_a_no_op_for_one_process():
    assert parallel.initialize_distributed() == 0
    with pytest.raises(ValueError, match="coordinator"):
        parallel.initialize_distributed(num_processes=2)
