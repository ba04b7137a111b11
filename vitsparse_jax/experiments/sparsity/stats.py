"""Pure statistics of attention and channel sparsity (SPEC sections 2 and 4), in streaming form.

Device side (jnp, jit-able): functions of ONE batch that return float32/int32 sums over its images,
each image weighted by its `valid` flag (0 for batch padding). Host side (numpy): the sums of all
batches are added in float64 (`accumulate`) and turned into results (`pearson`, `density`, ...).
Nothing keeps a per-image value, so memory does not grow with the number of images, and the totals do
not depend on how the images were split into batches.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax.experiments.ablation import units as ablation_units

Array = jax.Array
TINY = float(np.finfo(np.float32).tiny)   # mu below this (an underflowed softmax) counts as TINY in nu
HIGHEST = jax.lax.Precision.HIGHEST


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

def attention_column_means(probs: Array) -> tuple[Array, Array]:
    """ViT maps (B, H, N, N), rows = queries -> mu (B, N) and per-head mu_h (B, H, N) (SPEC sec. 2)."""
    mu_h = jnp.mean(probs, axis=2)
    return jnp.mean(mu_h, axis=1), mu_h


def window_column_means(probs: Array, token_index: np.ndarray) -> tuple[Array, Array]:
    """Swin window maps (B, nW, heads, T, T) -> mu (B, HW), mu_h (B, heads, HW) over the block's input tokens.

    mu of token j = mean over heads and over the query rows of the window that holds j (SPEC sec. 3,
    Swin); `token_index` (nW, T) is the raster index of each window column (shift undone), from
    `models.swin.window_token_index`. Each window's columns sum to 1, so sum_j mu_j = nW.
    """
    b, nw, heads, t, _ = probs.shape
    cols = jnp.mean(probs, axis=3).transpose(0, 2, 1, 3).reshape(b, heads, nw * t)   # window order
    order = np.argsort(np.asarray(token_index).reshape(-1))                              # -> raster order
    if order.size != nw * t:
        raise ValueError(f"token_index of shape {np.shape(token_index)} does not fit maps {probs.shape}")
    mu_h = cols[:, :, order]
    return jnp.mean(mu_h, axis=1), mu_h


def channel_l1(act: Array) -> Array:
    """Post-ReLU map (B, H, W, C) -> per-channel l1 score (B, C) = sum over positions of |a| (SPEC sec. 3)."""
    return jnp.sum(jnp.abs(act.astype(jnp.float32)), axis=(1, 2))


def shares(scores: Array) -> Array:
    """Scores (B, U) -> each unit's share of the image's total (rows sum to 1; all-zero rows stay 0)."""
    total = jnp.sum(scores, axis=-1, keepdims=True)
    return jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), 0.0)


def nu_of(mu: Array) -> Array:
    """nu = -log10(mu), with mu floored at the smallest normal float32 (an exact 0 gives 37.9)."""
    return -jnp.log10(jnp.maximum(mu, TINY))


# ---------------------------------------------------------------------------------------------------------
# Per-batch sums (device)

def histogram(values: Array, weights: Array, lo: float, hi: float, bins: int) -> Array:
    """Counts (bins + 2,) int32 of values (B, U): [below lo, bins equal bins of [lo, hi), at or above hi]."""
    pos = jnp.floor((values - lo) * (bins / (hi - lo)))
    idx = jnp.clip(pos, -1, bins).astype(jnp.int32) + 1
    w = jnp.broadcast_to(weights.astype(jnp.int32)[:, None], values.shape)
    return jnp.zeros(bins + 2, jnp.int32).at[idx.reshape(-1)].add(w.reshape(-1))


def nu_moments(mu: Array, weights: Array) -> dict[str, Array]:
    """`moment_sums` of nu over the positive mu (B, U) of valid images (mean and spread of nu), and the
    number of zero mu (left out: their nu is infinite)."""
    w = weights.astype(jnp.float32)[:, None]
    pos = mu > 0
    nu = -jnp.log10(jnp.where(pos, mu, 1.0))
    return {**moment_sums(nu[..., None], w * pos), "zeros": jnp.sum(jnp.where(pos, 0.0, w))}


def moment_sums(x: Array, weights: Array) -> dict[str, Array]:
    """Pooled moments for Pearson r between K variables observed on (image, unit) pairs.

    x (B, U, K): variable k of unit u of image b; weights (B,) per image or (B, U) per row, 0 or 1.
    Over the valid rows of this batch returns n, the mean
    (K,) as a float32 value `mean` plus its rounding error `mean_err` (so that the host knows the mean to
    float64 accuracy) and the co-moment cm (K, K) = sum (x - mean)(x - mean)^T. Centring on the batch's
    own mean keeps the float32 sums accurate even when values hardly vary (untrained models);
    `accumulate` merges batches exactly (Chan et al.'s pairwise update).
    """
    w = jnp.broadcast_to(weights.astype(jnp.float32).reshape(x.shape[0], -1), x.shape[:2])
    n = jnp.sum(w)
    inv_n = 1.0 / jnp.maximum(n, 1.0)
    mean = jnp.einsum("buk,bu->k", x, w, precision=HIGHEST) * inv_n
    xc = (x - mean) * w[..., None]   # w is 0 or 1, so w^2 = w
    err = jnp.sum(xc, axis=(0, 1)) * inv_n
    cm = jnp.einsum("buk,bul->kl", xc, xc, precision=HIGHEST) - n * jnp.outer(err, err)
    return {"n": n, "mean": mean, "mean_err": err, "cm": cm}


def top_k_counts(scores: Array, weights: Array, k: int) -> Array:
    """(U,) int32: over images, how often each unit is among the k largest scores (B, U) of its image.

    Ties go to the lower unit index (jax.lax.top_k).
    """
    _, idx = jax.lax.top_k(scores, k)
    w = jnp.broadcast_to(weights.astype(jnp.int32)[:, None], idx.shape)
    return jnp.zeros(scores.shape[-1], jnp.int32).at[idx.reshape(-1)].add(w.reshape(-1))


def top_share_sums(scores: Array, weights: Array, ks: Sequence[int]) -> tuple[Array, Array]:
    """Sum over images of the share of an image's total score held by its top-k units, for each k.

    Returns (sums (len(ks),), number of images with a positive total); images whose scores are all
    zero (a dead layer) have no share and are left out of both.
    """
    ordered = -jnp.sort(-scores, axis=-1)
    csum = jnp.cumsum(ordered, axis=-1)
    total = csum[:, -1]
    ok = (total > 0).astype(jnp.float32) * weights.astype(jnp.float32)
    share = csum[:, np.asarray(ks) - 1] / jnp.where(total > 0, total, 1.0)[:, None]
    return jnp.sum(share * ok[:, None], axis=0), jnp.sum(ok)


def region_matrix(grid: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """(gh*gw, th*tw) 0/1 matrix summing a fine raster grid onto a coarser one covering the same image.

    Fine cell (r, c) goes to coarse cell (r * th // gh, c * tw // gw): plain sum pooling when the sizes
    divide. The identity when grid == target.
    """
    (gh, gw), (th, tw) = grid, target
    rows = (np.arange(gh) * th // gh)[:, None] * tw + (np.arange(gw) * tw // gw)[None, :]
    m = np.zeros((gh * gw, th * tw), np.float32)
    m[np.arange(gh * gw), rows.reshape(-1)] = 1.0
    return m


# ---------------------------------------------------------------------------------------------------------
# Host side: totals -> results

def accumulate(acc: dict[str, np.ndarray], sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds one batch's sums into the host totals `acc` (float64, int64 for counts), in place.

    Plain keys are added. A `moment_sums` group stored as `<g>_n`, `<g>_mean`, `<g>_mean_err`, `<g>_cm`
    is merged with Chan et al.'s pairwise update, which is exact: the result does not depend on the
    batch split. The totals hold the float64 mean in `<g>_mean` (their `<g>_mean_err` stays 0).
    """
    sums = {k: np.asarray(v) for k, v in sums.items()}
    groups = [k[:-3] for k in sums if k.endswith("_cm")]
    for g in groups:
        na, nb = float(acc[f"{g}_n"]), float(sums[f"{g}_n"])
        if nb == 0:
            continue
        n = na + nb
        delta = sums[f"{g}_mean"].astype(np.float64) + sums[f"{g}_mean_err"] - acc[f"{g}_mean"]
        acc[f"{g}_cm"] = acc[f"{g}_cm"] + sums[f"{g}_cm"] + np.outer(delta, delta) * (na * nb / n)
        acc[f"{g}_mean"] = acc[f"{g}_mean"] + delta * (nb / n)
        acc[f"{g}_n"] = np.asarray(n)
    done = {f"{g}_{part}" for g in groups for part in ("n", "mean", "mean_err", "cm")}
    for key, value in sums.items():
        if key not in done:
            integer = np.issubdtype(value.dtype, np.integer)
            acc[key] = acc[key] + value.astype(np.int64 if integer else np.float64)
    return acc


def zeros_like_sums(shapes: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, np.ndarray]:
    """Empty host totals for per-batch sums of these shapes (e.g. from jax.eval_shape)."""
    return {k: np.zeros(v.shape, np.int64 if np.issubdtype(v.dtype, np.integer) else np.float64)
            for k, v in shapes.items()}


def pearson(n: float, cm: np.ndarray) -> np.ndarray:
    """Pooled Pearson r (K, K) from the merged co-moment of `moment_sums`; NaN where a variable is constant."""
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
# Whole-model sums of one batch, and their results

@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """Static facts that shape the attention statistics of a model."""

    grids: tuple[tuple[int, int], ...]   # patch grid of each block (Swin: the block's input map)
    prefix: int                          # class (+ distillation) columns: left out of every statistic
    heads: int                           # heads of the last block
    corr_grid: tuple[int, int]           # common grid of the layer-by-layer correlation (coarsest)
    nu_range: tuple[float, float, int]   # (lo, hi, bins) of the nu histograms
    top_k: int                           # Fig. 3b: top-k columns of the last block per image
    top_head: int | None                 # Fig. 3b ranks this head's mu_h (published quirk); None = mu
    top_fractions: tuple[float, ...]     # share of the patch mass held by the top p columns

    def patches(self, block: int) -> int:
        gh, gw = self.grids[block]
        return gh * gw

    def share_ks(self, block: int) -> tuple[int, ...]:
        return tuple(num_top(p, self.patches(block)) for p in self.top_fractions)


def attention_batch_sums(mus: Sequence[Array], last_mu_h: Array, weights: Array,
                         lay: AttentionLayout) -> dict[str, Array]:
    """Per-batch sums of every attention statistic.

    mus: per block mu (B, prefix + patches); last_mu_h: the last block's mu_h (B, heads, prefix + patches);
    weights (B,): 1 for an image, 0 for padding.
    """
    p, (lo, hi, bins) = lay.prefix, lay.nu_range
    w = weights.astype(jnp.float32)
    blocks: dict[str, list[Array]] = {k: [] for k in ("prefix_mu", "patch_mu", "nu_hist", "mu_zeros", "top_share",
                                                      "share_images")}
    out: dict[str, Array] = {"images": jnp.sum(w)}
    pooled = []
    for l, mu in enumerate(mus):
        patch = mu[:, p:]
        nu = nu_moments(patch, w)
        out.update({f"nu{l}_{k}": v for k, v in nu.items() if k != "zeros"})
        share, n_ok = top_share_sums(patch, w, lay.share_ks(l))
        for key, value in (("prefix_mu", jnp.sum(mu[:, :p] * w[:, None])), ("patch_mu", jnp.sum(patch * w[:, None])),
                           ("nu_hist", histogram(nu_of(patch), w, lo, hi, bins)), ("mu_zeros", nu["zeros"]),
                           ("top_share", share), ("share_images", n_ok)):
            blocks[key].append(value)
        region = region_matrix(lay.grids[l], lay.corr_grid)
        pooled.append(jnp.matmul(patch, region, precision=HIGHEST))
    out.update({k: jnp.stack(v) for k, v in blocks.items()})

    layer_mom = moment_sums(jnp.stack(pooled, axis=-1), w)
    head_mom = moment_sums(last_mu_h[:, :, p:].transpose(0, 2, 1), w)
    last = len(mus) - 1
    out.update({f"layers_{k}": v for k, v in layer_mom.items()})
    out.update({f"heads_{k}": v for k, v in head_mom.items()})

    scores = mus[last][:, p:] if lay.top_head is None else last_mu_h[:, lay.top_head, p:]
    out["top_counts"] = top_k_counts(scores, w, lay.top_k)
    return out


def _nu_summary(t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean / std of nu over positive values and the fraction of nu outside the histogram range."""
    hist = t["nu_hist"]
    n = np.array([float(t[f"nu{l}_n"]) for l in range(hist.shape[0])])
    mean = np.array([t[f"nu{l}_mean"][0] for l in range(hist.shape[0])])
    var = np.array([t[f"nu{l}_cm"][0, 0] for l in range(hist.shape[0])]) / np.maximum(n, 1)
    out_of_range = (hist[:, 0] + hist[:, -1]) / np.maximum(hist.sum(axis=1), 1)
    return {"mean_nu": np.where(n > 0, mean, np.nan), "std_nu": np.sqrt(np.clip(var, 0.0, None)),
            "nu_out_of_range": out_of_range}


def attention_results(t: Mapping[str, np.ndarray], lay: AttentionLayout) -> dict:
    """Totals of `attention_batch_sums` over all images -> the statistics (numpy, float64)."""
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
    }


@dataclasses.dataclass(frozen=True)
class ChannelLayout:
    """Static facts that shape the channel statistics of a CNN."""

    channels: tuple[int, ...]            # channels of each layer counted
    nu_range: tuple[float, float, int]   # (lo, hi, bins) of the histograms of -log10(channel share)
    top_fractions: tuple[float, ...]     # share of the layer's l1 held by the top p channels

    def share_ks(self, layer: int) -> tuple[int, ...]:
        return tuple(num_top(p, self.channels[layer]) for p in self.top_fractions)


def channel_batch_sums(acts: Sequence[Array], weights: Array, lay: ChannelLayout) -> dict[str, Array]:
    """Per-batch sums of the channel statistics of post-ReLU maps acts[l] (B, H, W, C_l).

    A channel's share = its l1 score / the layer's total l1 (per image; sums to 1 like mu), and
    nu = -log10(share), so the CNN histograms read like the attention ones.
    """
    lo, hi, bins = lay.nu_range
    w = weights.astype(jnp.float32)
    keys = ("l1", "active", "nu_hist", "mu_zeros", "top_share", "share_images")
    layers: dict[str, list[Array]] = {k: [] for k in keys}
    out: dict[str, Array] = {"images": jnp.sum(w)}
    for l, act in enumerate(acts):
        score = channel_l1(act)
        share = shares(score)
        nu = nu_moments(share, w)
        out.update({f"nu{l}_{k}": v for k, v in nu.items() if k != "zeros"})
        top, n_ok = top_share_sums(score, w, lay.share_ks(l))
        active = jnp.mean((act > 0).astype(jnp.float32), axis=(1, 2, 3))
        for key, value in (("l1", jnp.sum(score * w[:, None])), ("active", jnp.sum(active * w)),
                           ("nu_hist", histogram(nu_of(share), w, lo, hi, bins)), ("mu_zeros", nu["zeros"]),
                           ("top_share", top), ("share_images", n_ok)):
            layers[key].append(value)
    out.update({k: jnp.stack(v) for k, v in layers.items()})
    return out


def channel_results(t: Mapping[str, np.ndarray], lay: ChannelLayout) -> dict:
    """Totals of `channel_batch_sums` -> per-layer statistics."""
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
