"""Several models in one sparsity run (`sparsity.models`): comparison tables and figures.

Each model's own outputs are in `models/<name with its tag>/` (results.json, tables, figures, report.md); this module
writes, at the top of the workdir, `models.csv` (one row per model and block), `results.json` and the
comparison figures: Fig. 3a's nu density of the last block side by side, the share of patch attention
in the top 5% columns against relative depth, and the overlap and Spearman curves of
docs/science.md#high-norm-tokens.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from vitsparse_jax import science
from vitsparse_jax.experiments.sparsity import norms
from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.report_html import write_report_html
from vitsparse_jax.runtime.workdir import Workdir

MODELS_DIR = "models"


def model_dir(name: str) -> str:
    """The per-model folder of a multi-model run: models/<name with unsafe characters replaced>."""
    return f"{MODELS_DIR}/{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}"


def relative_depth(blocks: int) -> np.ndarray:
    """Block l of L at (l + 1) / L: the last block of every model at 1."""
    return (np.arange(blocks) + 1) / blocks


def _attention(summaries: Sequence[dict]) -> list[dict]:
    return [s for s in summaries if s["kind"] == "attention"]


def rows(summaries: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per (model, block) with the numbers that the comparison figures draw."""
    out = []
    for s in _attention(summaries):
        res = s["statistics"]
        blocks = len(res["mean_mu"])
        norms = res.get("norms")
        for l, depth in enumerate(relative_depth(blocks)):
            row = {"model": s["name"], "block": s["layers"][l], "relative_depth": float(depth),
                   "top5_share": float(np.asarray(res["top_share"])[l, 0]),
                   "mean_nu": float(res["mean_nu"][l])}
            row.update({f"prefix_mu_{kind}": float(v[l]) for kind, v in res["prefix_mu_by_kind"].items()})
            if norms is not None:
                row.update(high_norm_share_input=float(norms["high_norm_share_input"][l]),
                           high_norm_share_output=float(norms["high_norm_share_output"][l]),
                           top5_overlap_high_norm_input=float(norms["top5_overlap_high_norm_input"][l]),
                           spearman_mu_input_norm=float(norms["spearman_mu_input_norm"][l]))
            out.append(row)
    return out


def nu_density_figure(summaries: Sequence[dict]) -> Figure:
    """Fig. 3a side by side: the nu density of the last block of each model, with its -log10(mean mu) line."""
    models = _attention(summaries)
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 2.8), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], models):
        res = s["statistics"]
        edges = np.asarray(res["nu_bin_edges"])
        dens = st.density(np.asarray(res["nu_hist"])[-1], edges[0], edges[-1])
        ax.stairs(dens, edges, fill=True, alpha=0.6)
        ax.axvline(res["nu_reference"][-1], color="k", lw=0.8, ls="--")
        ax.set_title(s["name"], fontsize=8)
        ax.set_xlabel(r"$\nu = -\log_{10}\mu$ (last block)")
    axes[0, 0].set_ylabel("density")
    fig.tight_layout()
    return fig


def depth_figure(summaries: Sequence[dict]) -> Figure:
    """Share of the patch attention held by the top 5% columns against relative depth, one line per model."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for s in _attention(summaries):
        share = np.asarray(s["statistics"]["top_share"])[:, 0]
        ax.plot(relative_depth(len(share)), share, marker="o", ms=3, label=s["name"])
    ax.set_xlabel("relative depth (block / blocks)")
    ax.set_ylabel("share of patch attention in top 5% columns")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def write_comparison(workdir: Workdir, summaries: Sequence[dict], config: dict) -> dict:
    """Writes models.csv, the comparison figures, results.json, report.md and report.html; returns results.json."""
    table = rows(summaries)
    if table:
        workdir.write_csv("models.csv", table)
    figures = []
    with_norms = [(s["name"], s["statistics"]) for s in _attention(summaries) if s["statistics"].get("norms")]
    for stem, make in (("compare_nu_density", nu_density_figure), ("compare_top_share_depth", depth_figure),
                       ("compare_norms", lambda _: norms.depth_figure(with_norms) if with_norms else None)):
        fig = make(summaries) if _attention(summaries) else None
        if fig is not None:
            workdir.save_figure(fig, stem)
            plt.close(fig)
            figures.append(stem)
    result = {"experiment": "sparsity", "models": [s["name"] for s in summaries],
              "folders": {s["name"]: s["folder"] for s in summaries},
              "images": {s["name"]: s["images"] for s in summaries}, "figures": figures, "config": config}
    workdir.write_json("results.json", result)
    lines = ["# Sparsity: several models on the same images", "",
             "| model | images | folder |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['images']} | [{s['folder']}]({s['folder']}/report.md) |"
              for s in summaries]
    lines += ["", "Per model and block: `models.csv`. Figures:", ""]
    lines += [f"![{stem}]({stem}.png)" for stem in figures]
    keys = ["mu", "prefix_mass", "nu_density", "top_share", "block_depth"] if _attention(summaries) else []
    keys += ["high_norm_tokens"] if with_norms else []
    lines += ["", *science.report_block(keys)]
    text = "\n".join(lines) + "\n"
    workdir.write_text("report.md", text)
    write_report_html(workdir, "Sparsity: several models", text, [(stem, "") for stem in figures])
    return result
