"""The attention distances of every attention block of a model, per image and summed over a dataset
(docs/science.md#attention-distance); shared by the sparsity and locality experiments.

    measures = block_measures(module, fraction, renormalize)   # static and cached: one per module and switch
    values = measures(aux)            # jitted device step: aux holds `measures.captures` -> (B, blocks, heads)
    per_image = measures.host_values(numpy values)             # each image's values, for exact ordered totals
    ... totals over the images (runtime.ordered.OrderedSums; names start with 'ad_') ...
    res = measures.results(totals)    # per block and head, NaN on padded heads, with the uniform references
    measures.rows(res)                # one CSV row per block and head

Swin stages have different head counts: the (B, blocks, heads) arrays are padded with zeros to the model's
largest head count, and `results` puts NaN there. With `renormalize`, the mean over images is a mean over every
query row kept (each image's mean weighted by its kept rows), so rows left out in one image do not reweight the
others; without it every image has the same rows and this is the plain mean over images.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.measures import attention_distance as ad
from vitsparse_jax.measures import locality

DEVICE_VALUES = ("distance", "distance_central", "prefix_mass", "prefix_mass_central", "entropy", "entropy_norm",
                 "skipped", "skipped_central")
MEANS = ("prefix_mass", "prefix_mass_central", "entropy", "entropy_norm")   # plain means over images
PREFIX = "ad_"    # names of the per-image values (and of their totals)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMeasures:
    """The attention blocks of one model, their static geometry and head counts, and the switch."""

    blocks: tuple[str, ...]                          # 'blocks.3', 'layers.1.blocks.0', forward order
    geometries: tuple[ad.AttentionGeometry, ...]
    heads: tuple[int, ...]                           # heads of each block
    fraction: float                                  # the central region's side (docs/science.md#receptive-fields)
    renormalize: bool

    @property
    def captures(self) -> tuple[str, ...]:
        return tuple(f"{b}.attn.probs" for b in self.blocks)

    @property
    def max_heads(self) -> int:
        return max(self.heads)

    def head_mask(self) -> np.ndarray:
        """(blocks, max_heads) bool: a real head (False: padding)."""
        return np.arange(self.max_heads)[None, :] < np.asarray(self.heads)[:, None]

    def queries(self, central: bool) -> np.ndarray:
        """(blocks,) the number of query rows averaged per image: patch queries, or the central ones."""
        return np.array([int((g.central if central else g.patch).sum()) for g in self.geometries], np.int64)

    # --- device (jnp, inside the jitted step) --------------------------------------------------------
    def __call__(self, aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The captured maps of every block -> {value: (B, blocks, max_heads)} (DEVICE_VALUES)."""
        per_block = [ad.attention_measures(aux[c], g, self.renormalize) for c, g in zip(self.captures, self.geometries)]
        pad = lambda x: jnp.pad(x, ((0, 0), (0, self.max_heads - x.shape[1])))  # noqa: E731
        return {k: jnp.stack([pad(m[k]) for m in per_block], axis=1) for k in DEVICE_VALUES}

    # --- host (numpy) ----------------------------------------------------------------------------------
    def host_values(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Each image's values (leading axis B) for the totals: distances times the rows kept and the rows kept
        (int), the means' values, the skipped rows (int)."""
        out: dict[str, np.ndarray] = {}
        for suffix, central in (("", False), ("_central", True)):
            skipped = np.asarray(values[f"skipped{suffix}"], np.int64)
            rows = self.queries(central)[None, :, None] - skipped
            distance = np.asarray(values[f"distance{suffix}"], np.float64)
            out[f"{PREFIX}distance{suffix}"] = np.where(rows > 0, distance, 0.0) * rows
            out[f"{PREFIX}rows{suffix}"] = rows
            out[f"{PREFIX}skipped{suffix}"] = skipped
        for name in MEANS:
            out[f"{PREFIX}{name}"] = np.asarray(values[name], np.float64)
        return out

    def image_rows(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Per-image outputs: each image's distances (B, blocks, max_heads) in pixels, float32 (padded heads: NaN)."""
        mask = self.head_mask()[None]
        return {f"attention_{k}": np.where(mask, np.asarray(values[k], np.float32), np.nan).astype(np.float32)
                for k in ("distance", "distance_central", "prefix_mass")}

    def results(self, totals: Mapping[str, np.ndarray], images: int) -> dict[str, Any]:
        """Totals of `host_values` over `images` images -> per block and head (blocks, max_heads), NaN on padded
        heads (and on distances of which every row was left out), plus each block's uniform references."""
        mask = self.head_mask()
        masked = lambda x: np.where(mask, np.asarray(x, np.float64), np.nan)  # noqa: E731
        side = np.array([g.image_side for g in self.geometries], np.float64)[:, None]
        res: dict[str, Any] = {"blocks": list(self.blocks), "heads": list(self.heads), "fraction": self.fraction,
                               "renormalize": self.renormalize, "images": int(images),
                               "grid": [list(g.grid) for g in self.geometries],
                               "token_px": [list(g.token_px) for g in self.geometries],
                               "image_side": [int(g.image_side) for g in self.geometries],
                               "queries": self.queries(False).tolist(), "central_queries": self.queries(True).tolist()}
        for suffix in ("", "_central"):
            rows = np.asarray(totals[f"{PREFIX}rows{suffix}"], np.float64)
            total = np.asarray(totals[f"{PREFIX}distance{suffix}"], np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                px = masked(np.where(rows > 0, total / np.where(rows > 0, rows, 1.0), np.nan))
            res[f"distance{suffix}_px"] = px
            res[f"distance{suffix}_rel"] = px / side
            res[f"skipped{suffix}"] = np.where(mask, totals[f"{PREFIX}skipped{suffix}"], 0).astype(np.int64)
        for name in MEANS:
            res[name] = masked(np.asarray(totals[f"{PREFIX}{name}"], np.float64) / max(int(images), 1))
        refs = [ad.uniform_reference(g) for g in self.geometries]
        res["uniform"] = {"distance_px": [r.distance for r in refs],
                          "distance_central_px": [r.distance_central for r in refs],
                          "entropy": [r.entropy for r in refs], "entropy_norm": [r.entropy_norm for r in refs]}
        return res


def head_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(blocks, heads) with NaN padding -> the mean, min and max over each block's heads (blocks,)."""
    v = np.asarray(values, np.float64)
    ok = ~np.isnan(v)
    count = ok.sum(axis=1)
    mean = np.where(count > 0, np.where(ok, v, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)
    lo = np.where(count > 0, np.where(ok, v, np.inf).min(axis=1), np.nan)
    hi = np.where(count > 0, np.where(ok, v, -np.inf).max(axis=1), np.nan)
    return mean, lo, hi


def rows(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per block and head of `BlockMeasures.results`: distances (px, / image side), prefix mass,
    entropy, skipped rows, and the block's uniform-map references."""
    out = []
    uniform = res["uniform"]
    for b, (block, heads) in enumerate(zip(res["blocks"], res["heads"])):
        for h in range(heads):
            row = {"block": block, "head": h, "grid": "x".join(map(str, res["grid"][b]))}
            row.update({k: res[k][b, h] for k in ("distance_px", "distance_central_px", "distance_rel",
                                                  "distance_central_rel", "prefix_mass", "prefix_mass_central",
                                                  "entropy", "entropy_norm")})
            out.append({**row, "skipped_rows": int(res["skipped"][b, h]),
                        "skipped_rows_central": int(res["skipped_central"][b, h]),
                        "uniform_distance_px": uniform["distance_px"][b],
                        "uniform_distance_central_px": uniform["distance_central_px"][b]})
    return out


def _heads(module: nn.Module, captures: tuple[str, ...]) -> tuple[int, ...]:
    """Each block's head count, from an abstract forward pass (ViT maps (B, heads, N, N); Swin (B, nW, heads, T, T))."""
    shapes = models.capture_shapes(module, captures)
    return tuple(int(shapes[c][1] if len(shapes[c]) == 4 else shapes[c][2]) for c in captures)


@functools.lru_cache(maxsize=32)
def block_measures(module: nn.Module, fraction: float = locality.DEFAULT_FRACTION, renormalize: bool = False,
                   blocks: tuple[str, ...] | None = None) -> BlockMeasures:
    """The measures of the attention blocks of a ViT or Swin module (`blocks`: these, in forward order; None =
    every one). Cached: a model's trained and untrained twins share one, and so the compiled programs that use it."""
    geoms = ad.geometries(module, fraction)
    if blocks is None:
        blocks = tuple(geoms)
    elif set(blocks) - set(geoms):
        raise ValueError(f"{sorted(set(blocks) - set(geoms))} are not attention blocks of "
                         f"{models.model_info(module).name}; its blocks: {', '.join(geoms)}")
    else:
        blocks = tuple(b for b in geoms if b in blocks)
    heads = _heads(module, tuple(f"{b}.attn.probs" for b in blocks))
    return BlockMeasures(blocks, tuple(geoms[b] for b in blocks), heads, float(fraction), bool(renormalize))
