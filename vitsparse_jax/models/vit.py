"""timm's VisionTransformer / DeiT (plain and distilled) in Flax linen, with captures, masks and stages.

Parameter layout mirrors timm (`blocks.3.attn.qkv` -> `blocks_3/attn/qkv`), so that conversion is a
rename plus transposes. Interface: docs/design.md ("Models").
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitsparse_jax.models import base
from vitsparse_jax.models.base import Array, ModelInfo
from vitsparse_jax.models.layers import Mlp, trunc_normal

FAMILY = "vit"
LN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------
# Initialisers (timm's init_weights: trunc_normal_ std .02 with ABSOLUTE bounds [-2, 2], i.e. practically a
# plain normal; torch's default Conv2d init for the patch embedding, which timm leaves untouched).

def normal(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


def torch_conv_uniform(fan_in: int) -> Callable:
    """torch.nn.Conv2d default (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight and bias."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


# ---------------------------------------------------------------------------------------------------------
# Layers

class Attention(nn.Module):
    """Multi-head self-attention; keep factors multiply the post-softmax columns (SPEC sec. 3)."""

    dim: int
    num_heads: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, renormalize: bool) -> tuple[Array, Array]:
        b, n, d = x.shape
        hd = self.dim // self.num_heads
        dense = lambda feats, name: nn.Dense(  # noqa: E731
            feats, dtype=self.dtype, precision=self.precision, kernel_init=trunc_normal(.02),
            bias_init=nn.initializers.zeros, name=name)

        qkv = dense(3 * self.dim, "qkv")(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (B, H, N, hd)
        q = q * hd ** -0.5                                                   # timm scales q before q @ k^T
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=self.precision)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        if mask is not None:
            probs = mask_columns(probs, mask, renormalize)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, precision=self.precision)
        out = out.transpose(0, 2, 1, 3).reshape(b, n, self.dim)
        return dense(self.dim, "proj")(out), probs


def mask_columns(probs: Array, mask: Array, renormalize: bool) -> Array:
    """Multiplies column j of every head and query row by mask[:, j]; optionally renormalises rows.

    probs (B, H, N, N) float32, mask (B, N). Rows whose mass is all dropped stay zero. With renormalize,
    images whose mask keeps everything are returned untouched, so an all-ones mask is exactly a no-op.
    """
    if mask.shape != (probs.shape[0], probs.shape[-1]):
        raise ValueError(f"attention mask must have shape (B, N) = {(probs.shape[0], probs.shape[-1])}, "
                         f"got {mask.shape}")
    mask = jnp.asarray(mask, jnp.float32)
    kept = probs * mask[:, None, None, :]
    if not renormalize:
        return kept
    total = kept.sum(-1, keepdims=True)
    renormed = jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 0.0)
    untouched = jnp.all(mask == 1.0, axis=-1)[:, None, None, None]
    return jnp.where(untouched, kept, renormed)


class Block(nn.Module):
    """Pre-norm transformer block; returns the block output and its named intermediates."""

    dim: int
    num_heads: int
    mlp_ratio: float
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, renormalize: bool) -> tuple[Array, dict[str, Array]]:
        norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=name)  # noqa: E731
        attn, probs = Attention(self.dim, self.num_heads, self.dtype, self.precision, name="attn")(
            norm("norm1")(x), mask, renormalize)
        x = x + attn
        attn_res = x
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.dtype, self.precision, name="mlp")(
            norm("norm2")(x))
        x = x + mlp
        return x, {"attn.probs": probs, "attn": attn, "attn_res": attn_res, "mlp": mlp}


# ---------------------------------------------------------------------------------------------------------
# Model

