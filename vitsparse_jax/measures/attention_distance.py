"""Mean attention distance, prefix mass and attention entropy per head (docs/science.md#attention-distance).

Two halves:
- a static geometry per attention block (`AttentionGeometry`, numpy, built once per model from its module:
  `geometries`, `vit_geometry`, `swin_geometry`): token positions in input pixels, which tokens are patches,
  which patch queries are central, which keys each query may attend to;
- `attention_measures(probs, geometry)`: jnp, for the jitted device step. One block's post-softmax maps ->
  per-image (B, heads) vectors, so only those leave the device.

Both families share one layout: windows of T tokens, (nW, T). A ViT block is one window of its N = prefix +
patch tokens (maps (B, heads, N, N)); a Swin block has nW windows of T = window tokens (maps (B, nW, heads, T,
T), `models.swin.window_token_index` gives each window column's token). Swin tokens sit at their true
(unrolled) positions: in a shifted window a query attends only to keys of its own region (timm's -100 mask),
and those keys have the same displacement in rolled and true coordinates.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.measures import locality
from vitsparse_jax.models import swin
from vitsparse_jax.models.base import ModelInfo

Array = jax.Array
MIN_PATCH_MASS = 1e-6   # renormalize=True skips (and counts) query rows whose patch-key mass is below this


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionGeometry:
    """The static layout of one attention block's maps (numpy; see the module docstring)."""

    positions: np.ndarray   # (nW, T, 2) float64: (y, x) centre of each token in input pixels; prefix tokens: 0
    patch: np.ndarray       # (nW, T) bool: a patch token (False: class, distillation and register tokens)
    central: np.ndarray     # (nW, T) bool: a patch token of the central region (locality.central_region)
    group: np.ndarray       # (nW, T) int64: a query attends only to keys of its own group (shifted windows)
    grid: tuple[int, int]   # the block's patch-token grid (g_h, g_w)
    token_px: tuple[float, float]   # pixels per token (y, x): the ViT patch, the Swin stage patch
    image_side: int         # input pixels

    @property
    def windows(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_keys(self) -> int:
        """N of the entropy's log N: prefix + patch tokens (ViT), the window's tokens (Swin)."""
        return int(self.positions.shape[1])

    def counted_keys(self) -> np.ndarray:
        """(nW, T, T) bool: key j counts for query i's distance (a patch key of i's group)."""
        return self.patch[:, None, :] & (self.group[:, :, None] == self.group[:, None, :])

    def distances(self) -> np.ndarray:
        """(nW, T, T) float64 pixel distance between the tokens of each window."""
        diff = self.positions[:, :, None, :] - self.positions[:, None, :, :]
        return np.sqrt(np.sum(diff ** 2, axis=-1))


# ---------------------------------------------------------------------------------------------------------
# Geometry builders (numpy, once per model and block)

def _grid_positions(rows: np.ndarray, cols: np.ndarray, token_px: tuple[float, float]) -> np.ndarray:
    """Token centres in pixels: p * (index + 1/2) on each axis."""
    return np.stack([(rows + 0.5) * token_px[0], (cols + 0.5) * token_px[1]], axis=-1).astype(np.float64)


def _central(rows: np.ndarray, cols: np.ndarray, region: locality.Region) -> np.ndarray:
    return (rows >= region.row0) & (rows < region.row1) & (cols >= region.col0) & (cols < region.col1)


def vit_geometry(info: ModelInfo, fraction: float = locality.DEFAULT_FRACTION) -> AttentionGeometry:
    """Every block of a ViT: N = prefix + g_h g_w tokens in one window, prefix tokens first."""
    if info.family != "vit":
        raise ValueError(f"{info.name} is a {info.family} model, not a ViT")
    (gh, gw), prefix, side = info.patch_grid, info.num_prefix_tokens, info.img_size
    token_px = (side / gh, side / gw)
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    positions = np.zeros((1, prefix + gh * gw, 2))
    positions[0, prefix:] = _grid_positions(rows, cols, token_px)
    patch = np.zeros((1, prefix + gh * gw), bool)
    patch[0, prefix:] = True
    central = np.zeros_like(patch)
    central[0, prefix:] = _central(rows, cols, locality.central_region((gh, gw), fraction))
    return AttentionGeometry(positions, patch, central, np.zeros(patch.shape, np.int64), (gh, gw), token_px, side)


def swin_geometry(module: nn.Module, stage: int, block: int,
                  fraction: float = locality.DEFAULT_FRACTION) -> AttentionGeometry:
    """Block `layers.{stage}.blocks.{block}` of a Swin: its windows, tokens at their true positions on the
    stage's grid (stage patch = image side / grid side), grouped by the regions of a shifted window."""
    info = models.model_info(module)
    if info.family != "swin":
        raise ValueError(f"{info.name} is a {info.family} model, not a Swin")
    geom = module.geometry()[stage][block]
    (gh, gw), (wh, ww), side = geom.grid, geom.window, info.img_size
    token_px = (side / gh, side / gw)
    index = swin.window_token_index(module, stage, block)           # (nW, T) raster index, shift undone
    rows, cols = np.divmod(index, gw)
    local_rows, local_cols = np.divmod(np.arange(wh * ww), ww)       # position inside the (rolled) window
    # tokens of one window that wrapped around the map have another offset true - local: another region
    dr, dc = rows - local_rows, cols - local_cols
    group = (dr + gh) * (2 * gw + 1) + (dc + gw)
    region = locality.central_region((gh, gw), fraction)
    return AttentionGeometry(_grid_positions(rows, cols, token_px), np.ones(index.shape, bool),
                             _central(rows, cols, region), group.astype(np.int64), (gh, gw), token_px, side)


def attention_blocks(info: ModelInfo) -> tuple[str, ...]:
    """The blocks with attention maps, forward order ('blocks.3', 'layers.1.blocks.0'); their maps are the
    captures f'{block}.attn.probs'."""
    if info.family not in ("vit", "swin"):
        raise ValueError(f"{info.name} is a {info.family} model: it has no attention maps")
    return tuple(site.removesuffix(".attn") for site in info.mask_sites if site.endswith(".attn"))


def geometries(module: nn.Module, fraction: float = locality.DEFAULT_FRACTION) -> dict[str, AttentionGeometry]:
    """Block name -> geometry for every attention block of a ViT or Swin module (ViT blocks share one)."""
    info = models.model_info(module)
    blocks = attention_blocks(info)
    if info.family == "vit":
        geom = vit_geometry(info, fraction)
        return {name: geom for name in blocks}
    return {name: swin_geometry(module, int(name.split(".")[1]), int(name.split(".")[3]), fraction)
            for name in blocks}


# ---------------------------------------------------------------------------------------------------------
# Device side (jnp, inside the jitted step)

def _as_windows(probs: Array, geom: AttentionGeometry) -> Array:
    """ViT (B, heads, N, N) or Swin (B, nW, heads, T, T) -> (B, nW, heads, T, T), checked against `geom`."""
    nw, t = geom.windows, geom.num_keys
    if probs.ndim == 4 and nw == 1 and probs.shape[2:] == (t, t):
        return probs[:, None]
    if probs.ndim == 5 and probs.shape[1] == nw and probs.shape[3:] == (t, t):
        return probs
    expected = f"(B, heads, {t}, {t})" if nw == 1 else f"(B, {nw}, heads, {t}, {t})"
    raise ValueError(f"attention maps of shape {tuple(probs.shape)} do not fit the block's geometry: expected "
                     f"{expected}")


def _query_mean(rows: Array, queries: np.ndarray) -> Array:
    """(B, nW, heads, T) row values -> (B, heads) mean over the query rows where `queries` (nW, T) is True."""
    weight = jnp.asarray(queries, rows.dtype)[None, :, None, :]
    return jnp.sum(rows * weight, axis=(1, 3)) / max(int(queries.sum()), 1)


def attention_measures(probs: Array, geom: AttentionGeometry, renormalize: bool = False) -> dict[str, Array]:
    """One block's post-softmax maps -> per image and head (B, heads):

    - `distance`, `distance_central`: mean attention distance in pixels, sum_j a_ij ||pos_i - pos_j|| over the
      patch keys j of query i's group, averaged over all patch queries / the central ones. Prefix keys add no
      distance and rows are not renormalised; with `renormalize` (static) each row's sum is divided by its
      patch-key mass first, and rows with a mass below MIN_PATCH_MASS are left out (a set without rows: NaN);
    - `distance_rel`, `distance_central_rel`: the same divided by the image side;
    - `prefix_mass`, `prefix_mass_central`: attention on the prefix keys (0 without prefix tokens);
    - `entropy`: -sum_j a_ij log a_ij over every key of the row (0 log 0 = 0), nats, mean over patch queries;
      `entropy_norm`: divided by log N (N = keys per row; NaN if N = 1);
    - `skipped`, `skipped_central` (int32): rows left out by `renormalize` (0 without it).
    """
    a = _as_windows(probs, geom).astype(jnp.float32)                      # (B, nW, heads, T, T)
    pos = jnp.asarray(geom.positions, jnp.float32)                         # (nW, T, 2), small: built in-graph
    dist = jnp.sqrt(jnp.sum((pos[:, :, None, :] - pos[:, None, :, :]) ** 2, axis=-1))
    group = jnp.asarray(geom.group)
    patch = jnp.asarray(geom.patch)
    counted = (patch[:, None, :] & (group[:, :, None] == group[:, None, :])).astype(jnp.float32)
    counted_a = a * counted[None, :, None]
    row_distance = jnp.sum(counted_a * dist[None, :, None], axis=-1)        # (B, nW, heads, T)
    row_prefix = jnp.sum(a * (~patch).astype(jnp.float32)[None, :, None, None, :], axis=-1)
    row_entropy = -jnp.sum(jax.scipy.special.xlogy(a, a), axis=-1)
    if renormalize:
        mass = jnp.sum(counted_a, axis=-1)                                  # the row's patch-key mass
        kept = mass >= MIN_PATCH_MASS
        ratio = jnp.where(kept, row_distance / jnp.where(kept, mass, 1.0), 0.0)
    out: dict[str, Array] = {}
    for suffix, queries in (("", geom.patch), ("_central", geom.central)):
        if renormalize:
            q = jnp.asarray(queries)[None, :, None, :]
            rows = jnp.sum(jnp.where(q & kept, 1.0, 0.0), axis=(1, 3))      # 0 rows: 0 / 0 = NaN
            out[f"distance{suffix}"] = jnp.sum(jnp.where(q, ratio, 0.0), axis=(1, 3)) / rows
            out[f"skipped{suffix}"] = jnp.sum(q & ~kept, axis=(1, 3)).astype(jnp.int32)
        else:
            out[f"distance{suffix}"] = _query_mean(row_distance, queries)
            out[f"skipped{suffix}"] = jnp.zeros(a.shape[:1] + a.shape[2:3], jnp.int32)
        out[f"distance{suffix}_rel"] = out[f"distance{suffix}"] / geom.image_side
        out[f"prefix_mass{suffix}"] = _query_mean(row_prefix, queries)
    out["entropy"] = _query_mean(row_entropy, geom.patch)
    out["entropy_norm"] = out["entropy"] / (math.log(geom.num_keys) if geom.num_keys > 1 else float("nan"))
    return out


# ---------------------------------------------------------------------------------------------------------
# Uniform-map references (numpy)

@dataclasses.dataclass(frozen=True)
class UniformAttention:
    """The measures of a map whose every row is uniform over its counted keys (the patch keys of its group)."""

    distance: float           # pixels, all patch queries
    distance_central: float   # pixels, central queries
    entropy: float            # nats: mean over patch queries of log(counted keys)
    entropy_norm: float       # divided by log N


def uniform_map(geom: AttentionGeometry) -> np.ndarray:
    """(nW, T, T) float64: every row uniform over its counted keys (add batch and head axes to measure it)."""
    keys = geom.counted_keys().astype(np.float64)
    return keys / np.maximum(keys.sum(axis=-1, keepdims=True), 1.0)


def uniform_reference(geom: AttentionGeometry) -> UniformAttention:
    """Reference values for the figures (224 px, 14x14 ViT: 116.5 px over all queries, 86.0 px central)."""
    keys = geom.counted_keys()
    row_distance = np.sum(geom.distances() * keys, axis=-1) / np.maximum(keys.sum(axis=-1), 1)
    row_entropy = np.log(np.maximum(keys.sum(axis=-1), 1))
    entropy = float(row_entropy[geom.patch].mean())
    return UniformAttention(float(row_distance[geom.patch].mean()), float(row_distance[geom.central].mean()),
                            entropy, entropy / math.log(geom.num_keys) if geom.num_keys > 1 else float("nan"))
