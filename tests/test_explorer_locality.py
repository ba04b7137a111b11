"""report.html of a locality run: the explorer's maps and numbers are the run's own (locality_maps.npz,
locality.csv), and in headless Chromium the circles lie where those numbers say: centred on the central region's
centre, the solid one at the block's central-query attention distance and the dashed one at the shown map's
mass-weighted distance, both scaled from input pixels to the canvas; CNN stages get no attention circle. The
shipped command (vit_pico and vgg_pico, trained and untrained) on 6 digits (tests/shared_runs.py).

VITSPARSE_JAX_SCREENSHOTS=docs/img also saves the explorer's screenshot (docs/img/explorer_locality.png)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.browser import page_data, screenshot
from vitsparse_jax.report_html import decode_array
from vitsparse_jax.report_html.maps import LOG_DECADES, dequantised

WHITE, LIME = (255, 255, 255), (163, 230, 53)   # the page's colours: attention distance, receptive field


@pytest.fixture(scope="module")
def run(finished_runs) -> Path:
    return finished_runs.path("locality")


def csv_rows(run: Path) -> dict[tuple[str, str], dict[str, str]]:
    """locality.csv by (variant label, block): the label as the page writes it, 'name (trained|untrained)'."""
    with open(run / "locality.csv", newline="") as f:
        return {(f"{r['model']} ({'trained' if r['trained'] == 'True' else 'untrained'})", r["block"]): r
                for r in csv.DictReader(f)}


def test_explorer_data_is_the_runs_own(run):
    data = page_data(run / "report.html", "locality")
    rows = csv_rows(run)
    saved = np.load(run / "locality_maps.npz")
    index = {str(saved[f"{i}/label"]): i for i in range(4)}
    assert [m["name"] for m in data["models"]] == ["vit_pico_patch4_32.digits", "vgg_pico.digits"]
    for m in data["models"]:
        assert [v["trained"] for v in m["variants"]] == [False, True]      # untrained first, as the RF explorer
        assert m["pool"] == 1 and m["map_size"] == [32, 32] and m["image_size"] == [32, 32]
        cnn = m["name"].startswith("vgg")
        assert all((b["attn"] is None) == cnn for b in m["blocks"])        # CNN stages: no attention sub-stage
        for v in m["variants"]:
            i = index[v["label"]]
            assert [m["layers"][l]["name"] for l in range(len(m["layers"]))] == list(saved[f"{i}/layers"])
            full, top = saved[f"{i}/maps"], np.array(v["map_max"])
            np.testing.assert_allclose(top, full.max(axis=(1, 2)), rtol=1e-6)
            maps = dequantised(decode_array(v["maps"]), top)
            kept = full > 1.03 * 10 ** -LOG_DECADES * top[:, None, None]
            np.testing.assert_allclose(maps[kept], full[kept], rtol=0.024)
            for b, got in zip(m["blocks"], v["blocks"]):
                row = rows[(v["label"], b["name"])]
                for key, value in got.items():                         # every number is the table's ('' = none)
                    assert value == (None if row[key] == "" else pytest.approx(float(row[key]), rel=1e-12)), key


def overlay(page, v: int) -> np.ndarray:
    """The RGBA pixels of variant v's overlay canvas, (H, W, 4)."""
    w, h, flat = page.evaluate("""v => { const c = document.getElementById('locality-over-' + v);
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""", v)
    return np.asarray(flat, np.int32).reshape(h, w, 4)


def ring(pixels: np.ndarray, colour: tuple[int, int, int], centre: tuple[float, float], tol: int
         ) -> tuple[np.ndarray, int]:
    """The distances from `centre` (x, y) of the opaque pixels of `colour` (within `tol` per channel), and how
    many of 36 sectors of 10 degrees around the centre hold one."""
    close = np.all(np.abs(pixels[..., :3] - np.array(colour)) <= tol, axis=-1) & (pixels[..., 3] >= 235)
    y, x = np.nonzero(close)
    dx, dy = x + 0.5 - centre[0], y + 0.5 - centre[1]
    sectors = np.unique(np.floor((np.degrees(np.arctan2(dy, dx)) + 180) / 10).astype(int) % 36)
    return np.hypot(dx, dy), len(sectors)


