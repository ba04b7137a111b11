"""Figures of the receptive-field experiment (paper 2, Figs. 2 and 3, and locality over training).

Each function takes plain entries, one per measured model:
  {"label": str, "model": str, "trained": bool, "step": int | None, "image_size": [H, W],
   "maps": (L, H, W) array, "layers": [{"layer", "group", "relative_depth", "grid", "central",
   "S", "mean_radius", ...}, ...]}
("model" is the colour key: the same for a model's trained and untrained twins) and returns a Figure.
"""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

Entry = dict[str, Any]
GROUP_TITLES = {"attn": "attn (slow pathway)", "attn_res": "attn_res (fast pathway)", "mlp": "mlp",
                "mlp_res": "mlp_res (block output)"}
GROUP_STYLES = {"attn": "--", "attn_res": "-", "mlp": ":", "mlp_res": "-."}
METRICS = (("S", "S = sum r E_r / max M"), ("mean_radius", "mean radius (px)"))


def _log_axis(ax: plt.Axes) -> None:
    """Log y axis with plain-text tick labels (matplotlib's default mathtext labels are slow to draw)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
    ax.grid(alpha=0.3, which="both")


def _groups(entry: Entry) -> list[str]:
    return list(dict.fromkeys(layer["group"] for layer in entry["layers"]))


def _columns(n: int, max_columns: int) -> list[int]:
    """Up to max_columns indices spread evenly over 0..n-1, first and last included."""
    if n <= max_columns:
        return list(range(n))
    return sorted(set(np.round(np.linspace(0, n - 1, max_columns)).astype(int).tolist()))


def maps_across_depth(entries: Sequence[Entry], max_columns: int = 12) -> plt.Figure:
    """Receptive-field maps (each scaled to its own max) across depth: a row per model and pathway,
    the central region outlined."""
    rows = [(entry, group) for entry in entries for group in _groups(entry)]
    ncols = max(len(_columns(sum(l["group"] == g for l in e["layers"]), max_columns)) for e, g in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.3 * ncols + 1.8, 1.35 * len(rows) + 0.4),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (entry, group) in enumerate(rows):
        idx = [i for i, layer in enumerate(entry["layers"]) if layer["group"] == group]
        h, w = entry["image_size"]
        for c, k in enumerate(_columns(len(idx), max_columns)):
            layer, m = entry["layers"][idx[k]], np.asarray(entry["maps"][idx[k]])
            ax = axes[r, c]
            ax.imshow(m / m.max() if m.max() > 0 else m, cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
            (gh, gw), (r0, r1, c0, c1) = layer["grid"], layer["central"]
            ax.add_patch(Rectangle((c0 * w / gw - 0.5, r0 * h / gh - 0.5), (c1 - c0) * w / gw, (r1 - r0) * h / gh,
                                   fill=False, edgecolor="cyan", linewidth=0.6))
            ax.set_title(layer["layer"], fontsize=6)
        axes[r, 0].text(-0.08, 0.5, f"{entry['label']}\n{GROUP_TITLES.get(group, group)}", fontsize=6.5,
                        ha="right", va="center", transform=axes[r, 0].transAxes)
    fig.suptitle("Gradient receptive fields |d sum(Y_central)/dx| across depth", fontsize=9)
    fig.tight_layout()
    return fig


def _model_colours(entries: Sequence[Entry]) -> dict[str, Any]:
    models = list(dict.fromkeys(e["model"] for e in entries))
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def locality_vs_depth(entries: Sequence[Entry]) -> plt.Figure:
    """S and mean radius (log scale) against relative depth; columns untrained / trained (paper 2 Fig. 3), a
    colour per model, a line style per ViT pathway; single-layer groups (embedding, stem) as markers."""
    states = [t for t in (False, True) if any(e["trained"] == t for e in entries)]
    colours = _model_colours(entries)
    fig, axes = plt.subplots(2, len(states), figsize=(5.2 * len(states) + 2.2, 6.5), squeeze=False,
                             sharex=True, sharey="row")
    for c, trained in enumerate(states):
        for entry in (e for e in entries if e["trained"] == trained):
            for group in _groups(entry):
                layers = [l for l in entry["layers"] if l["group"] == group]
                x = [l["relative_depth"] for l in layers]
                for r, (key, _) in enumerate(METRICS):
                    axes[r, c].plot(x, [l[key] for l in layers], GROUP_STYLES.get(group, "-"),
                                    color=colours[entry["model"]], marker="o" if len(layers) == 1 else ".",
                                    markersize=5 if len(layers) == 1 else 3, linewidth=1.2)
        axes[0, c].set_title("trained" if trained else "untrained")
        axes[1, c].set_xlabel("relative depth")
        for r, (_, ylabel) in enumerate(METRICS):
            axes[r, c].set_ylabel(ylabel)
            _log_axis(axes[r, c])
    handles = [Line2D([], [], color=col, label=m) for m, col in colours.items()]
    handles.append(Line2D([], [], color="gray", marker="o", linestyle="none", label="single layer (embed, stem)"))
    groups = list(dict.fromkeys(g for e in entries for g in _groups(e) if g in GROUP_STYLES))
    handles += [Line2D([], [], color="gray", linestyle=GROUP_STYLES[g], label=GROUP_TITLES[g]) for g in groups]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    fig.suptitle("Locality of receptive fields against depth", fontsize=10)
    fig.tight_layout()
    return fig


def locality_over_training(entries: Sequence[Entry]) -> plt.Figure:
    """S and mean radius against training step, a column per layer group, a line per layer coloured by
    relative depth."""
    entries = sorted(entries, key=lambda e: e["step"])
    steps = [e["step"] for e in entries]
    groups = list(dict.fromkeys(g for e in entries for g in _groups(e)))
    fig, axes = plt.subplots(2, len(groups), figsize=(3.2 * len(groups) + 1.2, 5.8), squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for c, group in enumerate(groups):
        names = list(dict.fromkeys(l["layer"] for e in entries for l in e["layers"] if l["group"] == group))
        for name in names:
            per_step = [next((l for l in e["layers"] if l["layer"] == name), None) for e in entries]
            depth = next(l["relative_depth"] for l in per_step if l is not None)
            for r, (key, _) in enumerate(METRICS):
                y = [np.nan if l is None else l[key] for l in per_step]
                axes[r, c].plot(steps, y, "-o", color=cmap(depth), markersize=3, linewidth=1.2, label=name)
        axes[0, c].set_title(GROUP_TITLES.get(group, group), fontsize=9)
        axes[1, c].set_xlabel("training step")
        for r, (_, ylabel) in enumerate(METRICS):
            axes[r, c].grid(alpha=0.3)
            if c == 0:
                axes[r, c].set_ylabel(ylabel)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes.ravel().tolist(), label="relative depth", fraction=0.03, pad=0.02)
    fig.suptitle(f"Locality over training: {entries[0].get('arch', entries[0]['model'])}", fontsize=10)
    return fig
