"""Layers and initialisers shared by the model families (timm's defaults, torch's numerics)."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitsparse_jax.models import base
from vitsparse_jax.models.base import Array


def trunc_normal(std: float = 0.02, lo: float = -2.0, hi: float = 2.0) -> Callable:
    """timm.layers.trunc_normal_: N(0, std^2) truncated to the ABSOLUTE interval [lo, hi] (for std .02
    that is +-100 std, practically a plain normal)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.truncated_normal(key, lo / std, hi / std, shape, jnp.float32).astype(dtype) * std
    return init


class TimmDense(nn.Dense):
    """nn.Dense with timm's Linear init for transformers (trunc_normal .02 weights, zero bias)."""

    kernel_init: Any = trunc_normal(0.02)
    bias_init: Any = nn.initializers.zeros


class Mlp(nn.Module):
    """timm's Mlp: fc1, exact GELU, fc2 (back to the input width)."""

    hidden: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        x = TimmDense(self.hidden, dtype=self.dtype, precision=self.precision, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return TimmDense(dim, dtype=self.dtype, precision=self.precision, name="fc2")(x)


def torch_batch_norm(train: bool, dtype: Any, **kwargs: Any) -> nn.BatchNorm:
    """torch BatchNorm2d: eps 1e-5, momentum 0.1 (flax 0.9); two-pass variance for batch statistics."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                        dtype=dtype, **kwargs)
