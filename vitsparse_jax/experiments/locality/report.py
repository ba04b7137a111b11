"""Results of the locality experiment: each model's per-block table, locality.csv, results.json, the figure,
report.md (with the caveats of docs/science.md#attention-distance) and report.html."""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Sequence

import numpy as np

from vitsparse_jax import science
from vitsparse_jax.experiments import sanity
from vitsparse_jax.experiments.names import pair_names
from vitsparse_jax.measures import attention_summary, locality
from vitsparse_jax.measures.gradient_fields import Layer
from vitsparse_jax.runtime.workdir import Workdir, atomic_write_bytes

FIGURE = "locality_vs_depth"
CAVEATS = (
    "An attention distance describes one block's mixing through its attention pathway only; the receptive field "
    "at block l is cumulative over blocks 0..l and includes the residual (\"fast\") pathway, so the two answer "
    "different questions and neither bounds the other. The receptive field at the attention sub-stage (before its "
    "residual add) is the closer of the two to the attention. By default, as the published implementations, "
    "attention on class or register tokens adds no distance and rows are not renormalised: a head that attends "
    "mostly to prefix tokens reads as local (see its prefix mass; `locality.renormalize=True` divides each row "
    "by its patch mass). Swin attends within windows: its distances are capped by the window (at most "
    "6 sqrt(2) tokens of the stage's size for 7x7 windows). Compare each curve with its uniform-map reference "
    "(dotted): the value of the same measure for a map spread evenly over the same grid.")


@dataclasses.dataclass(frozen=True)
class Block:
    """One row of the table: an attention block (its attention sub-stage and output), or a CNN stage output."""

    name: str
    attn: str | None            # the receptive-field layer of the attention sub-stage (None: a CNN)
    out: str                    # the receptive-field layer of the block output


@dataclasses.dataclass
class ModelResult:
    """One model's pass: the mean receptive-field maps and the attention totals' summary."""

    model: dict[str, Any]       # loaded.describe() + name, listed, arch, trained (the weights are not kept)
    label: str                  # e.g. 'vit_pico_patch4_32 (trained)'
    blocks: list[Block]
    layers: list[Layer]         # the receptive-field layers, in the order of `maps`
    maps: np.ndarray            # (L, H, W) mean M over the images
    image_hw: tuple[int, int]
    num_images: int
    skipped: int = 0            # images that could not be read (left out)
    attention: dict[str, Any] | None = None   # attention_summary.BlockMeasures.results (None: a CNN)
    totals: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)   # the ordered totals (kept when done)

    def table(self) -> list[dict[str, Any]]:
        """Per block: relative depth, the attention distances (head mean, min, max), prefix mass, entropy, the
        receptive field's distances at the attention sub-stage and at the block output, S, and every reference."""
        by_layer = {layer.name: (layer, m) for layer, m in zip(self.layers, self.maps)}
        att = self.attention
        index = {b: i for i, b in enumerate(att["blocks"])} if att else {}
        rows = []
        for block in self.blocks:
            out_layer, _ = by_layer[block.out]
            row: dict[str, Any] = {"block": block.name, "relative_depth": out_layer.depth,
                                   "grid": "x".join(map(str, out_layer.region.grid))}
            if att and block.name in index:
                row.update(_attention_columns(att, index[block.name]))
            for prefix, name in (("rf_attn", block.attn), ("rf_out", block.out)):
                if name is not None:
                    row.update(_rf_columns(prefix, *by_layer[name], self.image_hw))
            centre = out_layer.region.centre_px(self.image_hw)
            ref = locality.uniform_reference(self.image_hw, centre)
            row.update(uniform_rf_mass_distance_px=ref.mass_weighted_distance,
                       uniform_rf_ring_radius_px=ref.ring_mean_radius)
            rows.append(row)
        return rows


