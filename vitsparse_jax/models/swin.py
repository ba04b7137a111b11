"""Swin Transformer (timm's `SwinTransformer`) in Flax linen, NHWC, with captures, column masks and `start`.

Layout and names follow timm: `patch_embed` -> `layers.{s}` (PatchMerging `downsample` at the start of
stages 1..3, then `blocks.{b}`) -> `norm` -> average pool -> `head.fc`. Odd blocks use shifted windows with
timm's -100 attention mask; a map that is not larger than the window gets a clamped window and no shift
(timm's `_calc_window_shift`). See docs/design.md for the interface.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax.models import base
from vitsparse_jax.models.base import Array, ModelInfo
from vitsparse_jax.models.layers import Mlp, TimmDense, trunc_normal

LN_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------
# Architectures: timm arch name -> constructor kwargs + default pretrained_cfg (timm's default tag).

def _cfg(tag: str, img_size: int = 224, crop_pct: float = 0.9) -> dict:
    return {"tag": tag, "input_size": (3, img_size, img_size), "crop_pct": crop_pct,
            "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 1000}


def _arch(embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...], window: int | tuple[int, ...],
          cfg: dict) -> dict:
    windows = window if isinstance(window, tuple) else (window,) * len(depths)
    kwargs = dict(img_size=cfg["input_size"][1], patch_size=4, embed_dim=embed_dim, depths=depths,
                  num_heads=num_heads, window_size=windows)
    return {"kwargs": kwargs, "default_cfg": cfg}


_T, _S, _L = (2, 2, 6, 2), (2, 2, 18, 2), (6, 12, 24, 48)
ARCHS: dict[str, dict] = {
    "swin_tiny_patch4_window7_224": _arch(96, _T, (3, 6, 12, 24), 7, _cfg("ms_in1k")),
    "swin_small_patch4_window7_224": _arch(96, _S, (3, 6, 12, 24), 7, _cfg("ms_in22k_ft_in1k")),
    "swin_base_patch4_window7_224": _arch(128, _S, (4, 8, 16, 32), 7, _cfg("ms_in22k_ft_in1k")),
    "swin_large_patch4_window7_224": _arch(192, _S, _L, 7, _cfg("ms_in22k_ft_in1k")),
    "swin_base_patch4_window12_384": _arch(128, _S, (4, 8, 16, 32), 12, _cfg("ms_in22k_ft_in1k", 384, 1.0)),
    "swin_large_patch4_window12_384": _arch(192, _S, _L, 12, _cfg("ms_in22k_ft_in1k", 384, 1.0)),
    "swin_s3_tiny_224": _arch(96, _T, (3, 6, 12, 24), (7, 7, 14, 7), _cfg("ms_in1k")),
    "swin_s3_small_224": _arch(96, _S, (3, 6, 12, 24), (14, 14, 14, 7), _cfg("ms_in1k")),
    "swin_s3_base_224": _arch(96, (2, 2, 30, 2), (3, 6, 12, 24), (7, 7, 14, 7), _cfg("ms_in1k")),
}


def build(arch: str, **overrides: Any) -> "SwinTransformer":
    if arch not in ARCHS:
        raise ValueError(f"unknown Swin arch {arch!r}; known: {', '.join(ARCHS)}")
    kwargs = {**ARCHS[arch]["kwargs"], **overrides}
    return SwinTransformer(arch=arch, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Static window geometry (numpy, computed once per configuration).

class BlockGeometry(NamedTuple):
    grid: tuple[int, int]    # (H, W) of the block's input map
    window: tuple[int, int]  # window size after clamping to the map
    shift: tuple[int, int]   # cyclic shift (0 where the map is not larger than the window)


@functools.lru_cache(maxsize=None)
def block_geometry(img_size: int, patch_size: int, depths: tuple[int, ...],
                   window_size: tuple[int, ...]) -> tuple[tuple[BlockGeometry, ...], ...]:
    """Per stage, per block geometry, as timm's SwinTransformerStage / _calc_window_shift compute it."""
    if len(window_size) < len(depths):
        raise ValueError(f"window_size {window_size} needs one entry per stage of depths {depths}")
    grid = (img_size // patch_size,) * 2
    stages = []
    for s, (depth, target) in enumerate(zip(depths, window_size)):
        if s > 0:
            grid = tuple((g + 1) // 2 for g in grid)  # PatchMerging pads odd maps
        window = tuple(g if g <= target else target for g in grid)
        if any(g % w for g, w in zip(grid, window)):
            raise ValueError(f"stage {s}: map {grid} is not a multiple of window {window} "
                             "(timm's window padding is not implemented)")
        blocks = []
        for b in range(depth):
            target_shift = target // 2 if b % 2 else 0
            shift = tuple(0 if g <= w else target_shift for g, w in zip(grid, window))
            blocks.append(BlockGeometry(grid, window, shift))
        stages.append(tuple(blocks))
    return tuple(stages)


def _window_index(geom: BlockGeometry) -> np.ndarray:
    """(nW, T) raster index into the H*W map of each window position, shift undone."""
    (h, w), (wh, ww) = geom.grid, geom.window
    idx = np.arange(h * w).reshape(h, w)
    idx = np.roll(idx, (-geom.shift[0], -geom.shift[1]), axis=(0, 1))  # same roll as the features
    idx = idx.reshape(h // wh, wh, w // ww, ww).transpose(0, 2, 1, 3)
    return idx.reshape(-1, wh * ww)


def _relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """(T, T) index into the ((2wh-1)*(2ww-1), heads) bias table (timm's get_relative_position_index)."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, T, T)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def _shift_attention_mask(geom: BlockGeometry) -> np.ndarray | None:
    """(nW, T, T) additive mask, 0 within a region and -100 across regions (timm's get_attn_mask)."""
    if not any(geom.shift):
        return None
    (h, w), (wh, ww), (sh, sw) = geom.grid, geom.window, geom.shift
    regions = np.zeros((h, w), np.float32)
    count = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            regions[hs, ws] = count
            count += 1
    windows = regions.reshape(h // wh, wh, w // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def _partition(x: Array, window: tuple[int, int]) -> Array:
    """(B, H, W, C) -> (B, nW, T, C), windows in raster order (timm's window_partition)."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, wh * ww, c)


def _reverse(x: Array, window: tuple[int, int], grid: tuple[int, int]) -> Array:
    """(B, nW, T, C) -> (B, H, W, C) (timm's window_reverse)."""
    b, _, _, c = x.shape
    (h, w), (wh, ww) = grid, window
    x = x.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def window_token_index(module: "SwinTransformer", stage: int, block: int) -> np.ndarray:
    """int array (nW, T): raster index into the block input's H*W map of each window column."""
    return _window_index(module.geometry()[stage][block])


# ----------------------------------------------------------------------------------------------------
# Initialisers (timm's scheme).

def _torch_conv_bias(fan_in: int):
    """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# PyTorch's default Conv2d weight init (kaiming_uniform, a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


# ----------------------------------------------------------------------------------------------------
# Modules.

def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    # two-pass variance, as torch computes it
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


def mask_columns(probs: Array, keep: Array, renormalize: bool) -> Array:
    """Multiplies key columns of (B, nW, heads, T, T) probabilities by keep factors (B, nW, T).

    With `renormalize`, rows that lost probability mass are rescaled to sum to 1 (rows with nothing
    dropped are left bit-identical; a row with nothing left stays all zero).
    """
    kept = probs * keep[:, :, None, None, :].astype(probs.dtype)
    if not renormalize:
        return kept
    dropped = jnp.sum(probs - kept, axis=-1, keepdims=True)
    total = jnp.sum(kept, axis=-1, keepdims=True)
    return kept / jnp.where((dropped != 0) & (total > 0), total, 1.0)


class WindowAttention(nn.Module):
    dim: int
    num_heads: int
    window: tuple[int, int]
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, shift_mask: np.ndarray | None, keep: Array | None,
                 renormalize: bool) -> tuple[Array, Array]:
        """x: (B, nW, T, C) windows -> (output windows (B, nW, T, C), probs (B, nW, heads, T, T))."""
        b, nw, t, c = x.shape
        head_dim = self.dim // self.num_heads
        qkv = TimmDense(3 * self.dim, dtype=self.dtype, precision=self.precision, name="qkv")(x)
        qkv = qkv.reshape(b, nw, t, 3, self.num_heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q * head_dim ** -0.5, k, precision=self.precision)

        wh, ww = self.window
        table = self.param("relative_position_bias_table", trunc_normal(0.02),
                           ((2 * wh - 1) * (2 * ww - 1), self.num_heads), jnp.float32)
        bias = table[_relative_position_index(self.window)].transpose(2, 0, 1)  # (heads, T, T)
        logits = logits.astype(jnp.float32) + bias
        if shift_mask is not None:
            logits = logits + shift_mask[:, None]  # (nW, 1, T, T)
        probs = jax.nn.softmax(logits, axis=-1)
        if keep is not None:
            probs = mask_columns(probs, keep, renormalize)

        out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs.astype(self.dtype), v, precision=self.precision)
        out = TimmDense(self.dim, dtype=self.dtype, precision=self.precision, name="proj")(
            out.reshape(b, nw, t, self.dim))
        return out, probs


class SwinBlock(nn.Module):
    dim: int
    num_heads: int
    geom: BlockGeometry
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, keep: Array | None, renormalize: bool) -> tuple[Array, dict[str, Array]]:
        """x: (B, H, W, C); keep: (B, H*W) keep factors over x's tokens in raster order, or None."""
        sh, sw = self.geom.shift
        y = _layer_norm("norm1", self.dtype)(x)
        if sh or sw:
            y = jnp.roll(y, (-sh, -sw), axis=(1, 2))
        windows = _partition(y, self.geom.window)
        if keep is not None:
            keep = keep[:, _window_index(self.geom)]  # same roll + partition as the features
        out, probs = WindowAttention(self.dim, self.num_heads, self.geom.window, self.dtype,
                                     self.precision, name="attn")(
            windows, _shift_attention_mask(self.geom), keep, renormalize)
        attn = _reverse(out, self.geom.window, self.geom.grid)
        if sh or sw:
            attn = jnp.roll(attn, (sh, sw), axis=(1, 2))
        attn_res = x + attn
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.dtype, self.precision, name="mlp")(
            _layer_norm("norm2", self.dtype)(attn_res))
        out = attn_res + mlp
        return out, {"attn.probs": probs, "attn": attn, "attn_res": attn_res, "mlp": mlp}


class PatchMerging(nn.Module):
    out_dim: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h, w = x.shape[1:3]
        # timm's order: (B, H/2, 2[row], W/2, 2[col], C) -> (B, H/2, W/2, col, row, C) -> 4C channels
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        x = _layer_norm("norm", self.dtype)(x)
        return TimmDense(self.out_dim, use_bias=False, dtype=self.dtype, precision=self.precision,
                      name="reduction")(x)


class PatchEmbed(nn.Module):
    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    precision=self.precision, kernel_init=_torch_conv_kernel,
                    bias_init=_torch_conv_bias(p * p * x.shape[-1]), name="proj")(x)
        return _layer_norm("norm", self.dtype)(x)


class ClassifierHead(nn.Module):
    num_classes: int
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return TimmDense(self.num_classes, dtype=self.dtype, precision=self.precision, name="fc")(x)


class SwinStage(nn.Module):
    """timm's SwinTransformerStage: optional PatchMerging, then blocks. Runs its units from `first` on."""

    dim: int
    num_heads: int
    geoms: tuple[BlockGeometry, ...]
    downsample: bool
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array, first: int, keeps: Mapping[int, Array], renormalize: bool,
                 last: int | None = None) -> tuple[Array, dict[str, Array]]:
        """Runs units `first` ... `last` (inclusive; None = to the end) of this stage, indexed over its units
        (downsample if any, then blocks); names are stage-local."""
        found = {}
        offset = int(self.downsample)
        if self.downsample and first == 0:
            x = PatchMerging(self.dim, self.dtype, self.precision, name="downsample")(x)
            found["downsample"] = x
        for b, geom in enumerate(self.geoms):
            if b + offset < first:
                continue
            if last is not None and b + offset > last:
                break
            x, parts = SwinBlock(self.dim, self.num_heads, geom, self.mlp_ratio, self.dtype, self.precision,
                                 name=f"blocks_{b}")(x, keeps.get(b), renormalize)
            found.update({f"blocks.{b}.{k}": v for k, v in parts.items()})
            found[f"blocks.{b}"] = x
        return x, found


class SwinTransformer(nn.Module):
    """timm's SwinTransformer (global average pool, LayerNorm eps 1e-5); see docs/design.md."""

    arch: str = "swin_tiny_patch4_window7_224"
    img_size: int = 224
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: tuple[int, ...] = (7, 7, 7, 7)  # target window per stage
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    dtype: Any = jnp.float32
    precision: Any = base.DEFAULT_PRECISION

    # ---- static structure ----
    def geometry(self) -> tuple[tuple[BlockGeometry, ...], ...]:
        windows = self.window_size
        if isinstance(windows, int):
            windows = (windows,) * len(self.depths)
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"num_heads {self.num_heads} needs one entry per stage of depths {self.depths}")
        return block_geometry(self.img_size, self.patch_size, tuple(self.depths), tuple(windows))

    def _stage_units(self) -> list[tuple[int, str]]:
        """(stage index or -1, global stage name) in forward order, without `head`."""
        units = [(-1, "patch_embed")]
        for s, depth in enumerate(self.depths):
            if s > 0:
                units.append((s, f"layers.{s}.downsample"))
            units += [(s, f"layers.{s}.blocks.{b}") for b in range(depth)]
        return units

    def info(self) -> ModelInfo:
        units = [name for _, name in self._stage_units()]
        blocks = [n for n in units if ".blocks." in n]
        captures = []
        for name in units:
            if name in blocks:
                captures += [f"{name}.attn.probs", f"{name}.attn", f"{name}.attn_res", f"{name}.mlp"]
            captures.append(name)
        sites = tuple(f"{n}.attn" for n in blocks)
        cfg = ARCHS[self.arch]["default_cfg"] if self.arch in ARCHS else {}
        grid = self.geometry()[0][0].grid
        return ModelInfo(name=self.arch, family="swin", num_classes=self.num_classes, img_size=self.img_size,
                         num_prefix_tokens=0, patch_grid=grid, stages=tuple(units) + ("head",),
                         mask_sites=sites, ablation_sites=sites,
                         capture_names=tuple(captures) + ("norm", "pre_logits"), default_cfg=dict(cfg))

    def _dims(self) -> list[int]:
        return [self.embed_dim * 2 ** s for s in range(len(self.depths))]

    def _input_shape(self, stage_index: int) -> tuple[int, int, int]:
        """Expected (H, W, C) of the input of stage `stage_index` (index into info().stages)."""
        units = self._stage_units()
        if stage_index == 0:
            return (self.img_size, self.img_size, 3)
        geoms, dims = self.geometry(), self._dims()
        if stage_index == len(units):  # head: output of the last block
            return (*geoms[-1][-1].grid, dims[-1])
        s, name = units[stage_index]
        if name.endswith("downsample"):
            return (*geoms[s - 1][-1].grid, dims[s - 1])
        return (*geoms[s][0].grid, dims[s])

    # ---- forward ----
    @nn.compact
    def __call__(self, x: Array, *, masks: Mapping[str, Array] | None = None, capture: tuple[str, ...] = (),
                 start: str | None = None, stop: str | None = None, renormalize: bool = False
                 ) -> tuple[Array, dict[str, Array]]:
        info = self.info()
        begin = base.check_start(start, info.stages)
        end = base.check_stop(stop, info.stages, begin)
        masks = base.check_masks(masks, info.mask_sites)
        base.check_masks_run(masks, lambda site: site.removesuffix(".attn"), info.stages, begin, start, end, stop)
        base.select_captures({}, capture, info.capture_names)  # fail on a bad pattern before computing
        if x.ndim != 4 or tuple(x.shape[1:]) != self._input_shape(begin):
            raise ValueError(f"{self.arch}: input of stage {info.stages[begin]!r} must be (B, "
                             f"{', '.join(map(str, self._input_shape(begin)))}), got {tuple(x.shape)}")
        geoms, dims = self.geometry(), self._dims()
        for site, keep in masks.items():
            s, b = int(site.split(".")[1]), int(site.split(".")[3])
            h, w = geoms[s][b].grid
            if keep.ndim != 2 or keep.shape[1] != h * w or keep.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"mask {site!r} must be (B, {h * w}) keep factors, got {keep.shape}")

        found: dict[str, Array] = {}
        x = x.astype(self.dtype)
        if begin == 0:
            x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, self.precision, name="patch_embed")(x)
            found["patch_embed"] = x
        for s, depth in enumerate(self.depths):
            # position of `start` among this stage's units (downsample if s > 0, then blocks)
            stage_begin = info.stages.index(f"layers.{s}.downsample" if s else "layers.0.blocks.0")
            local_first = max(0, begin - stage_begin)
            if end < stage_begin:
                break  # this stage and the next ones lie after `stop`
            if local_first >= depth + (s > 0):
                continue  # the whole stage lies before `start`
            keeps = {}
            for b in range(depth):
                keep = masks.get(f"layers.{s}.blocks.{b}.attn")
                if keep is not None:
                    keeps[b] = jnp.broadcast_to(jnp.asarray(keep, jnp.float32), (x.shape[0], keep.shape[1]))
            x, parts = SwinStage(dims[s], self.num_heads[s], geoms[s], s > 0, self.mlp_ratio, self.dtype,
                                 self.precision, name=f"layers_{s}")(x, local_first, keeps, renormalize,
                                                                     end - stage_begin)
            found.update({f"layers.{s}.{k}": v for k, v in parts.items()})
        if end < len(info.stages) - 1:  # `stop` before head: the output of stage `stop`
            return x, base.select_captures(found, capture, info.capture_names)

        x = _layer_norm("norm", self.dtype)(x)
        found["norm"] = x
        pooled = jnp.mean(x, axis=(1, 2))
        found["pre_logits"] = pooled
        out = pooled
        if self.num_classes:
            out = ClassifierHead(self.num_classes, self.dtype, self.precision, name="head")(pooled)
        return out, base.select_captures(found, capture, info.capture_names)
