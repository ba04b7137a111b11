"""timm's ConvNeXt (`timm/models/convnext.py`, the channels-last block of the FB weights) in Flax linen.

Flax names mirror timm's (`stem_0`, `stem_1`, `stages_1/downsample_0`, `stages_2/blocks_4/conv_dw`,
`.../mlp/fc1`, `.../gamma`, `head/norm`, `head/fc`), so conversion is a rename plus transposes; see
docs/design.md for captures, stages and mask sites. A block: depthwise 7x7 conv, LayerNorm (channels last,
eps 1e-6), Linear -> exact GELU -> Linear, layer scale `gamma`, residual add. Head: global average pool,
LayerNorm, fc (timm's NormMlpClassifierHead without hidden layer).

Units (docs/science.md#convnext-units): a channel of the GELU output inside each block's MLP (`...mlp.act`),
the activation that follows the spatial conv; mask sites and ablation sites are every block's `mlp.act`, in
forward order.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitsparse_jax.models import base
from vitsparse_jax.models.layers import trunc_normal

Array = jax.Array
FAMILY = "convnext"
LN_EPS = 1e-6

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# docs/science.md#models pins `fb_in1k` (timm's own default tags are in12k_ft_in1k for tiny / small and
# fb_in22k_ft_in1k for base; converted checkpoints carry their real pretrained_cfg in the JSON).
_FB_CFG = {"tag": "fb_in1k", "input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
           "num_classes": 1000, **_IMAGENET}

ARCHS: dict[str, dict] = {
    "convnext_tiny": {"kwargs": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768)}, "default_cfg": _FB_CFG},
    "convnext_small": {"kwargs": {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768)}, "default_cfg": _FB_CFG},
    "convnext_base": {"kwargs": {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)}, "default_cfg": _FB_CFG},
    "convnext_large": {"kwargs": {"depths": (3, 3, 27, 3), "dims": (192, 384, 768, 1536)},
                       "default_cfg": _FB_CFG},
}

INIT = trunc_normal(0.02)   # timm's _init_weights: every Conv2d / Linear weight trunc_normal(.02), bias 0


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    # two-pass variance, as torch's layer_norm
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


def _dense(features: int, name: str, dtype: Any, precision: Any) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, precision=precision, kernel_init=INIT, bias_init=nn.initializers.zeros,
                    name=name)


class Mlp(nn.Module):
    """timm Mlp (fc1, exact GELU, fc2) whose GELU output is a mask site; returns (output, the masked act)."""

    hidden: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> tuple[Array, Array]:
        dim = x.shape[-1]
        act = base.apply_unit_mask(nn.gelu(_dense(self.hidden, "fc1", self.dtype, self.precision)(x),
                                           approximate=False), mask)
        return _dense(dim, "fc2", self.dtype, self.precision)(act), act


class Block(nn.Module):
    """ConvNeXt block (channels last); returns the block output and {'conv_dw', 'mlp.act', 'mlp'}."""

    dim: int
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float | None = 1e-6
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> tuple[Array, dict[str, Array]]:
        k, pad = self.kernel_size, self.kernel_size // 2
        y = nn.Conv(self.dim, (k, k), padding=((pad, pad), (pad, pad)), feature_group_count=self.dim,
                    dtype=self.dtype, precision=self.precision, kernel_init=INIT, bias_init=nn.initializers.zeros,
                    name="conv_dw")(x)
        conv_dw = y
        y, act = Mlp(int(self.mlp_ratio * self.dim), self.dtype, self.precision, name="mlp")(
            _layer_norm("norm", self.dtype)(y), mask)
        mlp = y
        if self.ls_init_value is not None:
            gamma = self.param("gamma", nn.initializers.constant(self.ls_init_value), (self.dim,))
            y = y * gamma.astype(y.dtype)
        return x + y, {"conv_dw": conv_dw, "mlp.act": act, "mlp": mlp}


class Stage(nn.Module):
    """One of timm's ConvNeXtStage; runs the parts of it that lie between `start` and `stop`."""

    dim: int
    kernel_size: int = 7
    ls_init_value: float | None = 1e-6
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, parts: tuple[str, ...], masks: Mapping[str, Array]
                 ) -> tuple[Array, dict[str, Array]]:
        """`parts`: which of 'downsample', 'blocks.0', ... to run (in order). Returns the output and the
        captures keyed relative to the stage ('downsample', 'blocks.0.mlp.act', 'blocks.0', ...)."""
        found: dict[str, Array] = {}
        for part in parts:
            if part == "downsample":   # LayerNorm2d + 2x2 stride-2 conv (`downsample.0`, `downsample.1`)
                x = _layer_norm("downsample_0", self.dtype)(x)
                x = found["downsample"] = nn.Conv(
                    self.dim, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype, precision=self.precision,
                    kernel_init=INIT, bias_init=nn.initializers.zeros, name="downsample_1")(x)
                continue
            b = int(part.split(".")[1])
            x, sub = Block(self.dim, self.kernel_size, ls_init_value=self.ls_init_value, dtype=self.dtype,
                           precision=self.precision, name=f"blocks_{b}")(x, masks.get(f"{part}.mlp.act"))
            found.update({f"{part}.{k}": v for k, v in sub.items()})
            found[part] = x
        return x, found


