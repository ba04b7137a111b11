"""The sparsity explorer of report.html: for a few example images, every block's and head's post-softmax map
in compact form, mu per column, the top columns, token norms and prefix-token mass (ViTs), or, for Swin, every
block's window attention mapped back to the block's token grid (`collect_swin`, explorer_swin.js); and each
head's mean attention distance (all and central patch queries) and prefix mass, per block, for each example
image and over the run (`distances`, explorer_distances.js; docs/science.md#attention-distance).

Images: `sparsity.explore_images` readable images from `sparsity.example_index` on (the Fig. 1 image first).
Rows are stored compactly (docs/sparsity.md, "report.html"): per row (query token), block and head (the head
mean included) the prefix-token columns exactly (float16), the `ROW_TOP_K` largest patch columns (uint8/uint16
indices, uint8 log-quantised values; every patch column when that takes at most `FULL_ROWS_BYTES`) and the
rest of the row's patch mass (float16). Columns are rebuilt in the browser from the rows, so a column shows
only its entries that are among their row's top `ROW_TOP_K`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import data
from vitsparse_jax.experiments.contract import Context
from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.experiments.sparsity.probe import Probe
from vitsparse_jax.measures import attention_distance
from vitsparse_jax.measures.attention_summary import BlockMeasures
from vitsparse_jax.report_html import Explorer, encode_array, image_data_url, static_text
from vitsparse_jax.weights.loading import LoadedModel

ROW_TOP_K = 16        # patch columns kept per attention row ...
FULL_ROWS_BYTES = 1_500_000   # ... or all of them when that stores at most this many bytes (small models)
LOG_FLOOR = -6.0      # values are stored as log10 in [LOG_FLOOR, 0] on 1..255; 0 = below 10**LOG_FLOOR
IMAGE_SIDE = 224      # longest side of an example image in the page (JPEG when larger than 64 px)


def supported(probe: Probe) -> bool:
    """Global attention (ViT/DeiT: one map per block) or Swin's window attention (a token index per block)."""
    return probe.kind == "attention"


def is_swin(probe: Probe) -> bool:
    return probe.kind == "attention" and any(i is not None for i in probe.token_index)


def quantize_log(v: np.ndarray) -> np.ndarray:
    """Attention values in [0, 1] -> uint8: 0 below 10**LOG_FLOOR, else 1 + round(254 * (log10 v - F) / -F)."""
    v = np.asarray(v, np.float64)
    with np.errstate(divide="ignore"):
        t = (np.log10(np.maximum(v, 1e-30)) - LOG_FLOOR) / -LOG_FLOOR
    q = 1 + np.rint(np.clip(t, 0, 1) * 254)
    return np.where(v > 10 ** LOG_FLOOR, q, 0).astype(np.uint8)


def dequantize_log(q: np.ndarray) -> np.ndarray:
    """The inverse of `quantize_log` (0 -> 0), as the page does it."""
    q = np.asarray(q, np.float64)
    return np.where(q > 0, 10 ** (LOG_FLOOR + (q - 1) / 254 * -LOG_FLOOR), 0.0)


def row_top_k(images: int, blocks: int, heads: int, prefix: int, patches: int) -> int:
    """Patch columns stored per row: all when that takes at most FULL_ROWS_BYTES, else ROW_TOP_K."""
    full = images * blocks * (heads + 1) * (prefix + patches) * patches * 2
    return patches if full <= FULL_ROWS_BYTES else min(ROW_TOP_K, patches)


def pack(a: jax.Array, prefix: int, top_k: int) -> dict[str, jax.Array]:
    """One block's maps (B, H, N, N) -> (B, H + 1, ...) arrays, head mean last: the prefix-column entries
    (..., N, prefix), the top-k patch values and indices (..., N, k), the rest of each row's patch mass
    (..., N), and mu per column (..., N)."""
    a = a.astype(jnp.float32)
    a = jnp.concatenate([a, a.mean(axis=1, keepdims=True)], axis=1)
    patches = a[..., prefix:]
    vals, idx = jax.lax.top_k(patches, top_k)
    return {"prefix": a[..., :prefix], "vals": vals, "idx": idx,
            "rest": jnp.maximum(patches.sum(-1) - vals.sum(-1), 0.0), "mu": a.mean(axis=-2)}


