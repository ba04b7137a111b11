"""The receptive-field pass's host step: each readable image's maps added into exact, ordered totals.

`MapTotals(layers, image_hw, images)` gives the pass its three functions:

    totals = MapTotals(len(layers), image_hw, len(source))
    init=totals.init                      # the accumulators (the resume state)
    host=totals.add                       # (maps (L, B, H, W), valid (B,), index (B,), acc) -> acc
    merge=totals.merge                    # two processes' accumulators (disjoint images) -> one
    readable=totals.count                 # readable images added so far
    ... totals.mean(acc)                  # after the pass: the mean map of each layer (L, H, W), float64

The maps are summed with `runtime.ordered.OrderedSums` in blocks of `BLOCK` images aligned to the image index,
so the sums are bitwise the same for any batch size, padding, device count or host split, and equal the
image-by-image float64 sums to rounding. The open block waits in the state as float32 maps (BLOCK x one image's
maps). A resume state of the per-image loop before (arrays `maps`, `count`) lacks these arrays and is refused by
the pass ("does not fit this run"), never misread.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from vitsparse_jax.runtime.ordered import OrderedSums

BLOCK = 2          # images per ordered block: the state holds one block of per-image maps (float32)


@dataclasses.dataclass(frozen=True)
class MapTotals:
    """Ordered sums of the per-image maps of `layers` layers (H, W) over `images` images."""

    layers: int
    image_hw: tuple[int, int]
    images: int
    dtype: Any = np.float32          # the maps' dtype as they come from the device (kept while they wait)

    @functools.cached_property
    def sums(self) -> OrderedSums:
        return OrderedSums({"maps": ((self.layers, *self.image_hw), np.dtype(self.dtype)),
                            "count": ((), np.dtype(np.int64))}, self.images, block=BLOCK, prefix="rf__")

    def init(self) -> dict[str, np.ndarray]:
        return {**self.sums.init(), "skipped": np.zeros((), np.int64)}

    def add(self, maps: np.ndarray, valid: np.ndarray, index: np.ndarray, acc: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
        """Adds a batch in place: maps (L, B, H, W) (each image's weighted maps, as the device gives them),
        valid (B,) (False: padding or an unreadable image), index (B,) global image indices (< 0: padding)."""
        maps, valid, index = np.asarray(maps), np.asarray(valid, bool), np.asarray(index)
        self.sums.add(acc, {"maps": np.moveaxis(maps, 1, 0), "count": valid.astype(np.int64)}, valid, index)
        acc["skipped"] = acc["skipped"] + np.sum((index >= 0) & ~valid)    # unreadable images: counted, not added
        return acc

    def merge(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Two accumulators of disjoint images (two processes' shares) -> the one of all their images, bitwise
        what one accumulator fed with all of them holds (`OrderedSums.merge`)."""
        return {**self.sums.merge(a, b), "skipped": a["skipped"] + b["skipped"]}

    def count(self, acc: dict[str, np.ndarray]) -> int:
        """Readable images added so far (exact at any time)."""
        return int(acc["rf__total__count"])

    def skipped(self, acc: dict[str, np.ndarray]) -> int:
        return int(acc["skipped"])

    def mean(self, acc: dict[str, np.ndarray]) -> np.ndarray:
        """The mean map of each layer (L, H, W), float64, once every image has been added."""
        total = self.sums.result(acc)
        return total["maps"] / max(int(total["count"]), 1)
