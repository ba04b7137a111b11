"""Statistics of attention and channel sparsity (SPEC sections 2 and 4), in streaming form.

Device side (jnp, jit-able): the reduction of each image's maps to per-image vectors: column means mu
(with their float32 rounding error, so the host knows them to float64 accuracy) or channel l1 scores.
Host side (numpy, float64): every statistic of each image (`attention_image_values`,
`channel_image_values`), then `accumulate` adds the images ONE BY ONE in dataset order (sums, and
pooled co-moments merged with Chan et al.'s update). Nothing keeps a per-image value after its batch,
so memory does not grow with the number of images; and since each image's contribution and the order
of addition depend only on the image, the totals are the same for any batch size, device count or
number of hosts, to the last bit.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax.experiments.ablation import units as ablation_units

Array = jax.Array
Pair = tuple[Array, Array]   # a float32 mean and its rounding error (`mean_with_error`)
TINY = float(np.finfo(np.float32).tiny)   # mu below this (an underflowed softmax) counts as TINY in nu


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a top fraction must be in (0, 1], got {fraction}")
    return fraction


def num_top(fraction: float, units: int) -> int:
    """k = round(fraction * units), the ablation's count (SPEC sec. 3: 0.05 * 196 -> 10, 0.05 * 49 -> 2).

    A fraction that gives k = 0 is an error.
    """
    k = ablation_units.count(check_fraction(fraction), units)
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
    """ViT maps (B, H, N, N), rows = queries -> mu (B, N) and per-head mu_h (B, H, N) (SPEC sec. 2)."""
    mu_h = jnp.mean(probs, axis=2)
    return jnp.mean(mu_h, axis=1), mu_h


def attention_column_means_split(probs: Array) -> tuple[Pair, Pair]:
    """As `attention_column_means`, each as a `mean_with_error` pair: ((mu, err) (B, N), (mu_h, err) (B, H, N))."""
    return mean_with_error(probs, (1, 2)), mean_with_error(probs, (2,))


def window_column_means(probs: Array, token_index: np.ndarray) -> tuple[Array, Array]:
    """Swin window maps (B, nW, heads, T, T) -> mu (B, HW), mu_h (B, heads, HW) over the block's input tokens.

    mu of token j = mean over heads and over the query rows of the window that holds j (SPEC sec. 3,
    Swin); `token_index` (nW, T) is the raster index of each window column (shift undone), from
    `models.swin.window_token_index`. Each window's columns sum to 1, so sum_j mu_j = nW.
    """
    (mu, _), (mu_h, _) = window_column_means_split(probs, token_index)
    return mu, mu_h


def window_column_means_split(probs: Array, token_index: np.ndarray) -> tuple[Pair, Pair]:
    """As `window_column_means`, each as a `mean_with_error` pair."""
    b, nw, heads, t, _ = probs.shape
    order = np.argsort(np.asarray(token_index).reshape(-1))                              # window -> raster order
    if order.size != nw * t:
        raise ValueError(f"token_index of shape {np.shape(token_index)} does not fit maps {probs.shape}")

    def raster(x: Array) -> Array:   # (B, nW, [heads,] T) -> (B, [heads,] HW)
        x = jnp.moveaxis(x, 1, -2) if x.ndim == 4 else x
        return x.reshape(*x.shape[:-2], nw * t)[..., order]

    mu, mu_h = mean_with_error(probs, (2, 3)), mean_with_error(probs, (3,))
    return tuple(raster(x) for x in mu), tuple(raster(x) for x in mu_h)


def channel_l1(act: Array) -> Array:
    """Post-ReLU map (B, H, W, C) -> per-channel l1 score (B, C) = sum over positions of |a| (SPEC sec. 3)."""
    return jnp.sum(jnp.abs(act.astype(jnp.float32)), axis=(1, 2))


def active_fraction(act: Array) -> Array:
    """Post-ReLU map (B, H, W, C) -> the share of its positive activations (B,)."""
    return jnp.mean((act > 0).astype(jnp.float32), axis=(1, 2, 3))


# ---------------------------------------------------------------------------------------------------------
# Host side, per image (numpy, float64): each function maps a batch's per-image inputs (leading axis B)
# to per-image values; nothing here mixes two images.

def shares(scores: np.ndarray) -> np.ndarray:
    """Scores (B, U) -> each unit's share of the image's total (rows sum to 1; all-zero rows stay 0)."""
    total = scores.sum(axis=-1, keepdims=True)
    return np.where(total > 0, scores / np.where(total > 0, total, 1.0), 0.0)


def nu_of(mu: np.ndarray) -> np.ndarray:
    """nu = -log10(mu), with mu floored at the smallest normal float32 (an exact 0 gives 37.9)."""
    return -np.log10(np.maximum(mu, TINY))


def histogram(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Per-image counts (B, bins + 2) int64 of values (B, U): [below lo, bins equal bins of [lo, hi), at or
    above hi]."""
    pos = np.floor((values - lo) * (bins / (hi - lo)))
    idx = np.clip(pos, -1, bins).astype(np.int64) + 1
    counts = np.zeros((values.shape[0], bins + 2), np.int64)
    np.add.at(counts, (np.arange(values.shape[0])[:, None], idx), 1)
    return counts


