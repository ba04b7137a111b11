"""The receptive-field explorer of report.html: a slider over the measured layers (sub-stages included), the
trained and untrained maps side by side, a shared or per-map colour scale, and the S / mean-radius curves
with the current layer marked.

Everything shown comes from the run's own results (`Measured`): the mean maps, quantised to uint8 per map
(each map / its maximum, the maxima kept as float32 for the shared scale) and, when the run has many
large maps, average-pooled by one integer factor so that all of them fit `MAP_BUDGET` bytes; S, the mean
radius and the central region are the full-resolution values of the results.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vitsparse_jax.report_html import Explorer, encode_array, static_text

KEY = "rf"
MAP_BUDGET = 2_000_000          # bytes of uint8 map pixels in one page (base64 in the page: x 4/3)
SCALES = ("per_map", "shared_layer", "shared")
Measured = Any                  # report.Measured (report.py imports this module)


def pool_factor(results: Sequence[Measured], budget: int = MAP_BUDGET) -> int:
    """The smallest integer factor f whose f x f average pooling brings every map of the page within budget."""
    pixels = sum(r.maps.shape[0] * r.maps.shape[1] * r.maps.shape[2] for r in results)
    f = 1
    while pixels / (f * f) > budget and f < min(min(r.maps.shape[1:]) for r in results):
        f += 1
    return f


def pooled(maps: np.ndarray, f: int) -> np.ndarray:
    """(L, H, W) -> (L, H // f, W // f) means over f x f blocks (a border narrower than f is left out)."""
    if f == 1:
        return np.asarray(maps, np.float64)
    l, h, w = maps.shape
    m = np.asarray(maps, np.float64)[:, :h - h % f, :w - w % f]
    return m.reshape(l, h // f, f, w // f, f).mean(axis=(2, 4))


def quantised(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, h, w) non-negative maps -> uint8 maps (each / its max x 255, rounded) and the float32 maxima."""
    top = maps.reshape(len(maps), -1).max(axis=1)
    safe = np.where(top > 0, top, 1.0)
    q = np.rint(np.clip(maps / safe[:, None, None], 0.0, 1.0) * 255).astype(np.uint8)
    return q, top.astype(np.float32)


def _variant(res: Measured, f: int) -> dict[str, Any]:
    q, top = quantised(pooled(res.maps, f))
    return {"label": res.label, "trained": bool(res.model.get("trained")), "num_images": res.num_images,
            "S": [s["S"] for s in res.summaries()], "mean_radius": [s["mean_radius"] for s in res.summaries()],
            "max_M": [s["max_M"] for s in res.summaries()],
            "maps": encode_array(q, "uint8"), "map_max": [float(t) for t in top]}


def model_data(twins: Sequence[Measured], f: int) -> dict[str, Any]:
    """One listed model: its layers (shared by its twins) and one entry per variant (trained first)."""
    twins = sorted(twins, key=lambda r: not r.model.get("trained"))
    first = twins[0]
    layers = [{"name": s["layer"], "group": s["group"], "depth": s["relative_depth"], "grid": s["grid"],
               "central": s["central"], "centre_px": s["centre_px"]} for s in first.summaries()]
    return {"name": first.model.get("listed", first.model["name"]), "image_size": list(first.image_hw),
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
    html = (
        f'<div class="vj-controls">'
        f'<label id="{KEY}-model-box">model <select id="{KEY}-model"></select></label>'
        f'<label>layer <input type="range" id="{KEY}-layer" min="0" max="0" step="1" value="0"></label>'
        f'<b id="{KEY}-layer-label"></b>'
        f'<label>colour scale <select id="{KEY}-scale">'
        f'<option value="per_map">per map (M / its max)</option>'
        f'<option value="shared_layer">shared: both maps of this layer</option>'
        f'<option value="shared">shared: every map of the model</option></select></label></div>'
        f'<div class="vj-panels" id="{KEY}-maps"></div><div class="vj-panels" id="{KEY}-curves"></div>'
        f'<p class="vj-note" id="{KEY}-note"></p>')
    return Explorer(key=KEY, title="Receptive-field explorer: every layer and sub-stage", html=html,
                    script=static_text("receptive_field.js"),
                    data={"models": [model_data(twins, f) for twins in listed.values()],
                          "scale": scale if scale in SCALES else "per_map"})
