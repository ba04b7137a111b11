"""report.html of a receptive-field run: the explorer's maps and curves are the run's own (quantised maps,
S and mean radius of results.json), and the page works in headless Chromium (slider, keys, colour scale,
curve points, no console error). The built-in default (vit_pico, trained + untrained) on 8 digits.

VITSPARSE_JAX_SCREENSHOTS=docs/img also saves the explorer's screenshot
(docs/img/explorer_receptive_field.png)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.browser import page_data
from vitsparse_jax.experiments.receptive_field import explorer as rf_explorer
from vitsparse_jax.report_html import decode_array


@pytest.fixture(scope="module")
def run(finished_runs) -> Path:
    return finished_runs.path("receptive_field")   # the built-in default on 8 digits (tests/shared_runs.py)


def test_pooling_and_log_quantisation(rng):
    maps = np.arange(2 * 5 * 4, dtype=np.float64).reshape(2, 5, 4)
    np.testing.assert_allclose(rf_explorer.pooled(maps, 2)[0], [[2.5, 4.5], [10.5, 12.5]])   # last row left out
    big = [type("M", (), {"maps": np.zeros((98, 224, 224))})()]     # ViT-B, trained + untrained: 2 x 49 maps
    assert rf_explorer.pool_factor(big) == 2 and rf_explorer.pool_factor(big, budget=10**8) == 1
    # each map relative to its max on a log scale: within 2.3% down to 10^-5 of the max, 0 below, 0 for M = 0
    x = 10 ** rng.uniform(-6, 0, size=(3, 6, 7)) * np.array([1.0, 1e-9, 3e4])[:, None, None]
    x[2, 0, 0] = 0.0
    q, top = rf_explorer.quantised(np.concatenate([x, np.zeros((1, 6, 7))]))
    assert q.dtype == np.uint8 and top[-1] == 0 and not q[-1].any()
    np.testing.assert_allclose(top[:3], x.reshape(3, -1).max(1), rtol=1e-6)
    back = rf_explorer.dequantised(q, top)[:3]
    floor = 10 ** -rf_explorer.LOG_DECADES * x.reshape(3, -1).max(1)[:, None, None]
    kept = x > floor * 1.03
    assert kept.mean() > 0.7 and np.all(q[:3][kept] >= 1) and np.all(q[:3].max(axis=(1, 2)) == 255)
    np.testing.assert_allclose(back[kept], x[kept], rtol=0.024)
    assert np.all(back[x < floor * 0.97] == 0) and back[2, 0, 0] == 0


def test_explorer_data_is_the_runs_own(run):
    data = page_data(run / "report.html", "rf")
    (m,) = data["models"]
    results = json.loads((run / "results.json").read_text())["models"]
    saved = np.load(run / "receptive_fields.npz")
    # untrained first: the order of the locality figure's columns (untrained | trained)
    assert m["pool"] == 1 and m["map_size"] == [32, 32] and [v["trained"] for v in m["variants"]] == [False, True]
    assert data["scale"] == "per_map" and data["log_decades"] == rf_explorer.LOG_DECADES
    index = {r["label"]: i for i, r in enumerate(results)}
    for variant in m["variants"]:
        i = index[variant["label"]]
        assert variant["S"] == [layer["S"] for layer in results[i]["layers"]]
        assert variant["mean_radius"] == [layer["mean_radius"] for layer in results[i]["layers"]]
        top, full = np.array(variant["map_max"]), saved[f"{i}/maps"]
        np.testing.assert_allclose(top, full.max(axis=(1, 2)), rtol=1e-6)
        maps = rf_explorer.dequantised(decode_array(variant["maps"]), top)
        kept = full > 1.03 * 10 ** -rf_explorer.LOG_DECADES * top[:, None, None]
        np.testing.assert_allclose(maps[kept], full[kept], rtol=0.024)          # within 2.3% of each value
        assert np.all(maps[~kept] <= 1.04 * 10 ** -rf_explorer.LOG_DECADES * np.broadcast_to(top[:, None, None],
                                                                                             full.shape)[~kept])
    assert [layer["name"] for layer in m["layers"]] == [layer["layer"] for layer in results[0]["layers"]]


def _state(page) -> dict:
    return page.evaluate("""() => ({
        label: document.getElementById('rf-layer-label').textContent,
        slider: document.getElementById('rf-layer').value,
        stage: document.getElementById('rf-stage').value,
        stages: Array.from(document.getElementById('rf-stage').options).map(o => o.textContent),
        stageOff: document.getElementById('rf-stage').disabled,
        mark: document.getElementById('rf-mark-S-0').getAttribute('cx'),
        markR: document.getElementById('rf-mark-mean_radius-1').getAttribute('cy'),
        lows: [0, 1].map(v => document.querySelector('#rf-cb-' + v + ' .vj-cb-lo').textContent),
        tops: [0, 1].map(v => document.querySelector('#rf-cb-' + v + ' .vj-cb-hi').textContent),
        maps: [0, 1].map(v => document.getElementById('rf-map-' + v).toDataURL())})""")


def _slide(page, position: int) -> dict:
    page.eval_on_selector("#rf-layer", f"e => {{ e.value = {position}; e.dispatchEvent(new Event('input')); }}")
    return _state(page)


def test_explorer_in_a_browser(run, open_report):
    (m,) = page_data(run / "report.html", "rf")["models"]
    names = [layer["name"] for layer in m["layers"]]
    saved = np.load(run / "receptive_fields.npz")
    results = json.loads((run / "results.json").read_text())["models"]
    rp = open_report(run / "report.html")
    page = rp.page
    page.wait_for_function("document.getElementById('rf-layer-label').textContent.length > 0")
    # untrained left, trained right (as the locality figure's columns)
    assert "(untrained)" in page.inner_text("#rf-title-0") and "(trained)" in page.inner_text("#rf-title-1")

    # it opens at the attention sub-stage of the middle block (depth 0.5 of vit_pico's 6 blocks); the slider
    # steps through the embedding and the 6 blocks, the sub-stage is its own control
    start = _state(page)
    mid = names.index("blocks.2.attn")
    assert start["label"].startswith("blocks.2.attn \u00b7 attn")
    assert f"layer {mid + 1} of {len(names)}" in start["label"]
    assert (start["slider"], page.get_attribute("#rf-layer", "max")) == ("3", "6")
    assert start["stage"] == str(mid) and start["stages"] == ["attn", "attn_res", "mlp", "mlp_res"]

    moved = _slide(page, 4)                                   # the next block, the same sub-stage
    assert moved["label"].startswith("blocks.3.attn \u00b7")
    assert moved["mark"] != start["mark"] and moved["markR"] != start["markR"] and moved["maps"] != start["maps"]
    point = page.eval_on_selector_all(f'#rf-curve-S circle[data-layer="{names.index("blocks.3.attn")}"]',
                                      "cs => cs[0].getAttribute('cx')")
    assert moved["mark"] == point
    page.select_option("#rf-stage", label="attn_res")        # the sub-stage control
    assert _state(page)["label"].startswith("blocks.3.attn_res \u00b7")
    page.focus("#rf-layer")
    page.keyboard.press("ArrowRight")                       # the slider's own keys keep the sub-stage
    assert _state(page)["label"].startswith("blocks.4.attn_res \u00b7")
    page.click("#rf-note")
    page.keyboard.press("ArrowLeft")                        # page-level arrows (no control focused)
    assert _state(page)["label"].startswith("blocks.3.attn_res \u00b7")
    embed = _slide(page, 0)                                   # the embedding: one sub-stage of its own ...
    assert embed["label"].startswith("embed \u00b7") and embed["stages"] == ["embed"] and embed["stageOff"]
    assert _slide(page, 1)["label"].startswith("blocks.0.attn_res \u00b7")   # ... and the kept one comes back
    attn = names.index("blocks.1.attn")
    page.click(f'#rf-curve-S circle[data-layer="{attn}"]')    # a point of a curve selects its layer
    clicked = _state(page)
    assert clicked["label"].startswith("blocks.1.attn \u00b7") and clicked["stage"] == str(attn)

    # the value under the mouse is the run's map at that pixel (within the 2.3% of the log quantisation)
    full = saved[f"{next(i for i, r in enumerate(results) if r['trained'])}/maps"][attn]
    y, x = np.unravel_index(np.argmin(np.abs(full - 0.3 * full.max())), full.shape)   # a mid-scale value
    box = page.locator("#rf-map-1").bounding_box()
    page.mouse.move(box["x"] + 1 + 320 * (x + 0.5) / 32, box["y"] + 1 + 320 * (y + 0.5) / 32)
    hover = page.inner_text("#rf-hover-1")
    assert hover.startswith("M \u2248 ") and f"at pixel ({y}, {x})" in hover
    assert float(hover.split()[2]) == pytest.approx(full[y, x], rel=0.03)

    per_map = _state(page)
    assert per_map["tops"][0] != per_map["tops"][1]          # each map on its own scale
    page.select_option("#rf-scale", index=1)                # shared by this layer's two maps
    layer = _state(page)
    assert layer["tops"][0] == layer["tops"][1] and layer["maps"] != per_map["maps"]
    page.select_option("#rf-scale", index=2)                # shared by every map of the model
    every = _state(page)
    top = max(max(v["map_max"]) for v in m["variants"])
    assert every["tops"] == [page.evaluate(f"vj.fmt({top!r})")] * 2

    page.select_option("#rf-scale", index=0)
    linear = _state(page)
    assert linear["lows"] == ["0", "0"]
    page.select_option("#rf-colour", "log")                  # log colour: 5 decades below each map's max
    log = _state(page)
    assert log["maps"] != linear["maps"] and log["tops"] == linear["tops"]
    assert log["lows"] == [page.evaluate(f"vj.fmt({v['map_max'][attn] * 10 ** -rf_explorer.LOG_DECADES!r})")
                           for v in m["variants"]]
    assert "log10" in page.inner_text("#rf-cb-0")
    page.select_option("#rf-colour", "linear")

    _slide(page, 3)                                          # the docs' picture: blocks.2, attention sub-stage
    page.select_option("#rf-stage", label="attn")
    shots = os.environ.get("VITSPARSE_JAX_SCREENSHOTS")
    if shots:
        page.evaluate("document.querySelector('header').style.position = 'static'")
        page.locator("#rf-explorer").screenshot(path=str(Path(shots) / "explorer_receptive_field.png"))
    rp.assert_clean()