class VisionTransformer(nn.Module):
    """timm VisionTransformer (class token, learned pos embed incl. prefix, token pooling, final norm);
    `distilled=True` is timm's VisionTransformerDistilled (cls + dist token, eval = mean of two heads)."""

    arch: str
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    distilled: bool = False
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    # --- static facts -----------------------------------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return g, g

    def stage_names(self) -> tuple[str, ...]:
        return ("embed", *(f"blocks.{l}" for l in range(self.depth)), "head")

    def capture_names(self) -> tuple[str, ...]:
        names = ["embed"]
        for l in range(self.depth):
            p = f"blocks.{l}"
            names += [f"{p}.attn.probs", f"{p}.attn", f"{p}.attn_res", f"{p}.mlp", p]
        return (*names, "norm", "pre_logits")

    def info(self) -> ModelInfo:
        sites = tuple(f"blocks.{l}.attn" for l in range(self.depth))
        cfg = ARCHS[self.arch]["default_cfg"] if self.arch in ARCHS else {}
        return ModelInfo(name=self.arch, family=FAMILY, num_classes=self.num_classes, img_size=self.img_size,
                         num_prefix_tokens=self.num_prefix_tokens, patch_grid=self.grid,
                         stages=self.stage_names(), mask_sites=sites, ablation_sites=sites,
                         capture_names=self.capture_names(), default_cfg=dict(cfg))

    # --- forward ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        d, p = self.embed_dim, self.patch_size
        self.patch_embed = PatchEmbed(d, p, self.dtype, self.precision)
        self.cls_token = self.param("cls_token", normal(1e-6), (1, 1, d))
        if self.distilled:
            self.dist_token = self.param("dist_token", trunc_normal(.02), (1, 1, d))
        n = self.grid[0] * self.grid[1] + self.num_prefix_tokens
        self.pos_embed = self.param("pos_embed", trunc_normal(.02), (1, n, d))
        self.blocks = [Block(d, self.num_heads, self.mlp_ratio, self.dtype, self.precision)
                       for _ in range(self.depth)]
        self.norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        if self.num_classes > 0:
            head = lambda: nn.Dense(self.num_classes, dtype=self.dtype, precision=self.precision,  # noqa: E731
                                    kernel_init=trunc_normal(.02), bias_init=nn.initializers.zeros)
            self.head = head()
            if self.distilled:
                self.head_dist = head()

    def __call__(self, x: Array, *, masks: Mapping[str, Array] | None = None, capture: tuple[str, ...] = (),
                 start: str | None = None, stop: str | None = None, renormalize: bool = False
                 ) -> tuple[Array, dict[str, Array]]:
        """Images (B, H, W, 3), or the input of stage `start`, -> (logits or pooled features, captures).

        With `stop`, the run ends after that stage and returns its output (the input of the next stage)
        instead of the logits. A mask of a block before `start` or after `stop` is an error (that block
        does not run).
        """
        valid = self.capture_names()
        base.select_captures({}, capture, valid)   # validates the patterns before any compute
        masks = base.check_masks(masks, tuple(f"blocks.{l}.attn" for l in range(self.depth)))
        stages = self.stage_names()
        first = base.check_start(start, stages)   # 0 = embed, 1 + l = blocks.l, depth + 1 = head
        last = base.check_stop(stop, stages, first)
        base.check_masks_run(masks, lambda site: site.removesuffix(".attn"), stages, first, start, last, stop)
        wanted = lambda name: any(fnmatch.fnmatchcase(name, p) for p in capture)  # noqa: E731
        found: dict[str, Array] = {}

        def keep(name: str, value: Array) -> None:
            if wanted(name):
                found[name] = value

        if first == 0:
            x = self.embed(x)
            keep("embed", x)
        for l in range(max(first - 1, 0), min(last, self.depth)):   # block l is stage 1 + l
            x, parts = self.blocks[l](x, masks.get(f"blocks.{l}.attn"), renormalize)
            for key, value in parts.items():
                keep(f"blocks.{l}.{key}", value)
            keep(f"blocks.{l}", x)
        if last <= self.depth:   # `stop` before head: the output of stage `stop`
            return x, base.select_captures(found, capture, valid)
        x = self.norm(x)
        keep("norm", x)
        if self.distilled:
            pooled = (x[:, 0] + x[:, 1]) / 2
        else:
            pooled = x[:, 0]
        keep("pre_logits", pooled)
        if self.num_classes == 0:
            out = pooled
        elif self.distilled:   # timm eval: mean of the class-token and distillation-token heads
            out = (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        else:
            out = self.head(pooled)
        return out, base.select_captures(found, capture, valid)

    def embed(self, images: Array) -> Array:
        """(B, H, W, 3) normalised images -> (B, N, D) tokens: patches, prefix tokens, + pos_embed."""
        x = self.patch_embed(images.astype(self.dtype))
        b = x.shape[0]
        prefix = [self.cls_token] + ([self.dist_token] if self.distilled else [])
        prefix = [jnp.broadcast_to(t, (b, 1, self.embed_dim)).astype(x.dtype) for t in prefix]
        x = jnp.concatenate([*prefix, x], axis=1)
        return x + self.pos_embed.astype(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv (explicit VALID padding), flattened row-major like timm (NCHW flatten)."""

    dim: int
    patch: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = torch_conv_uniform(x.shape[-1] * self.patch * self.patch)
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                    dtype=self.dtype, precision=self.precision, kernel_init=init, bias_init=init,
                    name="proj")(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


# ---------------------------------------------------------------------------------------------------------
# Registry: timm arch name -> constructor kwargs + the default tag's pretrained_cfg

_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# (embed_dim, depth, num_heads)
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def _cfg(tag: str, img: int, norm: dict, num_classes: int = 1000) -> dict:
    """timm pretrained_cfg fields of a tag: crop_pct .9 at 224 px, else 1.0 (384 px; the 32 px pico model)."""
    return dict(tag=tag, input_size=(3, img, img), crop_pct=0.9 if img == 224 else 1.0,
                interpolation="bicubic", num_classes=num_classes, **norm)


def _entry(dims: tuple[int, int, int], patch: int, img: int, cfg: dict, **kw: Any) -> dict:
    dim, depth, heads = dims
    kwargs = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                  num_classes=cfg["num_classes"], **kw)
    return {"kwargs": kwargs, "default_cfg": cfg}


def _make_archs() -> dict[str, dict]:
    archs = {}
    # timm's ViT names; default tag augreg_in21k_ft_in1k unless noted.
    default_tag = {("base", 16, 224): "augreg2_in21k_ft_in1k", ("large", 32, 384): "orig_in21k_ft_in1k"}
    for size, patch, img in [("tiny", 16, 224), ("tiny", 16, 384), ("small", 16, 224), ("small", 16, 384),
                             ("small", 32, 224), ("small", 32, 384), ("base", 16, 224), ("base", 16, 384),
                             ("base", 32, 224), ("base", 32, 384), ("large", 16, 224), ("large", 16, 384),
                             ("large", 32, 384)]:
        tag = default_tag.get((size, patch, img), "augreg_in21k_ft_in1k")
        archs[f"vit_{size}_patch{patch}_{img}"] = _entry(_SIZES[size], patch, img, _cfg(tag, img, _HALF))
    # vit_large_patch32_224 only has in21k weights without a classifier (timm's default: num_classes 0).
    archs["vit_large_patch32_224"] = _entry(_SIZES["large"], 32, 224, _cfg("orig_in21k", 224, _HALF, 0))
    # DeiT (fb_in1k, ImageNet mean/std), plain and distilled.
    for size in ("tiny", "small", "base"):
        cfg = _cfg("fb_in1k", 224, _IMAGENET)
        archs[f"deit_{size}_patch16_224"] = _entry(_SIZES[size], 16, 224, cfg)
        archs[f"deit_{size}_distilled_patch16_224"] = _entry(_SIZES[size], 16, 224, cfg, distilled=True)
    cfg = _cfg("fb_in1k", 384, _IMAGENET)
    archs["deit_base_patch16_384"] = _entry(_SIZES["base"], 16, 384, cfg)
    archs["deit_base_distilled_patch16_384"] = _entry(_SIZES["base"], 16, 384, cfg, distilled=True)
    # The project's own small model for the built-in 32x32 digit images (trained by vitsparse_jax.experiments.train.run).
    archs["vit_pico_patch4_32"] = _entry((64, 6, 4), 4, 32, _cfg("builtin", 32, _HALF, 10), mlp_ratio=2.0)
    return archs


ARCHS: dict[str, dict] = _make_archs()


def build(arch: str, **overrides: Any) -> VisionTransformer:
    """The Flax module of a registered arch; `overrides` replace constructor fields (num_classes, dtype, ...)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ViT arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
    kwargs = {**ARCHS[arch]["kwargs"], **overrides}
    return VisionTransformer(arch=arch, **kwargs)
