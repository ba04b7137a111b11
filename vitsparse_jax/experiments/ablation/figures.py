"""Figure 4 of paper 1: accuracy against the fraction p of dropped units.

Both functions take per-model results as written to results.json (`ablation.model_result`): `A0`,
`grid.p`, `cells` (n, p, A_t, A_r) and `whole_layer` (n, acc).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch


def _curve(result: Mapping[str, Any], n: int, key: str) -> tuple[list[float], list[float]]:
    """(p in %, accuracy in %) at n, starting from the clean model at p = 0."""
    cells = sorted((c for c in result["cells"] if c["n"] == n), key=lambda c: c["p"])
    return [0.0] + [100 * c["p"] for c in cells], [100 * result["A0"]] + [100 * c[key] for c in cells]


def _finish(ax: Any, title: str, colours: Sequence[tuple[str, Any]], whole: bool = False) -> None:
    """Axes labels and one legend outside the axes (never over the curves): colour = model or n (filled
    squares), line style = which units were dropped (grey lines), so no line is described twice."""
    ax.set(xlabel="p: dropped units (%)", ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    handles: list[Any] = [Patch(facecolor=colour, edgecolor="none", label=label) for label, colour in colours]
    handles += [Line2D([], [], color="gray", ls="-", marker="o", ms=3, label="top-p dropped (A_t)"),
                Line2D([], [], color="gray", ls="--", marker="o", ms=3, mfc="none", label="random p dropped (A_r)")]
    if whole:
        handles.append(Line2D([], [], color="gray", ls=":", label="p × whole-layer loss"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
              handlelength=3.0)


def accuracy_vs_p(results: Sequence[Mapping[str, Any]], n: int = 2) -> Figure:
    """Fig. 4a: A_t (solid) and A_r (dashed) against p for several models, last n layers ablated."""
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    colors = plt.get_cmap("tab10" if len(results) <= 10 else "tab20").colors
    for i, r in enumerate(results):
        color = colors[i % len(colors)]
        ax.plot(*_curve(r, n, "A_t"), "-o", color=color, ms=3)
        ax.plot(*_curve(r, n, "A_r"), "--o", color=color, ms=3, mfc="none")
    _finish(ax, f"ablation of the last {n} layers",
            [(r["label"], colors[i % len(colors)]) for i, r in enumerate(results)])
    return fig


def accuracy_vs_p_by_n(result: Mapping[str, Any]) -> Figure:
    """Fig. 4b: one model, n = 1..3; dotted: the whole-layer loss scaled by p, A0 - p (A0 - A_whole(n))."""
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    colors = plt.get_cmap("tab10").colors
    whole = {w["n"]: w["acc"] for w in result.get("whole_layer", [])}
    for i, n in enumerate(result["grid"]["n"]):
        color = colors[i % len(colors)]
        xs, top = _curve(result, n, "A_t")
        ax.plot(xs, top, "-o", color=color, ms=3)
        ax.plot(*_curve(result, n, "A_r"), "--o", color=color, ms=3, mfc="none")
        if n in whole:
            a0 = 100 * result["A0"]
            ax.plot(xs, [a0 - x / 100 * (a0 - 100 * whole[n]) for x in xs], ":", color=color)
    _finish(ax, result["label"], [(f"last {n} layer{'s' if n > 1 else ''} (n = {n})", colors[i % len(colors)])
                                  for i, n in enumerate(result["grid"]["n"])], whole=bool(whole))
    return fig