def _pack_fn(loaded: LoadedModel, probe: Probe, top_k: int, norms: bool,
             also: Callable[[dict[str, jax.Array]], Any] | None = None) -> Any:
    """jit(variables, image uint8) -> {"blocks": [pack(maps of each block)], "norms": (B, L + 1, N), "distances":
    the probe's per-image attention distances (B, blocks, heads) when it measures them, "also": also(aux), what
    another figure needs of the same forward pass}."""
    p, cfg = probe.layout.prefix, loaded.pretrained_cfg
    names = ("embed", *probe.names) if norms else ()

    @jax.jit
    def fn(variables: Any, image: jax.Array) -> dict[str, Any]:
        _, aux = loaded.module.apply(variables, data.normalize(image, cfg),
                                     capture=tuple(dict.fromkeys(probe.captures + names)))
        out = {"blocks": [pack(aux[c], p, top_k) for c in probe.captures]}
        if also is not None:
            out["also"] = also(aux)
        if probe.distances is not None:
            out["distances"] = probe.distances(aux)
        if norms:
            out["norms"] = jnp.stack([jnp.linalg.norm(aux[c].astype(jnp.float32), axis=-1) for c in names], 1)
        return out

    return fn


def encode(blocks: list[dict[str, np.ndarray]], norms: np.ndarray | None, meta: dict[str, Any],
           distances: dict[str, Any] | None = None) -> dict[str, Any]:
    """Host arrays of `pack` per block (images first) and the token norms (I, L + 1, N) -> the page's data.
    `meta`: model, blocks, heads, grid, prefix, prefix_kinds, top_fraction, images (data URLs), image_index,
    label; `distances`: `image_distances` of the same images."""
    stack = lambda k: np.stack([np.asarray(b[k]) for b in blocks], 1)  # noqa: E731 (I, L, H + 1, ...)
    gh, gw = meta["grid"]
    p, patches, mu = meta["prefix"], gh * gw, stack("mu")
    n_top = st.num_top(float(meta["top_fraction"]), patches)
    top = np.argsort(-mu[..., p:], axis=-1, kind="stable")[..., :n_top]
    index_kind = "uint8_raw" if patches <= 256 else "uint16"
    res = {**meta, "prefix_kinds": list(meta["prefix_kinds"]) or ["prefix"] * p,
           "row_top_k": int(blocks[0]["idx"].shape[-1]), "log_floor": LOG_FLOOR, "top_n": int(n_top),
           "idx": encode_array(stack("idx"), index_kind),
           "val": encode_array(quantize_log(stack("vals")), "uint8_raw"),
           "pre": encode_array(stack("prefix"), "float16"),
           "rest": encode_array(stack("rest"), "float16"),
           "mu": encode_array(mu, "float16"),
           "top": encode_array(top, index_kind)}
    if norms is not None:   # (I, L + 1, N): the input of block l is entry l
        res["norms"] = encode_array(norms, "float16")
    return _with_distances(res, distances)


@dataclasses.dataclass
class Forward:
    """The explorer's forward pass over its images: the host batch, its readable rows, the device outputs."""

    batch: dict[str, np.ndarray]
    keep: np.ndarray
    out: dict[str, Any]
    top_k: int


def collect(loaded: LoadedModel, probe: Probe, ctx: Context, start: int, images: int,
            top_fraction: float) -> dict[str, Any] | None:
    """The explorer's data for the readable images among `images` from `start` on (None when none)."""
    if images <= 0 or not supported(probe):
        return None
    if is_swin(probe):
        return collect_swin(loaded, probe, ctx, start, images, top_fraction)
    return page_data(loaded, probe, forward(loaded, probe, ctx, start, images), top_fraction)


