"""Outputs of the sparsity experiment: CSV tables, figures (PNG + PDF), results.json and report.md."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vitsparse_jax import science
from vitsparse_jax.experiments import sanity
from vitsparse_jax.experiments.sparsity import explorer, norms
from vitsparse_jax.experiments.sparsity import figures as figs
from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.experiments.sparsity.probe import Example, Probe
from vitsparse_jax.measures import attention_summary
from vitsparse_jax.report_html import write_report_html
from vitsparse_jax.runtime.workdir import Workdir

Figures = list[tuple[str, str]]   # (file stem, caption), in report order


def matrix_rows(matrix: np.ndarray, labels: Sequence[str], corner: str) -> list[dict[str, Any]]:
    return [{corner: a, **{b: float(matrix[i, j]) for j, b in enumerate(labels)}} for i, a in enumerate(labels)]


def density_rows(res: dict, names: Sequence[str], nu_range: tuple[float, float, int]) -> list[dict[str, Any]]:
    edges, dens = _densities(res, nu_range)
    return [{"nu_lo": edges[b], "nu_hi": edges[b + 1], **{n: dens[l, b] for l, n in enumerate(names)}}
            for b in range(dens.shape[1])]


def layer_rows(res: dict, probe: Probe) -> list[dict[str, Any]]:
    """One row per block (attention) or layer (CNN): the sparsity summary."""
    rows = []
    for l, name in enumerate(probe.names):
        if probe.kind == "attention":
            gh, gw = probe.layout.grids[l]
            row = {"block": name, "grid": f"{gh}x{gw}", "mean_mu": res["mean_mu"][l],
                   "mean_prefix_mu": res["mean_prefix_mu"][l]}
        else:
            row = {"layer": name, "channels": probe.layout.channels[l], "mean_l1": res["mean_l1"][l],
                   "active_fraction": res["active_fraction"][l], "zero_channels": res["zero_channels"][l]}
        row.update(mean_nu=res["mean_nu"][l], std_nu=res["std_nu"][l], nu_reference=res["nu_reference"][l],
                   nu_out_of_range=res["nu_out_of_range"][l])
        row.update({f"top_{100 * p:g}pct_share": res["top_share"][l, i]
                    for i, p in enumerate(probe.layout.top_fractions)})
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def _densities(res: dict, nu_range: tuple[float, float, int]) -> tuple[np.ndarray, np.ndarray]:
    lo, hi, bins = nu_range
    return st.bin_edges(lo, hi, bins), np.stack([st.density(h, lo, hi) for h in res["nu_hist"]])


def _short(name: str) -> str:
    """'blocks.11' -> 'b11', 'layers.2.blocks.5' -> '2.b5' (axis labels)."""
    return name.replace("layers.", "").replace("blocks.", "b")


DISPLAY_ORDER = ("fig1_example_attention", "fig2a_corr_heads", "fig2b_corr_layers", "fig3a_nu_density_last",
                 "fig3b_top_patches", "figS1_all_heads", "figS4_nu_density_blocks", "top_share",
                 "norms_mu_vs_input_norm", "norms_vs_depth")   # the attention figures in report.md and report.html


def attention_outputs(workdir: Workdir, name: str, probe: Probe, res: dict, ex: Example | None,
                      top_fraction: float) -> tuple[Figures, list[str]]:
    lay: st.AttentionLayout = probe.layout
    names, heads = probe.names, [str(h) for h in range(lay.heads)]
    rows = layer_rows(res, probe)
    workdir.write_csv("blocks.csv", rows)
    workdir.write_csv("corr_heads.csv", matrix_rows(res["corr_heads"], heads, "head"))
    workdir.write_csv("corr_layers.csv", matrix_rows(res["corr_layers"], names, "block"))
    workdir.write_csv("nu_density.csv", density_rows(res, names, lay.nu_range))
    gh, gw = lay.grids[-1]
    workdir.write_csv("top_patches.csv", [
        {"patch": r * gw + c, "row": r, "col": c, "count": int(res["top_counts"][r * gw + c]),
         "probability": res["top_distribution"][r, c]} for r in range(gh) for c in range(gw)])

    edges, dens = _densities(res, lay.nu_range)
    ranked = "mean over heads" if lay.top_head is None else f"head {lay.top_head} (published code)"
    short = [_short(n) for n in names]
    swin_grid = f" (summed onto the {lay.corr_grid[0]}x{lay.corr_grid[1]} grid)" if len(set(lay.grids)) > 1 else ""
    out: Figures = []

    def save(stem: str, caption: str, make: Any, *args: Any, **kwargs: Any) -> None:
        workdir.figure(stem, make, *args, **kwargs)   # drawn by a figure worker when one is free
        out.append((stem, caption))

    # the two slowest figures first, so that the figure workers and this process finish together; report.html
    # lists the figures in their own order (DISPLAY_ORDER)
    save("figS4_nu_density_blocks", "Fig. S4: density of nu for every block.",
         figs.nu_density_grid, edges, dens, res["nu_reference"], names)
    if ex is not None:
        save("figS1_all_heads", f"Fig. S1: {ex.heads_title}.", figs.all_heads, ex.heads, ex.heads_title)
        save("fig1_example_attention", f"Fig. 1: image {ex.index}, the attention map of {ex.head_title} and the "
             "patches of its 3 brightest columns.",
             figs.example_attention, ex.image, ex.head_map, ex.top_cells, lay.grids[-1], ex.head_title)
    save("fig2a_corr_heads", "Fig. 2a: pooled Pearson r between the heads' mu_h of the last block.",
         figs.correlation_heatmap, res["corr_heads"], heads, "head", f"{name}: heads of {names[-1]} (mu_h)")
    save("fig2b_corr_layers", f"Fig. 2b: pooled Pearson r between the blocks' mu{swin_grid}.",
         figs.correlation_heatmap, res["corr_layers"], short, "block", f"{name}: blocks (mu)")
    save("fig3a_nu_density_last", "Fig. 3a: density of nu = -log10(mu) over the last block's patch columns; "
         "dashed: -log10 of the mean mu.",
         figs.nu_density, edges, dens[-1], float(res["nu_reference"][-1]), f"{name}: nu of {names[-1]}")
    save("fig3b_top_patches", f"Fig. 3b: how often each patch is among the top k = {lay.top_k} columns of the "
         f"last block (ranked by {ranked}), in % of all picks (sums to 100); dashed on the colour bar: a "
         "uniform choice.",
         figs.top_distribution, res["top_distribution"],
         f"top {100 * top_fraction:g}% (k={lay.top_k}) of {names[-1]}, {ranked}")
    save("top_share", "Share of the patch columns' attention mass held by the top p% columns (mean over images).",
         figs.top_share, lay.top_fractions, res["top_share"], res["top_share_uniform"], short, "columns")
    if res.get("norms") is not None:   # docs/science.md#high-norm-tokens
        norm_rows = norms.rows(names, res)
        workdir.write_csv("norms.csv", norm_rows)
        if ex is not None and ex.norm_scatter is not None:
            save("norms_mu_vs_input_norm", f"mu of the last block's columns against the norm of the "
                 f"same token at the block's input, {len(ex.norm_scatter['mu'])} images from {ex.index} on "
                 "(log-log; prefix tokens marked).",
                 norms.mu_norm_figure, ex.norm_scatter, lay.prefix_kinds, f"{name}: {names[-1]}")
        save("norms_vs_depth", f"Share of each block's top-5% mu columns that are high-norm tokens (norm > "
             f"{res['norms']['norm_factor']:g} x median) of its input (dotted: chance), Spearman r(mu, input norm) "
             "and the mu mass on register tokens, against relative depth.",
             norms.depth_figure, [(name, res)])
    out.sort(key=lambda figure: DISPLAY_ORDER.index(figure[0]))
    tables = ["## Blocks", "", markdown_table(rows), "",
              *(["## Sparse columns and high-norm tokens", "", markdown_table(norm_rows), ""]
                if res.get("norms") is not None else []),
              f"## Head-by-head r ({names[-1]}, Fig. 2a)", "",
              markdown_table(matrix_rows(res["corr_heads"], heads, "head")), "",
              "## Layer-by-layer r (Fig. 2b)", "", markdown_table(matrix_rows(res["corr_layers"], names, "block"))]
    if res.get("attention_distance") is not None:   # docs/science.md#attention-distance
        workdir.write_csv("distances.csv", attention_summary.rows(res["attention_distance"]))
        tables += ["", "## Attention distance (every head: distances.csv)", "",
                   markdown_table(distance_rows(res["attention_distance"]))]
    return out, tables


def distance_rows(att: dict) -> list[dict[str, Any]]:
    """Per block: the mean attention distance over all and over the central patch queries (mean over heads, min
    and max), the prefix mass and the normalised entropy (means over heads), beside the uniform-map references."""
    rows = []
    for b, block in enumerate(att["blocks"]):
        row: dict[str, Any] = {"block": block}
        for key, name in (("distance_px", "distance_px"), ("distance_central_px", "central_px")):
            mean, lo, hi = (float(v[0]) for v in attention_summary.head_band(att[key][b:b + 1]))
            row.update({name: mean, f"{name}_min": lo, f"{name}_max": hi})
        row.update(uniform_px=att["uniform"]["distance_px"][b],
                   uniform_central_px=att["uniform"]["distance_central_px"][b],
                   prefix_mass=float(attention_summary.head_band(att["prefix_mass"][b:b + 1])[0][0]),
                   entropy_norm=float(attention_summary.head_band(att["entropy_norm"][b:b + 1])[0][0]))
        rows.append(row)
    return rows


def cnn_outputs(workdir: Workdir, name: str, probe: Probe, res: dict) -> tuple[Figures, list[str]]:
    lay: st.ChannelLayout = probe.layout
    rows = layer_rows(res, probe)
    workdir.write_csv("layers.csv", rows)
    workdir.write_csv("nu_density.csv", density_rows(res, probe.names, lay.nu_range))
    edges, dens = _densities(res, lay.nu_range)
    workdir.figure("cnn_channel_density", figs.nu_density_grid, edges, dens, res["nu_reference"], probe.names,
                   xlabel=r"$-\log_{10}$(channel l1 share)", ref_label=r"$\log_{10} C$")
    workdir.figure("top_share", figs.top_share, lay.top_fractions, res["top_share"], res["top_share_uniform"],
                   probe.names, "channels")
    out = [("cnn_channel_density", f"{name}: density of -log10(channel l1 share) per layer (CNN counterpart of "
            "Fig. S4); dashed: a uniform share 1/C."),
           ("top_share", "Share of a layer's total l1 held by its top p% channels (mean over images).")]
    return out, ["## Layers", "", markdown_table(rows)]


def definition_keys(summary: dict) -> list[str]:
    """The docs/science.md definitions of the quantities this report shows (`science.report_block`)."""
    family = summary["model"]["family"]
    if summary["kind"] != "attention":
        return ["preprocessing", "convnext_units" if family == "convnext" else "cnn_units", "channel_share",
                "top_share"]
    keys = ["preprocessing", "mu", "swin_units" if family == "swin" else "prefix_mass", "nu_density",
            "correlations", "top_patches", "top_share"]
    keys += ["high_norm_tokens"] if summary["statistics"].get("norms") is not None else []
    return keys + (["attention_distance", "attention_entropy"]
                   if summary["statistics"].get("attention_distance") is not None else [])


def write_report(workdir: Workdir, summary: dict, figures: Figures, tables: list[str]) -> str:
    """Writes report.md; returns its text."""
    m = summary["model"]
    prov = summary.get("provenance") or sanity.provenance(m)
    lines = [f"# Sparsity: {summary['name']} ({summary['kind']})", "",
             f"Model `{summary['name']}` ({m['family']}), weights: {prov['kind']}, {prov['detail']}. Data: "
             f"{summary['data']['name']}, {summary['images']} images ({summary['images_skipped']} skipped).", ""]
    lines += sanity.markdown(summary.get("warnings", ()))
    for stem, caption in figures:
        lines += [f"![{stem}]({stem}.png)", "", caption, ""]
    lines += tables + ["", "## Choices", ""] + [f"- {k}: {v}" for k, v in summary["choices"].items()]
    lines += ["", *science.report_block(definition_keys(summary))]
    text = "\n".join(lines) + "\n"
    workdir.write_text("report.md", text)
    return text


def write_outputs(workdir: Workdir, summary: dict, probe: Probe, res: dict, ex: Example | None,
                  explore: dict | None = None) -> dict:
    """Writes every output (report.html last, with the explorer when `explore`, from `explorer.collect`);
    returns `summary` completed with the layout, statistics and figure list."""
    lay = probe.layout
    if probe.kind == "attention":
        figures, tables = attention_outputs(workdir, summary["name"], probe, res, ex,
                                            summary["config"]["sparsity"]["top_fraction"])
        layout = {"grids": lay.grids, "prefix_tokens": lay.prefix, "heads_last_block": lay.heads,
                  "top_k": lay.top_k, "correlation_grid": lay.corr_grid,
                  "top_ranked_by": "head_mean" if lay.top_head is None else f"head_index {lay.top_head}"}
    else:
        figures, tables = cnn_outputs(workdir, summary["name"], probe, res)
        layout = {"channels": lay.channels}
    summary = {**summary, "layout": layout, "figures": [stem for stem, _ in figures],
               "provenance": sanity.provenance(summary["model"]),
               "warnings": sanity.emit(sanity.weights_warnings(summary["name"], summary["model"])),
               "statistics": {**res, "nu_bin_edges": st.bin_edges(*lay.nu_range)}}
    workdir.write_json("results.json", summary)
    text = write_report(workdir, summary, figures, tables)
    write_report_html(workdir, f"Sparsity: {summary['name']}", text, figures,
                      [explorer.make_explorer(explore, res.get("attention_distance"))] if explore else [])
    return summary
