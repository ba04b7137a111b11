"""Layer maps (receptive fields) for the explorers of report.html: average pooling to a page budget and log
quantisation to uint8, each map relative to its maximum. The explorers' scripts decode a value q as
M = map_max x 10^(-D (1 - (q - 1) / 254)), 0 for q = 0 (D = LOG_DECADES)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

LOG_DECADES = 5.0               # a map is stored as log10(M / max M) in [-LOG_DECADES, 0] on 1..255; 0 = below


def pool_factor(shapes: Sequence[Sequence[int]], budget: int) -> int:
    """The smallest integer factor f whose f x f average pooling brings maps of `shapes` ((L, H, W) each) within
    `budget` pixels in all."""
    pixels = sum(int(np.prod(s)) for s in shapes)
    f = 1
    while pixels / (f * f) > budget and f < min(min(s[1:]) for s in shapes):
        f += 1
    return f


def pooled(maps: np.ndarray, f: int) -> np.ndarray:
    """(L, H, W) -> (L, H // f, W // f) means over f x f blocks (a border narrower than f is left out)."""
    if f == 1:
        return np.asarray(maps, np.float64)
    l, h, w = maps.shape
    m = np.asarray(maps, np.float64)[:, :h - h % f, :w - w % f]
    return m.reshape(l, h // f, f, w // f, f).mean(axis=(2, 4))


def quantised(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, h, w) non-negative maps -> uint8 maps and the float32 maxima. Each map is stored relative to its
    maximum on a log scale, so a log colour scale shows its far, faint part as well as a linear one its
    peak: q = 1 + round(254 (log10(M / max M) + D) / D) with D = LOG_DECADES (within 2.3% of M), q = 0
    where M / max M <= 10^-D (and where M = 0)."""
    top = maps.reshape(len(maps), -1).max(axis=1)
    rel = np.asarray(maps, np.float64) / np.where(top > 0, top, 1.0)[:, None, None]
    with np.errstate(divide="ignore"):
        t = (np.log10(np.maximum(rel, 1e-300)) + LOG_DECADES) / LOG_DECADES
    q = np.where(rel > 10 ** -LOG_DECADES, 1 + np.rint(np.clip(t, 0.0, 1.0) * 254), 0).astype(np.uint8)
    return q, top.astype(np.float32)


def dequantised(q: np.ndarray, top: np.ndarray) -> np.ndarray:
    """The inverse of `quantised`, as the pages do it: (L, h, w) maps (0 where q = 0)."""
    q = np.asarray(q, np.float64)
    rel = np.where(q > 0, 10 ** (-LOG_DECADES * (1 - (q - 1) / 254)), 0.0)
    return rel * np.asarray(top, np.float64).reshape(-1, *([1] * (q.ndim - 1)))
