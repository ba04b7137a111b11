"""The batched gradient program of the receptive-field experiment, and the layers it measures.

For each requested layer Y: M = |d sum(Y_central) / dx|, x = the normalised input image, summed over the
colour channels (SPEC section 5). One jitted program per model computes the maps of ALL layers: one
forward under `jax.vjp` gives every layer's central sum per image, then the pullback runs for all layers'
one-hot cotangents at once (vmapped, `chunk_size` layers at a time with `lax.map`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import data, locality
from vitsparse_jax.models import ModelInfo

LOGITS = "logits"               # the model output (B, num_classes); not a capture name
NON_SPATIAL_STAGES = ("head", "pre_logits")
TRANSFORMER_FAMILIES = ("vit", "swin")


# ------------------------------------------------------------------------------------------------------
# Layers: names, groups, relative depth, grids

@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    group: str                 # pathway / kind: 'attn' (slow), 'attn_res' (fast), 'mlp', 'mlp_res', 'block'...
    depth: float               # relative depth in [0, 1]
    layout: str                # 'tokens' (B, N, D) | 'map' (B, h, w, C) | 'vector' (B, D)
    region: locality.Region    # central block of the layer's grid

    def central_sum(self, y: jax.Array, num_prefix_tokens: int) -> jax.Array:
        """sum(Y_central) per image, (B,)."""
        if self.layout == "vector":
            return y.reshape(y.shape[0], -1).sum(axis=1)
        if self.layout == "tokens":
            gh, gw = self.region.grid
            y = y[:, num_prefix_tokens:].reshape(y.shape[0], gh, gw, y.shape[-1])
        return self.region.slice(y).sum(axis=(1, 2, 3))


_GROUP_RULES = (   # first match wins
    (r".*\.attn$", "attn"), (r".*\.attn_res$", "attn_res"), (r".*\.mlp$", "mlp"),
    (r"^(layers\.\d+\.)?blocks\.\d+$", "mlp_res"), (r"^layers\.\d+\.downsample$", "downsample"),
    (r"^layer\d+\.\d+$", "block"), (r"^layer\d+\.\d+\.(act\d)$", r"\1"), (r"^features\.\d+$", "features"),
)


def layer_group(name: str) -> str:
    """The pathway / kind a layer belongs to, e.g. 'blocks.3.attn' -> 'attn', 'blocks.3' -> 'mlp_res'."""
    for pattern, group in _GROUP_RULES:
        if re.match(pattern, name):
            return re.sub(pattern, group, name)
    return name


def valid_layers(info: ModelInfo) -> tuple[str, ...]:
    """Every layer whose receptive field can be measured, in forward order."""
    names = tuple(n for n in info.capture_names if not n.endswith(".probs"))
    return names + ((LOGITS,) if info.num_classes > 0 else ())


def default_layers(info: ModelInfo) -> tuple[str, ...]:
    """Transformers: embedding and the four sub-stages of every block (+ Swin downsampling);
    VGG: every ReLU after a conv; ResNet: the stem and every block output."""
    if info.family in TRANSFORMER_FAMILIES:
        return tuple(n for n in valid_layers(info) if n not in ("norm", "pre_logits", LOGITS))
    if info.family == "vgg":
        return tuple(info.ablation_sites)
    return tuple(s for s in info.stages if s not in NON_SPATIAL_STAGES)


def select_layers(info: ModelInfo, patterns: Sequence[str]) -> tuple[str, ...]:
    """Layers matching any fnmatch pattern, in forward order; () = the defaults."""
    if not patterns:
        return default_layers(info)
    valid = valid_layers(info)
    for pattern in patterns:
        if pattern == LOGITS and info.num_classes == 0:
            raise ValueError(f"{info.name} is headless (num_classes=0, e.g. DINO): it has no logits; its output "
                             f"is the pooled features, layer 'pre_logits'")
        if not fnmatch.filter(valid, pattern):
            raise ValueError(f"receptive_field.layers: {pattern!r} matches no layer of {info.name}; valid layers: "
                             f"{', '.join(valid)}")
    return tuple(n for n in valid if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def relative_depth(info: ModelInfo, name: str) -> float:
    """Index of the layer's stage among the spatial stages, scaled to [0, 1] (embed / stem = 0)."""
    stages = [s for s in info.stages if s not in NON_SPATIAL_STAGES]
    owners = [i for i, s in enumerate(stages) if name == s or name.startswith(s + ".")]
    if owners:
        index = max(owners)
    elif name == LOGITS:
        index = len(stages) - 1
    else:  # e.g. ResNet 'act1' (before stage 'stem'), ViT 'norm': the last stage that runs before it
        order = {n: i for i, n in enumerate(info.capture_names)}
        before = [i for i, s in enumerate(stages) if order.get(s, len(order)) <= order[name]]
        index = max(before) if before else 0
    return index / max(len(stages) - 1, 1)