def forward(loaded: LoadedModel, probe: Probe, ctx: Context, start: int, images: int,
            also: Callable[[dict[str, jax.Array]], Any] | None = None) -> Forward:
    """The forward pass of a ViT explorer (`supported`, not `is_swin`) over images [start, start + images):
    one program, which also returns `also(aux)` (Fig. 1 and S1's maps of the first image: one forward pass
    for both)."""
    lay: st.AttentionLayout = probe.layout
    gh, gw = lay.grids[-1]
    stop = min(len(ctx.source), start + images)
    top_k = row_top_k(stop - start, len(probe.names), lay.heads, lay.prefix, gh * gw)
    batch, keep = ctx.host_batch(loaded, start, stop)
    if keep.size == 0:   # no readable image: nothing to compute
        return Forward(batch, keep, {}, top_k)
    norms = "embed" in loaded.info.capture_names
    out = ctx.to_host(_pack_fn(loaded, probe, top_k, norms, also)(loaded.variables, batch["image"]))
    return Forward(batch, keep, out, top_k)


def page_data(loaded: LoadedModel, probe: Probe, fwd: Forward, top_fraction: float) -> dict[str, Any] | None:
    """The explorer's data from its `forward` (None when no image was readable)."""
    batch, keep, out = fwd.batch, fwd.keep, fwd.out
    if keep.size == 0:
        return None
    lay: st.AttentionLayout = probe.layout
    gh, gw = lay.grids[-1]
    side = batch["image"].shape[1]
    meta = {"model": loaded.name, "blocks": list(probe.names), "heads": lay.heads, "grid": [gh, gw],
            "prefix": lay.prefix, "prefix_kinds": list(lay.prefix_kinds), "top_fraction": float(top_fraction),
            "images": [image_data_url(np.asarray(batch["image"][i]), "jpeg" if side > 64 else "png",
                                      max_side=IMAGE_SIDE) for i in keep],
            "image_index": [int(batch["index"][i]) for i in keep], "label": [int(batch["label"][i]) for i in keep]}
    blocks = [{k: np.asarray(v)[keep] for k, v in b.items()} for b in out["blocks"]]
    distances = image_distances(probe.distances, out["distances"], keep) if probe.distances is not None else None
    return encode(blocks, np.asarray(out["norms"])[keep] if "norms" in out else None, meta, distances)


# ---------------------------------------------------------------------------------------------------------
# Attention distance per head (docs/science.md#attention-distance): plain JSON numbers, NaN as null

DISTANCE_VALUES = (("distance", "distance_px"), ("distance_central", "distance_central_px"),
                   ("prefix_mass", "prefix_mass"))   # (device value, results key)


def _with_distances(res: dict[str, Any], distances: dict[str, Any] | None) -> dict[str, Any]:
    """The page's data with `image_distances` of its images, whose blocks must be the page's, in its order."""
    if distances is None:
        return res
    if distances["blocks"] != list(res["blocks"]):
        raise ValueError(f"attention distances of blocks {distances['blocks']} for an explorer of {res['blocks']}")
    return {**res, "distances": distances}


def _numbers(x: np.ndarray) -> list[float | None]:
    """JSON numbers to 7 significant digits (float32's precision; the page stays small), NaN as null."""
    return [None if np.isnan(v) else float(f"{v:.7g}") for v in np.asarray(x, np.float64)]


