"""Units, ranking and keep masks of the ablation experiment (docs/science.md#ablation-units); pure and jit-friendly.

A *plan* says, for one model and one grid (p values, n values, draws), which mask sites are ablated, how
many candidate units each has, what the clean pass must capture to rank them, and from which stage each
n-group of variants re-runs the network. Everything here is static (numpy / Python) except the functions
that turn captured tensors into scores and scores into keep masks, which run on device inside jit.

Variants of one n-group, in this order (the variant axis of every mask and result):
  for each p: the top set, then draw 0 .. draws-1;  then (optionally) the whole-layer reference.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.measures.units import count
from vitsparse_jax.models.base import Array, ModelInfo

RANK_BY = ("last_layer", "each_layer")
CNN_UNITS = ("channel", "spatial")


def stage_of(site: str, stages: Sequence[str]) -> str:
    """The stage that contains a mask site: the longest stage name that is the site or a dotted prefix."""
    found = [s for s in stages if site == s or site.startswith(s + ".")]
    if not found:
        raise ValueError(f"mask site {site!r} lies in no stage of {list(stages)}")
    return max(found, key=len)


@dataclasses.dataclass(frozen=True)
class SiteUnits:
    """One ablated mask site and its candidate units."""

    site: str                   # mask site, e.g. 'blocks.11.attn', 'features.27', 'layer4.2.act2'
    stage: str                  # the stage containing it
    kind: str                   # 'token' (ViT/DeiT columns) | 'window' (Swin map tokens) | 'channel' | 'spatial'
    units: int                  # U: number of candidate units
    score_from: str             # capture name that ranks this site's units (clean pass)
    prefix: int = 0             # 'token': prefix tokens kept out of the candidates
    grid: tuple[int, int] = (0, 0)   # 'spatial': the activation map's (H, W)
    # 'window': (H*W,) position in the captured (nW*T) window columns of each raster token
    token_order: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Group:
    """The variants that ablate the last n sites: they re-run the network from `start`."""

    n: int
    sites: tuple[SiteUnits, ...]
    start: str                  # stage the variants start from
    start_input: str | None     # capture holding that stage's input (None: the images)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The checked grid for one model: its groups (sorted by n) and k per site and p (static)."""

    family: str
    ps: tuple[float, ...]
    ns: tuple[int, ...]
    draws: int
    whole_layer: bool
    rank_by: str                # as applied: ViT/DeiT honour the switch, Swin and CNNs rank each layer
    cnn_unit: str
    renormalize: bool
    groups: tuple[Group, ...]
    ks: Mapping[str, tuple[int, ...]]   # site -> k for each p

    @property
    def variants_per_group(self) -> int:
        return len(self.ps) * (1 + self.draws) + int(self.whole_layer)

    @property
    def captures(self) -> tuple[str, ...]:
        """What the clean pass captures: ranking inputs and the start inputs of every group."""
        names = [s.score_from for g in self.groups for s in g.sites]
        names += [g.start_input for g in self.groups if g.start_input]
        return tuple(dict.fromkeys(names))


def _site_units(module: nn.Module, info: ModelInfo, site: str, last_site: str, rank_by: str,
                cnn_unit: str, shapes: Mapping[str, tuple[int, ...]]) -> SiteUnits:
    stage = stage_of(site, info.stages)
    if info.family == "vit":
        score_from = f"{last_site if rank_by == 'last_layer' else site}.probs"
        n_tokens = shapes[f"{site}.probs"][-1]
        return SiteUnits(site, stage, "token", n_tokens - info.num_prefix_tokens, score_from,
                         prefix=info.num_prefix_tokens)
    if info.family == "swin":
        from vitsparse_jax.models import swin

        parts = site.split(".")   # layers.{s}.blocks.{b}.attn
        index = np.asarray(swin.window_token_index(module, int(parts[1]), int(parts[3]))).reshape(-1)
        order = np.empty_like(index)
        order[index] = np.arange(index.size)
        return SiteUnits(site, stage, "window", int(index.size), f"{site}.probs", token_order=order)
    _, h, w, c = shapes[site]
    if cnn_unit == "channel":
        return SiteUnits(site, stage, "channel", c, site, grid=(h, w))
    return SiteUnits(site, stage, "spatial", h * w, site, grid=(h, w))