def layer_specs(module: Any, variables: Any, info: ModelInfo, names: Sequence[str], fraction: float,
                image_hw: tuple[int, int]) -> list[Layer]:
    """Layout, grid and central region of each layer, from the shapes of one (abstract) forward pass."""
    captures = tuple(n for n in names if n != LOGITS)
    x = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    out, aux = jax.eval_shape(lambda v, x: module.apply(v, x, capture=captures), variables, x)
    layers = []
    for name in names:
        shape = (out if name == LOGITS else aux[name]).shape
        if len(shape) == 2:
            layout, grid = "vector", (1, 1)
        elif len(shape) == 4:
            layout, grid = "map", tuple(shape[1:3])
        elif len(shape) == 3:
            layout, grid = "tokens", tuple(info.patch_grid)
            if shape[1] - info.num_prefix_tokens != grid[0] * grid[1]:
                raise ValueError(f"{info.name} {name}: {shape[1]} tokens do not fit {info.num_prefix_tokens} "
                                 f"prefix tokens + a {grid[0]}x{grid[1]} patch grid")
        else:
            raise ValueError(f"{info.name} {name}: output of shape {shape} has no spatial grid")
        layers.append(Layer(name, layer_group(name), relative_depth(info, name), layout,
                            locality.central_region(grid, fraction)))
    return layers


# ------------------------------------------------------------------------------------------------------
# The batched gradient program

@functools.lru_cache(maxsize=16)
def make_rf_fn(module: Any, layers: tuple[Layer, ...], num_prefix_tokens: int, chunk_size: int = 0,
               norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> Callable:
    """A jitted fn(variables, images, weight) -> (L, H, W): sum over images of weight * M_l.

    images: (B, H, W, 3), uint8 when `norm` = (mean, std) is given (x = (images / 255 - mean) / std), else
    the normalised x. weight: (B,) per image (1 = count, 0 = padding): the cotangent of layer l is `weight`
    in column l, so padding contributes nothing. chunk_size: layers whose pullbacks run at once (0 = all).
    Cached: the trained and untrained twins of a model share one compiled program.
    """
    captures = tuple(layer.name for layer in layers if layer.name != LOGITS)
    n = len(layers)

    def central_sums(variables: Any, x: jax.Array) -> jax.Array:   # (B, L)
        out, aux = module.apply(variables, x, capture=captures)
        return jnp.stack([layer.central_sum(out if layer.name == LOGITS else aux[layer.name], num_prefix_tokens)
                          for layer in layers], axis=1)

    def fn(variables: Any, images: jax.Array, weight: jax.Array) -> jax.Array:
        if norm is not None:
            x = data.normalize(images, mean=norm[0], std=norm[1])
        else:
            x = images.astype(jnp.float32)
        _, pullback = jax.vjp(lambda x: central_sums(variables, x), x)
        weight = weight.astype(jnp.float32)

        def one_layer(onehot: jax.Array) -> jax.Array:   # (L,) -> (H, W)
            (grad,) = pullback(weight[:, None] * onehot[None, :])
            return jnp.abs(grad).sum(axis=-1).sum(axis=0)

        onehots = jnp.eye(n, dtype=jnp.float32)
        if chunk_size <= 0 or chunk_size >= n:
            return jax.vmap(one_layer)(onehots)
        return jax.lax.map(one_layer, onehots, batch_size=chunk_size)

    return jax.jit(fn)


def receptive_field_maps(module: Any, variables: Any, images: jax.Array, layers: Sequence[Layer],
                         num_prefix_tokens: int, chunk_size: int = 0) -> np.ndarray:
    """M (L, H, W) of normalised images (B, H, W, 3), averaged over the images (all in one batch)."""
    fn = make_rf_fn(module, tuple(layers), num_prefix_tokens, chunk_size)
    return np.asarray(fn(variables, images, jnp.ones(images.shape[0]))) / images.shape[0]