class Head(nn.Module):
    """timm's NormMlpClassifierHead (no hidden layer): global average pool, LayerNorm `norm`, `fc`.
    Returns (output, pooled features); without classes the output is the pooled features."""

    num_classes: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        pooled = _layer_norm("norm", self.dtype)(jnp.mean(x, axis=(1, 2)))
        if self.num_classes == 0:
            return pooled, pooled
        return _dense(self.num_classes, "fc", self.dtype, self.precision)(pooled), pooled


class ConvNeXt(nn.Module):
    """timm ConvNeXt ('patch' stem, channels-last blocks, pool -> norm -> fc head). NHWC input, normalised."""

    arch: str = "convnext_tiny"
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    kernel_size: int = 7
    patch_size: int = 4
    ls_init_value: float | None = 1e-6
    num_classes: int = 1000
    img_size: int = 224
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    def parts(self) -> Iterator[tuple[str, int, str]]:
        """(stage name, stage index, part within the stage) of every stage after the stem, in forward order."""
        for s, depth in enumerate(self.depths):
            if self.has_downsample(s):
                yield f"stages.{s}.downsample", s, "downsample"
            for b in range(depth):
                yield f"stages.{s}.blocks.{b}", s, f"blocks.{b}"

    def has_downsample(self, s: int) -> bool:
        return s > 0   # timm: stride 2 for every stage after the first (stage 0 keeps the stem's width)

    def info(self) -> base.ModelInfo:
        if len(self.depths) != len(self.dims):
            raise ValueError(f"{self.arch}: depths {self.depths} and dims {self.dims} differ in length")
        names = [name for name, *_ in self.parts()]
        blocks = [n for n in names if not n.endswith(".downsample")]
        sites = tuple(f"{n}.mlp.act" for n in blocks)
        captures = ["stem"]
        for n in names:
            captures += [n] if n.endswith(".downsample") else [f"{n}.conv_dw", f"{n}.mlp.act", f"{n}.mlp", n]
        return base.ModelInfo(
            name=self.arch, family=FAMILY, num_classes=self.num_classes, img_size=self.img_size,
            num_prefix_tokens=0, patch_grid=(0, 0), stages=("stem", *names, "head"), mask_sites=sites,
            ablation_sites=sites, capture_names=(*captures, "pre_logits"),
            default_cfg=dict(ARCHS.get(self.arch, {}).get("default_cfg", {})))

    @nn.compact
    def __call__(self, x: Array, *, masks: Mapping[str, Array] | None = None, capture: tuple[str, ...] = (),
                 start: str | None = None, stop: str | None = None, renormalize: bool = False
                 ) -> tuple[Array, dict[str, Array]]:
        del renormalize  # attention-only switch
        info = self.info()
        base.select_captures({}, capture, info.capture_names)   # validates the patterns before any compute
        masks = base.check_masks(masks, info.mask_sites)
        first = base.check_start(start, info.stages)
        last = base.check_stop(stop, info.stages, first)
        base.check_masks_run(masks, lambda site: site.removesuffix(".mlp.act"), info.stages, first, start, last, stop)

        found: dict[str, Array] = {}
        if first == 0:
            p = self.patch_size
            x = nn.Conv(self.dims[0], (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                        precision=self.precision, kernel_init=INIT, bias_init=nn.initializers.zeros,
                        name="stem_0")(x.astype(self.dtype))
            x = found["stem"] = _layer_norm("stem_1", self.dtype)(x)
        for s, dim in enumerate(self.dims):
            run = tuple(part for name, stage, part in self.parts()
                        if stage == s and first <= info.stages.index(name) <= last)
            if not run:
                continue
            prefix = f"stages.{s}."
            stage_masks = {k[len(prefix):]: v for k, v in masks.items() if k.startswith(prefix)}
            x, sub = Stage(dim, self.kernel_size, self.ls_init_value, self.dtype, self.precision,
                           name=f"stages_{s}")(x, run, stage_masks)
            found.update({prefix + k: v for k, v in sub.items()})
        if last < len(info.stages) - 1:  # `stop` before head: the output of stage `stop`
            return x, base.select_captures(found, capture, info.capture_names)
        x, found["pre_logits"] = Head(self.num_classes, self.dtype, self.precision, name="head")(x)
        return x, base.select_captures(found, capture, info.capture_names)


def build(arch: str, **overrides: Any) -> ConvNeXt:
    if arch not in ARCHS:
        raise ValueError(f"unknown ConvNeXt arch {arch!r}; known: {', '.join(ARCHS)}")
    kwargs = {**ARCHS[arch]["kwargs"], **overrides}
    kwargs["depths"], kwargs["dims"] = tuple(kwargs["depths"]), tuple(kwargs["dims"])
    module = ConvNeXt(arch=arch, **kwargs)
    module.info()   # checks the options
    return module
