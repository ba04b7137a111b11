"""Resampling of a learned absolute position embedding to another patch grid, exactly as timm does it.

timm (`timm.layers.resample_abs_pos_embed`, called by `checkpoint_filter_fn` when a ViT is created at another
image size than its weights) keeps the prefix-token entries as they are and resizes the patch entries, seen as a
(D, h, w) image, with `F.interpolate(mode='bicubic', antialias=True, align_corners=None)`. With `antialias=True`
torch uses its separable "anti-aliased" kernel (the one of PIL): Keys' cubic with a = -0.5, stretched by the
scale when downsampling, each output sample's weights cut to the input and renormalised to sum 1. This module is
that computation in NumPy (float64, then the input's dtype); no torch, no jax. Used once, at conversion / load
time (`weights/timm_keys/vit.py`), never inside a model.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (torch's anti-aliased bicubic filter uses a = -0.5)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def antialias_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of torch's `interpolate(mode='bicubic', antialias=True)` along one axis
    (align_corners=False, output size given, so scale = in_size / out_size)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0          # bicubic: interp_size 4 -> half-width 2
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)             # C++ int64 cast: truncation toward zero
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) * invscale)
        total = w.sum()
        weights[i, lo:hi] = w / total if total != 0.0 else w
    return weights


def resample_abs_pos_embed(posemb: np.ndarray, new_size: Sequence[int], old_size: Sequence[int] | None = None,
                           num_prefix_tokens: int = 1) -> np.ndarray:
    """(1, prefix + h*w, D) -> (1, prefix + H*W, D): timm's `resample_abs_pos_embed` (bicubic, antialias).

    `num_prefix_tokens` = the leading entries that are not on the grid (class / distillation / register
    entries; 0 for `no_embed_class` models, whose embedding covers the patches only); they are kept unchanged.
    `old_size` defaults to the square grid that holds the remaining entries. Same size in and out: returned
    unchanged (as timm).
    """
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"position embedding must have shape (1, N, D), got {posemb.shape}")
    new_size = (int(new_size[0]), int(new_size[1]))
    grid_tokens = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(max(grid_tokens, 0))
        if side * side != grid_tokens:
            raise ValueError(f"position embedding with {posemb.shape[1]} entries and {num_prefix_tokens} prefix "
                             f"entries does not hold a square grid ({grid_tokens} entries); pass old_size")
        old_size = (side, side)
    old_size = (int(old_size[0]), int(old_size[1]))
    if old_size[0] * old_size[1] != grid_tokens:
        raise ValueError(f"old grid {old_size} does not fit {grid_tokens} position entries")
    if old_size == new_size:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    grid = grid.astype(np.float64).reshape(*old_size, -1)                       # (h, w, D)
    wh = antialias_bicubic_weights(old_size[0], new_size[0])
    ww = antialias_bicubic_weights(old_size[1], new_size[1])
    out = np.einsum("ih,hwd,jw->ijd", wh, grid, ww).reshape(1, new_size[0] * new_size[1], -1)
    return np.concatenate([prefix, out.astype(posemb.dtype)], axis=1)