def _attention_columns(att: dict[str, Any], b: int) -> dict[str, Any]:
    """Block b's attention columns: distances as mean, min and max over heads; the rest as means over heads."""
    out: dict[str, Any] = {"heads": att["heads"][b]}
    for key, name in (("distance_central_px", "attn_distance_central_px"), ("distance_px", "attn_distance_px")):
        mean, lo, hi = (float(v[0]) for v in attention_summary.head_band(att[key][b:b + 1]))
        out.update({name: mean, f"{name}_min": lo, f"{name}_max": hi})
    for key, name in (("distance_central_rel", "attn_distance_central_rel"), ("distance_rel", "attn_distance_rel"),
                      ("prefix_mass", "prefix_mass"), ("prefix_mass_central", "prefix_mass_central"),
                      ("entropy", "entropy"), ("entropy_norm", "entropy_norm")):
        out[name] = float(attention_summary.head_band(att[key][b:b + 1])[0][0])
    out["skipped_rows"] = int(np.sum(att["skipped"][b]))
    out["uniform_attn_distance_central_px"] = att["uniform"]["distance_central_px"][b]
    out["uniform_attn_distance_px"] = att["uniform"]["distance_px"][b]
    return out


def _rf_columns(prefix: str, layer: Layer, m: np.ndarray, image_hw: tuple[int, int]) -> dict[str, Any]:
    loc = locality.locality(m, layer.region.centre_px(image_hw))
    return {f"{prefix}_mass_distance_px": loc.mass_distance, f"{prefix}_ring_radius_px": loc.mean_radius,
            f"{prefix}_S": loc.s}


COLUMNS = ("model", "tag", "trained", "family", "weights_source", "block", "relative_depth", "grid", "heads",
           "attn_distance_central_px", "attn_distance_central_px_min", "attn_distance_central_px_max",
           "attn_distance_px", "attn_distance_px_min", "attn_distance_px_max", "attn_distance_central_rel",
           "attn_distance_rel", "prefix_mass", "prefix_mass_central", "entropy", "entropy_norm", "skipped_rows",
           "uniform_attn_distance_central_px", "uniform_attn_distance_px",
           "rf_attn_mass_distance_px", "rf_attn_ring_radius_px", "rf_attn_S",
           "rf_out_mass_distance_px", "rf_out_ring_radius_px", "rf_out_S",
           "uniform_rf_mass_distance_px", "uniform_rf_ring_radius_px", "image_side", "num_images")


def csv_rows(results: Sequence[ModelResult]) -> list[dict[str, Any]]:
    """locality.csv: one row per model and block, every column of COLUMNS ('' where a model has no such value,
    e.g. the attention of a CNN)."""
    rows = []
    for res in results:
        head = {"model": res.model["name"], "tag": res.model.get("tag") or "", "trained": res.model["trained"],
                "family": res.model["family"], "weights_source": sanity.provenance(res.model)["kind"],
                "image_side": res.image_hw[0], "num_images": res.num_images}
        for row in res.table():
            full = {**head, **row}
            rows.append({c: full.get(c, "") for c in COLUMNS})
    return rows


def result_json(res: ModelResult) -> dict[str, Any]:
    return {**res.model, "provenance": sanity.provenance(res.model), "label": res.label,
            "num_images": res.num_images, "images_skipped": res.skipped, "image_size": list(res.image_hw),
            "blocks": res.table(), "attention": res.attention,
            "layers": [{"layer": layer.name, "group": layer.group, "relative_depth": layer.depth,
                        "grid": list(layer.region.grid)} for layer in res.layers]}


def _save_maps(workdir: Workdir, name: str, results: Sequence[ModelResult]) -> None:
    arrays = {}
    for i, res in enumerate(results):
        arrays[f"{i}/maps"] = res.maps.astype(np.float32)
        arrays[f"{i}/layers"] = np.array([layer.name for layer in res.layers])
        arrays[f"{i}/label"] = np.array(res.label)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(workdir.path(name), buf.getvalue())


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, (float, np.floating)) else str(value)


