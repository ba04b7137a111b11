"""Figures of the receptive-field experiment (paper 2, Figs. 2 and 3, and locality over training).

Each function takes plain entries, one per measured model:
  {"label": str, "model": str, "trained": bool, "step": int | None, "image_size": [H, W],
   "maps": (L, H, W) array, "layers": [{"layer", "group", "relative_depth", "grid", "central",
   "S", "mean_radius", ...}, ...]}
("model" is the colour key, the model's name with its tag: the same for a model's trained and untrained twins;
for a checkpoint series, its training run's name) and returns a Figure.
"""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

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


SCALES = ("per_map", "shared")


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"receptive_field.map_scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return scale


def _short(name: str) -> str:
    """Panel titles: 'layers.3.blocks.1.attn_res' -> 'l3.b1.attn_res', 'blocks.11.mlp' -> 'b11.mlp'."""
    return name.replace("layers.", "l").replace("blocks.", "b").replace("features.", "f")


def maps_across_depth(entries: Sequence[Entry], max_columns: int = 12, scale: str = "per_map") -> plt.Figure:
    """Receptive-field maps across depth (paper 2, Fig. 2): for each model and pathway, its layers in forward
    order, wrapping onto a new row after `max_columns` maps so that every layer is shown (ViT-B/16: 49
    layers = embed + 4 pathways x 12 blocks -> 5 rows); the central region outlined in cyan; one colour bar.

    scale: 'per_map' divides each map by its own maximum (the shapes are comparable; colour bar M / max M);
    'shared' puts every map of the figure on one linear scale (the magnitudes are comparable; colour bar M).
    """
    check_scale(scale)
    max_columns = max(1, int(max_columns))
    blocks = []                       # (entry, group, layer indices) per model and pathway
    for entry in entries:
        for group in _groups(entry):
            blocks.append((entry, group, [i for i, layer in enumerate(entry["layers"]) if layer["group"] == group]))
    ncols = min(max_columns, max(len(idx) for _, _, idx in blocks))
    rows = [(entry, group, idx[k:k + ncols], k == 0) for entry, group, idx in blocks for k in range(0, len(idx), ncols)]
    vmax = max(float(np.max(e["maps"])) for e in entries) if scale == "shared" else 1.0
    vmax = vmax if vmax > 0 else 1.0
    panel = 1.05
    fig = plt.figure(figsize=(panel * ncols + 2.6, panel * 1.12 * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    image = None
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, (entry, group, idx, first) in enumerate(rows):
        h, w = entry["image_size"]
        for c, i in enumerate(idx):
            layer, m = entry["layers"][i], np.asarray(entry["maps"][i], np.float64)
            if scale == "per_map":
                m = m / m.max() if m.max() > 0 else m
            ax = axes[r, c]
            image = ax.imshow(m, cmap="inferno", vmin=0, vmax=vmax, interpolation="none")
            (gh, gw), (r0, r1, c0, c1) = layer["grid"], layer["central"]
            ax.add_patch(Rectangle((c0 * w / gw - 0.5, r0 * h / gh - 0.5), (c1 - c0) * w / gw, (r1 - r0) * h / gh,
                                   fill=False, edgecolor="cyan", linewidth=0.6))
            ax.set_title(_short(layer["layer"]), fontsize=6, pad=2)
        if first:
            axes[r, 0].text(-0.1, 0.5, f"{entry['label']}\n{GROUP_TITLES.get(group, group)}", fontsize=6.5,
                            ha="right", va="center", transform=axes[r, 0].transAxes)
    if image is not None:
        label = "M / max M (each map)" if scale == "per_map" else "M = |d sum(Y_central)/dx| (one scale)"
        bar = fig.colorbar(image, ax=axes, shrink=min(1.0, max(0.3, 3.5 / len(rows))), aspect=20, pad=0.01)
        bar.set_label(label, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle("Gradient receptive fields |d sum(Y_central)/dx| across depth"
                 + (" (each map scaled to its maximum)" if scale == "per_map" else " (one colour scale)"), fontsize=9)
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
    # Colour = model (a filled square), line style = pathway (grey lines): no entry draws a line that another
    # entry also describes.
    handles = [Patch(facecolor=col, edgecolor="none", label=m) for m, col in colours.items()]
    groups = list(dict.fromkeys(g for e in entries for g in _groups(e) if g in GROUP_STYLES))
    if len(groups) > 1:
        handles += [Line2D([], [], color="gray", linestyle=GROUP_STYLES[g], label=GROUP_TITLES[g]) for g in groups]
    singles = [g for e in entries for g in _groups(e) if sum(l["group"] == g for l in e["layers"]) == 1]
    if singles:
        handles.append(Line2D([], [], color="gray", marker="o", linestyle="none",
                              label=f"single layer ({', '.join(dict.fromkeys(singles))})"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
               title="colour: model; line: pathway" if len(groups) > 1 else "colour: model", title_fontsize=8)
    fig.suptitle("Locality of receptive fields against depth", fontsize=10)
    fig.tight_layout()
    return fig


SERIES_STYLES = ("-", "--", ":", "-.")
SERIES_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}


def locality_over_training(entries: Sequence[Entry]) -> plt.Figure:
    """S and mean radius against training step, a column per layer group, a line per layer coloured by
    relative depth; several series (entries' "model": each training run's name) in one line style each."""
    entries = sorted(entries, key=lambda e: e["step"])
    series = list(dict.fromkeys(e["model"] for e in entries))
    groups = list(dict.fromkeys(g for e in entries for g in _groups(e)))
    fig, axes = plt.subplots(2, len(groups), figsize=(3.2 * len(groups) + 1.2, 5.8), squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for k, run in enumerate(series):
        style = SERIES_STYLES[k % len(SERIES_STYLES)]
        mine = [e for e in entries if e["model"] == run]
        steps = [e["step"] for e in mine]
        for c, group in enumerate(groups):
            names = list(dict.fromkeys(l["layer"] for e in mine for l in e["layers"] if l["group"] == group))
            for name in names:
                per_step = [next((l for l in e["layers"] if l["layer"] == name), None) for e in mine]
                depth = next(l["relative_depth"] for l in per_step if l is not None)
                for r, (key, _) in enumerate(METRICS):
                    y = [np.nan if l is None else l[key] for l in per_step]
                    axes[r, c].plot(steps, y, style, marker="o", color=cmap(depth), markersize=3, linewidth=1.2,
                                    label=name)
    for c, group in enumerate(groups):
        axes[0, c].set_title(GROUP_TITLES.get(group, group), fontsize=9)
        axes[1, c].set_xlabel("training step")
        for r, (_, ylabel) in enumerate(METRICS):
            axes[r, c].grid(alpha=0.3)
            if c == 0:
                axes[r, c].set_ylabel(ylabel)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes.ravel().tolist(), label="relative depth", fraction=0.03, pad=0.02)
    runs = [run if len(series) == 1 else f"{run} ({SERIES_NAMES[SERIES_STYLES[k % len(SERIES_STYLES)]]})"
            for k, run in enumerate(series)]   # several runs: which line style is which
    fig.suptitle(f"Locality over training: {', '.join(runs)}", fontsize=10)
    return fig