def make_plan(module: nn.Module, *, ps: Sequence[float], ns: Sequence[int], draws: int = 3,
              rank_by: str = "last_layer", cnn_unit: str = "channel", renormalize: bool = False,
              whole_layer: bool = True) -> Plan:
    """Checks the grid against the model and builds the plan; every error is raised here, before compute."""
    info = models.model_info(module)
    ps, ns = tuple(float(p) for p in ps), tuple(int(n) for n in ns)
    if not ps or not ns:
        raise ValueError("the grid needs at least one p and one n")
    bad = [p for p in ps if not 0.0 < p < 1.0]
    if bad:
        raise ValueError(f"p must lie in (0, 1) (a fraction of the units, e.g. 0.05 for 5%); got {bad}")
    if len(set(ps)) != len(ps) or len(set(ns)) != len(ns):
        raise ValueError(f"repeated values in the grid: p={ps}, n={ns}")
    sites = info.ablation_sites
    bad = [n for n in ns if not 1 <= n <= len(sites)]
    if bad:
        raise ValueError(f"n must be between 1 and the number of ablation layers of {info.name} "
                         f"({len(sites)}: {', '.join(sites)}); got {bad}")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if cnn_unit not in CNN_UNITS:
        raise ValueError(f"cnn_unit must be one of {CNN_UNITS}, got {cnn_unit!r}")
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    if info.num_classes <= 0:
        raise ValueError(f"{info.name} has no classifier head (num_classes=0): accuracy is undefined")
    if info.family != "vit":
        rank_by = "each_layer"   # Swin tokens of different stages / CNN channels are different units

    ablated = sites[len(sites) - max(ns):]
    wanted = [f"{s}.probs" for s in ablated] if info.family in ("vit", "swin") else list(ablated)
    shapes = models.capture_shapes(module, wanted)
    units = {s: _site_units(module, info, s, sites[-1], rank_by, cnn_unit, shapes) for s in ablated}
    ks = {s: tuple(count(p, u.units) for p in ps) for s, u in units.items()}
    for s, k in ks.items():
        if min(k) == 0:
            raise ValueError(f"p={ps[k.index(0)]} is too small: it drops round(p * {units[s].units}) = 0 "
                             f"units of {s}; use p > {0.5 / units[s].units:.3g}")
    groups = []
    for n in sorted(ns):
        group_sites = tuple(units[s] for s in sites[len(sites) - n:])
        start = group_sites[0].stage
        i = info.stages.index(start)
        groups.append(Group(n, group_sites, start, info.stages[i - 1] if i > 0 else None))
    return Plan(info.family, ps, ns, int(draws), bool(whole_layer), rank_by, cnn_unit, bool(renormalize),
                tuple(groups), ks)


# --- on device -------------------------------------------------------------------------------------------

def unit_scores(site: SiteUnits, captured: Array) -> Array:
    """(B, U) ranking scores of a site's candidates from its clean-pass capture (docs/science.md#attention-maps)."""
    if site.kind == "token":      # mu: mean over heads and all query rows; patch columns only
        return captured.astype(jnp.float32).mean(axis=(1, 2))[:, site.prefix:]
    if site.kind == "window":     # per window column, then back to raster token order
        cols = captured.astype(jnp.float32).mean(axis=(2, 3))          # (B, nW, T)
        return cols.reshape(cols.shape[0], -1)[:, site.token_order]
    act = jnp.abs(captured.astype(jnp.float32))                          # (B, H, W, C), post-ReLU
    if site.kind == "channel":
        return act.sum(axis=(1, 2))
    return act.sum(axis=3).reshape(act.shape[0], -1)


