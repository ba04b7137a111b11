"""Layers and initialisers shared by the model families (timm's defaults, torch's numerics)."""
from __future__ import annotations

import functools
import itertools
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


def max_pool(x: Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))) -> Array:
    """torch max_pool2d on NHWC (-inf padding): `nn.max_pool`'s forward, with a differentiation rule that
    vmaps well over cotangents.

    The derivative is the first maximum of each window (row-major), as in torch and XLA, written as a
    JVP of strided slices and selects: its transpose pads each window offset's cotangent back in place.
    JAX's own rule transposes to select-and-scatter, whose batching rule copies the pool input once per
    vmapped cotangent (and XLA:CPU expands it into index arrays of that size): vmapped over many rows,
    as the receptive-field program does, that dominated its memory (VGG16, batch 16, 4 rows: 17 GiB).
    """
    return _max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in padding))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: Array, window: tuple[int, int], strides: tuple[int, int],
              padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    return nn.max_pool(x, window, strides=strides, padding=padding)


@_max_pool.defjvp
def _max_pool_jvp(window, strides, padding, primals, tangents):
    (x,), (t,) = primals, tangents
    y = _max_pool(x, window, strides, padding)
    pads = ((0, 0), *padding, (0, 0))
    xp, tp = jnp.pad(x, pads, constant_values=-jnp.inf), jnp.pad(t, pads)
    views = []   # (start, limit, strides) of each window offset's strided slice, shaped like y
    for offset in itertools.product(*(range(w) for w in window)):
        limit = (x.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, y.shape[1:3], strides)), x.shape[3])
        views.append(((0, *offset, 0), limit, (1, *strides, 1)))
    best, first = jax.lax.slice(xp, *views[0]), jnp.zeros(y.shape, jnp.int32)
    for k, view in enumerate(views[1:], start=1):   # strictly greater: the first maximum wins ties
        xk = jax.lax.slice(xp, *view)
        better = xk > best
        best, first = jnp.where(better, xk, best), jnp.where(better, k, first)
    t_out = sum(jnp.where(first == k, jax.lax.slice(tp, *view), jnp.zeros((), t.dtype))
                for k, view in enumerate(views))
    return y, t_out


def trunc_normal_tf(std: float = 1.0, lo: float = -2.0, hi: float = 2.0) -> Callable:
    """timm.layers.trunc_normal_tf_: N(0, 1) truncated to [lo, hi], THEN scaled by std (bounds in std units)."""
    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, lo, hi, shape, jnp.float32) * std).astype(dtype)
    return init
