"""The ablation explorer of report.html: for the first k images a run evaluated, which units each variant
dropped (per site, p and draw) and what the model then predicted.

`collect` runs after the pass: the batches holding those images go once more through the pass's compiled
step, which also returns the predicted classes and the keep masks it applied (`Evaluator(predictions=True)`),
so the drops are exactly the sets the pass evaluated (keyed by the global image index). `explorer` turns the
collected arrays into a `report_html.Explorer` (compact: uint8 drop flags, int32 predictions; crops as PNG up
to 64 px, else JPEG).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from vitsparse_jax.experiments.ablation import units as ablation_units
from vitsparse_jax.experiments.ablation.units import Plan
from vitsparse_jax.report_html import Explorer, encode_array, image_data_url, static_text

KEY = "ablation"
HTML = f"""<div class="vj-controls">
<label id="{KEY}-model-box">model <select id="{KEY}-model"></select></label>
<label>image <select id="{KEY}-image"></select></label>
<label>last n layers <select id="{KEY}-n"></select></label>
<label>p <select id="{KEY}-p"></select></label>
<label>units dropped <select id="{KEY}-draw"></select></label>
<label>layer <select id="{KEY}-layer"></select></label>
</div>
<div class="{KEY}-thumbs" id="{KEY}-thumbs"></div>
<div class="vj-panels">
<div class="vj-panel" style="max-width:340px">
<h3 id="{KEY}-title"></h3>
<canvas id="{KEY}-canvas" width="320" height="320"></canvas>
<canvas id="{KEY}-channels" width="320" height="320" hidden></canvas>
<div class="vj-readout" id="{KEY}-units"></div><div class="vj-readout" id="{KEY}-cell"></div></div>
<div class="vj-panel" style="flex:1;min-width:320px"><h3>Prediction</h3>
<div class="vj-readout" id="{KEY}-readout"></div>
<p><b id="{KEY}-status"></b></p>
<h3>Every variant of this image and n (click a cell)</h3><table id="{KEY}-table"></table>
<p class="vj-note">Top: the units with the largest clean-pass scores (attention mean mu / l1 of the map);
random: the run's own draws, keyed by the image's index. Green: the prediction is unchanged, red: changed;
a tick marks a correct prediction.</p></div>
</div>"""


def collect(k: int, evaluator: Any, rows: Mapping[str, np.ndarray],
            batches: Callable[[int, int], Iterable[dict[str, Any]]],
            to_host: Callable[[Any], Any]) -> dict[str, Any] | None:
    """Drops and predictions of every variant for the first k evaluated images (`rows['done']`).

    `evaluator`: the pass's `Evaluator`, built with predictions=True (its compiled step is reused);
    `batches(start, stop)`: the run's batches of images [start, stop); `to_host`: global arrays -> numpy on every
    process. Every process calls this (the batches are global). None when k = 0. Arrays: images (k, S, S, 3)
    uint8, index / label / clean (k,), preds (Nn, V, k) int32 (V = the variants of a group, units.py order),
    dropped {site: (P, 1 + D, k, U) bool}.
    """
    want = np.flatnonzero(np.asarray(rows["done"], bool))[:max(int(k), 0)]
    if want.size == 0:
        return None
    plan = evaluator.plan
    got: dict[int, dict[str, Any]] = {}
    for batch in batches(int(want[0]), int(want[-1]) + 1):
        out = to_host({**evaluator(batch), **{n: batch[n] for n in ("image", "label", "index", "valid")}})
        for r in np.flatnonzero(out["valid"] & np.isin(out["index"], want)):
            got[int(out["index"][r])] = {"image": out["image"][r], "label": out["label"][r],
                                         "clean": out["clean_pred"][r], "pred": out["pred"][r],
                                         "drops": {s: d[r] for s, d in out["drops"].items()}}
    index = [i for i in want.tolist() if i in got]
    if not index:
        return None
    shape = (len(plan.ps), 1 + plan.draws)   # the whole-layer reference (last variant) drops every candidate
    return {"images": np.stack([got[i]["image"] for i in index]), "index": np.array(index, np.int32),
            "label": np.array([got[i]["label"] for i in index], np.int32),
            "clean": np.array([got[i]["clean"] for i in index], np.int32),
            "preds": np.stack([got[i]["pred"] for i in index], axis=-1).astype(np.int32),
            "dropped": {s: np.stack([got[i]["drops"][s][:shape[0] * shape[1]].reshape(*shape, -1) for i in index],
                                    axis=2) for s in got[index[0]]["drops"]}}


def _site_grid(site: ablation_units.SiteUnits, patch_grid: Sequence[int]) -> list[int]:
    """The (rows, cols) layout of a site's units over the image; [0, 0] for channels (no position)."""
    if site.kind == "token":
        return list(patch_grid)
    if site.kind == "window":     # the block's input map: the patch grid halved once per merging stage
        gh, gw = patch_grid
        factor = int(round((gh * gw / site.units) ** 0.5))
        return [gh // factor, gw // factor]
    if site.kind == "spatial":
        return list(site.grid)
    return [0, 0]


def model_data(result: Mapping[str, Any], plan: Plan, patch_grid: Sequence[int], collected: Mapping[str, Any],
               image_refs: Sequence[int]) -> dict[str, Any]:
    """One model's explorer data (JSON-able); `image_refs` index the page's shared image list."""
    sites = plan.groups[-1].sites
    return {
        "name": result["name"], "family": result["family"], "ps": list(plan.ps), "ns": [g.n for g in plan.groups],
        "draws": plan.draws, "whole_layer": plan.whole_layer,
        "sites": [{"site": s.site, "kind": s.kind, "units": s.units, "prefix": s.prefix,
                   "grid": _site_grid(s, patch_grid), "k": list(plan.ks[s.site])} for s in sites],
        "images": list(image_refs), "index": collected["index"].tolist(), "label": collected["label"].tolist(),
        "clean": collected["clean"].tolist(), "preds": encode_array(collected["preds"], "int32"),
        "dropped": {s.site: encode_array(collected["dropped"][s.site].astype(np.uint8), "uint8_raw") for s in sites},
        "A0": result["A0"], "images_used": result["images_used"],
    }


def explorer(entries: Sequence[tuple[Mapping[str, Any], Plan, Sequence[int], Mapping[str, Any]]],
             class_names: Sequence[str] | None = None) -> Explorer | None:
    """The page's explorer from (model result, plan, patch grid, collected) per model; None if none collected."""
    entries = [e for e in entries if e[3] is not None]
    if not entries:
        return None
    urls: list[str] = []
    seen: dict[str, int] = {}
    models = []
    for result, plan, patch_grid, collected in entries:
        refs = []
        for image in collected["images"]:          # models with the same crop share the image
            digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
            if digest not in seen:
                seen[digest] = len(urls)
                urls.append(image_data_url(image, "png" if max(image.shape[:2]) <= 64 else "jpeg"))
            refs.append(seen[digest])
        models.append(model_data(result, plan, patch_grid, collected, refs))
    classes = sorted({int(c) for *_, col in entries
                      for c in [*col["label"].tolist(), *col["clean"].tolist(), *np.unique(col["preds"]).tolist()]
                      if c >= 0})   # the names of the classes shown only
    names = {str(c): class_names[c] for c in classes if class_names and c < len(class_names)}
    return Explorer(key=KEY, title="Ablation explorer: what each variant dropped, and the prediction",
                    html=HTML, script=static_text("explorer.js", __package__),
                    data={"models": models, "images": urls, "class_names": names})
