"""Results of the receptive-field experiment: the per-model record, JSON / CSV rows, maps, report.md."""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Sequence

import numpy as np

from vitsparse_jax import science
from vitsparse_jax.experiments import sanity
from vitsparse_jax.experiments.names import pair_names
from vitsparse_jax.measures import locality
from vitsparse_jax.measures.gradient_fields import Layer
from vitsparse_jax.runtime.workdir import Workdir, atomic_write_bytes

DECISIONS = (
    ("M = |d sum(Y_central)/dx| with x the normalised input (after mean/std), |.| per image, summed over "
     "colour channels, averaged over images"),
    ("central part: round(f * side) positions per grid side (halves up, at least 1), starting at "
     "(side - n) // 2; transformer tokens without prefix tokens on the patch grid; CNN maps (B, H, W, C)"),
    ("grid cell (i, j) of a g_h x g_w map covers input pixels [i H/g_h, (i+1) H/g_h) x [j W/g_w, (j+1) W/g_w); "
     "the centre of the central region is mapped to input pixels this way; pixel centres at (i+0.5, j+0.5)"),
    ("E_r = mean of M over pixels at distance [r, r+1) from that centre, r = 0..floor(R); "
     "S = sum_r r E_r / max M; mean radius = sum_r r E_r / sum_r E_r (both in input pixels)"),
    "a non-spatial output (pre_logits, logits) counts as a 1x1 grid covering the whole image",
    "relative depth = index of the layer's stage among the spatial stages / (their number - 1)",
)


@dataclasses.dataclass
class Measured:
    """One model's mean receptive-field maps over the images, with what the results say about it."""

    model: dict[str, Any]      # loaded.describe() + name, listed, arch, trained (the weights are not kept);
                               # listed: the name as listed (a series: its training run's name)
    label: str                 # e.g. 'vit_pico_patch4_32.digits (trained)', 'vit_pico_patch4_32.digits step 500'
    layers: list[Layer]
    maps: np.ndarray           # (L, H, W) mean M over images
    num_images: int
    image_hw: tuple[int, int]
    step: int | None = None    # training step, for a checkpoint series
    skipped: int = 0           # images that could not be read (left out of the mean)

    def summaries(self) -> list[dict[str, Any]]:
        """Per layer: grid, central block, centre, S, mean radius, max M and the radial profile E_r."""
        rows = []
        for layer, m in zip(self.layers, self.maps):
            centre = layer.region.centre_px(self.image_hw)
            loc = locality.locality(m, centre)
            r = layer.region
            rows.append({"layer": layer.name, "group": layer.group, "relative_depth": layer.depth,
                         "grid": list(r.grid), "central": [r.row0, r.row1, r.col0, r.col1],
                         "centre_px": list(centre), "S": loc.s, "mean_radius": loc.mean_radius,
                         "max_M": loc.max_m, "profile": loc.profile.tolist()})
        return rows


def _csv_rows(results: Sequence[Measured]) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        source = sanity.provenance(res.model)["kind"]   # hub, converted, builtin, trained_here, untrained, ...
        for s in res.summaries():
            rows.append({"model": res.model["name"], "tag": res.model["tag"] or "", "trained": res.model["trained"],
                         "step": "" if res.step is None else res.step, "weights": res.model["weights"],
                         "layer": s["layer"], "group": s["group"], "relative_depth": round(s["relative_depth"], 6),
                         "grid": "x".join(map(str, s["grid"])), "S": s["S"], "mean_radius": s["mean_radius"],
                         "max_M": s["max_M"], "num_images": res.num_images, "weights_source": source})
    return rows


def result_json(res: Measured) -> dict[str, Any]:
    return {**res.model, "provenance": sanity.provenance(res.model), "label": res.label, "step": res.step,
            "num_images": res.num_images,
            "images_skipped": res.skipped,
            "image_size": list(res.image_hw), "layers": res.summaries()}


def _figure_entry(res: Measured, shown: dict[str, str] | None = None) -> dict[str, Any]:
    """The figures' entry: 'model' is the colour key, the name (with its tag) that stands for a listed model's
    trained and untrained variants (`shown`: names.pair_names), or a series' training run."""
    listed = res.model["listed"]
    return {**result_json(res), "model": (shown or {}).get(listed, listed), "maps": res.maps}


def _save_maps(workdir: Workdir, name: str, results: Sequence[Measured]) -> None:
    arrays = {}
    for i, res in enumerate(results):
        arrays[f"{i}/maps"] = res.maps.astype(np.float32)
        arrays[f"{i}/layers"] = np.array([layer.name for layer in res.layers])
        arrays[f"{i}/label"] = np.array(res.label)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(workdir.path(name), buf.getvalue())


