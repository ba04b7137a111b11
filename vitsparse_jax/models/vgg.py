"""timm's VGG (`timm/models/vgg.py`) in Flax: `features` Sequential, ConvMlp `pre_logits`, ClassifierHead.

Flax names mirror timm's module names (`features_4`, `pre_logits/fc1`, `head/fc`); see docs/design.md.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax.models import base
from vitsparse_jax.models.layers import max_pool, torch_batch_norm

Array = jax.Array

# timm's `_initialize_weights`: convs kaiming-normal (fan_out, relu), Linear N(0, 0.01), biases 0, BN 1/0.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
LINEAR_INIT = nn.initializers.normal(0.01)

CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
    "vgg_pico": (16, "M", 32, "M", 64, 64, "M"),  # project-own: 32x32 digits -> 4x4 map
}

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# timm `vgg*.tv_in1k` (the default tag of every timm VGG).
_TV_CFG = {"tag": "tv_in1k", "input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
           "num_classes": 1000, **_IMAGENET}
_PICO_CFG = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
             "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 10}

ARCHS: dict[str, dict] = {
    **{name: {"kwargs": {"cfg": CFGS[name]}, "default_cfg": _TV_CFG} for name in
       ("vgg11", "vgg13", "vgg16", "vgg19")},
    **{f"{name}_bn": {"kwargs": {"cfg": CFGS[name], "batch_norm": True}, "default_cfg": _TV_CFG} for name in
       ("vgg11", "vgg13", "vgg16", "vgg19")},
    # The map is 4x4 before pre_logits at 32 px, so fc1 is a 4x4 conv (1x1 out), as 7x7 is at 224 px.
    "vgg_pico": {"kwargs": {"cfg": CFGS["vgg_pico"], "head_hidden": 128, "pre_logits_kernel": 4,
                            "num_classes": 10, "img_size": 32}, "default_cfg": _PICO_CFG},
}


def feature_layers(cfg: tuple[int | str, ...], batch_norm: bool) -> tuple[str, ...]:
    """Kind of each module of timm's `features` Sequential, by index: 'conv', 'bn', 'relu' or 'pool'."""
    kinds: list[str] = []
    for v in cfg:
        kinds += ["pool"] if v == "M" else ["conv", "bn", "relu"] if batch_norm else ["conv", "relu"]
    return tuple(kinds)


def adaptive_avg_pool(x: Array, out_hw: tuple[int, int]) -> Array:
    """torch `adaptive_avg_pool2d` on NHWC: output bin i averages input rows floor(i*n/m) : ceil((i+1)*n/m)."""
    def weights(n: int, m: int) -> np.ndarray:
        w = np.zeros((m, n), np.float32)
        for i in range(m):
            lo, hi = (i * n) // m, -((-(i + 1) * n) // m)
            w[i, lo:hi] = 1.0 / (hi - lo)
        return w
    wh, ww = weights(x.shape[1], out_hw[0]), weights(x.shape[2], out_hw[1])
    return jnp.einsum("oh,bhwc,pw->bopc", wh, x, ww, precision=base.DEFAULT_PRECISION)


class ConvMlp(nn.Module):
    """timm's ConvMlp head: fc1 (k x k conv, VALID), act1, dropout (rate 0 in timm VGG), fc2 (1x1), act2."""

    hidden: int
    kernel_size: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, masks: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        k = self.kernel_size
        if x.shape[1] < k or x.shape[2] < k:  # timm keeps the input at least k x k
            x = adaptive_avg_pool(x, (max(k, x.shape[1]), max(k, x.shape[2])))
        conv = functools.partial(nn.Conv, self.hidden, padding="VALID", dtype=self.dtype,
                                 precision=self.precision, kernel_init=CONV_INIT)
        act1 = base.apply_unit_mask(nn.relu(conv((k, k), name="fc1")(x)), masks.get("act1"))
        act2 = base.apply_unit_mask(nn.relu(conv((1, 1), name="fc2")(act1)), masks.get("act2"))
        return act2, {"act1": act1, "act2": act2}