def drop_ranks(scores: Array, kmax: int) -> Array:
    """(..., U) scores -> (..., U) int32: each unit's place among the kmax largest (kmax if not among them).

    Dropping the top k units = keeping the units whose rank is >= k, for every k <= kmax at once.
    Ties: jax.lax.top_k puts the lower index first.
    """
    units = scores.shape[-1]
    flat = scores.reshape(-1, units)
    idx = jax.lax.top_k(flat, kmax)[1]
    ranks = jax.vmap(lambda i: jnp.full((units,), kmax, jnp.int32).at[i].set(jnp.arange(kmax, dtype=jnp.int32)))
    return ranks(idx).reshape(scores.shape)


def random_scores(key: Array, index: Array, draws: int, units: int, ks: Sequence[int]) -> Array:
    """(P, D, B, U) uniform scores; the k largest of row (p, d, b) are draw d for image b at k = ks[p].

    Keyed by (global image index, draw, U, k) only: an image's set never depends on its batch, the batch
    size or the device count, and sites with the same number of units (the blocks of a ViT) get the same
    set, as in the published code.
    """
    def one(i: Array, d: Array, k: Array) -> Array:
        sub = key
        for part in (i, d, units, k):
            sub = jax.random.fold_in(sub, part)
        return jax.random.uniform(sub, (units,))
    over_images = jax.vmap(one, in_axes=(0, None, None))
    over_draws = jax.vmap(over_images, in_axes=(None, 0, None))
    over_ks = jax.vmap(over_draws, in_axes=(None, None, 0))
    return over_ks(index, jnp.arange(draws), jnp.asarray(ks, jnp.int32))


def unit_keeps(plan: Plan, site: SiteUnits, scores: Array, key: Array, index: Array) -> Array:
    """(V, B, U) float32 keep factors of one site for every variant of a group (order: module docstring)."""
    ks = np.asarray(plan.ks[site.site])
    kmax, b = int(ks.max()), scores.shape[0]
    thresholds = ks[:, None, None]                                                   # (P, 1, 1)
    top = drop_ranks(scores, kmax)[None] >= thresholds                               # (P, B, U)
    rand = drop_ranks(random_scores(key, index, plan.draws, site.units, ks), kmax) >= thresholds[:, None]
    keeps = jnp.concatenate([top[:, None], rand], axis=1).reshape(-1, b, site.units)  # (P * (1 + D), B, U)
    if plan.whole_layer:
        keeps = jnp.concatenate([keeps, jnp.zeros_like(keeps[:1])])
    return keeps.astype(jnp.float32)


def site_mask(site: SiteUnits, keep: Array) -> Array:
    """(..., B, U) unit keep factors -> the model's mask for the site (docs/design.md, mask sites)."""
    if site.kind == "token":       # prefix columns are always kept
        ones = jnp.ones((*keep.shape[:-1], site.prefix), keep.dtype)
        return jnp.concatenate([ones, keep], axis=-1)
    if site.kind == "window":      # (B, H*W) raster keep factors
        return keep
    if site.kind == "channel":
        return keep[..., None, None, :]
    return keep.reshape(*keep.shape[:-1], *site.grid, 1)


def all_keeps(plan: Plan, aux: Mapping[str, Array], key: Array, index: Array) -> dict[str, Array]:
    """(V, B, U) keep factors of every ablated site, from the clean-pass captures `aux`.

    Sites ranked by the same capture with the same units (ViT's blocks under rank_by=last_layer) share
    one computation.
    """
    out: dict[str, Array] = {}
    shared: dict[tuple[str, int, tuple[int, ...]], Array] = {}
    for site in {s.site: s for g in plan.groups for s in g.sites}.values():
        memo = (site.score_from, site.units, plan.ks[site.site])
        if memo not in shared:
            shared[memo] = unit_keeps(plan, site, unit_scores(site, aux[site.score_from]), key, index)
        out[site.site] = shared[memo]
    return out


def group_masks(group: Group, keeps: Mapping[str, Array]) -> dict[str, Array]:
    """The model's masks with a leading variant axis (V, B, ...) for every site of a group."""
    return {s.site: site_mask(s, keeps[s.site]) for s in group.sites}