def assert_circle(pixels, colour, centre, radius, sectors_min, tol):
    r, sectors = ring(pixels, colour, centre, tol)
    assert len(r) > 0 and np.median(r) == pytest.approx(radius, abs=0.75), (np.median(r), radius)
    assert np.ptp(r) < 4 and sectors >= sectors_min, (np.ptp(r), sectors)   # a thin ring all around


def test_the_circles_are_the_tables_distances_on_the_canvas(run, open_report):
    data = page_data(run / "report.html", "locality")
    rows = csv_rows(run)
    rp = open_report(run / "report.html")
    page = rp.page
    page.wait_for_function("document.getElementById('locality-label').textContent.length > 0")
    assert page.inner_text("#locality-label").startswith("blocks.2.attn \u00b7")   # the middle block, its attention
    m = data["models"][0]
    width = page.evaluate("document.getElementById('locality-map-0').width")
    scale = width / (m["map_size"][1] * m["pool"])                   # canvas px per input px: 320 / 32
    # the central region of the 8x8 grid of 4 px tokens (f = 1/7: one token, row and column 3, the odd row left
    # after it): centre (14, 14) px
    assert width == 320 and m["layers"][m["blocks"][2]["attn"]]["centre_px"] == [14.0, 14.0]
    centre = (14.0 * scale, 14.0 * scale)

    def check(block: str, rf_key: str) -> None:
        for v, variant in enumerate(m["variants"]):
            row, pixels = rows[(variant["label"], block)], overlay(page, v)
            assert_circle(pixels, WHITE, centre, float(row["attn_distance_central_px"]) * scale, 34, 20)
            assert_circle(pixels, LIME, centre, float(row[rf_key]) * scale, 16, 30)   # dashed: about half

    check("blocks.2", "rf_attn_mass_distance_px")
    page.select_option("#locality-layer", "out")                   # the block output: its own RF, same attention
    assert page.inner_text("#locality-label").startswith("blocks.2 \u00b7")
    check("blocks.2", "rf_out_mass_distance_px")
    page.click("#locality-note")
    page.keyboard.press("ArrowRight")                              # the next block, still its output
    assert page.inner_text("#locality-label").startswith("blocks.3 \u00b7")
    check("blocks.3", "rf_out_mass_distance_px")
    page.uncheck("#locality-show-attn")                            # the attention circle off, the dashed one on
    assert ring(overlay(page, 1), WHITE, centre, 20)[0].size == 0
    assert ring(overlay(page, 1), LIME, centre, 30)[0].size > 0
    page.check("#locality-show-attn")

    page.select_option("#locality-model", "1")                     # a CNN: no attention, no circle of it
    cnn = data["models"][1]
    assert page.inner_text("#locality-label").startswith("features.4 \u00b7")
    assert page.locator("#locality-layer").is_disabled()
    for v, variant in enumerate(cnn["variants"]):
        layer = cnn["layers"][cnn["blocks"][1]["out"]]
        c = (layer["centre_px"][1] * scale, layer["centre_px"][0] * scale)
        pixels = overlay(page, v)
        assert ring(pixels, WHITE, c, 20)[0].size == 0
        assert_circle(pixels, LIME, c, float(rows[(variant["label"], "features.4")]["rf_out_mass_distance_px"])
                      * scale, 16, 30)
    assert "no attention (a CNN stage)" in page.inner_text("#locality-readout-0")

    # the docs' picture: the ViT's middle block output, where the attention reaches far and the receptive field not
    page.select_option("#locality-model", "0")
    page.select_option("#locality-layer", "out")
    page.evaluate("document.querySelector('header').style.position = 'static'")
    screenshot(rp, "#locality-explorer", "explorer_locality.png")
    rp.assert_clean()
