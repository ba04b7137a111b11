"""docs/science.md#high-norm-tokens, outputs of one model: sparse columns against high-norm tokens.

The statistics themselves are streamed with the others (`stats.norm_image_values`); here: the table per
block, the mu-against-input-norm scatter of the last block for a few images, and its figure.
"""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from vitsparse_jax.experiments.sparsity import stats as st

SCATTER_IMAGES = 8   # images drawn in the mu-against-norm scatter
PREFIX_STYLE = {"cls": ("s", "C3", "class token"), "dist": ("D", "C2", "distillation token"),
                "reg": ("^", "C1", "register tokens"), "prefix": ("s", "C3", "prefix tokens")}


def rows(names: Sequence[str], res: dict[str, Any]) -> list[dict[str, Any]]:
    """norms.csv: one row per block (block l's input is the output of block l - 1, or the embedding)."""
    n = res["norms"]
    out = []
    for l, name in enumerate(names):
        row = {"block": name, "high_norm_share_input": n["high_norm_share_input"][l],
               "high_norm_share_output": n["high_norm_share_output"][l],
               "top5_overlap_high_norm_input": n["top5_overlap_high_norm_input"][l],
               "spearman_mu_input_norm": n["spearman_mu_input_norm"][l],
               "patch_norm_median_output": n["patch_norm_median"][l + 1]}
        row.update({f"mu_mass_{kind}": v[l] for kind, v in res["prefix_mu_by_kind"].items()})
        out.append({k: float(v) if not isinstance(v, str) else v for k, v in row.items()})
    return out


def scatter_values(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The last block's mu (n, N) and the norms of its input tokens (n, N) of the readable images among the
    SCATTER_IMAGES from the example image on: the rows the pass kept of them (`done`: the image was readable),
    in image order. No forward pass of its own (and no program to compile)."""
    done = rows["done"]
    return {"mu": rows["mu"][done], "norm_in": rows["norm_in"][done]}


def mu_norm_figure(scatter: dict[str, np.ndarray], prefix_kinds: Sequence[str], title: str) -> Figure:
    """mu of the last block's columns against the norm of the same token at the block's input (log-log):
    patch tokens as dots, prefix tokens marked by kind."""
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    p = len(prefix_kinds)
    mu, norm = np.maximum(scatter["mu"], st.TINY), scatter["norm_in"]
    ax.scatter(norm[:, p:].ravel(), mu[:, p:].ravel(), s=4, alpha=0.35, color="C0", lw=0, label="patch tokens")
    for kind in dict.fromkeys(prefix_kinds):
        cols = [i for i, k in enumerate(prefix_kinds) if k == kind]
        marker, colour, label = PREFIX_STYLE.get(kind, PREFIX_STYLE["prefix"])
        ax.scatter(norm[:, cols].ravel(), mu[:, cols].ravel(), s=22, marker=marker, color=colour,
                   edgecolor="k", lw=0.4, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("token norm at the block's input")
    ax.set_ylabel(r"$\mu$ of the token's column (last block)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def depth_figure(models: Sequence[tuple[str, dict]]) -> Figure:
    """Overlap of the top-5% mu columns with the high-norm tokens of the block's input (solid; dotted:
    chance = `high_norm_share_input`), Spearman r(mu, input norm), and the mu mass on register tokens,
    against relative depth (block / blocks), one colour per model; models = (name, statistics)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for i, (name, res) in enumerate(models):
        colour, n = f"C{i}", res["norms"]
        overlap = n["top5_overlap_high_norm_input"]
        depth = (np.arange(len(overlap)) + 1) / len(overlap)
        axes[0].plot(depth, overlap, marker="o", ms=3, color=colour, label=name)
        axes[0].plot(depth, n["high_norm_share_input"], ls=":", color=colour)
        axes[1].plot(depth, n["spearman_mu_input_norm"], marker="o", ms=3, color=colour, label=name)
        reg = res["prefix_mu_by_kind"].get("reg")
        if reg is not None:
            axes[2].plot(depth, reg, marker="o", ms=3, color=colour, label=name)
    axes[0].set_ylabel("top-5% mu columns that are high-norm inputs")
    axes[1].set_ylabel(r"Spearman r($\mu$, input norm), patch tokens")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[2].set_ylabel(r"$\mu$ mass on register tokens")
    for ax in axes:
        ax.set_xlabel("relative depth")
    axes[0].legend(fontsize=6)
    if not axes[2].lines:
        axes[2].text(0.5, 0.5, "no model with registers", ha="center", va="center", transform=axes[2].transAxes)
    fig.tight_layout()
    return fig
