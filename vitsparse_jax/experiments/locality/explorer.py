"""The locality explorer of report.html: per block (a slider over depth), the receptive-field map of its attention
sub-stage or of its output, untrained and trained side by side, with the block's central-query attention distance
drawn on it as a circle around the central region's centre (radius: the mean over heads, in input pixels) and the
map's mass-weighted distance as a dashed circle (docs/science.md#attention-distance); CNN stages have no
attention, so only the dashed circle.

Everything shown comes from the run's own results (`ModelResult`): the maps as the receptive-field explorer stores
them (`report_html.maps`: log-quantised per map, average-pooled to `MAP_BUDGET`), and per block the numbers of
`ModelResult.table()`, the rows of locality.csv.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vitsparse_jax.experiments.names import pair_names
from vitsparse_jax.report_html import Explorer, encode_array, static_text
from vitsparse_jax.report_html.maps import LOG_DECADES, pool_factor, pooled, quantised

KEY = "locality"
MAP_BUDGET = 2_000_000          # bytes of uint8 map pixels in one page (base64 in the page: x 4/3)
ModelResult = Any               # report.ModelResult (report.py imports this module)
# the columns of ModelResult.table() the page shows, per block and variant (None where a block has none)
COLUMNS = ("heads", "attn_distance_central_px", "attn_distance_central_px_min", "attn_distance_central_px_max",
           "attn_distance_px", "prefix_mass", "prefix_mass_central", "uniform_attn_distance_central_px",
           "rf_attn_mass_distance_px", "rf_out_mass_distance_px", "uniform_rf_mass_distance_px", "rf_attn_S",
           "rf_out_S")

HTML = (
    f'<div class="vj-controls">'
    f'<label id="{KEY}-model-box">model <select id="{KEY}-model"></select></label>'
    f'<label>block <input type="range" id="{KEY}-block" min="0" max="0" step="1" value="0"></label>'
    f'<label>map <select id="{KEY}-layer"></select></label>'
    f'<b id="{KEY}-label"></b></div>'
    f'<div class="vj-controls">'
    f'<label><input type="checkbox" id="{KEY}-show-attn" checked> attention distance (solid)</label>'
    f'<label><input type="checkbox" id="{KEY}-show-rf" checked> receptive field\'s mass-weighted distance '
    f'(dashed)</label>'
    f'<label><input type="checkbox" id="{KEY}-show-uniform"> uniform-map references (dotted)</label></div>'
    f'<div class="vj-controls">'
    f'<label>colour scale <select id="{KEY}-scale"><option value="per_map">per map (M / its max)</option>'
    f'<option value="shared">shared: both maps of this block</option></select></label>'
    f'<label>colour <select id="{KEY}-colour"><option value="linear">linear, 0 to max</option>'
    f'<option value="log">log10, {LOG_DECADES:g} decades below max</option></select></label></div>'
    f'<div class="vj-panels" id="{KEY}-maps"></div>'
    f'<p class="vj-note" id="{KEY}-note"></p>')


def _number(v: Any) -> float | int | None:
    if v is None or v == "" or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return None
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


def _variant(res: ModelResult, f: int) -> dict[str, Any]:
    q, top = quantised(pooled(res.maps, f))
    return {"label": res.label, "trained": bool(res.model.get("trained")), "num_images": res.num_images,
            "maps": encode_array(q, "uint8_raw"), "map_max": [float(t) for t in top],
            "blocks": [{c: _number(row.get(c)) for c in COLUMNS} for row in res.table()]}


def model_data(twins: Sequence[ModelResult], f: int, name: str) -> dict[str, Any]:
    """One listed model: its blocks and layers (shared by its twins) and one entry per variant, untrained first
    (as the receptive-field explorer)."""
    twins = sorted(twins, key=lambda r: bool(r.model.get("trained")))
    first = twins[0]
    index = {layer.name: i for i, layer in enumerate(first.layers)}
    layers = []
    for layer in first.layers:
        r = layer.region
        layers.append({"name": layer.name, "group": layer.group, "grid": list(r.grid),
                       "central": [r.row0, r.row1, r.col0, r.col1], "centre_px": list(r.centre_px(first.image_hw))})
    blocks = [{"name": b.name, "depth": first.layers[index[b.out]].depth,
               "attn": index[b.attn] if b.attn is not None else None, "out": index[b.out]} for b in first.blocks]
    return {"name": name, "family": first.model.get("family", ""), "image_size": list(first.image_hw),
            "map_size": list(pooled(first.maps[:1], f).shape[1:]), "pool": f, "layers": layers, "blocks": blocks,
            "variants": [_variant(r, f) for r in twins]}


def explorer(results: Sequence[ModelResult], renormalize: bool = False) -> Explorer | None:
    """The page's explorer over every measured model (its trained and untrained variants side by side)."""
    if not results:
        return None
    f = pool_factor([r.maps.shape for r in results], MAP_BUDGET)
    listed: dict[str, list[ModelResult]] = {}
    for r in results:
        listed.setdefault(r.model.get("listed", r.model["name"]), []).append(r)
    shown = pair_names([r.model for r in results])
    return Explorer(key=KEY, title="Locality explorer: attention distance on the receptive field", html=HTML,
                    script=static_text("explorer.js", __package__),
                    data={"models": [model_data(twins, f, shown.get(name, name)) for name, twins in listed.items()],
                          "log_decades": LOG_DECADES, "renormalize": bool(renormalize)})
