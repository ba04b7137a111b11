"""Locality of gradient receptive fields: central regions, radial profiles, S, the ring-mean radius
(docs/science.md#locality-summary), the mass-weighted distance and the uniform-map references
(docs/science.md#attention-distance).

Pure functions of shapes and numpy maps; no model code. Pixel (i, j) of an image has its centre at
(i + 0.5, j + 0.5) in continuous pixel coordinates; a cell (r, c) of a g_h x g_w grid laid over an
H x W image covers pixels [r H/g_h, (r+1) H/g_h) x [c W/g_w, (c+1) W/g_w).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

DEFAULT_FRACTION = 1.0 / 7.0  # 14x14 -> 2x2, 56x56 -> 8x8, 7x7 -> 1x1


@dataclasses.dataclass(frozen=True)
class Region:
    """The central block of a grid: rows [row0, row1), columns [col0, col1)."""

    grid: tuple[int, int]
    row0: int
    row1: int
    col0: int
    col1: int

    def centre_px(self, image_hw: tuple[int, int]) -> tuple[float, float]:
        """Centre of the region mapped to continuous input-pixel coordinates (y, x)."""
        (gh, gw), (h, w) = self.grid, image_hw
        return (self.row0 + self.row1) / 2 * h / gh, (self.col0 + self.col1) / 2 * w / gw

    def slice(self, y: Any) -> Any:
        """The region of a (B, g_h, g_w, C) map (numpy or jax)."""
        return y[:, self.row0:self.row1, self.col0:self.col1]


def check_fraction(fraction: float) -> float:
    """The relative side f of the central region; f must lie in (0, 1]."""
    f = float(fraction)
    if not (0.0 < f <= 1.0):  # also rejects NaN
        raise ValueError(f"receptive_field.fraction={fraction!r} leaves no central position: the side of the "
                         f"central region is the fraction f of each grid side, with 0 < f <= 1 "
                         f"(default 1/7: 14x14 -> 2x2)")
    return f


def central_side(n: int, fraction: float) -> int:
    """Side of the central part of a grid side of n positions: round(f * n) (halves up), at least 1."""
    if n < 1:
        raise ValueError(f"a grid side of {n} positions has no central part")
    return min(n, max(1, math.floor(check_fraction(fraction) * n + 0.5)))


def central_region(grid: tuple[int, int], fraction: float = DEFAULT_FRACTION) -> Region:
    """Central block of a g_h x g_w grid with sides round(f g), at least one position, centred
    (when g - side is odd the extra row/column is after the block)."""
    gh, gw = (int(g) for g in grid)
    sh, sw = central_side(gh, fraction), central_side(gw, fraction)
    r0, c0 = (gh - sh) // 2, (gw - sw) // 2
    return Region((gh, gw), r0, r0 + sh, c0, c0 + sw)


def pixel_distances(image_hw: tuple[int, int], centre: tuple[float, float]) -> np.ndarray:
    """(H, W) Euclidean distance of every pixel centre from `centre` (y, x)."""
    h, w = image_hw
    yy = np.arange(h, dtype=np.float64)[:, None] + 0.5 - centre[0]
    xx = np.arange(w, dtype=np.float64)[None, :] + 0.5 - centre[1]
    return np.sqrt(yy ** 2 + xx ** 2)


def radial_profile(m: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """E_r[M] for r = 0..floor(R): the mean of M over pixels at distance in [r, r+1) from `centre`.

    R = distance of the farthest pixel. Every bin up to floor(R) holds a pixel (neighbouring pixels
    differ in distance by at most 1), so no entry is empty.
    """
    m = np.asarray(m, np.float64)
    if m.ndim != 2:
        raise ValueError(f"a receptive-field map must be (H, W), got shape {m.shape}")
    bins = np.floor(pixel_distances(m.shape, centre)).astype(np.int64).ravel()
    sums = np.bincount(bins, weights=m.ravel())
    counts = np.bincount(bins)
    return sums / np.maximum(counts, 1)


def mass_weighted_distance(m: np.ndarray, centre: tuple[float, float]) -> float:
    """sum_x M(x) ||x - c|| / sum_x M(x) over the pixel centres x of a map M (H, W), c = `centre` (y, x).

    Unlike the ring-mean radius (a mean over rings, each ring's pixels averaged first), every pixel counts with
    its own mass, as every key counts with its attention weight in the mean attention distance. A map that is
    0 everywhere gives NaN.
    """
    m = np.asarray(m, np.float64)
    if m.ndim != 2:
        raise ValueError(f"a receptive-field map must be (H, W), got shape {m.shape}")
    total = float(np.sum(m))
    return float(np.sum(m * pixel_distances(m.shape, centre))) / total if total > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class UniformReference:
    """The receptive-field measures of a uniform map M = 1 on the same image and centre (reference lines)."""

    ring_mean_radius: float       # floor(R) / 2: every ring r = 0..floor(R) has the same E_r
    mass_weighted_distance: float  # the mean distance of the pixel centres from the centre


def uniform_reference(image_hw: tuple[int, int], centre: tuple[float, float]) -> UniformReference:
    """The uniform-map values of the ring-mean radius and the mass-weighted distance (224 px around the image
    centre: 78.5 px and 85.7 px)."""
    d = pixel_distances(image_hw, centre)
    return UniformReference(math.floor(float(d.max())) / 2, float(d.mean()))


@dataclasses.dataclass(frozen=True)
class Locality:
    s: float              # (1 / max M) * sum_r r E_r[M]
    mean_radius: float    # ring-mean radius sum_r r E_r / sum_r E_r (scale-free)
    max_m: float
    profile: np.ndarray   # E_r[M], r = 0..floor(R)
    mass_distance: float  # mass-weighted distance sum_x M(x) ||x - c|| / sum_x M(x) (scale-free)


def locality(m: np.ndarray, centre: tuple[float, float]) -> Locality:
    """The locality summary of one receptive-field map M (H, W) around `centre` (y, x) in pixels.

    A map that is 0 everywhere (no gradient reaches the input) gives NaN for S and both distances.
    """
    profile = radial_profile(m, centre)
    r = np.arange(len(profile), dtype=np.float64)
    max_m = float(np.max(m))
    moment = float(np.sum(r * profile))
    total = float(np.sum(profile))
    s = moment / max_m if max_m > 0 else float("nan")
    mean_radius = moment / total if total > 0 else float("nan")
    return Locality(s, mean_radius, max_m, profile, mass_weighted_distance(m, centre))
