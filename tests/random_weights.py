"""Variables for tests whose subject is not the initialisation: drawn with numpy from the module's shapes
(`models.variable_shapes`, no init program to compile; compiling `models.init_untrained` costs seconds per
model). The initialisation itself is tested against timm's in the parity tests."""
from __future__ import annotations

import jax
import numpy as np

from vitsparse_jax import models


def random_variables(module, seed: int = 0) -> dict:
    """Generic random variables: kernels N(0, 1/fan_in), scales and BatchNorm variances around 1, small
    biases, means and embeddings."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
        if name.endswith("['scale']") or name.endswith("['var']"):
            return (1.0 + 0.1 * np.abs(rng.standard_normal(s.shape))).astype(s.dtype)
        return (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(module))


def zero_variables(module) -> dict:
    """Zeros of the right shapes, for tests of names, shapes and errors."""
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), models.variable_shapes(module))
