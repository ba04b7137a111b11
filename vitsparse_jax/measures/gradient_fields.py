"""The batched gradient program of receptive fields, and the layers it measures (shared by the receptive-field
and locality experiments).

For each requested layer Y: M = |d sum(Y_central) / dx|, x = the normalised input image, summed over the
colour channels (docs/science.md#receptive-fields). One jitted program per model computes the maps of ALL layers with a
reverse sweep over the model's stages (`module.info().stages`): the forward runs stage by stage under
`jax.vjp` (`apply(start=s, stop=s)`) up to the deepest requested layer; then, from the top down, a batch
of cotangents with one row per layer already reached is pulled back through each stage (vmapped over the
rows), each layer's row joining at the stage that computes it. Layer l so pays for the backward of its
own stage and those below it, about what a per-layer autograd loop does, instead of a full backward pass. At
most `chunk_size` rows travel together (one sweep per chunk of layers, deepest first), which bounds memory.
The same forward pass can also give other per-image values of its captures (`Side`, e.g. the attention
distances of every block), so that one device step computes both.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
import re
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import data
from vitsparse_jax.measures import locality
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
    (r"^stages\.\d+\.blocks\.\d+$", "block"), (r"^stages\.\d+\.downsample$", "downsample"),      # ConvNeXt
    (r"^stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.act)$", r"\1"),
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
    """Transformers: embedding and the four sub-stages of every block (+ Swin downsampling; with layer scale the
    `attn` / `mlp` sub-stages are the scaled branches, before the residual add); VGG: every ReLU after a conv;
    ResNet: the stem and every block output; ConvNeXt: the stem and every block output (docs/science.md#sub-stages)."""
    if info.family in TRANSFORMER_FAMILIES:
        head = ("norm", "pre_logits", "attn_pool.probs", LOGITS)
        return tuple(n for n in valid_layers(info) if n not in head)
    if info.family == "vgg":
        return tuple(info.ablation_sites)
    if info.family == "convnext":
        return tuple(s for s in info.stages if s not in NON_SPATIAL_STAGES and not s.endswith(".downsample"))
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

class Side(Protocol):
    """Per-image values computed from captures of the gradient program's own forward pass (not differentiated):
    `captures` names them, `__call__(aux)` reduces {capture name: array} to a pytree of (B, ...) arrays. It must
    be hashable (the compiled programs are cached on it)."""

    captures: tuple[str, ...]

    def __call__(self, aux: Mapping[str, jax.Array]) -> Any: ...


def stage_plan(module: Any) -> tuple[str | None, ...]:
    """The stages the program runs one at a time: `info().stages` when the module's `__call__` takes `stop`
    (every family of this package), else the whole network as one stage (`None`)."""
    try:
        accepts_stop = "stop" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        accepts_stop = False
    if accepts_stop and hasattr(module, "info"):
        return tuple(module.info().stages)
    return (None,)


@functools.lru_cache(maxsize=16)
def make_rf_fn(module: Any, layers: tuple[Layer, ...], num_prefix_tokens: int, chunk_size: int = 0,
               norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None, per_image: bool = False, *,
               side: Side | None = None) -> Callable:
    """A jitted fn(variables, images, weight) -> (L, H, W): sum over images of weight * M_l; with
    `per_image`, (L, B, H, W): each image's weight * M_l, for the host to add in a fixed order. With `side`,
    fn returns (maps, side(captures)): the side's captures come from the same forward pass (every stage that
    computes one runs), unweighted.

    images: (B, H, W, 3), uint8 when `norm` = (mean, std) is given (x = (images / 255 - mean) / std), else
    the normalised x. weight: (B,) per image (1 = count, 0 = padding): it scales the cotangent of every
    layer, so padding contributes nothing. chunk_size: at most this many layers' cotangents are pulled back
    together (0 = all). Cached: the trained and untrained twins of a model share one compiled program.

    A reverse sweep over the stages (`stage_plan`): the forward runs stage by stage under `jax.vjp`
    (`apply(start=s, stop=s)`), each stage returning its output and the captures of the requested layers
    it computes, and stops after the deepest requested layer's stage. The layers, deepest first, are cut
    into chunks of `chunk_size`; for each chunk, a cotangent batch with one row per layer of the chunk
    already seen is pulled back from the chunk's deepest stage down to the input (vmapped over the rows),
    the rows of the layers a stage computes joining it there. Layer l thus pays for the backward of its own
    stage and those below it, not of the whole network. A module whose `__call__` takes no `stop` is
    swept as one stage (the whole network: a full backward pass per layer).
    """
    captures = tuple(dict.fromkeys(layer.name for layer in layers if layer.name != LOGITS))
    side_captures = tuple(dict.fromkeys(side.captures)) if side is not None else ()
    everything = tuple(dict.fromkeys(captures + side_captures))
    by_name = {layer.name: layer for layer in layers}
    stages = stage_plan(module)

    def seed(name: str, y: jax.Array, weight: jax.Array) -> jax.Array:
        """d sum(Y_central) / dY, each image scaled by its weight: the cotangent of layer `name` at Y."""
        _, vjp = jax.vjp(lambda y: by_name[name].central_sum(y, num_prefix_tokens), y)
        (ct,) = vjp(weight.astype(y.dtype))
        return ct

    def fn(variables: Any, images: jax.Array, weight: jax.Array) -> jax.Array:
        if norm is not None:
            x = data.normalize(images, mean=norm[0], std=norm[1])
        else:
            x = images.astype(jnp.float32)
        weight = weight.astype(jnp.float32)

        # forward, stage by stage, until every requested layer (and side capture) has been computed
        runs, stage_of, side_aux, h = [], {}, {}, x
        for i, stage in enumerate(stages):
            kw = {} if stage is None else {"start": stage, "stop": stage}

            def run(h, kw=kw):   # -> ((output, the layers' captures: differentiated), the side's captures)
                out, aux = module.apply(variables, h, capture=everything, **kw)
                return (out, {k: v for k, v in aux.items() if k in captures}), \
                    {k: v for k, v in aux.items() if k in side_captures}

            (out, aux), pullback, extra = jax.vjp(run, h, has_aux=True)
            runs.append((out, aux, pullback))
            side_aux.update(extra)
            stage_of.update({name: i for name in captures if name in aux})
            if i == len(stages) - 1 and LOGITS in by_name:
                stage_of[LOGITS] = i
            if len(stage_of) == len(by_name) and len(side_aux) == len(side_captures):
                break
            h = out
        missing = [name for name in by_name if name not in stage_of] + [n for n in side_captures if n not in side_aux]
        if missing:
            raise ValueError(f"no stage of {type(module).__name__} computes {missing}; stages: {stages}")

        # reverse sweeps, one per chunk of layers (deepest first); rows = the chunk's layers seen so far
        deepest_first = sorted(by_name, key=lambda name: -stage_of[name])
        size = chunk_size if chunk_size > 0 else len(deepest_first)
        maps, order = [], []
        for begin in range(0, len(deepest_first), size):
            chunk = deepest_first[begin:begin + size]
            if maps:   # this chunk's seeds wait for the previous chunk's maps: one chunk's cotangents at a time
                maps[-1], weight = jax.lax.optimization_barrier((maps[-1], weight))
            rows, carry = [], None
            for i in range(stage_of[chunk[0]], -1, -1):
                new = [name for name in chunk if stage_of[name] == i]
                carry = pull_stage(runs[i], carry, len(rows), new, weight, to_maps=i == 0)
                rows += new
            maps.append(carry)
            order += rows
        maps = jnp.concatenate(maps) if len(maps) > 1 else maps[0]
        maps = maps[jnp.asarray([order.index(layer.name) for layer in layers])]
        return (maps, side(side_aux)) if side is not None else maps

    def pull_stage(run: tuple, carry: jax.Array | None, old: int, new: list[str], weight: jax.Array,
                   to_maps: bool) -> jax.Array:
        """Pulls the `old` cotangent rows `carry` (at the stage output) and the seeds of the layers `new` that
        the stage computes back through the stage, vmapped over the rows: (rows, B, *stage input), or with
        `to_maps` (the first stage: the input is x) the maps |d/dx| summed over channels (and over images
        unless `per_image`)."""
        out, aux, pullback = run
        row_of = {name: old + j for j, name in enumerate(new)}
        seeds = {name: seed(name, aux[name], weight) for name in new if name != LOGITS}
        fresh = [seed(LOGITS, out, weight) if name == LOGITS else jnp.zeros_like(out) for name in new]
        ct_out = jnp.concatenate(([] if carry is None else [carry]) + ([jnp.stack(fresh)] if fresh else []))

        def pull(index: jax.Array, ct: jax.Array) -> jax.Array:
            ct_aux = {name: jnp.where(index == row_of[name], seeds[name], jnp.zeros_like(seeds[name]))
                      if name in seeds else jnp.zeros_like(value) for name, value in aux.items()}
            (grad,) = pullback((ct, ct_aux))
            if not to_maps:
                return grad
            maps = jnp.abs(grad).sum(axis=-1)
            return maps if per_image else maps.sum(axis=0)

        return jax.vmap(pull)(jnp.arange(old + len(new)), ct_out)

    return jax.jit(fn)


def receptive_field_maps(module: Any, variables: Any, images: jax.Array, layers: Sequence[Layer],
                         num_prefix_tokens: int, chunk_size: int = 0) -> np.ndarray:
    """M (L, H, W) of normalised images (B, H, W, 3), averaged over the images (all in one batch)."""
    fn = make_rf_fn(module, tuple(layers), num_prefix_tokens, chunk_size)
    return np.asarray(fn(variables, images, jnp.ones(images.shape[0]))) / images.shape[0]
