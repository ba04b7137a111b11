"""The receptive-field explorer of report.html: a slider over the measured layers' depths with the sub-stage
(ViT: attn, attn_res, mlp, mlp_res) as its own control beside it, opening at the attention sub-stage of the
middle block; the untrained and trained maps side by side in that order (as the locality figure's columns); a
per-map or shared, linear or log colour scale; the S / mean-radius curves with the current layer marked.

Everything shown comes from the run's own results (`Measured`): the mean maps, log-quantised to uint8 per map
(M / its maximum over `LOG_DECADES` decades, `report_html.maps.quantised`; the maxima kept as float32 for the
shared scale) and,
when the run has many large maps, average-pooled by one integer factor so that all of them fit `MAP_BUDGET`
bytes; S, the mean radius and the central region are the full-resolution values of the results.
"""
from __future__ import annotations

from typing import Any, Sequence


from vitsparse_jax.experiments.names import pair_names
from vitsparse_jax.report_html import Explorer, encode_array, maps, static_text
from vitsparse_jax.report_html.maps import LOG_DECADES, dequantised, pooled, quantised  # noqa: F401 (this page's)

KEY = "rf"
MAP_BUDGET = 2_000_000          # bytes of uint8 map pixels in one page (base64 in the page: x 4/3)
SCALES = ("per_map", "shared_layer", "shared")
Measured = Any                  # report.Measured (report.py imports this module)


HTML = (
    f'<div class="vj-controls">'
    f'<label id="{KEY}-model-box">model <select id="{KEY}-model"></select></label>'
    f'<label>layer <input type="range" id="{KEY}-layer" min="0" max="0" step="1" value="0"></label>'
    f'<label>sub-stage <select id="{KEY}-stage"></select></label>'
    f'<b id="{KEY}-layer-label"></b></div>'
    f'<div class="vj-controls">'
    f'<label>colour scale <select id="{KEY}-scale">'
    f'<option value="per_map">per map (M / its max)</option>'
    f'<option value="shared_layer">shared: both maps of this layer</option>'
    f'<option value="shared">shared: every map of the model</option></select></label>'
    f'<label>colour <select id="{KEY}-colour"><option value="linear">linear, 0 to max</option>'
    f'<option value="log">log10, {LOG_DECADES:g} decades below max</option></select></label></div>'
    f'<div class="vj-panels" id="{KEY}-maps"></div><div class="vj-panels" id="{KEY}-curves"></div>'
    f'<p class="vj-note" id="{KEY}-note"></p>')


def pool_factor(results: Sequence[Measured], budget: int = MAP_BUDGET) -> int:
    """The smallest integer factor f whose f x f average pooling brings every map of the page within budget."""
    return maps.pool_factor([r.maps.shape for r in results], budget)


def _variant(res: Measured, f: int) -> dict[str, Any]:
    q, top = quantised(pooled(res.maps, f))
    return {"label": res.label, "trained": bool(res.model.get("trained")), "num_images": res.num_images,
            "S": [s["S"] for s in res.summaries()], "mean_radius": [s["mean_radius"] for s in res.summaries()],
            "max_M": [s["max_M"] for s in res.summaries()],
            "maps": encode_array(q, "uint8_raw"), "map_max": [float(t) for t in top]}


def model_data(twins: Sequence[Measured], f: int) -> dict[str, Any]:
    """One listed model: its layers (shared by its twins) and one entry per variant, untrained first (the order
    of the locality figure's columns, figures.locality_vs_depth)."""
    twins = sorted(twins, key=lambda r: bool(r.model.get("trained")))
    first = twins[0]
    layers = [{"name": s["layer"], "group": s["group"], "depth": s["relative_depth"], "grid": s["grid"],
               "central": s["central"], "centre_px": s["centre_px"]} for s in first.summaries()]
    name = pair_names([r.model for r in twins])[first.model.get("listed", first.model["name"])]   # with its tag
    return {"name": name, "image_size": list(first.image_hw),
            "map_size": list(pooled(first.maps[:1], f).shape[1:]), "pool": f, "layers": layers,
            "variants": [_variant(r, f) for r in twins]}


def explorer(results: Sequence[Measured], scale: str = "per_map") -> Explorer | None:
    """The page's explorer over every measured model (a checkpoint series is left to its figure)."""
    if not results:
        return None
    f = pool_factor(results)
    listed: dict[str, list[Measured]] = {}
    for r in results:
        listed.setdefault(r.model.get("listed", r.model["name"]), []).append(r)
    return Explorer(key=KEY, title="Receptive-field explorer: every layer and sub-stage", html=HTML,
                    script=static_text("explorer.js", __package__),
                    data={"models": [model_data(twins, f) for twins in listed.values()],
                          "scale": scale if scale in SCALES else "per_map", "log_decades": LOG_DECADES})
