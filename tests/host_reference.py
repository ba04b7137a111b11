"""The per-image host path as it was before `vitsparse_jax.runtime.ordered` (reference for tests and
benchmarks/host_ceiling.py, not part of the package): each image's statistics computed row by row and added
into the totals one image at a time, in batch order (`accumulate`), and the receptive-field maps added image
by image (`add_maps_per_image`). The vectorised, ordered path must agree with it to 1e-12 (relative).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from vitsparse_jax.experiments.sparsity.stats import (
    AttentionLayout,
    ChannelLayout,
    hi_lo,
    nu_of,
    num_top,
    region_matrix,
    shares,
)


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


def stack_moments(groups: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-image moments of G independent groups (same K) -> one group with a group axis after B."""
    return {k: np.stack([g[k] for g in groups], axis=1) for k in ("n", "mean", "cm")}


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
    """The patch tokens (B, patches) whose norm exceeds `factor` x the median patch-token norm of their image
    (norms (B, prefix + patches) of one block; docs/science.md#high-norm-tokens)."""
    patch = norms[:, prefix:]
    return patch > factor * np.median(patch, axis=-1, keepdims=True)


def norm_image_values(mus: Sequence[np.ndarray], norms: np.ndarray, lay: AttentionLayout) -> dict[str, np.ndarray]:
    """Per image (leading axis B), for `accumulate`: sparse columns against high-norm tokens
    (docs/science.md#high-norm-tokens).

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


def host_values(reduced: Mapping[str, Any], lay: AttentionLayout | ChannelLayout) -> dict[str, np.ndarray]:
    """`Probe.host_values` as it was: the device's reduced values -> per-image statistics."""
    if isinstance(lay, ChannelLayout):
        return channel_image_values(reduced["l1"], reduced["active"], lay)
    mus = [hi_lo(m) for m in reduced["mu"]]
    values = attention_image_values(mus, hi_lo(reduced["last_mu_h"]), lay)
    if "norms" in reduced:
        values.update(norm_image_values(mus, np.asarray(reduced["norms"], np.float64), lay))
    return values


def add_maps_per_image(acc: dict[str, np.ndarray], maps: np.ndarray, valid: np.ndarray, index: np.ndarray
                       ) -> dict[str, np.ndarray]:
    """The receptive-field pass's host step as it was: maps (L, B, H, W), added one valid image at a time."""
    for i in np.flatnonzero(valid):
        acc["maps"] += maps[:, i]
        acc["count"] += 1
    acc["skipped"] += np.sum((index >= 0) & ~np.asarray(valid))
    return acc