def image_moments(x: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-image moments of K variables observed on U units: x (B, U, K), weights (B, U) of 0/1 (None = all).

    Returns n (B,), mean (B, K) and the centred co-moment cm (B, K, K) = sum_u (x - mean)(x - mean)^T, in
    float64 (two passes, so nearly constant values keep their spread). `accumulate` pools images with
    Chan et al.'s update into one Pearson r over all (image, unit) pairs.
    """
    x = np.asarray(x, np.float64)
    w = np.ones(x.shape[:2]) if weights is None else np.asarray(weights, np.float64)
    n = w.sum(axis=1)
    mean = np.einsum("buk,bu->bk", x, w) / np.maximum(n, 1.0)[:, None]
    xc = (x - mean[:, None, :]) * w[..., None]          # w is 0 or 1, so w^2 = w
    return {"n": n, "mean": mean, "cm": np.einsum("buk,bul->bkl", xc, xc)}


def nu_moments(mu: np.ndarray) -> dict[str, np.ndarray]:
    """`image_moments` of nu over the positive mu (B, U) of each image (mean and spread of nu), and the
    number of zero mu (left out: their nu is infinite)."""
    pos = mu > 0
    nu = -np.log10(np.where(pos, mu, 1.0))
    return {**image_moments(nu[..., None], pos), "zeros": (~pos).sum(axis=1).astype(np.float64)}


def top_k_indicator(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, U) int64: 1 where a unit is among the k largest scores of its image (ties to the lower index)."""
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    out = np.zeros(scores.shape, np.int64)
    np.put_along_axis(out, top, 1, axis=-1)
    return out


def top_shares(scores: np.ndarray, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the share of its total score held by its top-k units for each k: ((B, len(ks)), ok (B,)).

    Images whose scores are all zero (a dead layer) have no share: ok = 0 and share 0.
    """
    ordered = -np.sort(-scores, axis=-1)
    csum = np.cumsum(ordered, axis=-1)
    total = csum[:, -1]
    ok = total > 0
    share = csum[:, np.asarray(ks) - 1] / np.where(ok, total, 1.0)[:, None]
    return np.where(ok[:, None], share, 0.0), ok.astype(np.float64)


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


def stack_moments(groups: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-image moments of G independent groups (same K) -> one group with a group axis after B."""
    return {k: np.stack([g[k] for g in groups], axis=1) for k in ("n", "mean", "cm")}


def hi_lo(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A device `mean_with_error` pair -> float64 values."""
    hi, lo = pair
    return np.asarray(hi, np.float64) + np.asarray(lo, np.float64)


# ---------------------------------------------------------------------------------------------------------
# Host side: adding images into totals, and totals -> results

MOMENT_PARTS = ("n", "mean", "cm")


def _moment_groups(values: Mapping[str, np.ndarray]) -> list[str]:
    return [k[:-3] for k in values if k.endswith("_cm")]


def empty_totals(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero totals for per-image values of these shapes (leading axis = images)."""
    return {k: np.zeros(np.shape(v)[1:], np.int64 if np.issubdtype(np.asarray(v).dtype, np.integer) else np.float64)
            for k, v in values.items()}


def accumulate(acc: dict[str, np.ndarray], values: Mapping[str, np.ndarray], valid: np.ndarray
               ) -> dict[str, np.ndarray]:
    """Adds the images of one batch whose `valid` flag is set into the totals `acc`, in place, one image at a
    time in batch order (= dataset order): the totals do not depend on how images were split into batches.

    Plain keys are summed (float64, int64 for counts). A moment group stored as `<g>_n`, `<g>_mean`,
    `<g>_cm` (from `image_moments`, any group axes after B) is merged with Chan et al.'s pairwise update.
    """
    values = {k: np.asarray(v) for k, v in values.items()}
    groups = _moment_groups(values)
    in_group = {f"{g}_{part}" for g in groups for part in MOMENT_PARTS}
    plain = [k for k in values if k not in in_group]
    for i in np.flatnonzero(np.asarray(valid)):
        for key in plain:
            acc[key] = acc[key] + values[key][i]
        for g in groups:
            na, nb = acc[f"{g}_n"], values[f"{g}_n"][i]
            n = na + nb
            f = np.where(n > 0, nb / np.where(n > 0, n, 1.0), 0.0)
            delta = values[f"{g}_mean"][i] - acc[f"{g}_mean"]
            outer = delta[..., :, None] * delta[..., None, :]
            acc[f"{g}_cm"] = acc[f"{g}_cm"] + values[f"{g}_cm"][i] + outer * (na * f)[..., None, None]
            acc[f"{g}_mean"] = acc[f"{g}_mean"] + delta * f[..., None]
            acc[f"{g}_n"] = n
    return acc


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
    norm_factor: float | None = None     # SPEC sec. 7: token norms measured (ViTs); high-norm = > factor x median
    norm_top_fraction: float = 0.05      # SPEC sec. 7: the top-5% mu columns compared with high-norm tokens

    @property
    def kinds(self) -> tuple[str, ...]:
        """The distinct prefix kinds, in token order ('prefix' for columns of unnamed kind)."""
        return tuple(dict.fromkeys(self.prefix_kinds or ("prefix",) * self.prefix))

    def patches(self, block: int) -> int:
        gh, gw = self.grids[block]
        return gh * gw

    def share_ks(self, block: int) -> tuple[int, ...]:
        return tuple(num_top(p, self.patches(block)) for p in self.top_fractions)


def attention_image_values(mus: Sequence[np.ndarray], last_mu_h: np.ndarray, lay: AttentionLayout
                           ) -> dict[str, np.ndarray]:
    """Every attention statistic of each image of a batch, float64 (leading axis B), for `accumulate`.

    mus: per block mu (B, prefix + patches); last_mu_h: the last block's mu_h (B, heads, prefix + patches),
    both float64 (`hi_lo` of the device's `mean_with_error` pairs).
    """
    p, (lo, hi, bins) = lay.prefix, lay.nu_range
    b = mus[0].shape[0]
    per_block: dict[str, list[np.ndarray]] = {k: [] for k in ("prefix_mu", "patch_mu", "nu_hist", "mu_zeros",
                                                             "top_share", "share_images")}
    nu_groups, pooled = [], []
    for l, mu in enumerate(mus):
        patch = mu[:, p:]
        nu = nu_moments(patch)
        nu_groups.append(nu)
        share, ok = top_shares(patch, lay.share_ks(l))
        for key, value in (("prefix_mu", mu[:, :p].sum(axis=1)), ("patch_mu", patch.sum(axis=1)),
                           ("nu_hist", histogram(nu_of(patch), lo, hi, bins)), ("mu_zeros", nu["zeros"]),
                           ("top_share", share), ("share_images", ok)):
            per_block[key].append(value)
        pooled.append(patch @ region_matrix(lay.grids[l], lay.corr_grid))
    out = {"images": np.ones(b), **{k: np.stack(v, axis=1) for k, v in per_block.items()}}
    out.update({f"nu_{k}": v for k, v in stack_moments(nu_groups).items()})
    out.update({f"layers_{k}": v for k, v in image_moments(np.stack(pooled, axis=-1)).items()})
    out.update({f"heads_{k}": v for k, v in image_moments(last_mu_h[:, :, p:].transpose(0, 2, 1)).items()})
    scores = mus[-1][:, p:] if lay.top_head is None else last_mu_h[:, lay.top_head, p:]
    out["top_counts"] = top_k_indicator(scores, lay.top_k)
    kinds = lay.prefix_kinds or ("prefix",) * p
    columns = [[i for i, k in enumerate(kinds) if k == kind] for kind in lay.kinds]
    out["prefix_mu_by_kind"] = np.stack([np.stack([mu[:, cols].sum(axis=1) for cols in columns], axis=-1)
                                         if columns else np.zeros((b, 0)) for mu in mus], axis=1)   # (B, L, kinds)
    return out


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1..U) along the last axis, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, axis=-1, kind="stable")
    xs = np.take_along_axis(x, order, axis=-1)
    ranks = np.empty_like(x, dtype=np.float64)
    for row in np.ndindex(x.shape[:-1]):
        v = xs[row]
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])          # first position of each tie group
        ends = np.r_[starts[1:], v.size]
        avg = (starts + ends + 1) / 2.0                                   # mean of the 1-based positions
        ranks[row + (order[row],)] = np.repeat(avg, ends - starts)
    return ranks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman r between a and b (B, U) per row, and ok (B,): 0 where a row is constant (r undefined)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    ok = den > 0
    return np.where(ok, (ra * rb).sum(-1) / np.where(ok, den, 1.0), 0.0), ok.astype(np.float64)


