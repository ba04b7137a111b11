"""report.html of an ablation run: the explorer's data is the run's own (the drops and predictions of the
pass, image by image), and the page works in headless Chromium (selects, table, canvas, no console error).
The built-in default (vit_pico on the digits, the paper's grid) on 8 images.

VITSPARSE_JAX_SCREENSHOTS=docs/img also saves the explorer's screenshot (docs/img/explorer_ablation.png)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.browser import page_data
from vitsparse_jax.experiments.ablation import explorer as ablation_explorer
from vitsparse_jax.experiments.ablation import figures as ablation_figures
from vitsparse_jax.experiments.ablation import report as ablation_report
from vitsparse_jax.report_html import decode_array
from vitsparse_jax.runtime.workdir import Workdir


@pytest.fixture(scope="module")
def run(finished_runs) -> Path:
    return finished_runs.path("ablate")   # the built-in default on 8 images (tests/shared_runs.py)


def test_explorer_data_is_the_drops_and_predictions_of_the_pass(run):
    (m,) = page_data(run / "report.html", "ablation")["models"]
    rows, _ = Workdir(run / "vit_pico_patch4_32.digits").load_state()
    ps, ns, draws, k = m["ps"], m["ns"], m["draws"], len(m["index"])
    assert k == 4 and m["index"] == [0, 1, 2, 3]          # the first explore_images (default 4) evaluated
    preds = decode_array(m["preds"])
    assert preds.shape == (len(ns), len(ps) * (1 + draws) + 1, k)
    grid = preds[:, :-1].reshape(len(ns), len(ps), 1 + draws, k)
    for j, idx in enumerate(m["index"]):
        label = m["label"][j]
        assert rows["clean"][idx] == (m["clean"][j] == label)
        np.testing.assert_array_equal(rows["top"][idx], grid[:, :, 0, j] == label)
        np.testing.assert_array_equal(rows["rand"][idx], grid[:, :, 1:, j] == label)
        np.testing.assert_array_equal(rows["whole"][idx], preds[:, -1, j] == label)
    for site in m["sites"]:                                 # k = round(p U) units, patch tokens only
        assert site["kind"] == "token" and site["units"] == 64 and site["prefix"] == 1 and site["grid"] == [8, 8]
        dropped = decode_array(m["dropped"][site["site"]])
        assert dropped.shape == (len(ps), 1 + draws, k, 64)
        np.testing.assert_array_equal(dropped.sum(-1), np.broadcast_to(np.array(site["k"])[:, None, None],
                                                                       dropped.shape[:-1]))
    # rank_by=last_layer: every block drops the same top set; random draws of the same U are shared too
    first, last = (decode_array(m["dropped"][s["site"]]) for s in (m["sites"][0], m["sites"][-1]))
    np.testing.assert_array_equal(first, last)


def test_explorer_off_and_size(run):
    assert ablation_explorer.collect(0, None, {"done": np.ones(8, bool)}, None, None) is None
    assert ablation_explorer.explorer([({}, None, (8, 8), None)]) is None
    size = (run / "report.html").stat().st_size
    assert size < 1_000_000, size                          # figures + 4 images + drops: well under a MB


def _state(page) -> dict:
    return page.evaluate("""() => ({
        title: document.getElementById('ablation-title').textContent,
        units: document.getElementById('ablation-units').textContent,
        readout: document.getElementById('ablation-readout').textContent,
        status: document.getElementById('ablation-status').textContent,
        canvas: document.getElementById('ablation-canvas').toDataURL(),
        layers: Array.from(document.getElementById('ablation-layer').options).map(o => o.value)})""")


def _expected_status(m: dict, image: int, ni: int, variant: int) -> str:
    preds = decode_array(m["preds"])
    return "unchanged" if preds[ni, variant, image] == m["clean"][image] else "changed"


def test_explorer_in_a_browser(run, open_report):
    (m,) = page_data(run / "report.html", "ablation")["models"]
    rp = open_report(run / "report.html")
    page = rp.page
    page.wait_for_function("document.getElementById('ablation-units').textContent.length > 0")
    start = _state(page)
    assert start["title"].startswith("blocks.5.attn: top set, p = 5%") and start["layers"] == ["blocks.5.attn"]
    assert start["units"].startswith("3 of 64 patch tokens dropped")
    assert start["status"] == _expected_status(m, 0, 0, 0)

    page.select_option("#ablation-p", index=3)                  # p = 30%: 19 of 64 tokens
    after_p = _state(page)
    assert after_p["units"].startswith("19 of 64") and after_p["canvas"] != start["canvas"]
    page.select_option("#ablation-draw", index=2)               # random draw 2
    after_draw = _state(page)
    assert "random draw 2" in after_draw["title"] and after_draw["canvas"] != after_p["canvas"]
    assert after_draw["status"] == _expected_status(m, 0, 0, 3 * 4 + 2)
    page.select_option("#ablation-n", index=2)                  # the last 3 layers
    after_n = _state(page)
    assert after_n["layers"] == ["blocks.3.attn", "blocks.4.attn", "blocks.5.attn"]
    assert "in the last 3 layers" in after_n["readout"] and after_n["status"] == _expected_status(m, 0, 2, 3 * 4 + 2)
    page.select_option("#ablation-image", index=2)              # another image
    after_image = _state(page)
    assert after_image["canvas"] != after_n["canvas"]
    assert after_image["status"] == _expected_status(m, 2, 2, 3 * 4 + 2)

    page.click("#ablation-cell-1-0")                        # the table: p = 10%, top set
    assert page.input_value("#ablation-p") == "1" and page.input_value("#ablation-draw") == "0"
    assert _state(page)["units"].startswith("6 of 64")
    page.click("#ablation-cell-whole")                      # the whole-layer reference: every patch token
    assert _state(page)["units"].startswith("64 of 64")
    box = page.locator("#ablation-canvas").bounding_box()   # a click on a patch names where it was dropped
    page.mouse.click(box["x"] + 5, box["y"] + 5)
    assert page.text_content("#ablation-cell").startswith("unit (row 0, col 0) of blocks.5.attn: dropped in blocks.3")

    page.select_option("#ablation-image", index=3)         # the screenshot: image #3, top 5% of the last 3 blocks
    page.select_option("#ablation-n", index=2)
    page.select_option("#ablation-p", index=0)
    page.select_option("#ablation-draw", index=0)
    assert _state(page)["status"] == _expected_status(m, 3, 2, 0)
    shots = os.environ.get("VITSPARSE_JAX_SCREENSHOTS")
    if shots:
        page.evaluate("document.querySelector('header').style.position = 'static'")
        page.locator("#ablation-explorer").screenshot(path=str(Path(shots) / "explorer_ablation.png"))
    rp.assert_clean()


def _result(ns: tuple[int, ...], ps: tuple[float, ...] = (0.1, 0.5), draws: int = 2) -> dict:
    """A model's results over a grid other than the paper's (ns, ps, draws), from random correctness rows."""
    rng = np.random.default_rng(0)
    t = 20
    rows = {"done": np.ones(t, bool), "clean": rng.random(t) < 0.9, "top": rng.random((t, len(ns), len(ps))) < 0.5,
            "rand": rng.random((t, len(ns), len(ps), draws)) < 0.8, "whole": rng.random((t, len(ns))) < 0.3}
    r = ablation_report.summarize(rows, ps, ns, samples=50)
    r.update(name="m.tag", model="m", tag="tag", label="m.tag", family="vit", images_skipped=0,
             grid={"p": list(ps), "n": list(ns), "draws": draws, "rank_by": "last_layer", "cnn_unit": "channel",
                   "renormalize": False},
             sites=[{"site": f"blocks.{i}.attn", "units": 16} for i in range(3)],
             provenance={"kind": "builtin", "detail": "a test"})
    return r


def test_the_report_and_figures_name_the_grid_that_ran():
    """Texts and titles come from the grid of the run (here n = 1, 2; p = 10, 50%; 2 draws; Transformers
    only), not from the paper's (n = 1..3, Tables 1-2), and a single layer is not 'the last 1 layers'."""
    r = _result((1, 2))
    out = {"data": {"name": "digits", "identity": "digits:v1", "num_images": 20}, "models": [r],
           "decisions": ["a decision"], "warnings": []}
    text = ablation_report.report_text(out, 1, r["name"])
    assert "grid: p = 10, 50% x n = 1, 2, 2 random draws" in text
    assert "`figure4b.png/pdf` (m.tag, n = 1, 2, whole-layer reference dotted)" in text and "1..3" not in text
    assert "`tables.md` (Table 1)" in text and "Tables 1-2" not in text
    assert ablation_report.tables_markdown([r], 0.95).startswith("# Ablation results (paper 1, Table 1)")
    assert ablation_report.ns_text([1, 2, 3]) == "n = 1..3" and ablation_report.ns_text([3]) == "n = 3"
    assert ablation_figures.accuracy_vs_p([r], n=1).axes[0].get_title() == "ablation of the last layer"
    assert ablation_figures.accuracy_vs_p([r], n=2).axes[0].get_title() == "ablation of the last 2 layers"
    legend = ablation_figures.accuracy_vs_p_by_n(r).axes[0].get_legend().get_texts()
    assert [t.get_text() for t in legend][:2] == ["last 1 layer (n = 1)", "last 2 layers (n = 2)"]
    import matplotlib.pyplot as plt
    plt.close("all")
