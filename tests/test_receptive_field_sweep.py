"""The stage-by-stage reverse sweep of `make_rf_fn` against one plain `jax.grad` per layer, every family.

Weights: random, drawn with numpy (tests/random_weights.py: LayerNorm / BatchNorm affine away from 1 / 0,
positive running variances), so that no layer's central sum is constant in the input (a LayerNorm output with
gamma = 1, beta = 0 sums to 0 over channels whatever its input: its gradient would be rounding noise).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.random_weights import random_variables
from vitsparse_jax import models
from vitsparse_jax.measures import gradient_fields as rf

SWIN = {"img_size": 64, "embed_dim": 16, "depths": (1, 1, 2, 2), "num_heads": (1, 1, 2, 2), "num_classes": 10,
        "window_size": (2, 2, 2, 2)}
CASES = {   # (arch, overrides, layer patterns)
    "vit": ("vit_pico_patch4_32", {"depth": 2}, ["*"]),
    "deit_distilled": ("vit_pico_patch4_32", {"depth": 2, "distilled": True}, ["embed", "blocks.1.*", "logits"]),
    "vit_headless": ("vit_pico_patch4_32", {"depth": 2, "num_classes": 0}, ["blocks.0.mlp", "pre_logits"]),
    "swin": ("swin_tiny_patch4_window7_224", SWIN,
             ["patch_embed", "layers.0.blocks.0.attn", "layers.1.downsample", "layers.2.blocks.1.mlp",
              "layers.3.blocks.1.attn_res", "norm", "logits"]),
    "vgg_bn": ("vgg_pico", {"batch_norm": True}, ["*"]),
    "resnet_basic": ("resnet_pico", {}, ["act1", "stem", "layer2.0.act1", "layer3.0", "layer4.0", "logits"]),
    "resnet_bottleneck": ("resnet50", {"layers": (1, 1, 1, 1), "num_classes": 10, "img_size": 64},
                          ["stem", "layer1.0.act2", "layer2.0", "layer4.0.act3", "pre_logits"]),
}


@functools.cache
def case(name: str):
    arch, kw, patterns = CASES[name]
    module = models.create_model(arch, **kw)
    info = models.model_info(module)
    variables = random_variables(module)
    names = tuple(n for n in rf.select_layers(info, patterns) if not n.endswith(".probs"))
    size = info.img_size
    layers = tuple(rf.layer_specs(module, variables, info, names, 1 / 7, (size, size)))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, size, size, 3))
    return module, info, variables, layers, x


def per_layer_grad(module, info, variables, layers, x, weight) -> np.ndarray:
    """M_l by one jax.grad per layer through the whole model (one jitted program for all layers)."""
    def grads(variables, x, weight):
        maps = []
        for layer in layers:
            def f(x, layer=layer):
                out, aux = module.apply(variables, x, capture=() if layer.name == rf.LOGITS else (layer.name,))
                y = out if layer.name == rf.LOGITS else aux[layer.name]
                return (weight * layer.central_sum(y, info.num_prefix_tokens)).sum()
            maps.append(jnp.abs(jax.grad(f)(x)).sum(axis=(0, 3)))
        return jnp.stack(maps)
    return np.asarray(jax.jit(grads)(variables, x, weight))


@pytest.mark.parametrize("name", list(CASES))
def test_sweep_equals_per_layer_jax_grad(name):
    module, info, variables, layers, x = case(name)
    weight = jnp.array([1.0, 0.5, 0.0])      # a weighted image and a padding row
    ref = per_layer_grad(module, info, variables, layers, x, weight)
    assert (ref.max(axis=(1, 2)) > 0).all()
    for chunk_size in (0, 3):
        ours = np.asarray(rf.make_rf_fn(module, layers, info.num_prefix_tokens, chunk_size)(variables, x, weight))
        assert ours.shape == ref.shape
        for layer, m, r in zip(layers, ours, ref, strict=True):
            err = np.abs(m - r).max() / np.abs(r).max()
            assert err <= 1e-5, (name, chunk_size, layer.name, err)


def test_stage_plan():
    module, info, *_ = case("vit")
    assert rf.stage_plan(module) == info.stages


def test_stages_above_the_deepest_layer_do_not_run():
    """Only blocks.0 requested: the program runs without the parameters of blocks.1, norm and head."""
    module, info, variables, _, x = case("vit")
    layers = tuple(rf.layer_specs(module, variables, info, ("embed", "blocks.0.attn"), 1 / 7, (32, 32)))
    full = rf.make_rf_fn(module, layers, info.num_prefix_tokens)(variables, x, jnp.ones(3))
    params = {k: v for k, v in variables["params"].items() if k not in ("blocks_1", "norm", "head")}
    cut = rf.make_rf_fn(module, layers, info.num_prefix_tokens)({"params": params}, x, jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(cut), np.asarray(full))