def report_text(results: Sequence[ModelResult], summary: dict[str, Any], files: Sequence[str]) -> str:
    renorm = summary["renormalize"]
    lines = ["# Attention distance against gradient receptive fields", "",
             f"Data: {summary['data']['name']}. Central region: f = {summary['fraction']:.6g} of each grid side. "
             f"Attention rows {'renormalised to their patch mass' if renorm else 'as they are (published convention)'}."
             " Distances in input pixels; depth = the block's relative depth.", "",
             *sanity.markdown(summary.get("warnings", ())),
             "| model | weights | images | block | depth | attn distance, central (min-max) | uniform | "
             "RF mass distance at attn | RF mass distance at output | uniform | prefix mass |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        weights = sanity.provenance(res.model)["kind"]
        table = res.table()
        shown = table if len(table) <= 4 else [table[0], table[len(table) // 2], table[-1]]
        for row in shown:
            band = (f"{_fmt(row.get('attn_distance_central_px'))} ({_fmt(row.get('attn_distance_central_px_min'))}-"
                    f"{_fmt(row.get('attn_distance_central_px_max'))})" if "heads" in row else "-")
            lines.append(f"| {res.model['name']} | {weights} | {res.num_images} | {row['block']} | "
                         f"{row['relative_depth']:.2f} | {band} | "
                         f"{_fmt(row.get('uniform_attn_distance_central_px'))} | "
                         f"{_fmt(row.get('rf_attn_mass_distance_px'))} | {_fmt(row.get('rf_out_mass_distance_px'))} | "
                         f"{_fmt(row['uniform_rf_mass_distance_px'])} | {_fmt(row.get('prefix_mass'))} |")
    lines += ["", "Every block of every model, with the all-query distances, entropy, S and the ring-mean radius: "
              "`locality.csv`.", "", "## Caveats", "", CAVEATS, "", f"![{FIGURE}]({FIGURE}.png)", "",
              FIGURE_CAPTION, "", "Files: " + ", ".join(files), ""]
    lines += science.report_block(["preprocessing", "attention_distance", "attention_entropy", "prefix_mass",
                                   "receptive_field", "locality", "rf_distance", "sub_stages"])
    return "\n".join(lines)


FIGURE_CAPTION = ("Per block against relative depth, trained (left) and untrained (right), one colour per model: "
                  "top, the central-query attention distance (mean over heads; band: min-max over heads); middle, "
                  "the receptive field's mass-weighted distance at the attention sub-stage (dashed) and at the block "
                  "output (solid); bottom, the attention mass on prefix tokens. Distances divided by the image side; "
                  "dotted: each measure's value for a uniform map on the same grid.")


def weights_warnings(results: Sequence[ModelResult]) -> list[str]:
    """A listed model none of whose variants has trained weights; weights whose origin is not recorded."""
    warnings: list[str] = []
    for listed in dict.fromkeys(r.model["listed"] for r in results):
        twins = [r for r in results if r.model["listed"] == listed]
        if all(sanity.provenance(r.model)["trained"] is False for r in twins):
            warnings += sanity.weights_warnings(twins[0].model["name"], twins[0].model)
    for r in results:
        warnings += sanity.weights_warnings(r.label, r.model, expect_trained=False)
    return warnings


def write_outputs(workdir: Workdir, results: Sequence[ModelResult], summary: dict[str, Any]) -> dict[str, Any]:
    """results.json (= `summary` with the warnings), locality.csv, locality_maps.npz, the figure, report.md and
    report.html; returns the summary as written."""
    from vitsparse_jax.experiments.locality import explorer, figures
    from vitsparse_jax.report_html import write_report_html

    files = ["report.html", "results.json", "locality.csv", "locality_maps.npz", f"{FIGURE}.png"]
    summary = {**summary, "warnings": sanity.emit(weights_warnings(results))}
    workdir.write_json("results.json", summary)
    workdir.write_csv("locality.csv", csv_rows(results))
    _save_maps(workdir, "locality_maps.npz", results)
    shown = pair_names([r.model for r in results])
    workdir.figure(FIGURE, figures.distances_vs_depth, [figure_entry(r, shown) for r in results])
    text = report_text(results, summary, files)
    workdir.write_text("report.md", text)
    panel = explorer.explorer(results, bool(summary.get("renormalize")))
    write_report_html(workdir, "Attention distance against receptive fields", text, [(FIGURE, FIGURE_CAPTION)],
                      [panel] if panel else [])
    return summary


def figure_entry(res: ModelResult, shown: dict[str, str] | None = None) -> dict[str, Any]:
    """The figure's entry: 'model' is the colour key, the name (with its tag) that stands for a listed model's
    trained and untrained variants (`shown`: names.pair_names)."""
    listed = res.model.get("listed", res.model["name"])
    return {"label": res.label, "model": (shown or {}).get(listed, listed), "trained": res.model["trained"],
            "image_side": res.image_hw[0], "blocks": res.table()}