def image_distances(measures: BlockMeasures, values: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """The attention distances of the explorer's images: `measures`' per-image device values (B, blocks,
    max_heads) of the rows `keep` -> per block its heads, image side and uniform-map references, and per image,
    block and head (that block's heads only) the all- and central-query distance in pixels and the prefix mass."""
    refs = [attention_distance.uniform_reference(g) for g in measures.geometries]
    image = {}
    for value, key in DISTANCE_VALUES:
        v = np.asarray(values[value], np.float64)[keep]
        image[key] = [[_numbers(v[i, b, :h]) for b, h in enumerate(measures.heads)] for i in range(len(v))]
    return {"blocks": list(measures.blocks), "heads": list(measures.heads),
            "image_side": [int(g.image_side) for g in measures.geometries], "renormalize": measures.renormalize,
            "uniform": {"distance_px": [r.distance for r in refs],
                        "distance_central_px": [r.distance_central for r in refs]}, "image": image}


def run_distances(res: dict[str, Any]) -> dict[str, Any]:
    """The run's means over its images (`BlockMeasures.results`: (blocks, max_heads), NaN-padded) -> per block
    and head, as `image_distances` has them, with the number of images."""
    out: dict[str, Any] = {"images": int(res["images"])}
    for _, key in DISTANCE_VALUES:
        out[key] = [_numbers(np.asarray(res[key])[b, :h]) for b, h in enumerate(res["heads"])]
    return out


# ---------------------------------------------------------------------------------------------------------
# Swin: window attention on each block's own token grid

SWIN_ROWS_BYTES = 4_400_000   # bytes of stored row entries (all images): every entry, or the largest top-k that fits


def swin_row_top_k(images: int, rows: list[tuple[int, int]]) -> int:
    """Window entries stored per row, the same for every block: T (every entry; no index stored) when all rows
    take at most SWIN_ROWS_BYTES, else the largest k whose uint8 index + uint8 value per entry and float16
    rest per row fit (at least 1). `rows`: per block (rows per image = tokens x (heads + 1), T tokens per
    window)."""
    if images * sum(r * t for r, t in rows) <= SWIN_ROWS_BYTES:
        return max(t for _, t in rows)
    for k in range(max(t for _, t in rows) - 1, 1, -1):
        if images * sum(r * (t if k >= t else 2 * k + 2) for r, t in rows) <= SWIN_ROWS_BYTES:
            return k
    return 1


def pack_windows(probs: jax.Array, top_k: int) -> dict[str, jax.Array]:
    """One Swin block's maps (B, nW, heads, T, T) -> (B, heads + 1, nW, T, ...) arrays, head mean last: the
    row values (..., T, k) and, when k < T, their window positions and the rest of each row's mass (..., T)."""
    a = probs.astype(jnp.float32)
    a = jnp.moveaxis(jnp.concatenate([a, a.mean(axis=2, keepdims=True)], axis=2), 2, 1)
    if top_k >= a.shape[-1]:
        return {"vals": a}
    vals, idx = jax.lax.top_k(a, top_k)
    return {"vals": vals, "idx": idx, "rest": jnp.maximum(a.sum(-1) - vals.sum(-1), 0.0)}


def _pack_swin_fn(loaded: LoadedModel, probe: Probe, top_k: int) -> Any:
    """jit(variables, image uint8) -> {"blocks": per block {pack_windows(...), "mu": the probe's (mu, mu_h)
    pairs}, "distances": the probe's per-image attention distances, when it measures them}."""
    cfg = loaded.pretrained_cfg

    @jax.jit
    def fn(variables: Any, image: jax.Array) -> dict[str, Any]:
        _, aux = loaded.module.apply(variables, data.normalize(image, cfg), capture=probe.captures)
        out: dict[str, Any] = {"blocks": [{**pack_windows(aux[c], top_k), "mu": probe.column_means(aux, l)}
                                          for l, c in enumerate(probe.captures)]}
        if probe.distances is not None:
            out["distances"] = probe.distances(aux)
        return out

    return fn


def encode_swin(blocks: list[dict[str, Any]], token_index: list[np.ndarray], meta: dict[str, Any],
                distances: dict[str, Any] | None = None) -> dict[str, Any]:
    """Host arrays of `_pack_swin_fn` per block (images first; "mu" as ((mu, err), (mu_h, err)) pairs, the
    run's own column means) and each block's window token index (nW, T) -> the page's data. `meta`: model,
    blocks, grids, windows, shifts, top_fraction, images, image_index, label; `distances`: `image_distances`."""
    out = []
    for b, tokens, grid, window, shift in zip(blocks, token_index, meta["grids"], meta["windows"], meta["shifts"]):
        (mu, mu_h) = b["mu"]
        mu = np.concatenate([st.hi_lo(mu_h), st.hi_lo(mu)[:, None]], axis=1)     # (I, heads + 1, HW), mean last
        hw = grid[0] * grid[1]
        n_top = st.num_top(float(meta["top_fraction"]), hw)
        top = np.argsort(-mu, axis=-1, kind="stable")[..., :n_top]               # as the statistics rank it
        vals = np.asarray(b["vals"])
        t = tokens.shape[1]
        entry = {"grid": list(grid), "window": list(window), "shift": list(shift), "heads": int(mu.shape[1] - 1),
                 "windows": int(tokens.shape[0]), "k": int(vals.shape[-1]), "top_n": int(n_top),
                 "tokens": encode_array(tokens, "uint16"), "val": encode_array(quantize_log(vals), "uint8_raw"),
                 "mu": encode_array(mu, "float16"), "top": encode_array(top, "uint16")}
        if "idx" in b:
            entry["idx"] = encode_array(np.asarray(b["idx"]), "uint8_raw" if t <= 256 else "uint16")
            entry["rest"] = encode_array(np.asarray(b["rest"]), "float16")
        out.append(entry)
    res = {**{k: v for k, v in meta.items() if k not in ("grids", "windows", "shifts")}, "kind": "swin",
           "prefix": 0, "log_floor": LOG_FLOOR, "row_top_k": max(e["k"] for e in out), "swin": out}
    return _with_distances(res, distances)


def collect_swin(loaded: LoadedModel, probe: Probe, ctx: Context, start: int, images: int,
                 top_fraction: float) -> dict[str, Any] | None:
    """`collect` for Swin: each block's window rows on the block's own grid (windows through the cyclic shift
    as the model takes them: `probe.token_index`, from `models.swin.window_token_index`)."""
    where = [(int(n.split(".")[1]), int(n.split(".")[3])) for n in probe.names]   # layers.{s}.blocks.{b}
    geoms = [loaded.module.geometry()[s][b] for s, b in where]
    stop = min(len(ctx.source), start + images)
    heads = [int(loaded.module.num_heads[s]) for s, _ in where]
    tokens = [np.asarray(i) for i in probe.token_index]
    top_k = swin_row_top_k(stop - start, [(i.size * (h + 1), i.shape[1]) for i, h in zip(tokens, heads)])
    batch, keep = ctx.host_batch(loaded, start, stop)
    if keep.size == 0:
        return None
    out = ctx.to_host(_pack_swin_fn(loaded, probe, top_k)(loaded.variables, batch["image"]))
    side = batch["image"].shape[1]
    meta = {"model": loaded.name, "blocks": list(probe.names), "grids": [list(g.grid) for g in geoms],
            "windows": [list(g.window) for g in geoms], "shifts": [list(g.shift) for g in geoms],
            "top_fraction": float(top_fraction),
            "images": [image_data_url(np.asarray(batch["image"][i]), "jpeg" if side > 64 else "png",
                                      max_side=IMAGE_SIDE) for i in keep],
            "image_index": [int(batch["index"][i]) for i in keep], "label": [int(batch["label"][i]) for i in keep]}
    blocks = [jax.tree.map(lambda v: np.asarray(v)[keep], b) for b in out["blocks"]]
    distances = image_distances(probe.distances, out["distances"], keep) if probe.distances is not None else None
    return encode_swin(blocks, tokens, meta, distances)


HTML = """
<p class="vj-note">Point at a patch (click to pin it, click again to release) to see its attention row (where
it looks) and its column (who looks at it). <kbd>&larr;</kbd> <kbd>&rarr;</kbd> step through blocks. The maps
are drawn in their colour bar's colours (map opacity 100%); the image is beside them, and washed out under
the cells that hold no value. <span id="sparsity-k"></span></p>
<div class="vj-controls">
  <label>image <select id="sparsity-image"></select></label>
  <label>block <button id="sparsity-prev" type="button">&#9664;</button><select id="sparsity-block"></select>
    <button id="sparsity-next" type="button">&#9654;</button></label>
  <label>head <select id="sparsity-head"></select></label>
  <label>colour <select id="sparsity-scale"><option value="log" selected>log10, at least 1 decade</option>
    <option value="stretch">log10, min to max</option><option value="linear">linear, 0 to max</option></select></label>
  <label>map opacity <input type="range" id="sparsity-opacity" min="0" max="100" step="5" value="100">
    <span id="sparsity-opacity-value">100%</span></label>
</div>
<div class="vj-controls">
  <label><input type="checkbox" id="sparsity-show-mu" checked> mu per column</label>
  <label><input type="checkbox" id="sparsity-show-top" checked> top <span id="sparsity-top-pct"></span>% columns</label>
  <label><input type="checkbox" id="sparsity-show-norms"> token norms</label>
  <label><input type="checkbox" id="sparsity-show-prefix" checked> prefix-token mass</label>
  <label><input type="checkbox" id="sparsity-show-dist" checked> attention distance per head</label>
</div>
<div class="vj-controls" id="sparsity-queries"></div>
<div class="vj-panels">
  <div class="vj-panel"><h3>Image (query outlined)</h3><canvas id="sparsity-picture" width="320" height="320"></canvas>
    <div class="vj-note" id="sparsity-grid-note"></div></div>
  <div class="vj-panel"><h3>Row: where the query looks</h3><canvas id="sparsity-row" width="320" height="320"></canvas>
    <div class="vj-colorbar" id="sparsity-row-cb"></div></div>
  <div class="vj-panel"><h3>Column: who looks at it</h3><canvas id="sparsity-col" width="320" height="320"></canvas>
    <div class="vj-colorbar" id="sparsity-col-cb"></div></div>
  <div class="vj-panel" id="sparsity-mu-panel"><h3>mu per column</h3>
    <canvas id="sparsity-mu" width="320" height="320"></canvas><div class="vj-colorbar" id="sparsity-mu-cb"></div></div>
  <div class="vj-panel" id="sparsity-norm-panel" hidden><h3>Token norms at the block's input</h3>
    <canvas id="sparsity-norm" width="320" height="320"></canvas>
    <div class="vj-colorbar" id="sparsity-norm-cb"></div></div>
  <div class="vj-panel" id="sparsity-dist-panel"><h3>Attention distance per head, this block</h3>
    <label class="vj-note" style="align-self:flex-start">values: <select id="sparsity-dist-source"></select></label>
    <svg id="sparsity-dist" width="320" height="240" role="img" aria-label="attention distance per head"></svg>
    <div class="vj-note" id="sparsity-dist-legend"></div></div>
</div>
<div class="vj-readout" id="sparsity-readout"></div>
<div class="vj-readout" id="sparsity-prefix"></div>
<div class="vj-readout" id="sparsity-dist-readout"></div>
"""


def make_explorer(collected: dict[str, Any], distances: dict[str, Any] | None = None) -> Explorer:
    """The explorer of `collect`'s data; `distances`: the run's attention distances (`BlockMeasures.results`, the
    statistics' "attention_distance"), shown beside the example images' own."""
    data = collected
    if distances is not None and "distances" in collected:
        if list(distances["blocks"]) != collected["distances"]["blocks"]:
            raise ValueError(f"the run's attention distances are of blocks {distances['blocks']}, the explorer's of "
                             f"{collected['distances']['blocks']}")
        data = {**collected, "distances": {**collected["distances"], "run": run_distances(distances)}}
    script = "explorer_swin.js" if collected.get("kind") == "swin" else "explorer.js"
    return Explorer(key="sparsity", title="Attention explorer", html=HTML,
                    script=static_text("explorer_distances.js", __package__) + "\n" + static_text(script, __package__),
                    data=data)
