"""Figures of paper 1, sections 3-4: attention maps, correlations, nu densities, top-5% spatial share.

Every function takes plain arrays (as computed by `vitsparse_jax.experiments.sparsity.experiment`) and returns a Figure; the
experiment saves it (PNG + PDF) with `Workdir.save_figure`.
"""
from __future__ import annotations

import math
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

TOP_COLORS = ("tab:red", "tab:orange", "tab:cyan")


def example_attention(image: np.ndarray, head_map: np.ndarray, top_cells: Sequence[tuple[int, int]],
                      grid: tuple[int, int], title: str) -> Figure:
    """Fig. 1: (a) the input image, (b) one head's attention map, (c) the patches of its top columns.

    image (S, S, 3) uint8; head_map (rows, columns) post-softmax; top_cells: (row, col) on `grid` of
    the brightest columns, brightest first.
    """
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    axes[0].imshow(image)
    axes[0].set(title="(a) input image", xlabel="x (pixels)", ylabel="y (pixels)")
    im = axes[1].imshow(head_map, cmap="inferno", interpolation="nearest")
    axes[1].set(title=f"(b) {title}", xlabel="key token j (column)", ylabel="query token i (row)")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label="attention")
    axes[2].imshow(image)
    ch, cw = image.shape[0] / grid[0], image.shape[1] / grid[1]
    outline = [patheffects.withStroke(linewidth=4.0, foreground="white")]   # readable on dark and bright
    for rank, (r, c) in enumerate(top_cells):
        color = TOP_COLORS[rank % len(TOP_COLORS)]
        box = Rectangle((c * cw - 0.5, r * ch - 0.5), cw, ch, fill=False, lw=2.5, ec=color)
        box.set_path_effects(outline)
        axes[2].add_patch(box)
        # the rank in a filled tag just outside the box's top-left corner (inside when at the image edge)
        x, y = c * cw - 0.5, r * ch - 0.5
        axes[2].annotate(str(rank + 1), (x, y), xytext=(2, -2), textcoords="offset points", ha="left", va="top",
                         fontsize=9, weight="bold", color="white",
                         bbox=dict(boxstyle="square,pad=0.15", fc=color, ec="white", lw=0.8))
    axes[2].set(title=f"(c) patches of the top-{len(top_cells)} columns", xlabel="x (pixels)",
                ylabel="y (pixels)")
    fig.tight_layout()
    return fig


