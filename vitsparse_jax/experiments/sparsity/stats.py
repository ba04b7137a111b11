"""Statistics of attention and channel sparsity (docs/science.md#attention-maps and
#sparsity-statistics), in streaming form.

Device side (jnp, jit-able): the reduction of each image's maps to per-image vectors: column means mu
(with their float32 rounding error, so the host knows them to float64 accuracy) or channel l1 scores.
Host side (numpy, float64): every statistic of each image of a batch (`attention_image_values`,
`channel_image_values`, vectorised over images and layers), then ordered totals (`totals_for`:
`runtime.ordered.OrderedSums`) add them in fixed blocks of images aligned to the dataset index (sums, and
pooled co-moments merged with Chan et al.'s update). Memory does not grow with the number of images; and
since each image's values and the order of the additions depend only on the image indices, the totals are
the same for any batch size, device count or number of hosts, to the last bit.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax.measures.units import count
from vitsparse_jax.runtime.ordered import OrderedSums

Array = jax.Array
Pair = tuple[Array, Array]   # a float32 mean and its rounding error (`mean_with_error`)
TINY = float(np.finfo(np.float32).tiny)   # mu below this (an underflowed softmax) counts as TINY in nu
NU_TINY = float(-np.log10(np.full(8, TINY))[0])   # nu of mu <= TINY


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a top fraction must be in (0, 1], got {fraction}")
    return fraction


def num_top(fraction: float, units: int) -> int:
    """k = round(fraction * units), the ablation's count (docs/science.md#ablation-units: 0.05 * 196 -> 10,
    0.05 * 49 -> 2).

    A fraction that gives k = 0 is an error.
    """
    k = count(check_fraction(fraction), units)
    if k < 1:
        raise ValueError(f"top fraction {fraction} of {units} units is round({fraction * units:g}) = 0 units; "
                         "use a larger fraction")
    return k


# ---------------------------------------------------------------------------------------------------------
# Attention maps -> column means

def mean_with_error(x: Array, axis: tuple[int, ...]) -> tuple[Array, Array]:
    """float32 mean over `axis` and its rounding error: (hi, lo), hi + lo = the mean to about float64 accuracy
    when the values lie close to their mean (nearly uniform attention, where hi alone loses the spread)."""
    hi = jnp.mean(x, axis=axis)
    return hi, jnp.mean(x - jnp.expand_dims(hi, axis), axis=axis)


def attention_column_means(probs: Array) -> tuple[Array, Array]:
    """ViT maps (B, H, N, N), rows = queries -> mu (B, N) and per-head mu_h (B, H, N) (science.md#attention-maps)."""
    mu_h = jnp.mean(probs, axis=2)
    return jnp.mean(mu_h, axis=1), mu_h


def attention_column_means_split(probs: Array) -> tuple[Pair, Pair]:
    """As `attention_column_means`, each as a `mean_with_error` pair: ((mu, err) (B, N), (mu_h, err) (B, H, N))."""
    return mean_with_error(probs, (1, 2)), mean_with_error(probs, (2,))


def window_column_means(probs: Array, token_index: np.ndarray) -> tuple[Array, Array]:
    """Swin window maps (B, nW, heads, T, T) -> mu (B, HW), mu_h (B, heads, HW) over the block's input tokens.

    mu of token j = mean over heads and over the query rows of the window that holds j
    (docs/science.md#swin-units); `token_index` (nW, T) is the raster index of each window column (shift undone), from
    `models.swin.window_token_index`. Each window's columns sum to 1, so sum_j mu_j = nW.
    """
    (mu, _), (mu_h, _) = window_column_means_split(probs, token_index)
    return mu, mu_h


def window_column_means_split(probs: Array, token_index: np.ndarray) -> tuple[Pair, Pair]:
    """As `window_column_means`, each as a `mean_with_error` pair."""
    _, nw, _, t, _ = probs.shape
    order = np.argsort(np.asarray(token_index).reshape(-1))                              # window -> raster order
    if order.size != nw * t:
        raise ValueError(f"token_index of shape {np.shape(token_index)} does not fit maps {probs.shape}")

    def raster(x: Array) -> Array:   # (B, nW, [heads,] T) -> (B, [heads,] HW)
        x = jnp.moveaxis(x, 1, -2) if x.ndim == 4 else x
        return x.reshape(*x.shape[:-2], nw * t)[..., order]

    mu, mu_h = mean_with_error(probs, (2, 3)), mean_with_error(probs, (3,))
    return tuple(raster(x) for x in mu), tuple(raster(x) for x in mu_h)


def channel_l1(act: Array) -> Array:
    """Post-ReLU map (B, H, W, C) -> per-channel l1 score (B, C) = sum over positions of |a| (science.md#cnn-units)."""
    return jnp.sum(jnp.abs(act.astype(jnp.float32)), axis=(1, 2))


def active_fraction(act: Array) -> Array:
    """Post-ReLU map (B, H, W, C) -> the share of its positive activations (B,)."""
    return jnp.mean((act > 0).astype(jnp.float32), axis=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------------
# Host side, per image (numpy, float64): each function maps a batch's per-image inputs (leading axis B, units
# on the last axis, any axes between) to per-image values, vectorised over images and layers; nothing here
# mixes two images, so each image's values are the same whatever batch it came in.

def shares(scores: np.ndarray) -> np.ndarray:
    """Scores (B, U) -> each unit's share of the image's total (rows sum to 1; all-zero rows stay 0)."""
    total = scores.sum(axis=-1, keepdims=True)
    return np.where(total > 0, scores / np.where(total > 0, total, 1.0), 0.0)


def nu_of(mu: np.ndarray) -> np.ndarray:
    """nu = -log10(mu), with mu floored at the smallest normal float32 (an exact 0 gives 37.9)."""
    return -np.log10(np.maximum(mu, TINY))


def bin_index(values: np.ndarray, lo: float, hi: float, bins: int, offset: np.ndarray | int = 0,
              negated: bool = False) -> np.ndarray:
    """The histogram bin of each value (same shape, int32): 0 = below lo, 1..bins = the equal bins of [lo, hi),
    bins + 1 = at or above hi; plus `offset` (e.g. layer l's bins start at l * (bins + 2)). The totals count
    them (`OrderedSums(..., bins=...)`). negated: the bins of -values (the same bits as negating first)."""
    scale = bins / (hi - lo)
    if negated:   # (-v - lo) * s == (v + lo) * -s exactly
        pos = np.multiply(np.add(values, lo) if lo else values, -scale)
    else:
        pos = np.multiply(np.subtract(values, lo) if lo else values, scale)
    np.floor(pos, out=pos)
    np.clip(pos, -1, bins, out=pos)
    pos += np.asarray(offset, np.float64) + 1.0
    return pos.astype(np.int32)


def histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts (..., bins + 2) int64 of values (..., U) in the bins of `bin_index`."""
    rows = np.arange(values.size // max(values.shape[-1], 1)).reshape(values.shape[:-1] + (1,)) * (bins + 2)
    counts = np.bincount(bin_index(values, lo, hi, bins, rows).reshape(-1), minlength=rows.size * (bins + 2))
    return counts.reshape(values.shape[:-1] + (bins + 2,)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Ranked:
    """The rows (..., U) of an array sorted ascending along the last axis (ties in any order): `values` sorted,
    and `flat`, the index of each in the flattened array (`x.reshape(-1)[flat] == values`), or `carried`, the
    entries of another array that went along with the sort."""

    values: np.ndarray
    flat: np.ndarray | None                 # None: sorted values only (`ranks` unavailable)
    maybe_tied: np.ndarray | None = None   # bool (...): rows that may hold equal values (None: not known)
    carried: np.ndarray | None = None      # `of(x, carry)`: carry's entry of each sorted value

    @classmethod
    def of(cls, x: np.ndarray, carry: np.ndarray | None = None) -> Ranked:
        """Sorts the rows of `x` (float). Fast path: one integer sort of (float32 bits of x, flat index) keys,
        then a check that the rows came out sorted; rows that did not (float64 values equal in float32, NaNs)
        are sorted again with argsort. carry (float32 x only): integers in [0, 2^32) shaped like x, sorted
        along in place of the flat index (`carried`; `flat` is then None)."""
        x = np.ascontiguousarray(x)
        u = x.shape[-1]
        if (not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize > 8 or u < 2 or x.size >= 2 ** 32
                or sys.byteorder != "little"):
            order = np.argsort(x, axis=-1)
            carried = None if carry is None else np.take_along_axis(np.asarray(carry), order, axis=-1)
            flat = order.reshape(-1) + _row_starts(x.shape)
            return cls(x.reshape(-1)[flat].reshape(x.shape), None if carry is not None else flat, None, carried)
        if carry is not None and x.dtype != np.float32:
            raise ValueError(f"only float32 rows carry values along their sort, got {x.dtype}")
        words = np.empty((*x.shape, 2), np.uint32)                  # int64 keys as (low, high) 32-bit words
        words[..., 0] = _flat_index(x.shape) if carry is None else carry   # low: ties in float32 by it
        words.view(np.float32)[..., 1] = x                           # high: the float32 bits of x
        bits = words.view(np.int32)[..., 1]
        negative = bool(bits.min() < 0)
        if negative:                                                 # negative floats: reverse their bit order
            np.bitwise_xor(bits, 0x7FFFFFFF, out=bits, where=bits < 0)
        keys = words.view(np.int64)[..., 0]
        keys.sort(axis=-1)
        flat = carried = None
        if carry is None:
            flat = (keys & 0xFFFFFFFF).reshape(-1)                   # the flat index of each sorted value
        else:
            carried = words[..., 0]                                  # (a view: read once)
        if x.dtype == np.float32:                                    # the sorted high words are the values
            if negative:
                np.bitwise_xor(bits, 0x7FFFFFFF, out=bits, where=bits < 0)
            values = np.ascontiguousarray(words.view(np.float32)[..., 1])
        else:
            values = np.take(x.reshape(-1), flat).reshape(x.shape)
        maybe_tied = ~(values[..., 1:] > values[..., :-1]).all(axis=-1)   # not strictly increasing
        if maybe_tied.any():
            rows = np.flatnonzero(maybe_tied.reshape(-1))
            x2, values2 = x.reshape(-1, u), values.reshape(-1, u)
            rows = rows[~(values2[rows, 1:] >= values2[rows, :-1]).all(axis=-1)]   # out of order (or NaN)
            order = np.argsort(x2[rows], axis=-1)
            if carry is None:
                flat.reshape(-1, u)[rows] = order + (rows * u)[:, None]
            else:
                words.reshape(-1, u, 2)[rows, :, 0] = np.take_along_axis(np.asarray(carry).reshape(-1, u)[rows], order,
                                                                         axis=-1)
            values2[rows] = np.take_along_axis(x2[rows], order, axis=-1)
        return cls(values, flat, maybe_tied, carried)

    def tied(self) -> np.ndarray:
        """Bool (...): the rows that may hold equal values (or NaNs)."""
        if self.maybe_tied is not None:
            return self.maybe_tied
        xs = self.values
        return ~(xs[..., 1:] != xs[..., :-1]).all(axis=-1)

    def sorted_ranks(self, rows: np.ndarray, centre: float = 0.0) -> np.ndarray:
        """Average ranks minus `centre` of the sorted values of the rows `rows` (indices of the flattened rows):
        (R, U), in sorted order (ties share the mean of their positions; NaNs each get their own)."""
        u = self.values.shape[-1]
        xs = self.values.reshape(-1, u)[rows]
        first = np.ones(xs.shape, bool)
        first[:, 1:] = xs[:, 1:] != xs[:, :-1]
        last = np.ones(xs.shape, bool)
        last[:, :-1] = first[:, 1:]
        at = np.arange(u)
        start = np.maximum.accumulate(np.where(first, at, 0), axis=-1)
        end = np.minimum.accumulate(np.where(last, at + 1, u)[:, ::-1], axis=-1)[:, ::-1]
        return (start + end + 1) / 2.0 - centre

    def ranks(self, centre: float = 0.0) -> np.ndarray:
        """Average ranks (1..U) in the original places, minus `centre`: ties share their average rank (as
        scipy.stats.rankdata; NaNs, unequal to everything, each get their own)."""
        xs, u = self.values, self.values.shape[-1]
        ranks = np.empty(xs.shape, np.float64)
        ranks.reshape(-1)[self.flat] = _positions(xs.shape, centre)   # 1..U - centre in sorted order
        tied = np.flatnonzero(self.tied().reshape(-1))
        if tied.size:   # rows with ties: each tie group gets the mean of its positions
            ranks.reshape(-1)[self.flat.reshape(-1, u)[tied]] = self.sorted_ranks(tied, centre)
        return ranks

    def places(self) -> np.ndarray:
        """Each value's place (0..U-1) in its sorted row, in the original places (the inverse of the sort), uint32."""
        shape = self.values.shape
        out = np.empty(shape, np.uint32)
        out.reshape(-1)[self.flat] = _columns(shape)
        return out

    def median(self) -> np.ndarray:
        """np.median along the last axis (NaN where a row holds a NaN)."""
        xs, u = self.values, self.values.shape[-1]
        half = xs[..., u // 2].astype(np.float64)
        mid = half if u % 2 else (xs[..., u // 2 - 1].astype(np.float64) + half) / 2   # in float64
        return np.where(np.isnan(xs[..., -1]), np.nan, mid)   # NaNs sort last

    def top(self, x: np.ndarray, k: int) -> np.ndarray:
        """Bool (..., U): the k largest values of each row of `x` (the array sorted here), ties to the lower
        index (as a stable argsort of -x)."""
        return top_mask_of_sorted(x, self.values, k)


@functools.lru_cache(maxsize=16)
def _row_starts(shape: tuple[int, ...]) -> np.ndarray:
    """Flat index of the first element of each row (last axis) of a C-contiguous array, repeated along the row."""
    u = shape[-1]
    starts = np.repeat(np.arange(int(np.prod(shape[:-1], dtype=np.int64))) * u, u)
    starts.flags.writeable = False
    return starts


@functools.lru_cache(maxsize=16)
def _flat_index(shape: tuple[int, ...]) -> np.ndarray:
    """0, 1, ... (the flat index of each element of an array of `shape`, below 2^32), uint32 of that shape,
    read-only."""
    index = np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.uint32).reshape(shape)
    index.flags.writeable = False
    return index


@functools.lru_cache(maxsize=16)
def _columns(shape: tuple[int, ...]) -> np.ndarray:
    """0..U-1 on every row of an array of `shape`, uint32, flat and read-only."""
    out = np.tile(np.arange(shape[-1], dtype=np.uint32), int(np.prod(shape[:-1], dtype=np.int64)))
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=16)
def _positions(shape: tuple[int, ...], centre: float) -> np.ndarray:
    """1..U - centre on every row of an array of `shape`, flat and read-only."""
    out = np.tile(np.arange(1, shape[-1] + 1, dtype=np.float64) - centre, int(np.prod(shape[:-1], dtype=np.int64)))
    out.flags.writeable = False
    return out


def count_true(mask: np.ndarray) -> np.ndarray:
    """np.count_nonzero(mask, axis=-1) of a bool array, int64 (summed as bytes: about twice as fast)."""
    small = mask.shape[-1] < 2 ** 16
    return np.add.reduce(mask.view(np.uint8), axis=-1, dtype=np.uint16 if small else np.int64).astype(np.int64)


def top_mask_of_sorted(x: np.ndarray, xs: np.ndarray, k: int) -> np.ndarray:
    """Bool (..., U): the k largest values of each row of `x` (`xs`: its rows sorted), ties to the lower index
    (as a stable argsort of -x)."""
    kth = xs[..., -k, None]                                      # the k-th largest value
    top = x >= kth
    extra = count_true(top) != k                                 # rows with ties at the k-th value
    if extra.any():
        row_x, row_kth = x[extra], kth[extra]
        tied = row_x == row_kth
        need = k - (row_x > row_kth).sum(axis=-1, keepdims=True)
        top[extra] = (row_x > row_kth) | (tied & (np.cumsum(tied, axis=-1) <= need))
    return top


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1..U) along the last axis, ties sharing their average rank (as scipy.stats.rankdata)."""
    return Ranked.of(x).ranks()


def top_k_indicator(scores: np.ndarray, k: int) -> np.ndarray:
    """(..., U) int64: 1 where a unit is among the k largest scores of its image (ties to the lower index)."""
    return top_mask_of_sorted(scores, np.sort(scores, axis=-1), k).astype(np.int64)


def top_shares_of_sorted(xs: np.ndarray, ks: Sequence[int], total: np.ndarray | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """`top_shares` from rows sorted ascending (`total`: their sums, if known)."""
    total = xs.sum(axis=-1) if total is None else total
    ok = total > 0
    top = np.stack([xs[..., xs.shape[-1] - k:].sum(axis=-1) for k in ks], axis=-1)
    return np.where(ok[..., None], top / np.where(ok, total, 1.0)[..., None], 0.0), ok.astype(np.float64)


def top_shares(scores: np.ndarray, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the share of its total score held by its top-k units for each k: ((..., len(ks)), ok (...)).

    Images whose scores are all zero (a dead layer) have no share: ok = 0 and share 0.
    """
    return top_shares_of_sorted(np.sort(scores, axis=-1), ks)


def moments(x: np.ndarray, weights: np.ndarray | None = None, sums: np.ndarray | None = None
            ) -> dict[str, np.ndarray]:
    """Per-image moments of K variables observed on U units: x (..., K, U), weights (..., U) of 0/1 (None =
    all). Returns n (...), mean (..., K) and the centred co-moment cm (..., K, K) = sum_u (x - mean)(x -
    mean)^T, in float64 (two passes, so nearly constant values keep their spread). The totals pool images
    with Chan et al.'s update into one Pearson r over all (image, unit) pairs. sums: x.sum(axis=-1), when
    known (no weights)."""
    x = np.asarray(x, np.float64)
    if weights is None:
        n = np.full(x.shape[:-2], float(x.shape[-1]))
        mean = (x.sum(axis=-1) if sums is None else sums) / max(x.shape[-1], 1)
        xc = x - mean[..., None]
    else:
        w = np.asarray(weights, np.float64)[..., None, :]
        n = w[..., 0, :].sum(axis=-1)
        mean = (x * w).sum(axis=-1) / np.maximum(n, 1.0)[..., None]
        xc = (x - mean[..., None]) * w                          # w is 0 or 1, so w^2 = w
    xt = np.ascontiguousarray(np.swapaxes(xc, -1, -2))          # (..., U, K): faster products than a strided view
    return {"n": n, "mean": mean, "cm": np.matmul(xc, xt)}


def image_moments(x: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`moments` of x (B, U, K) (units before variables), weights (B, U)."""
    return moments(np.swapaxes(np.asarray(x, np.float64), -1, -2), weights)


def nu_moments(mu: np.ndarray) -> dict[str, np.ndarray]:
    """Moments of nu over the positive mu (..., U) of each image (n (...), mean (..., 1), cm (..., 1, 1)) and
    the number of zero mu (left out: their nu is infinite)."""
    return nu_values(mu)[0]


def nu_values(mu: np.ndarray, smallest: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(`nu_moments` of mu (..., U), log10 of mu floored at TINY = -`nu_of(mu)`), from one logarithm, the
    same bits as computing nu first. smallest: each row's smallest mu, when known (no mask is needed when no
    mu is 0, NaN or below TINY)."""
    u = mu.shape[-1]
    if smallest is not None and bool((smallest >= TINY).all()):   # every mu > 0 (NaN compares False)
        lg = np.log10(mu)
        n = np.full(mu.shape[:-1], float(u))
        mean = lg.sum(axis=-1) / max(u, 1)                      # of log10(mu) = -nu: the same sums, negated
        xc = np.subtract(lg, mean[..., None])
        floored = lg
    else:
        pos = mu > 0
        lg = np.log10(np.where(pos, mu, 1.0))                   # 0 where mu = 0: adds nothing below
        n = np.count_nonzero(pos, axis=-1).astype(np.float64)
        mean = lg.sum(axis=-1) / np.maximum(n, 1.0)
        xc = np.subtract(lg, mean[..., None])
        xc *= pos
        floored = np.where(mu >= TINY, lg, -NU_TINY)            # nu_of floors mu at TINY
    moments_ = {"n": n, "mean": np.negative(mean)[..., None],
                "cm": np.einsum("...i,...i->...", xc, xc)[..., None, None], "zeros": u - n}
    return moments_, floored


def region_matrix(grid: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """(gh*gw, th*tw) 0/1 matrix summing a fine raster grid onto a coarser one covering the same image.

    Fine cell (r, c) goes to coarse cell (r * th // gh, c * tw // gw): plain sum pooling when the sizes
    divide. The identity when grid == target.
    """
    (gh, gw), (th, tw) = grid, target
    rows = (np.arange(gh) * th // gh)[:, None] * tw + (np.arange(gw) * tw // gw)[None, :]
    m = np.zeros((gh * gw, th * tw), np.float64)
    m[np.arange(gh * gw), rows.reshape(-1)] = 1.0
    return m


def pool_to(x: np.ndarray, grid: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """x (..., gh*gw) on a raster grid -> (..., th*tw) summed onto a coarser grid (`region_matrix`)."""
    (gh, gw), (th, tw) = grid, target
    if (gh, gw) == (th, tw):
        return x
    if gh % th == 0 and gw % tw == 0:   # whole cells: a reshape and a sum
        pooled = x.reshape(*x.shape[:-1], th, gh // th, tw, gw // tw).sum(axis=(-3, -1))
        return pooled.reshape(*x.shape[:-1], th * tw)
    return x @ region_matrix(grid, target)


def hi_lo(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A device `mean_with_error` pair -> float64 values."""
    hi, lo = pair
    return np.add(hi, lo, dtype=np.float64)   # = float64(hi) + float64(lo), in one pass


def layer_groups(sizes: Sequence[int]) -> list[list[int]]:
    """Layers with the same number of units, in first-seen order (each group is computed as one array)."""
    groups: dict[int, list[int]] = {}
    for layer, size in enumerate(sizes):
        groups.setdefault(size, []).append(layer)
    return list(groups.values())


def by_layer(parts: Sequence[Mapping[str, np.ndarray]], groups: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Per-group values (B, G, ...) -> per-layer values (B, layers, ...), in layer order."""
    if len(parts) == 1:
        return dict(parts[0])
    where = np.argsort(np.concatenate([np.asarray(g) for g in groups]))
    return {k: np.concatenate([p[k] for p in parts], axis=1)[:, where] for k in parts[0]}


# ---------------------------------------------------------------------------------------------------------
# Totals -> results (the totals: `vitsparse_jax.runtime.ordered.OrderedSums` over the per-image values)

BLOCK = 64   # images per ordered block of the totals


def totals_for(values: Mapping[str, np.ndarray], images: int, lay: AttentionLayout | ChannelLayout,
               prefix: str = "stats__") -> OrderedSums:
    """Ordered totals over `images` images for per-image values shaped like `values` (`*_image_values` of any
    batch): the nu histograms' bin indices are counted (layer l's bins at l * (bins + 2) ...), the rest
    summed, moment groups merged."""
    layers = len(lay.grids) if isinstance(lay, AttentionLayout) else len(lay.channels)
    return OrderedSums.like(values, images, block=BLOCK, prefix=prefix,
                            bins={"nu_hist": layers * (lay.nu_range[2] + 2)})


def pearson(n: float, cm: np.ndarray) -> np.ndarray:
    """Pooled Pearson r (K, K) from the merged co-moment of `image_moments`; NaN where a variable is constant."""
    cm = np.asarray(cm, np.float64)
    if float(n) < 2:
        return np.full(cm.shape, np.nan)
    sd = np.sqrt(np.clip(np.diag(cm), 0.0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(cm / np.outer(sd, sd), -1.0, 1.0)
    np.fill_diagonal(r, np.where(sd > 0, 1.0, np.nan))
    return r


def bin_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    return np.linspace(lo, hi, bins + 1)


def density(counts: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Probability density on the in-range bins of a `histogram` (bins + 2,), over ALL values counted.

    Values out of [lo, hi) lower the area under the curve below 1 instead of being dropped silently.
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    inner = counts[1:-1]
    width = (hi - lo) / inner.size
    return inner / (total * width) if total > 0 else np.zeros_like(inner)


# ---------------------------------------------------------------------------------------------------------
# Whole-model values of one batch, and their results

@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """Static facts that shape the attention statistics of a model."""

    grids: tuple[tuple[int, int], ...]   # patch grid of each block (Swin: the block's input map)
    prefix: int                          # class, distillation, register columns: left out of every statistic
    heads: int                           # heads of the last block
    corr_grid: tuple[int, int]           # common grid of the layer-by-layer correlation (coarsest)
    nu_range: tuple[float, float, int]   # (lo, hi, bins) of the nu histograms
    top_k: int                           # Fig. 3b: top-k columns of the last block per image
    top_head: int | None                 # Fig. 3b ranks this head's mu_h (published quirk); None = mu
    top_fractions: tuple[float, ...]     # share of the patch mass held by the top p columns
    prefix_kinds: tuple[str, ...] = ()   # kind of each prefix column ('cls', 'dist', 'reg'); () = unnamed
    norm_factor: float | None = None     # high-norm-tokens: token norms measured (ViTs); high-norm = > factor x median
    norm_top_fraction: float = 0.05      # high-norm-tokens: the top-5% mu columns compared with high-norm tokens

    @property
    def kinds(self) -> tuple[str, ...]:
        """The distinct prefix kinds, in token order ('prefix' for columns of unnamed kind)."""
        return tuple(dict.fromkeys(self.prefix_kinds or ("prefix",) * self.prefix))

    def patches(self, block: int) -> int:
        gh, gw = self.grids[block]
        return gh * gw

    def share_ks(self, block: int) -> tuple[int, ...]:
        return tuple(num_top(p, self.patches(block)) for p in self.top_fractions)


class SplitMu(NamedTuple):
    """mu of all blocks (same columns), split: prefix columns (B, blocks, prefix) and patch columns (B, blocks,
    patches), C-contiguous (`Probe.host_values` adds each device pair into them: no copy of the patch columns)."""

    prefix: np.ndarray
    patch: np.ndarray


Mus = Sequence[np.ndarray] | np.ndarray | SplitMu


def _blocks(mus: Sequence[np.ndarray] | np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """mu (B, G, N) of these blocks, from a list of per-block mu (B, N) or a stacked (B, blocks, N)."""
    if isinstance(mus, np.ndarray) and mus.ndim == 3:
        return mus if list(layers) == list(range(mus.shape[1])) else mus[:, layers]
    return np.stack([mus[l] for l in layers], axis=1)


PARTITION_ABOVE = 1024   # rows longer than this (Swin's first stages) are partitioned, not sorted, when no ranks
                         # are needed: the statistics read only a few order statistics


def _ranked_patches(mus: Mus, prefix: int, groups: Sequence[Sequence[int]], order: bool = True,
                    needed: Callable[[int], Sequence[int]] | None = None) -> list[tuple[np.ndarray, np.ndarray, Ranked]]:
    """Per group of blocks with the same columns: mu (B, G, N) (`SplitMu`: its prefix columns), its patch
    columns (contiguous), their ranking.

    order=False: the sorted values only, no ranks; for long rows only partitioned, so that the positions
    `needed(columns)` (and the first and last) hold the values sorting would put there, each position's larger
    values after it (enough for the top-k sums, the k-th largest value, the smallest and NaN checks).
    """
    out = []
    for layers in groups:
        if isinstance(mus, SplitMu):
            if mus.prefix.shape[-1] != prefix:
                raise ValueError(f"{mus.prefix.shape[-1]} prefix columns given, the layout has {prefix}")
            mu, patch = _layers(mus.prefix, layers), np.ascontiguousarray(_layers(mus.patch, layers))
        else:
            mu = _blocks(mus, layers)
            patch = np.ascontiguousarray(mu[..., prefix:])
        u = patch.shape[-1]
        if order:
            rank = Ranked.of(patch)
        elif u > PARTITION_ABOVE and needed is not None:
            rank = Ranked(np.partition(patch, sorted({0, u - 1, *needed(u)}), axis=-1), None)
        else:
            rank = Ranked(np.sort(patch, axis=-1), None)
        out.append((mu, patch, rank))
    return out


@functools.lru_cache(maxsize=64)
def _order_statistics(lay: AttentionLayout) -> dict[int, tuple[int, ...]]:
    """Patch count -> the sorted positions the statistics read: U - k for every top share's k, and for the last
    block's top-k count."""
    last = len(lay.grids) - 1
    return {lay.patches(l): tuple(lay.patches(l) - k for k in (*lay.share_ks(l), *((lay.top_k,) if l == last else ())))
            for l in range(len(lay.grids))}


def _column_counts(mus: Mus) -> list[int]:
    if isinstance(mus, SplitMu):
        return [mus.prefix.shape[2] + mus.patch.shape[2]] * mus.patch.shape[1]
    if isinstance(mus, np.ndarray) and mus.ndim == 3:
        return [mus.shape[2]] * mus.shape[1]
    return [m.shape[-1] for m in mus]


def attention_image_values(mus: Mus, last_mu_h: np.ndarray, lay: AttentionLayout, norms: np.ndarray | None = None
                           ) -> dict[str, np.ndarray]:
    """Every attention statistic of each image of a batch (leading axis B), for the totals (`totals_for`).

    mus: per block mu (B, prefix + patches), or all blocks stacked (B, blocks, N) or split (`SplitMu`);
    last_mu_h: the last block's mu_h (B, heads, prefix + patches), both float64 (`hi_lo` of the device's
    `mean_with_error` pairs); norms: the token norms of `norm_image_values` (their values are added), or None.
    """
    p, (lo, hi, bins) = lay.prefix, lay.nu_range
    b = last_mu_h.shape[0]
    groups = layer_groups(_column_counts(mus))
    needed = _order_statistics(lay)
    ranked = _ranked_patches(mus, p, groups, order=norms is not None,   # ranks: for the token norms only
                             needed=lambda u: needed.get(u, ()))
    kinds = lay.prefix_kinds or ("prefix",) * p
    columns = [[i for i, k in enumerate(kinds) if k == kind] for kind in lay.kinds]
    parts, hist, pooled = [], [], []
    for layers, (mu, patch, rank) in zip(groups, ranked):
        smallest = np.where(np.isnan(rank.values[..., -1]), np.nan, rank.values[..., 0])   # NaNs sort last
        moments_, log_mu = nu_values(patch, smallest)
        patch_mu = patch.sum(axis=-1)
        share, ok = top_shares_of_sorted(rank.values, lay.share_ks(layers[0]), patch_mu)
        by_kind = (np.stack([mu[..., cols].sum(axis=-1) for cols in columns], axis=-1) if columns
                   else np.zeros((b, len(layers), 0)))
        parts.append({"prefix_mu": mu[..., :p].sum(axis=-1), "patch_mu": patch_mu,
                      "mu_zeros": moments_.pop("zeros"), "top_share": share, "share_images": ok,
                      "prefix_mu_by_kind": by_kind, **{f"nu_{k}": v for k, v in moments_.items()}})
        offset = (np.asarray(layers) * (bins + 2.0))[:, None]          # layer l counts in its own bins
        hist.append(bin_index(log_mu, lo, hi, bins, offset, negated=True).reshape(b, -1))   # bins of nu
        pooled.append({"x": pool_to(patch, lay.grids[layers[0]], lay.corr_grid)})
    out = {"images": np.ones(b, np.int64), **by_layer(parts, groups),
           "nu_hist": hist[0] if len(hist) == 1 else np.concatenate(hist, axis=1)}
    x = by_layer(pooled, groups)["x"]
    sums = out["patch_mu"] if x is ranked[0][1] else None            # one group on the correlation grid (ViTs)
    out.update({f"layers_{k}": v for k, v in moments(x, sums=sums).items()})   # (B, L, cells)
    out.update({f"heads_{k}": v for k, v in moments(last_mu_h[:, :, p:]).items()})            # (B, heads, P)
    last = sum(map(len, groups)) - 1                                               # the last block
    g, j = next((g, layers.index(last)) for g, layers in enumerate(groups) if last in layers)
    if lay.top_head is None:
        _, last_patch, last_rank = ranked[g]
        out["top_counts"] = top_mask_of_sorted(last_patch[:, j], last_rank.values[:, j], lay.top_k).astype(np.int64)
    else:
        out["top_counts"] = top_k_indicator(last_mu_h[:, lay.top_head, p:], lay.top_k)
    if norms is not None:
        out.update(_norm_values(ranked, groups, norms, lay))
    return out


def _norm_values(ranked: Sequence[tuple[np.ndarray, np.ndarray, Ranked]], groups: Sequence[Sequence[int]],
                 norms: np.ndarray, lay: AttentionLayout) -> dict[str, np.ndarray]:
    """`norm_image_values` from the ranked patch columns of `_ranked_patches`."""
    p, factor = lay.prefix, float(lay.norm_factor)
    norms = np.asarray(norms)
    if norms.dtype != np.float32:
        norms = norms.astype(np.float64)
    blocks = norms.shape[1] - 1
    inputs = np.ascontiguousarray(norms[:, :blocks, p:])            # (B, L, P): block l's input; float32 as measured
    carry = None
    if (inputs.dtype == np.float32 and len(groups) == 1 and list(groups[0]) == list(range(blocks))
            and ranked[0][1].shape == inputs.shape):   # ViTs: sorted along with mu's place of each token
        carry = ranked[0][2].places()
    rank = Ranked.of(inputs, carry=carry)                            # ranked (Spearman r with mu)
    last = np.sort(norms[:, blocks, p:], axis=-1)                    # the last output: only its median is needed
    median = np.concatenate([rank.median(), Ranked(last, None).median()[:, None]], axis=1)   # (B, L+1) float64
    threshold = factor * median                                      # high-norm tokens: above it
    high = _above(inputs, threshold[:, :blocks])                     # (B, L, P) of the inputs
    high_last = _above(norms[:, blocks, p:], threshold[:, blocks])   # (B, P) of the last output
    high_count = np.concatenate([count_true(high), count_true(high_last)[:, None]], axis=1)
    u = inputs.shape[-1]
    centre = (u + 1) / 2.0                                           # the mean of the ranks 1..U
    parts = []
    for layers, (_, patch, mu_rank) in zip(groups, ranked):
        if patch.shape[-1] != u:
            raise ValueError(f"token norms of {u} patch tokens do not fit blocks of {patch.shape[-1]} patch columns")
        if rank.carried is not None:
            rho, den = _spearman_sums(mu_rank, rank)
        else:
            ra, rb = mu_rank.ranks(centre), _layers(rank.ranks(centre), layers)
            den = np.sqrt(np.einsum("...i,...i->...", ra, ra) * np.einsum("...i,...i->...", rb, rb))
            rho = np.einsum("...i,...i->...", ra, rb)
        ok = den > 0                                                 # a constant row: no Spearman r
        top_high, top = _top_in(patch, mu_rank, num_top(lay.norm_top_fraction, u), _layers(high, layers))
        parts.append({"norm_overlap": top_high / top,
                      "norm_spearman": np.where(ok, rho / np.where(ok, den, 1.0), 0.0),
                      "norm_spearman_images": ok.astype(np.float64)})
    return {"norm_high_share": high_count / u,                       # (B, L+1): embed, block outputs
            "norm_patch_median": median,
            "norm_prefix": norms[:, :, :p].astype(np.float64),      # (B, L+1, prefix)
            **by_layer(parts, groups)}


def _above(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """x > t[..., None] (x (..., U), t (...) float64). Float32 x is compared in float32 with t rounded down to
    a float32 (the largest <= t): the same booleans, without casting x."""
    if x.dtype != np.float32:
        return x > t[..., None]
    with np.errstate(over="ignore"):
        t32 = t.astype(np.float32)
    t32 = np.where(t32 > t, np.nextafter(t32, np.float32(-np.inf)), t32)
    return x > t32[..., None]


def _spearman_sums(a: Ranked, b: Ranked) -> tuple[np.ndarray, np.ndarray]:
    """Spearman r's numerator sum_i ra_i rb_i and denominator sqrt(sum_i ra_i^2 sum_i rb_i^2) per row of two
    ranked arrays of the same shape (..., U), the average ranks centred on (U + 1) / 2, b ranked with a's
    places (`Ranked.of(x, carry=a.places())`), so that no rank goes back to its place. The sums are of multiples
    of 1/4 far below 2^53, so exact in any order: the same bits as the sums over the ranks in place."""
    u = b.values.shape[-1]
    centre = (u + 1) / 2.0
    g = b.carried.reshape(-1, u)                                     # a's place (0..U-1) of b's j-th smallest
    w = np.arange(1, u + 1) - centre                                 # the rank at place j (rows without ties)
    rho = g.astype(np.float64) @ w                                   # = sum_j w_j (g_j + 1 - centre): sum_j w_j = 0
    sa = np.full(g.shape[0], w @ w)                                  # U (U^2 - 1) / 12
    sb = sa.copy()
    a_tied, b_tied = a.tied().reshape(-1), b.tied().reshape(-1)
    tied = np.flatnonzero(a_tied | b_tied)
    if tied.size:   # rows with ties (or NaNs): the average ranks, a's gathered in b's order
        ra, rb = a.sorted_ranks(tied, centre), b.sorted_ranks(tied, centre)
        rho[tied] = np.einsum("ij,ij->i", np.take_along_axis(ra, g[tied].astype(np.intp), axis=-1), rb)
        sa[tied], sb[tied] = np.einsum("ij,ij->i", ra, ra), np.einsum("ij,ij->i", rb, rb)
    shape = b.values.shape[:-1]
    return rho.reshape(shape), np.sqrt(sa * sb).reshape(shape)


def _top_in(x: np.ndarray, ranked: Ranked, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many of the k largest values of each row of x (..., U) (`top_mask_of_sorted`; `ranked`: x's ranking)
    lie where `mask` (bool, shaped like x) is True, and how many there are (k; fewer in rows with NaNs). Rows
    whose k-th largest value is above the rest and that hold no NaN are the last k sorted values: their mask
    entries are gathered; the other rows build the top-k mask."""
    u, shape = x.shape[-1], x.shape[:-1]
    xs = ranked.values.reshape(-1, u)
    if k >= u or ranked.flat is None:
        top = top_mask_of_sorted(x, ranked.values, k)
        return count_true(top & mask), count_true(top)
    inside = np.take(np.ascontiguousarray(mask).reshape(-1), ranked.flat.reshape(-1, u)[:, u - k:]).sum(axis=-1)
    count = np.full(inside.shape, k, np.int64)
    rows = np.flatnonzero(~((xs[:, u - k - 1] < xs[:, u - k]) & ~np.isnan(xs[:, -1])))
    if rows.size:
        top = top_mask_of_sorted(x.reshape(-1, u)[rows], xs[rows], k)
        inside[rows], count[rows] = count_true(top & mask.reshape(-1, u)[rows]), count_true(top)
    return inside.reshape(shape), count.reshape(shape)


def _layers(x: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """x[:, layers], a view when the layers are consecutive."""
    first = layers[0]
    if list(layers) == list(range(first, first + len(layers))):
        return x[:, first:first + len(layers)]
    return x[:, layers]


def spearman_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman r between a and b (..., U) per row, and ok (...): 0 where a row is constant (r undefined)."""
    centre = (a.shape[-1] + 1) / 2.0
    ra, rb = Ranked.of(a).ranks(centre), Ranked.of(b).ranks(centre)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    ok = den > 0
    return np.where(ok, (ra * rb).sum(-1) / np.where(ok, den, 1.0), 0.0), ok.astype(np.float64)


def high_norm(norms: np.ndarray, prefix: int, factor: float) -> np.ndarray:
    """The patch tokens (B, patches) whose norm exceeds `factor` x the median patch-token norm of their image
    (norms (B, prefix + patches) of one block; docs/science.md#high-norm-tokens)."""
    patch = norms[..., prefix:]
    return patch > factor * Ranked.of(patch).median()[..., None]


def norm_image_values(mus: Sequence[np.ndarray] | np.ndarray, norms: np.ndarray, lay: AttentionLayout
                      ) -> dict[str, np.ndarray]:
    """Per image (leading axis B), for the totals: sparse columns against high-norm tokens
    (docs/science.md#high-norm-tokens).

    mus: per block mu (B, N) (or stacked, (B, blocks, N)); norms (B, blocks + 1, N): token norms of the
    embedding (index 0, block 0's input) and of every block's output (index l + 1). Block l is compared with
    its input, norms[:, l].
    """
    groups = layer_groups(_column_counts(mus))
    return _norm_values(_ranked_patches(mus, lay.prefix, groups), groups, norms, lay)


def norm_results(t: Mapping[str, np.ndarray], lay: AttentionLayout) -> dict:
    """Totals of `norm_image_values` -> per block (docs/science.md#high-norm-tokens). Each name says whose
    tokens it measures: block l's input (the embedding for l = 0) or its output. Index 0 of the (L+1,) arrays
    is the embedding, index l + 1 block l's output."""
    images = float(t["images"])
    high = t["norm_high_share"] / images                      # (L+1,) embedding, then each block's output
    return {
        "norm_factor": float(lay.norm_factor),
        "high_norm_share_input": high[:-1],                   # (L,) share of high-norm patch tokens in block l's
        "high_norm_share_output": high[1:],                   #   input / output (the input's = the overlap's chance)
        "patch_norm_median": t["norm_patch_median"] / images,  # (L+1,) mean over images of the median norm
        "prefix_norm": t["norm_prefix"] / images,             # (L+1, prefix) mean norm of each prefix token
        "top5_overlap_high_norm_input": t["norm_overlap"] / images,   # (L,) share of block l's top-5% mu
        "spearman_mu_input_norm": t["norm_spearman"] / np.maximum(t["norm_spearman_images"], 1),   # columns that
        "spearman_images": t["norm_spearman_images"],         # are high-norm tokens of its input; Spearman (L,)
    }


def _nu_summary(t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean / std of nu over positive values and the fraction of nu outside the histogram range."""
    hist = t["nu_hist"]
    n, mean = t["nu_n"], t["nu_mean"][:, 0]
    var = t["nu_cm"][:, 0, 0] / np.maximum(n, 1)
    out_of_range = (hist[:, 0] + hist[:, -1]) / np.maximum(hist.sum(axis=1), 1)
    return {"mean_nu": np.where(n > 0, mean, np.nan), "std_nu": np.sqrt(np.clip(var, 0.0, None)),
            "nu_out_of_range": out_of_range}


def attention_results(t: Mapping[str, np.ndarray], lay: AttentionLayout) -> dict:
    """Totals of `attention_image_values` over all images -> the statistics (numpy, float64)."""
    t = {**t, "nu_hist": np.asarray(t["nu_hist"]).reshape(len(lay.grids), -1)}   # (blocks, bins + 2)
    images = float(t["images"])
    patches = np.array([lay.patches(l) for l in range(len(lay.grids))], np.float64)
    mean_mu = t["patch_mu"] / (images * patches)
    nu = _nu_summary(t)
    top = np.asarray(t["top_counts"], np.float64)
    return {
        "images": int(images),
        "mean_mu": mean_mu,                                  # mean of mu over patch columns and images
        "nu_reference": -np.log10(mean_mu),                  # the line of Fig. 3a / S4
        "mean_prefix_mu": t["prefix_mu"] / images,           # attention mass on class (+ dist) columns
        "mean_nu": nu["mean_nu"], "std_nu": nu["std_nu"], "nu_out_of_range": nu["nu_out_of_range"],
        "mu_zeros": t["mu_zeros"],
        "top_share": t["top_share"] / np.maximum(t["share_images"], 1)[:, None],   # (blocks, fractions)
        "top_share_uniform": np.array([[k / lay.patches(l) for k in lay.share_ks(l)] for l in range(len(lay.grids))]),
        "nu_hist": t["nu_hist"],
        "corr_layers": pearson(t["layers_n"], t["layers_cm"]),
        "corr_heads": pearson(t["heads_n"], t["heads_cm"]),
        "top_counts": t["top_counts"],
        "top_distribution": (top / top.sum() if top.sum() > 0 else top).reshape(lay.grids[-1]),
        "prefix_mu_by_kind": {kind: t["prefix_mu_by_kind"][:, i] / images for i, kind in enumerate(lay.kinds)},
        **({"norms": norm_results(t, lay)} if lay.norm_factor is not None else {}),
    }


@dataclasses.dataclass(frozen=True)
class ChannelLayout:
    """Static facts that shape the channel statistics of a CNN."""

    channels: tuple[int, ...]            # channels of each layer counted
    nu_range: tuple[float, float, int]   # (lo, hi, bins) of the histograms of -log10(channel share)
    top_fractions: tuple[float, ...]     # share of the layer's l1 held by the top p channels

    def share_ks(self, layer: int) -> tuple[int, ...]:
        return tuple(num_top(p, self.channels[layer]) for p in self.top_fractions)


def channel_image_values(scores: Sequence[np.ndarray], active: np.ndarray, lay: ChannelLayout
                         ) -> dict[str, np.ndarray]:
    """Every channel statistic of each image of a batch (leading axis B), for the totals (`totals_for`).

    scores[l]: per-channel l1 scores (B, C_l) of layer l (`channel_l1` on device); active (B, layers): the
    share of positive activations. A channel's share = its score / the layer's total (per image; sums to 1
    like mu), and nu = -log10(share), so the CNN histograms read like the attention ones.
    """
    lo, hi, bins = lay.nu_range
    b = np.shape(active)[0]
    groups = layer_groups([np.shape(s)[-1] for s in scores])
    parts, hist = [], []
    for layers in groups:   # layers with the same channel count, as one array (B, G, C)
        score = np.stack([np.asarray(scores[l], np.float64) for l in layers], axis=1)
        moments_, log_share = nu_values(shares(score))
        l1 = score.sum(axis=-1)
        top, ok = top_shares_of_sorted(np.sort(score, axis=-1), lay.share_ks(layers[0]), l1)
        parts.append({"l1": l1, "mu_zeros": moments_.pop("zeros"), "top_share": top, "share_images": ok,
                      **{f"nu_{k}": v for k, v in moments_.items()}})
        offset = (np.asarray(layers) * (bins + 2.0))[:, None]
        hist.append(bin_index(log_share, lo, hi, bins, offset, negated=True).reshape(b, -1))
    return {"images": np.ones(b, np.int64), "active": np.asarray(active, np.float64), **by_layer(parts, groups),
            "nu_hist": hist[0] if len(hist) == 1 else np.concatenate(hist, axis=1)}


def channel_results(t: Mapping[str, np.ndarray], lay: ChannelLayout) -> dict:
    """Totals of `channel_image_values` -> per-layer statistics."""
    t = {**t, "nu_hist": np.asarray(t["nu_hist"]).reshape(len(lay.channels), -1)}   # (layers, bins + 2)
    images = float(t["images"])
    channels = np.asarray(lay.channels, np.float64)
    nu = _nu_summary(t)
    return {
        "images": int(images),
        "mean_l1": t["l1"] / (images * channels),            # mean channel l1 score
        "active_fraction": t["active"] / images,              # share of positive activations (ReLU sparsity)
        "nu_reference": np.log10(channels),                   # -log10 of the mean share 1/C
        "mean_nu": nu["mean_nu"], "std_nu": nu["std_nu"], "nu_out_of_range": nu["nu_out_of_range"],
        "zero_channels": t["mu_zeros"] / (images * channels),  # fraction of (image, channel) with l1 = 0
        "top_share": t["top_share"] / np.maximum(t["share_images"], 1)[:, None],
        "top_share_uniform": np.array([[k / c for k in lay.share_ks(l)] for l, c in enumerate(lay.channels)]),
        "nu_hist": t["nu_hist"],
    }