def high_norm(norms: np.ndarray, prefix: int, factor: float) -> np.ndarray:
    """SPEC sec. 7: the patch tokens (B, patches) whose norm exceeds `factor` x the median patch-token norm of
    their image (norms (B, prefix + patches) of one block)."""
    patch = norms[:, prefix:]
    return patch > factor * np.median(patch, axis=-1, keepdims=True)


def norm_image_values(mus: Sequence[np.ndarray], norms: np.ndarray, lay: AttentionLayout) -> dict[str, np.ndarray]:
    """SPEC sec. 7, per image (leading axis B), for `accumulate`: sparse columns against high-norm tokens.

    mus: per block mu (B, N); norms (B, blocks + 1, N): token norms of the embedding (index 0, block 0's input)
    and of every block's output (index l + 1). Block l is compared with its input, norms[:, l].
    """
    p, factor = lay.prefix, float(lay.norm_factor)
    high = np.stack([high_norm(norms[:, l], p, factor) for l in range(norms.shape[1])], axis=1)   # (B, L+1, P)
    overlap, rho, ok = [], [], []
    for l, mu in enumerate(mus):
        patch = mu[:, p:]
        top = top_k_indicator(patch, num_top(lay.norm_top_fraction, patch.shape[1])).astype(bool)
        overlap.append((top & high[:, l]).sum(axis=1) / top.sum(axis=1))
        r, good = spearman_rows(patch, norms[:, l, p:])
        rho.append(r)
        ok.append(good)
    return {"norm_high_share": high.mean(axis=2),                          # (B, L+1): embed, block outputs
            "norm_patch_median": np.median(norms[:, :, p:], axis=2),
            "norm_prefix": norms[:, :, :p],                                # (B, L+1, prefix)
            "norm_overlap": np.stack(overlap, axis=1), "norm_spearman": np.stack(rho, axis=1),
            "norm_spearman_images": np.stack(ok, axis=1)}