def correlation_heatmap(r: np.ndarray, labels: Sequence[str], axis_label: str, title: str) -> Figure:
    """Fig. 2a / 2b: a correlation matrix with its values printed in the cells."""
    k = len(labels)
    size = max(4.0, 0.45 * k + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(r, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Pearson r")
    ax.set_xticks(range(k), labels, rotation=90 if k > 8 else 0)
    ax.set_yticks(range(k), labels)
    ax.set(xlabel=axis_label, ylabel=axis_label, title=title)
    font = 8 if k <= 12 else max(3, 8 - (k - 12) // 4)
    for i in range(k):
        for j in range(k):
            v = r[i, j]
            ax.text(j, i, "nan" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=font,
                    color="white" if abs(v) > 0.6 else "black")
    fig.tight_layout()
    return fig


def _support(edges: np.ndarray, dens: np.ndarray, references: np.ndarray, margin: float = 0.5) -> tuple[float, float]:
    """x range that holds every non-zero bin and reference line (plus a margin), within the edges."""
    nonzero = np.flatnonzero(np.atleast_2d(dens).max(axis=0) > 0)
    points = np.concatenate([np.asarray(references, np.float64).ravel(),
                             edges[nonzero], edges[nonzero + 1]] if nonzero.size else [np.ravel(references)])
    points = points[np.isfinite(points)]
    if points.size == 0:
        return float(edges[0]), float(edges[-1])
    return max(float(edges[0]), points.min() - margin), min(float(edges[-1]), points.max() + margin)


def _density_panel(ax, edges: np.ndarray, dens: np.ndarray, reference: float, xlabel: str | None, title: str,
                   ref_label: str) -> None:
    """The histogram as steps, one per bin (no smoothing between bins: a narrow peak keeps its width)."""
    ax.stairs(dens, edges, color="tab:blue", linewidth=1.0)
    ax.stairs(dens, edges, fill=True, alpha=0.25, color="tab:blue")
    ax.axvline(reference, color="tab:green", ls="--", lw=1.0, label=f"{ref_label} = {reference:.2f}")
    ax.set(ylabel="density", title=title)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left")


def nu_density(edges: np.ndarray, dens: np.ndarray, reference: float, title: str,
               xlabel: str = r"$\nu = -\log_{10}\mu$", ref_label: str = r"$-\log_{10}\bar\mu$") -> Figure:
    """Fig. 3a: the density of nu for one block, with a line at -log10(mean mu)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    _density_panel(ax, edges, dens, reference, xlabel, title, ref_label)
    ax.set_xlim(*_support(edges, dens, np.array([reference])))
    fig.tight_layout()
    return fig


def nu_density_grid(edges: np.ndarray, dens: np.ndarray, references: np.ndarray, names: Sequence[str],
                    xlabel: str = r"$\nu = -\log_{10}\mu$", ref_label: str = r"$-\log_{10}\bar\mu$") -> Figure:
    """Fig. S4: one density panel per block (or CNN layer), each with its reference line."""
    n = len(names)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    # fixed spacing instead of tight_layout (a third of this figure's time): the panels' decorations are alike,
    # and the saved file is cropped to its content (bbox_inches="tight")
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), sharex=True, squeeze=False,
                             gridspec_kw=dict(wspace=0.32, hspace=0.42 if rows > 1 else 0.2))
    for i, ax in enumerate(axes.flat):
        if i < n:
            bottom = i + cols >= n            # no panel below: this one shows the x axis label
            _density_panel(ax, edges, dens[i], float(references[i]), xlabel if bottom else None, names[i],
                           ref_label)
            if bottom:
                ax.xaxis.set_tick_params(labelbottom=True)
        else:
            ax.axis("off")
    axes.flat[0].set_xlim(*_support(edges, dens, references))   # shared by every panel
    return fig


def top_distribution(dist: np.ndarray, title: str, label_all_up_to: int = 10, label_top: int = 5) -> Figure:
    """Fig. 3b: share of the top-column picks that fell on each patch, on the patch grid, in % (sums to 100).

    Grids of at most `label_all_up_to` patches a side have every cell labelled; larger ones (ViT-B/16:
    14 x 14) are read from the colour bar, with only the `label_top` largest cells labelled, so that every
    label stays at a legible 7 pt. The colour bar marks the share of a uniform choice (100 / patches)."""
    gh, gw = dist.shape
    pct = 100.0 * np.asarray(dist, np.float64)
    cell = 0.5 if max(gh, gw) <= 10 else 0.36 if max(gh, gw) <= 16 else 0.22
    fig, ax = plt.subplots(figsize=(max(4.8, cell * gw + 1.9), max(4.0, cell * gh + 1.0)))
    im = ax.imshow(pct, cmap="viridis", interpolation="none", vmin=0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the top-k picks (%)")
    uniform = 100.0 / (gh * gw)
    cbar.ax.axhline(uniform, color="white", lw=1.5, ls="--")
    span = max(float(pct.max()), uniform)
    ticks = [t for t in cbar.get_ticks() if 0 <= t <= span and (t == 0 or abs(t - uniform) > 0.08 * span)]
    cbar.set_ticks(ticks + [uniform], labels=[f"{t:g}" for t in ticks] + [f"{uniform:.2g} uniform"])
    ax.set(xlabel="patch column", ylabel="patch row", title=title)
    step = 1 if gw <= 16 else max(1, gw // 8)
    ax.set_xticks(range(0, gw, step))
    ax.set_yticks(range(0, gh, step))
    if max(gh, gw) <= label_all_up_to:
        cells = [(i, j) for i in range(gh) for j in range(gw)]
    else:
        order = np.argsort(-pct, axis=None, kind="stable")[:label_top]
        cells = [divmod(int(k), gw) for k in order if pct.flat[k] > 0]
    norm, cmap = im.norm, im.get_cmap()
    for i, j in cells:
        r, g, b, _ = cmap(norm(pct[i, j]))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, f"{pct[i, j]:.1f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.tight_layout()
    return fig


def all_heads(maps: np.ndarray, title: str) -> Figure:
    """Fig. S1: the attention map of every head of one block for one image, on one colour scale."""
    heads = maps.shape[0]
    cols = min(4, heads)
    rows = math.ceil(heads / cols)
    # fixed margins instead of a layout engine (which took half of this figure's time): every panel has the same
    # decorations, so the spacing is known; the saved file is cropped to its content (bbox_inches="tight")
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.2 * rows + 0.4), squeeze=False,
                             gridspec_kw=dict(left=0.06, right=0.88, bottom=0.07, top=0.9, wspace=0.32, hspace=0.38))
    scale = dict(vmin=float(maps.min()), vmax=float(maps.max()))
    for h, ax in enumerate(axes.flat):
        if h < heads:
            im = ax.imshow(maps[h], cmap="inferno", interpolation="nearest", **scale)
            ax.set(title=f"head {h}", xlabel="key j", ylabel="query i")
        else:
            ax.axis("off")
    fig.colorbar(im, cax=fig.add_axes((0.9, 0.07, 0.015, 0.83)), label="attention")
    fig.suptitle(title)
    return fig


def top_share(fractions: Sequence[float], shares: np.ndarray, uniform: np.ndarray, names: Sequence[str],
              unit: str) -> Figure:
    """Share of the total (attention mass or channel l1) held by the top p% units, per block / layer;
    dotted: the share the same k units hold when every unit gets the same (k / units)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(names) + 2), 3.8))
    x = np.arange(len(names))
    for i, p in enumerate(fractions):
        line, = ax.plot(x, shares[:, i], "-o", ms=3, label=f"top {100 * p:g}% {unit}")
        ax.plot(x, uniform[:, i], ":", lw=0.8, color=line.get_color())
    ax.set_xticks(x, names, rotation=90 if len(names) > 8 else 0, fontsize=7)
    ax.set(xlabel="block" if unit == "columns" else "layer", ylabel="share of the total",
           title=f"share held by the top {unit} (dotted: uniform)", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
