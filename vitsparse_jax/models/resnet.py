"""timm's ResNet (`timm/models/resnet.py`, default 'b' variant) in Flax: basic and bottleneck blocks.

Flax names mirror timm's (`conv1`, `bn1`, `layer1_0/conv2`, `layer2_0/downsample_0`, `fc`); see
docs/design.md.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitsparse_jax.models import base
from vitsparse_jax.models.layers import max_pool, torch_batch_norm

Array = jax.Array

# timm's `init_weights`: convs kaiming-normal (fan_out, relu), BN 1/0 with the last BN of each residual
# branch zeroed (zero_init_last); fc keeps torch's nn.Linear default (uniform +-1/sqrt(fan_in)).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
FC_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _uniform(bound: float) -> nn.initializers.Initializer:
    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# timm `resnet*.tv_in1k`, the pinned tag (docs/science.md#models). timm's own default tag is a1_in1k (a1h_in1k for
# resnet152; bicubic, crop 0.95); converted checkpoints carry their real pretrained_cfg in the JSON.
_TV_CFG = {"tag": "tv_in1k", "input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
           "num_classes": 1000, **_IMAGENET}
_PICO_CFG = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
             "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 10}

ARCHS: dict[str, dict] = {
    "resnet18": {"kwargs": {"layers": (2, 2, 2, 2), "bottleneck": False}, "default_cfg": _TV_CFG},
    "resnet34": {"kwargs": {"layers": (3, 4, 6, 3), "bottleneck": False}, "default_cfg": _TV_CFG},
    "resnet50": {"kwargs": {"layers": (3, 4, 6, 3), "bottleneck": True}, "default_cfg": _TV_CFG},
    "resnet101": {"kwargs": {"layers": (3, 4, 23, 3), "bottleneck": True}, "default_cfg": _TV_CFG},
    "resnet152": {"kwargs": {"layers": (3, 8, 36, 3), "bottleneck": True}, "default_cfg": _TV_CFG},
    # Project-own, 32x32 digits: 3x3 stride-1 stem without max pool, one basic block per stage.
    "resnet_pico": {"kwargs": {"layers": (1, 1, 1, 1), "bottleneck": False, "channels": (16, 32, 64, 128),
                               "stem_width": 16, "stem_kernel": 3, "stem_stride": 1, "stem_pool": False,
                               "num_classes": 10, "img_size": 32}, "default_cfg": _PICO_CFG},
}


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((k // 2, k // 2), (k // 2, k // 2))


class Block(nn.Module):
    """timm BasicBlock (bottleneck=False) or Bottleneck; returns (output, {'act1': ..., ...})."""

    planes: int
    stride: int
    bottleneck: bool
    downsample: bool
    zero_init_last: bool = True
    train: bool = False
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, masks: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, precision=self.precision,
                                 kernel_init=CONV_INIT)
        bn = functools.partial(torch_batch_norm, self.train, self.dtype)
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        acts: dict[str, Array] = {}

        def act(name: str, y: Array) -> Array:
            acts[name] = base.apply_unit_mask(nn.relu(y), masks.get(name))
            return acts[name]

        s, p = self.stride, self.planes
        out_ch = p * 4 if self.bottleneck else p
        if self.bottleneck:
            y = act("act1", bn(name="bn1")(conv(p, (1, 1), padding="VALID", name="conv1")(x)))
            y = act("act2", bn(name="bn2")(conv(p, (3, 3), s, _pad(3), name="conv2")(y)))
            y = bn(name="bn3", scale_init=last_scale)(conv(out_ch, (1, 1), padding="VALID", name="conv3")(y))
        else:
            y = act("act1", bn(name="bn1")(conv(p, (3, 3), s, _pad(3), name="conv1")(x)))
            y = bn(name="bn2", scale_init=last_scale)(conv(p, (3, 3), 1, _pad(3), name="conv2")(y))
        if self.downsample:
            x = bn(name="downsample_1")(conv(out_ch, (1, 1), s, "VALID", name="downsample_0")(x))
        return act("act3" if self.bottleneck else "act2", y + x), acts


class ResNet(nn.Module):
    """timm ResNet. NHWC input, normalised. See docs/design.md for names, stages and mask sites."""

    arch: str = "resnet50"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    bottleneck: bool = True
    channels: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True  # 3x3 stride-2 max pool after the stem conv
    num_classes: int = 1000
    img_size: int = 224
    zero_init_last: bool = True
    train: bool = False  # True: BatchNorm normalises with batch statistics and updates 'batch_stats'
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    def blocks(self) -> Iterator[tuple[str, int, int, bool]]:
        """(name, planes, stride, has downsample) of every block in forward order, as timm's make_blocks."""
        inplanes = self.stem_width
        for s, (planes, n) in enumerate(zip(self.channels, self.layers)):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                out_ch = planes * 4 if self.bottleneck else planes
                yield f"layer{s + 1}.{b}", planes, stride, stride != 1 or inplanes != out_ch
                inplanes = out_ch

    def info(self) -> base.ModelInfo:
        names = [name for name, *_ in self.blocks()]
        block_acts = ("act1", "act2", "act3") if self.bottleneck else ("act1", "act2")
        acts = [f"{n}.{a}" for n in names for a in block_acts]
        ablate = [f"{n}.{a}" for n in names for a in (("act2",) if self.bottleneck else ("act1", "act2"))]
        captures = ["act1", "stem"] + [c for n in names for c in [f"{n}.{a}" for a in block_acts] + [n]]
        return base.ModelInfo(
            name=self.arch, family="resnet", num_classes=self.num_classes, img_size=self.img_size,
            num_prefix_tokens=0, patch_grid=(0, 0), stages=("stem", *names, "head"),
            mask_sites=("act1", *acts), ablation_sites=tuple(ablate),
            capture_names=(*captures, "pre_logits"),
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
        base.check_masks_run(masks, lambda site: "stem" if site == "act1" else site.rsplit(".", 1)[0],
                             info.stages, first, start, last, stop)

        found: dict[str, Array] = {}
        if first == 0:
            k = self.stem_kernel
            x = nn.Conv(self.stem_width, (k, k), self.stem_stride, _pad(k), use_bias=False, dtype=self.dtype,
                        precision=self.precision, kernel_init=CONV_INIT, name="conv1")(x)
            x = torch_batch_norm(self.train, self.dtype, name="bn1")(x)
            x = found["act1"] = base.apply_unit_mask(nn.relu(x), masks.get("act1"))
            if self.stem_pool:
                x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
            found["stem"] = x
        for name, planes, stride, downsample in self.blocks():
            if not first <= info.stages.index(name) <= last:
                continue
            block_masks = {k[len(name) + 1:]: v for k, v in masks.items() if k.startswith(name + ".")}
            x, acts = Block(planes, stride, self.bottleneck, downsample, zero_init_last=self.zero_init_last,
                            train=self.train, dtype=self.dtype, precision=self.precision,
                            name=name.replace(".", "_"))(x, block_masks)
            found.update({f"{name}.{a}": v for a, v in acts.items()})
            found[name] = x
        if last < len(info.stages) - 1:  # `stop` before head: the output of stage `stop`
            return x, base.select_captures(found, capture, info.capture_names)
        x = found["pre_logits"] = jnp.mean(x, axis=(1, 2))  # timm global avg pool (drop_rate 0)
        if self.num_classes > 0:
            bound = 1.0 / math.sqrt(x.shape[-1])
            x = nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision,
                         kernel_init=FC_KERNEL_INIT, bias_init=_uniform(bound), name="fc")(x)
        return x, base.select_captures(found, capture, info.capture_names)


def build(arch: str, **overrides: Any) -> ResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown ResNet arch {arch!r}; known: {', '.join(ARCHS)}")
    return ResNet(arch=arch, **{**ARCHS[arch]["kwargs"], **overrides})