def norm_results(t: Mapping[str, np.ndarray], lay: AttentionLayout) -> dict:
    """Totals of `norm_image_values` -> per block (SPEC sec. 7). Index 0 of the (L+1,) arrays is the embedding."""
    images = float(t["images"])
    high = t["norm_high_share"] / images
    return {
        "norm_factor": float(lay.norm_factor),
        "high_norm_share": high,                              # (L+1,) share of high-norm patch tokens
        "patch_norm_median": t["norm_patch_median"] / images,  # (L+1,) mean over images of the median norm
        "prefix_norm": t["norm_prefix"] / images,             # (L+1, prefix) mean norm of each prefix token
        "top_overlap": t["norm_overlap"] / images,            # (L,) share of block l's top mu columns that are
        "top_overlap_chance": high[:-1],                      #   high-norm in its input; chance = input's share
        "spearman_mu_input_norm": t["norm_spearman"] / np.maximum(t["norm_spearman_images"], 1),   # (L,)
        "spearman_images": t["norm_spearman_images"],
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
    """Every channel statistic of each image of a batch, float64 (leading axis B), for `accumulate`.

    scores[l]: per-channel l1 scores (B, C_l) of layer l (`channel_l1` on device); active (B, layers): the
    share of positive activations. A channel's share = its score / the layer's total (per image; sums to 1
    like mu), and nu = -log10(share), so the CNN histograms read like the attention ones.
    """
    lo, hi, bins = lay.nu_range
    per_layer: dict[str, list[np.ndarray]] = {k: [] for k in ("l1", "nu_hist", "mu_zeros", "top_share", "share_images")}
    nu_groups = []
    for l, score in enumerate(scores):
        score = np.asarray(score, np.float64)
        share = shares(score)
        nu = nu_moments(share)
        nu_groups.append(nu)
        top, ok = top_shares(score, lay.share_ks(l))
        for key, value in (("l1", score.sum(axis=1)), ("nu_hist", histogram(nu_of(share), lo, hi, bins)),
                           ("mu_zeros", nu["zeros"]), ("top_share", top), ("share_images", ok)):
            per_layer[key].append(value)
    out = {"images": np.ones(active.shape[0]), "active": np.asarray(active, np.float64),
           **{k: np.stack(v, axis=1) for k, v in per_layer.items()}}
    out.update({f"nu_{k}": v for k, v in stack_moments(nu_groups).items()})
    return out


def channel_results(t: Mapping[str, np.ndarray], lay: ChannelLayout) -> dict:
    """Totals of `channel_image_values` -> per-layer statistics."""
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