class ClassifierHead(nn.Module):
    """The `fc` of timm's ClassifierHead; its average pool is done by the caller (stage `pre_logits`)."""

    num_classes: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.num_classes <= 0:
            return x
        return nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision,
                        kernel_init=LINEAR_INIT, name="fc")(x)


class VGG(nn.Module):
    """timm VGG. NHWC input, normalised. See docs/design.md for names, stages and mask sites."""

    arch: str = "vgg16"
    cfg: tuple[int | str, ...] = CFGS["vgg16"]
    batch_norm: bool = False
    num_classes: int = 1000
    head_hidden: int = 4096
    pre_logits_kernel: int = 7
    img_size: int = 224
    train: bool = False  # True: BatchNorm normalises with batch statistics and updates 'batch_stats'
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    def info(self) -> base.ModelInfo:
        kinds = feature_layers(self.cfg, self.batch_norm)
        feats = tuple(f"features.{i}" for i in range(len(kinds)))
        relus = tuple(f"features.{i}" for i, k in enumerate(kinds) if k == "relu")
        head_acts = ("pre_logits.act1", "pre_logits.act2")
        return base.ModelInfo(
            name=self.arch, family="vgg", num_classes=self.num_classes, img_size=self.img_size,
            num_prefix_tokens=0, patch_grid=(0, 0), stages=feats + ("pre_logits", "head"),
            mask_sites=relus + head_acts, ablation_sites=relus,
            capture_names=feats + head_acts + ("pre_logits",),
            default_cfg=dict(ARCHS.get(self.arch, {}).get("default_cfg", {})))

    @nn.compact
    def __call__(self, x: Array, *, masks: Mapping[str, Array] | None = None, capture: tuple[str, ...] = (),
                 start: str | None = None, stop: str | None = None, renormalize: bool = False
                 ) -> tuple[Array, dict[str, Array]]:
        del renormalize  # attention-only switch
        info = self.info()
        masks = base.check_masks(masks, info.mask_sites)
        first = base.check_start(start, info.stages)
        last = base.check_stop(stop, info.stages, first)
        base.check_masks_run(masks, lambda site: site if site.startswith("features.") else "pre_logits",
                             info.stages, first, start, last, stop)

        conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                 precision=self.precision, kernel_init=CONV_INIT)
        found: dict[str, Array] = {}
        channels = iter(v for v in self.cfg if v != "M")
        for i, kind in enumerate(feature_layers(self.cfg, self.batch_norm)):
            name = f"features.{i}"
            width = next(channels) if kind == "conv" else None  # advance even for skipped layers
            if i < first:  # stage features.{i} is stages[i]
                continue
            if i > last:
                break
            if kind == "conv":
                x = conv(width, name=f"features_{i}")(x)
            elif kind == "bn":
                x = torch_batch_norm(self.train, self.dtype, name=f"features_{i}")(x)
            elif kind == "relu":
                x = base.apply_unit_mask(nn.relu(x), masks.get(name))
            else:
                x = max_pool(x, (2, 2), (2, 2))
            found[name] = x

        pre_logits = info.stages.index("pre_logits")
        if first <= pre_logits <= last:
            head_masks = {k.split(".")[1]: v for k, v in masks.items() if k.startswith("pre_logits.")}
            x, acts = ConvMlp(self.head_hidden, self.pre_logits_kernel, dtype=self.dtype,
                              precision=self.precision, name="pre_logits")(x, head_masks)
            found.update({f"pre_logits.{k}": v for k, v in acts.items()})
            x = jnp.mean(x, axis=(1, 2))  # timm ClassifierHead global avg pool
            found["pre_logits"] = x
        if last < len(info.stages) - 1:  # `stop` before head: the output of stage `stop`
            return x, base.select_captures(found, capture, info.capture_names)
        out = ClassifierHead(self.num_classes, dtype=self.dtype, precision=self.precision, name="head")(x)
        return out, base.select_captures(found, capture, info.capture_names)


def build(arch: str, **overrides: Any) -> VGG:
    if arch not in ARCHS:
        raise ValueError(f"unknown VGG arch {arch!r}; known: {', '.join(ARCHS)}")
    return VGG(arch=arch, **{**ARCHS[arch]["kwargs"], **overrides})
