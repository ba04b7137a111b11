"""The sparsity run's report.html: written for every run (ViT with its explorer, CNN, several models), and
the attention explorer driven in headless Chromium (tests/browser.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from configs import sparsity as sparsity_config
from tests.browser import cell_colours, colour_bar_fit, distance_chart, page_data, screenshot
from vitsparse_jax import main
from vitsparse_jax.experiments.sparsity import explorer
from vitsparse_jax.report_html import decode_array, image_data_url, write_report_html
from vitsparse_jax.runtime.workdir import Workdir

IMAGES = 8


def small_config(workdir: Path, **sparsity_overrides):
    config = sparsity_config.get_config()          # the built-in vit_pico_patch4_32 (trained) on digits
    config.workdir = str(workdir)
    config.progress = False
    config.data.batch_size = 8                     # 4 fake devices (conftest)
    config.data.num_images = IMAGES
    config.sparsity.update(sparsity_overrides)
    return config


@pytest.fixture(scope="module")
def vit_report(finished_runs) -> Path:
    # the built-in vit_pico on 8 digits with example_index=2 (tests/shared_runs.py)
    return finished_runs.path("sparsity") / "report.html"


def explorer_data(path: Path) -> dict:
    return page_data(path, "sparsity")


def test_the_report_holds_text_figures_and_the_explorer_data(vit_report):
    text = vit_report.read_text()
    assert "<h1>Sparsity: vit_pico_patch4_32" in text and "<table>" in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) >= 8   # every figure, in place
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)
    data = explorer_data(vit_report)
    assert data["image_index"] == [2, 3, 4, 5] and data["grid"] == [8, 8] and data["prefix_kinds"] == ["cls"]
    assert data["row_top_k"] == 64                 # a small model keeps every patch column
    assert vit_report.stat().st_size < 3_000_000


def canvas(page, name: str) -> str:
    return page.evaluate(f"document.getElementById('sparsity-{name}').toDataURL()")


def test_the_explorer_in_the_browser(vit_report, open_report):
    rp = open_report(vit_report)
    page = rp.page
    root = page.locator("#sparsity-explorer")
    page.wait_for_function("document.getElementById('sparsity-explorer').dataset.block !== undefined")
    assert root.get_attribute("data-block") == "5" and root.get_attribute("data-head") == "mean"

    page.select_option("#sparsity-block", "0")
    assert root.get_attribute("data-block") == "0"
    before, readout = canvas(page, "row"), page.inner_text("#sparsity-readout")

    row = page.locator("#sparsity-row")   # click patch (row 1, col 6) of the 8x8 grid
    size = row.bounding_box()
    row.click(position={"x": size["width"] * 6.5 / 8, "y": size["height"] * 1.5 / 8})
    assert root.get_attribute("data-query") == str(1 + 1 * 8 + 6)
    text = page.inner_text("#sparsity-readout")
    assert text != readout and "patch 14 (row 1, col 6) [pinned]" in text and "row max" in text
    row_max = float(root.get_attribute("data-row-max"))
    assert 0 < row_max <= 1 and f"row max {float(f'{row_max:.3g}'):g}" in text
    after = canvas(page, "row")
    assert after != before

    page.keyboard.press("ArrowRight")
    assert root.get_attribute("data-block") == "1" and page.input_value("#sparsity-block") == "1"
    assert "blocks.1" in page.inner_text("#sparsity-readout") and canvas(page, "row") != after
    page.keyboard.press("ArrowLeft")
    assert root.get_attribute("data-block") == "0"

    assert page.locator("#sparsity-norm-panel").is_hidden()
    page.check("#sparsity-show-norms")
    assert page.locator("#sparsity-norm-panel").is_visible()
    assert "cls norm" in page.inner_text("#sparsity-prefix")
    page.uncheck("#sparsity-show-mu")
    assert page.locator("#sparsity-mu-panel").is_hidden()

    page.select_option("#sparsity-head", "2")
    assert root.get_attribute("data-head") == "2"
    page.click("#sparsity-query-0")               # the class token's row
    assert root.get_attribute("data-query") == "0" and "query cls" in page.inner_text("#sparsity-readout")
    page.select_option("#sparsity-image", "1")
    assert root.get_attribute("data-image") == "1"

    # The docs' picture: the last block, head mean, a patch pinned.
    page.check("#sparsity-show-mu")
    page.select_option("#sparsity-head", "mean")
    page.select_option("#sparsity-block", "5")
    row.click(position={"x": size["width"] * 3.5 / 8, "y": size["height"] * 4.5 / 8})
    screenshot(rp, "#sparsity-explorer", "explorer_sparsity.png")


def _range(root) -> tuple[float, float]:
    lo, hi = root.get_attribute("data-row-range").split(",")
    return float(lo), float(hi)


def test_the_maps_are_drawn_in_their_colour_bars_colours(vit_report, open_report):
    """At the default map opacity (100%) every cell of the row, column and mu maps is a colour of the bar, at
    the place its value has on the bar (log colour: at least one decade below the row's maximum); blending
    with the image (a lower opacity) leaves the bar. 'min to max' and 'linear' rescale the bar as they say."""
    d = explorer_data(vit_report)
    rp = open_report(vit_report)
    page = rp.page
    root = page.locator("#sparsity-explorer")
    page.wait_for_function("document.getElementById('sparsity-explorer').dataset.block !== undefined")
    assert page.input_value("#sparsity-opacity") == "100" and page.inner_text("#sparsity-opacity-value") == "100%"
    for name in ("row", "col", "mu"):
        fits = colour_bar_fit(page, cell_colours(page, f"sparsity-{name}", 8, 8), "magma")
        assert max(dist for dist, _ in fits) < 4, name

    # the row shown: image 0, the last block, the head mean, the query at the grid's centre (patch row 4, col 4)
    image, block, head, query = 0, 5, d["heads"], 1 + 4 * 8 + 4
    assert (root.get_attribute("data-block"), root.get_attribute("data-query")) == (str(block), str(query))
    shape = tuple(d["idx"]["shape"])
    at = (image, block, head, query)
    values = np.full(64, np.nan)
    stored = explorer.dequantize_log(decode_array(d["val"]).reshape(shape)[at])
    values[decode_array(d["idx"]).reshape(shape)[at]] = stored
    values[values == 0] = np.nan                          # below the stored floor: not drawn
    top, low = np.nanmax(values), np.nanmin(values)
    lo, hi = _range(root)
    assert hi == pytest.approx(top, rel=1e-4) and lo == pytest.approx(min(low, top / 10), rel=1e-4)
    want = (np.log10(values) - np.log10(lo)) / (np.log10(hi) - np.log10(lo))
    fits = colour_bar_fit(page, cell_colours(page, "sparsity-row", 8, 8), "magma")
    drawn = ~np.isnan(want)
    np.testing.assert_allclose(np.array([t for _, t in fits])[drawn], want[drawn], atol=0.03)
    assert int(root.get_attribute("data-row-max-patch")) == int(np.nanargmax(values))

    page.select_option("#sparsity-scale", "stretch")       # log colour from the row's minimum to its maximum
    assert _range(root) == (pytest.approx(low, rel=1e-4), pytest.approx(top, rel=1e-4))
    assert "min to max" in page.inner_text("#sparsity-row-cb")
    page.select_option("#sparsity-scale", "linear")        # linear from 0
    assert _range(root) == (0.0, pytest.approx(top, rel=1e-4))
    page.select_option("#sparsity-scale", "log")

    before = canvas(page, "row")
    page.eval_on_selector("#sparsity-opacity", "e => { e.value = 50; e.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#sparsity-opacity-value") == "50%" and canvas(page, "row") != before
    fits = colour_bar_fit(page, cell_colours(page, "sparsity-row", 8, 8), "magma")
    assert max(dist for dist, _ in fits) > 20              # half image, half map: colours off the bar

    picture = canvas(page, "picture")                       # the image beside the maps, the query outlined
    assert page.inner_text("#sparsity-grid-note") == "8x8 patches, 40 px per patch"
    row = page.locator("#sparsity-row")
    size = row.bounding_box()
    row.click(position={"x": size["width"] * 0.5 / 8, "y": size["height"] * 0.5 / 8})
    assert root.get_attribute("data-query") == "1" and canvas(page, "picture") != picture
    rp.assert_clean()


def _uniform_distance(grid: int, side: int) -> float:
    """The mean attention distance of a map uniform over the patches (every patch query), from first principles."""
    centres = (np.arange(grid) + 0.5) * side / grid
    y, x = [a.ravel() for a in np.meshgrid(centres, centres, indexing="ij")]
    return float(np.hypot(y[:, None] - y[None], x[:, None] - x[None]).mean())


def test_the_distance_bars_are_the_runs_and_each_images_attention_distances(vit_report, open_report):
    """Each head's bars stand for the run's mean attention distances (results.json, all and central patch
    queries) and, for 'this image', the image's own (per_image.npz, written by the pass, not by the explorer);
    the prefix strip for the prefix mass; the dashed lines for a uniform map; one axis for every block. A click on
    a head's bars shows that head everywhere."""
    run = vit_report.parent
    att = json.loads((run / "results.json").read_text())["statistics"]["attention_distance"]
    rows = np.load(run / "per_image.npz")
    d = explorer_data(vit_report)
    rp = open_report(vit_report)
    page = rp.page
    root = page.locator("#sparsity-explorer")
    page.wait_for_function("document.getElementById('sparsity-explorer').dataset.block !== undefined")

    def bars(chart, series):
        return [chart[series][h] for h in range(d["heads"])]

    opened = distance_chart(page)                             # the last block, the run's means over its 8 images
    assert (opened["block"], opened["source"]) == (5, "run") and opened["selected"] is None
    assert page.input_value("#sparsity-dist-source") == "run" and att["images"] == 8
    for block in (5, 2):
        page.select_option("#sparsity-block", str(block))
        chart = distance_chart(page)
        assert chart["block"] == block and chart["k"] == pytest.approx(opened["k"])   # one axis for every block
        np.testing.assert_allclose(bars(chart, "all"), att["distance_px"][block], rtol=1e-6)
        np.testing.assert_allclose(bars(chart, "central"), att["distance_central_px"][block], rtol=1e-6)
        np.testing.assert_allclose(bars(chart, "prefix"), att["prefix_mass"][block], rtol=1e-6)
        assert chart["uniform"]["all"] == pytest.approx(_uniform_distance(8, 32), rel=1e-9)
        assert chart["uniform"]["central"] == pytest.approx(att["uniform"]["distance_central_px"][block], rel=1e-9)
        assert max(max(bars(chart, "all")), chart["uniform"]["all"]) <= chart["top"]   # nothing above the axis
    text = page.inner_text("#sparsity-dist-readout")
    assert "mean over the run's 8 images" in text
    head_mean = page.evaluate(f"vj.fmt({float(np.mean(att['distance_px'][2]))!r})")   # block 2, shown last
    assert f"all patch queries {head_mean} px" in text

    page.select_option("#sparsity-dist-source", "image")      # the example images' own values
    for i in (0, 1):
        page.select_option("#sparsity-image", str(i))
        chart = distance_chart(page)
        (at,) = np.flatnonzero(rows["index"] == d["image_index"][i])
        assert (chart["source"], chart["image"], chart["block"]) == ("image", i, 2)
        np.testing.assert_allclose(bars(chart, "all"), rows["attention_distance"][at, 2], rtol=1e-5)
        np.testing.assert_allclose(bars(chart, "central"), rows["attention_distance_central"][at, 2], rtol=1e-5)
        np.testing.assert_allclose(bars(chart, "prefix"), rows["attention_prefix_mass"][at, 2], rtol=1e-5)
    assert "this image" in page.inner_text("#sparsity-dist-readout")

    page.click("#sparsity-dist-bar-central-2")                # a head's bars select the head
    chart = distance_chart(page)
    assert root.get_attribute("data-head") == "2" and page.input_value("#sparsity-head") == "2"
    assert chart["selected"] is not None and chart["selected"][0] + 2 == pytest.approx(chart["x"][2])
    assert "head 2: " in page.inner_text("#sparsity-dist-readout")
    page.select_option("#sparsity-head", "mean")
    assert distance_chart(page)["selected"] is None
    page.uncheck("#sparsity-show-dist")
    assert page.locator("#sparsity-dist-panel").is_hidden() and page.locator("#sparsity-dist-readout").is_hidden()
    rp.assert_clean()


def _attention_maps(rng: np.random.Generator, heads: int, n: int) -> np.ndarray:
    logits = rng.normal(size=(1, heads, n, n)).astype(np.float32) * 3
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


def test_a_large_grid_gets_larger_canvases(tmp_path, rng, open_report):
    """A 40x40 patch grid is drawn with 10 px per patch (400 px canvases), not squeezed into 320 px (8 px
    per patch); the 8x8 grid of the built-in model keeps 320 px (40 px per patch)."""
    import jax
    import jax.numpy as jnp

    grid, prefix = 40, 1
    n = prefix + grid * grid
    k = explorer.row_top_k(1, 1, 1, prefix, grid * grid)
    packed = [jax.tree.map(np.asarray, explorer.pack(jnp.asarray(_attention_maps(rng, 1, n)), prefix, k))]
    meta = {"model": "synthetic", "blocks": ["blocks.0"], "heads": 1, "grid": [grid, grid], "prefix": prefix,
            "prefix_kinds": ["cls"], "top_fraction": 0.05, "image_index": [0], "label": [0],
            "images": [image_data_url(np.zeros((160, 160, 3), np.uint8))]}
    page_explorer = explorer.make_explorer(explorer.encode(packed, None, meta))
    path = write_report_html(Workdir(tmp_path), "t", "", [], [page_explorer])
    rp = open_report(path)
    page = rp.page
    page.wait_for_function("document.getElementById('sparsity-explorer').dataset.block !== undefined")
    sizes = page.evaluate("""() => ['picture', 'row', 'col', 'mu'].map(n => {
        const c = document.getElementById('sparsity-' + n), b = c.getBoundingClientRect();
        return [c.width, c.height, Math.round(b.width), Math.round(b.height)]; })""")
    assert sizes == [[400, 400, 402, 402]] * 4               # 10 px per patch (+ the 1 px border)
    assert page.inner_text("#sparsity-grid-note") == "40x40 patches, 10 px per patch"
    rp.assert_clean()


def test_cnn_and_several_model_runs_write_report_html(tmp_path):
    config = small_config(tmp_path, models="vit_pico_patch4_32,vgg_pico", explore_images=2)
    config.data.batch_size = 4
    config.data.num_images = 4
    result = main.run(config)
    top = (tmp_path / "report.html").read_text()
    for name, folder in result["folders"].items():
        assert f'href="{folder}/report.html"' in top
        text = (tmp_path / folder / "report.html").read_text()
        assert ('id="sparsity-data"' in text) == name.startswith("vit_pico"), name   # CNN: no explorer
        assert "data:image/png;base64," in text
    vit_folder = next(f for n, f in result["folders"].items() if n.startswith("vit_pico"))
    assert vit_folder == "models/vit_pico_patch4_32.digits"   # the name as loaded, with its tag (as listed: no tag)
    assert len(explorer_data(tmp_path / vit_folder / "report.html")["images"]) == 2
