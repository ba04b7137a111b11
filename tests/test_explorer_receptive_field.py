"""report.html of a receptive-field run: the explorer's maps and curves are the run's own (quantised maps,
S and mean radius of results.json), and the page works in headless Chromium (slider, keys, colour scale,
curve points, no console error). The built-in default (vit_pico, trained + untrained) on 4 digits.

VITSPARSE_JAX_SCREENSHOTS=docs/img also saves the explorer's screenshot
(docs/img/explorer_receptive_field.png)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from configs import receptive_field as rf_config
from tests.browser import page_data
from vitsparse_jax import main
from vitsparse_jax.experiments.receptive_field import explorer as rf_explorer
from vitsparse_jax.report_html import decode_array


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rf")
    config = rf_config.get_config()
    config.workdir, config.progress, config.data.num_images, config.data.batch_size = str(folder), False, 4, 4
    main.run(config)
    return folder


def test_pooling_and_quantisation():
    maps = np.arange(2 * 5 * 4, dtype=np.float64).reshape(2, 5, 4)
    np.testing.assert_allclose(rf_explorer.pooled(maps, 2)[0], [[2.5, 4.5], [10.5, 12.5]])   # last row left out
    q, top = rf_explorer.quantised(np.stack([maps[0], np.zeros((5, 4))]))
    assert q.dtype == np.uint8 and q[0].max() == 255 and top.tolist() == [19.0, 0.0] and q[1].max() == 0
    big = [type("M", (), {"maps": np.zeros((98, 224, 224))})()]     # ViT-B, trained + untrained: 2 x 49 maps
    assert rf_explorer.pool_factor(big) == 2 and rf_explorer.pool_factor(big, budget=10**8) == 1


def test_explorer_data_is_the_runs_own(run):
    data = page_data(run / "report.html", "rf")
    (m,) = data["models"]
    results = json.loads((run / "results.json").read_text())["models"]
    saved = np.load(run / "receptive_fields.npz")
    assert m["pool"] == 1 and m["map_size"] == [32, 32] and [v["trained"] for v in m["variants"]] == [True, False]
    assert data["scale"] == "per_map"
    for i, (variant, result) in enumerate(zip(m["variants"], results)):
        assert variant["S"] == [layer["S"] for layer in result["layers"]]
        assert variant["mean_radius"] == [layer["mean_radius"] for layer in result["layers"]]
        maps, top = decode_array(variant["maps"]).astype(np.float64), np.array(variant["map_max"])
        full = saved[f"{i}/maps"]
        np.testing.assert_allclose(top, full.max(axis=(1, 2)), rtol=1e-6)
        np.testing.assert_allclose(maps / 255 * top[:, None, None], full, rtol=0,
                                   atol=float(top.max()) / 500)   # within half a level of each map
    assert [layer["name"] for layer in m["layers"]] == [layer["layer"] for layer in results[0]["layers"]]


def _state(page) -> dict:
    return page.evaluate("""() => ({
        label: document.getElementById('rf-layer-label').textContent,
        mark: document.getElementById('rf-mark-S-0').getAttribute('cx'),
        markR: document.getElementById('rf-mark-mean_radius-1').getAttribute('cy'),
        tops: [0, 1].map(v => document.querySelector('#rf-cb-' + v + ' .vj-cb-hi').textContent),
        maps: [0, 1].map(v => document.getElementById('rf-map-' + v).toDataURL())})""")


def test_explorer_in_a_browser(run, open_report):
    (m,) = page_data(run / "report.html", "rf")["models"]
    names = [layer["name"] for layer in m["layers"]]
    rp = open_report(run / "report.html")
    page = rp.page
    page.wait_for_function("document.getElementById('rf-layer-label').textContent.length > 0")
    start = _state(page)
    assert start["label"].startswith("embed") and f"layer 1 of {len(names)}" in start["label"]

    page.eval_on_selector("#rf-layer", "e => { e.value = 10; e.dispatchEvent(new Event('input')); }")
    moved = _state(page)
    assert moved["label"].startswith(names[10]) and f"layer 11 of {len(names)}" in moved["label"]
    assert moved["mark"] != start["mark"] and moved["markR"] != start["markR"] and moved["maps"] != start["maps"]
    point = page.eval_on_selector_all('#rf-curve-S circle[data-layer="10"]', "cs => cs[0].getAttribute('cx')")
    assert moved["mark"] == point
    page.focus("#rf-layer")
    page.keyboard.press("ArrowRight")                       # the slider's own keys
    assert _state(page)["label"].startswith(names[11])
    page.click("#rf-note")
    page.keyboard.press("ArrowLeft")                        # page-level arrows (no control focused)
    assert _state(page)["label"].startswith(names[10])
    page.click('#rf-curve-mean_radius circle[data-layer="3"]')   # a point of a curve selects its layer
    assert _state(page)["label"].startswith(names[3])

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
    page.eval_on_selector("#rf-layer", "e => { e.value = 17; e.dispatchEvent(new Event('input')); }")
    shots = os.environ.get("VITSPARSE_JAX_SCREENSHOTS")
    if shots:
        page.evaluate("document.querySelector('header').style.position = 'static'")
        page.locator("#rf-explorer").screenshot(path=str(Path(shots) / "explorer_receptive_field.png"))
    rp.assert_clean()