def sanity_warnings(results: Sequence[Measured], series: Sequence[Measured] = ()) -> list[str]:
    """A listed model none of whose variants has trained weights; weights whose origin is not recorded."""
    warnings: list[str] = []
    for listed in dict.fromkeys(r.model.get("listed", r.model["name"]) for r in results):
        twins = [r for r in results if r.model.get("listed", r.model["name"]) == listed]
        if all(sanity.provenance(r.model)["trained"] is False for r in twins):
            warnings += sanity.weights_warnings(twins[0].model["name"], twins[0].model)
    for r in [*results, *series]:
        warnings += sanity.weights_warnings(r.label, r.model, expect_trained=False)
    return warnings


def _weights_cell(model: dict[str, Any]) -> str:
    prov = sanity.provenance(model)
    return prov["kind"] if prov["kind"] in (sanity.BUILTIN, sanity.UNTRAINED) else f"{prov['kind']}: {prov['detail']}"


def _report(results: Sequence[Measured], series: Sequence[Measured], fraction: float,
            files: Sequence[str], warnings: Sequence[str] = ()) -> str:
    lines = ["# Receptive fields and locality (paper 2)", "",
             f"Central fraction f = {fraction:.6g}. S and mean radius in input pixels.", "",
             *sanity.markdown(warnings),
             "| model | weights | images | layer group | layers | S first -> last | mean radius first -> last |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        summ = res.summaries()
        for group in dict.fromkeys(s["group"] for s in summ):
            g = [s for s in summ if s["group"] == group]
            lines.append(f"| {res.model['name']} | {_weights_cell(res.model)} | {res.num_images} | {group} | "
                         f"{len(g)} | "
                         f"{g[0]['S']:.3g} -> {g[-1]['S']:.3g} | "
                         f"{g[0]['mean_radius']:.3g} -> {g[-1]['mean_radius']:.3g} |")
    if series:
        steps = ", ".join(str(r.step) for r in series)
        runs = " and ".join(dict.fromkeys(r.model["listed"] for r in series))
        lines += ["", f"Locality over training: {len(series)} checkpoints of {runs}, steps {steps}."]
    lines += ["", "Decisions:", *(f"- {d}" for d in DECISIONS), "", "Files: " + ", ".join(files), ""]
    lines += science.report_block(["preprocessing", "receptive_field", "locality", "sub_stages"])
    return "\n".join(lines)


def write_outputs(workdir: Workdir, results: Sequence[Measured], series: Sequence[Measured], summary: dict[str, Any],
                  fraction: float, max_columns: int) -> None:
    """results.json (= `summary`), CSV, maps, figures, report.md and report.html (with the explorer) of a run."""
    from vitsparse_jax.experiments.receptive_field import explorer
    from vitsparse_jax.experiments.receptive_field import figures as figures
    from vitsparse_jax.report_html import write_report_html

    files = ["report.html", "results.json", "receptive_fields.csv", "receptive_fields.npz"]
    summary["warnings"] = sanity.emit(sanity_warnings(results, series))
    workdir.write_json("results.json", summary)
    workdir.write_csv("receptive_fields.csv", _csv_rows(results))
    _save_maps(workdir, "receptive_fields.npz", results)
    shown = pair_names([r.model for r in results])
    entries = [_figure_entry(r, shown) for r in results]
    scale = (summary.get("config") or {}).get("receptive_field", {}).get("map_scale", "per_map")
    workdir.figure("receptive_field_maps", figures.maps_across_depth, entries, max_columns=max_columns, scale=scale)
    workdir.figure("locality_vs_depth", figures.locality_vs_depth, entries)
    files += ["receptive_field_maps.png/pdf", "locality_vs_depth.png/pdf"]
    if series:
        workdir.write_csv("locality_over_training.csv", _csv_rows(series))
        _save_maps(workdir, "locality_over_training.npz", series)
        workdir.figure("locality_over_training", figures.locality_over_training, [_figure_entry(r) for r in series])
        files += ["locality_over_training.csv", "locality_over_training.npz", "locality_over_training.png/pdf"]
    text = _report(results, series, fraction, files, summary.get("warnings", ()))
    workdir.write_text("report.md", text)
    captions = {"receptive_field_maps": f"receptive-field maps across depth (colour scale: {scale})",
                "locality_vs_depth": "S and mean radius against relative depth",
                "locality_over_training": "locality over the training checkpoints"}
    shown = [(stem, caption) for stem, caption in captions.items() if series or stem != "locality_over_training"]
    panel = explorer.explorer(results, scale)
    write_report_html(workdir, "Receptive fields and locality", text, shown, [panel] if panel else [])
