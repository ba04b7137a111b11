"""Figure 4 of paper 1: accuracy against the fraction p of dropped units.

Both functions take per-model results as written to results.json (`ablation.model_result`): `A0`,
`grid.p`, `cells` (n, p, A_t, A_r) and `whole_layer` (n, acc); where the results carry them (`A0_ci`, each
cell's `A_t_ci` and `A_r_ci`: the percentile bootstrap over images of `report.summarize`), each point has its
interval drawn as an error bar.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

DODGE = 0.01    # neighbouring curves' points sit this fraction of the p axis apart, so that their bars do not overlap


def _cells(result: Mapping[str, Any], n: int) -> list[Mapping[str, Any]]:
    return sorted((c for c in result["cells"] if c["n"] == n), key=lambda c: c["p"])


def _curve(result: Mapping[str, Any], n: int, key: str) -> tuple[list[float], list[float]]:
    """(p in %, accuracy in %) at n, starting from the clean model at p = 0."""
    cells = _cells(result, n)
    return [0.0] + [100 * c["p"] for c in cells], [100 * result["A0"]] + [100 * c[key] for c in cells]


def _has_intervals(result: Mapping[str, Any]) -> bool:
    return "A0_ci" in result and all("A_t_ci" in c and "A_r_ci" in c for c in result["cells"])


def _bars(ax: Any, xs: Sequence[float], intervals: Sequence[Sequence[float]], color: Any) -> None:
    """Vertical bars from each interval's lower to its upper end (fractions, drawn in %)."""
    ax.vlines(xs, [100 * lo for lo, _ in intervals], [100 * hi for _, hi in intervals], color=color, lw=0.8)


def _plot(ax: Any, result: Mapping[str, Any], n: int, color: Any, slot: tuple[int, int] = (0, 1),
          clean: Any = None) -> bool:
    """A_t (solid) and A_r (dashed) at n from the clean model at p = 0, with the bootstrap interval of each
    point as an error bar when the result has them (A0's at p = 0 in the colour `clean`, None: not drawn);
    `slot`: (i, of m), this model's or n's place among the m of the axes: its two curves' points move apart
    from the others' by `DODGE`, the group centred on each p. Returns whether error bars were drawn."""
    bars = _has_intervals(result)
    step, (i, m) = DODGE * 100 * max(result["grid"]["p"]), slot
    for k, (key, style, face) in enumerate((("A_t", "-", color), ("A_r", "--", "none"))):
        xs, ys = _curve(result, n, key)
        xs = [xs[0]] + [x + step * (2 * i + k - (2 * m - 1) / 2) for x in xs[1:]]
        ax.plot(xs, ys, style, color=color, lw=1.3)
        ax.plot(xs[1:], ys[1:], "o", color=color, mfc=face, ms=3)
        if bars:
            _bars(ax, xs[1:], [c[f"{key}_ci"] for c in _cells(result, n)], color)
    if bars and clean is not None:
        ax.plot([0.0], [100 * result["A0"]], "o", color=clean, ms=3, zorder=3)
        _bars(ax, [0.0], [result["A0_ci"]], clean)
    return bars


def confidence(results: Sequence[Mapping[str, Any]]) -> float | None:
    """The confidence level of the results' error bars (None: no intervals to draw)."""
    levels = {r.get("bootstrap", {}).get("confidence") for r in results if "A0_ci" in r}
    return levels.pop() if len(levels) == 1 else None


def _finish(ax: Any, title: str, colours: Sequence[tuple[str, Any]], whole: bool = False,
            level: float | None = None, legend: bool = True) -> None:
    """Axes labels and one legend outside the axes (never over the curves): colour = model or n (filled
    squares), line style = which units were dropped (grey lines), so no line is described twice; an error bar
    for the intervals when they are drawn (`level`: their confidence)."""
    ax.set(xlabel="p: dropped units (%)", ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    if not legend:
        return
    handles: list[Any] = [Patch(facecolor=colour, edgecolor="none", label=label) for label, colour in colours]
    handles += [Line2D([], [], color="gray", ls="-", marker="o", ms=3, label="top-p dropped (A_t)"),
                Line2D([], [], color="gray", ls="--", marker="o", ms=3, mfc="none", label="random p dropped (A_r)")]
    if whole:
        handles.append(Line2D([], [], color="gray", ls=":", label="p × whole-layer loss"))
    if level is not None:
        handles.append(Line2D([], [], color="gray", marker="|", ms=8, ls="none",
                              label=f"{100 * level:g}% bootstrap interval\n(images resampled)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
              handlelength=3.0)


def accuracy_vs_p(results: Sequence[Mapping[str, Any]], n: int = 2) -> Figure:
    """Fig. 4a: A_t (solid) and A_r (dashed) against p for several models, last n layers ablated, with the
    bootstrap interval of each point."""
    fig, ax = plt.subplots(figsize=(5.0, 3.8))
    colors = plt.get_cmap("tab10" if len(results) <= 10 else "tab20").colors
    banded = [_plot(ax, r, n, colors[i % len(colors)], (i, len(results)), clean=colors[i % len(colors)])
              for i, r in enumerate(results)]
    _finish(ax, f"ablation of the last {n} layers" if n != 1 else "ablation of the last layer",
            [(r["label"], colors[i % len(colors)]) for i, r in enumerate(results)],
            level=confidence(results) if all(banded) else None)
    return fig


def accuracy_vs_p_by_n(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Figure:
    """Fig. 4b: one panel per model (one result, or several: e.g. every tag of an arch), a colour per n of its
    grid, with the bootstrap interval of each point; dotted: the whole-layer loss scaled by p,
    A0 - p (A0 - A_whole(n)). The legend is beside the last panel."""
    results = [results] if isinstance(results, Mapping) else list(results)
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results) + 1.4, 3.8), squeeze=False,
                             sharey=True)
    colors = plt.get_cmap("tab10").colors
    for k, (ax, result) in enumerate(zip(axes[0], results)):
        whole = {w["n"]: w["acc"] for w in result.get("whole_layer", [])}
        banded = []
        for i, n in enumerate(result["grid"]["n"]):
            color = colors[i % len(colors)]
            banded.append(_plot(ax, result, n, color, (i, len(result["grid"]["n"])),
                                clean="black" if i == 0 else None))   # A0 once: every n starts there
            if n in whole:
                xs, a0 = _curve(result, n, "A_t")[0], 100 * result["A0"]
                ax.plot(xs, [a0 - x / 100 * (a0 - 100 * whole[n]) for x in xs], ":", color=color)
        _finish(ax, result["label"], [(f"last {n} layer{'s' if n > 1 else ''} (n = {n})", colors[i % len(colors)])
                                      for i, n in enumerate(result["grid"]["n"])], whole=bool(whole),
                level=confidence([result]) if all(banded) else None, legend=k == len(results) - 1)
        if k:
            ax.set_ylabel("")
    return fig
