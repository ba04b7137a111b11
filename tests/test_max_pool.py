"""models.layers.max_pool: nn.max_pool's forward; its custom JVP gives the same derivatives as JAX's own rule."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitsparse_jax.models.layers import max_pool

CASES = [((2, 2), (2, 2), ((0, 0), (0, 0))),     # VGG
         ((3, 3), (2, 2), ((1, 1), (1, 1)))]     # ResNet stem (overlapping windows, -inf padding)


@pytest.mark.parametrize("window,strides,padding", CASES)
@pytest.mark.parametrize("size", [8, 9])
def test_forward_and_derivatives_equal_jax_rule(window, strides, padding, size):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))   # no ties

    def ours(x):
        return max_pool(x, window, strides, padding)

    def ref(x):
        return nn.max_pool(x, window, strides=strides, padding=padding)

    def pull(f):   # a vjp vmapped over 5 cotangents
        return jax.vmap(jax.vjp(f, x)[1])(cts)[0]

    np.testing.assert_array_equal(ours(x), ref(x))
    cts = jax.random.normal(jax.random.PRNGKey(1), (5, *ref(x).shape))
    np.testing.assert_array_equal(pull(ours), pull(ref))
    t = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    np.testing.assert_array_equal(jax.jvp(ours, (x,), (t,))[1], jax.jvp(ref, (x,), (t,))[1])


def test_ties_go_to_the_first_maximum():
    x = jnp.ones((1, 2, 2, 1))
    (g,) = jax.grad(lambda x: max_pool(x, (2, 2), (2, 2)).sum(), argnums=(0,))(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])
