"""The figure of the locality experiment: attention distance and receptive-field distance against depth.

`distances_vs_depth(entries)` takes one entry per measured model,
  {"label": str, "model": str (the colour key, shared by trained and untrained twins), "trained": bool,
   "image_side": int, "blocks": [the rows of report.ModelResult.table()]}
and returns a Figure.
"""
from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

Entry = dict[str, Any]
ROWS = ("attention distance, central queries\n/ image side",
        "receptive field: mass-weighted\ndistance / image side",
        "attention mass on prefix tokens\n(central queries)")


def _values(rows: Sequence[dict[str, Any]], key: str, side: float = 1.0) -> np.ndarray:
    return np.array([float(r[key]) / side if r.get(key, "") != "" else np.nan for r in rows], np.float64)


def distances_vs_depth(entries: Sequence[Entry]) -> plt.Figure:
    """Columns trained | untrained, a colour per model; rows: the central-query attention distance (mean over heads,
    band min-max over heads), the receptive field's mass-weighted distance at the attention sub-stage (dashed) and
    the block output (solid), and the prefix mass; dotted: each measure's uniform-map reference (per block: a Swin
    stage's window caps it). Distances are divided by the image side, so models of other sizes compare."""
    states = [t for t in (True, False) if any(e["trained"] == t for e in entries)]
    models = list(dict.fromkeys(e["model"] for e in entries))
    cmap = plt.get_cmap("tab10")
    colours = {m: cmap(i % 10) for i, m in enumerate(models)}
    fig, axes = plt.subplots(3, len(states), figsize=(4.8 * len(states) + 2.6, 8.4), squeeze=False, sharex=True,
                             layout="constrained")
    for ax in axes[:2].ravel()[1:]:
        ax.sharey(axes[0, 0])             # attention and receptive-field distances on one scale
    for ax in axes[2, 1:]:
        ax.sharey(axes[2, 0])
    for c, trained in enumerate(states):
        for entry in (e for e in entries if e["trained"] == trained):
            colour, side, rows = colours[entry["model"]], float(entry["image_side"]), entry["blocks"]
            att = [r for r in rows if r.get("heads", "") != ""]
            if att:
                x = _values(att, "relative_depth")
                axes[0, c].plot(x, _values(att, "attn_distance_central_px", side), "-o", color=colour, markersize=3,
                                linewidth=1.4)
                axes[0, c].fill_between(x, _values(att, "attn_distance_central_px_min", side),
                                        _values(att, "attn_distance_central_px_max", side), color=colour, alpha=0.18,
                                        linewidth=0)
                axes[0, c].plot(x, _values(att, "uniform_attn_distance_central_px", side), ":", color=colour,
                                linewidth=1.2)
                axes[2, c].plot(x, _values(att, "prefix_mass_central"), "-o", color=colour, markersize=3,
                                linewidth=1.2)
            x = _values(rows, "relative_depth")
            if any(r.get("rf_attn_mass_distance_px", "") != "" for r in rows):
                axes[1, c].plot(x, _values(rows, "rf_attn_mass_distance_px", side), "--", color=colour,
                                linewidth=1.2, marker=".", markersize=3)
            axes[1, c].plot(x, _values(rows, "rf_out_mass_distance_px", side), "-", color=colour, linewidth=1.4,
                            marker="o", markersize=3)
            axes[1, c].plot(x, _values(rows, "uniform_rf_mass_distance_px", side), ":", color=colour, linewidth=1.2)
        axes[0, c].set_title("trained" if trained else "untrained")
        axes[2, c].set_xlabel("relative depth")
        axes[2, c].set_xlim(-0.03, 1.03)
        for r in range(3):
            axes[r, c].grid(alpha=0.3)
            if c == 0:
                axes[r, c].set_ylabel(ROWS[r], fontsize=8.5)
    axes[0, 0].set_ylim(bottom=0)         # after every line: the shared axes' upper limits stay automatic
    axes[2, 0].set_ylim(bottom=0)
    handles = [Patch(facecolor=col, edgecolor="none", label=m) for m, col in colours.items()]
    handles += [Line2D([], [], color="gray", marker="o", markersize=3, label="attention: mean over heads"),
                Patch(facecolor="gray", alpha=0.25, label="attention: min-max over heads"),
                Line2D([], [], color="gray", linestyle="--", label="receptive field at the attention sub-stage"),
                Line2D([], [], color="gray", linestyle="-", label="receptive field at the block output"),
                Line2D([], [], color="gray", linestyle=":", label="uniform map (reference)")]
    fig.legend(handles=handles, loc="outside right center", fontsize=7.5, frameon=False)
    fig.suptitle("Attention distance against gradient receptive fields", fontsize=10)
    return fig
