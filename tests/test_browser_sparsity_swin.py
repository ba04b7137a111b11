"""The sparsity explorer of a Swin run: window attention mapped back to each block's token grid (through the
cyclic shift), checked against the model's maps in Python, then driven in headless Chromium (tests/browser.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import sparsity as sparsity_config
from tests.browser import cell_colours, colour_bar_fit, distance_chart, page_data, screenshot
from vitsparse_jax import data
from vitsparse_jax.experiments.sparsity import explorer
from vitsparse_jax.experiments import driver
from vitsparse_jax.report_html.page import decode_array
from vitsparse_jax.runtime import parallel
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import loading

IMAGES = 4
# 32 px, patch 4: stage 0 is 8x8 tokens in 4x4 windows (block 1 shifted by 2: its windows wrap around the
# edge), stage 1 is 4x4 tokens in one window (not shifted: the map is not larger than the window)
SWIN = dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=(4, 4))


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
    loaded = loading.load_model("swin_tiny_patch4_window7_224", "untrained", seed=0, num_classes=10, **SWIN)
    cfg = {**loaded.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0, "num_classes": 10}
    loaded = dataclasses.replace(loaded, pretrained_cfg=cfg)
    config = sparsity_config.get_config()
    config.weights, config.progress = "untrained", False
    config.data.batch_size, config.data.num_images = 4, IMAGES
    config.sparsity.example_index = 0
    workdir = tmp_path_factory.mktemp("sparsity_swin_html")
    source = data.subset(data.DigitsSource("test"), num_images=IMAGES)
    summary = driver.execute(config, Workdir(workdir), loaded=[loaded], source=source, mesh=parallel.make_mesh())
    return loaded, source, summary, workdir / "report.html"


def explorer_data(path: Path) -> dict:
    return page_data(path, "sparsity")


def shifted_windows(grid: int, window: int, shift: int) -> np.ndarray:
    """(nW, T) raster token of each window position: window position (i, j) of the map rolled by -shift is
    token ((i + shift) mod H, (j + shift) mod W), as timm's torch.roll does it."""
    n = grid // window
    out = np.zeros((n * n, window * window), np.int64)
    for w in range(n * n):
        for p in range(window * window):
            i, j = (w // n) * window + p // window, (w % n) * window + p % window
            out[w, p] = ((i + shift) % grid) * grid + (j + shift) % grid
    return out


def test_the_swin_data_are_the_models_window_rows_on_each_blocks_grid(swin_run):
    loaded, source, summary, path = swin_run
    d = explorer_data(path)
    assert d["kind"] == "swin" and d["blocks"] == summary["layers"] == [
        "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]
    assert [b["grid"] for b in d["swin"]] == [[8, 8], [8, 8], [4, 4], [4, 4]]
    assert [b["shift"] for b in d["swin"]] == [[0, 0], [2, 2], [0, 0], [0, 0]]
    assert d["row_top_k"] == 16 and all(b["k"] == 16 and "idx" not in b for b in d["swin"])   # every entry
    assert d["image_index"] == [0, 1, 2, 3] and "norms" not in d

    mesh = parallel.make_mesh(jax.devices()[:1])
    batch = parallel.to_host(next(iter(data.batches(source, loaded.pretrained_cfg, IMAGES, mesh))))
    _, aux = loaded.module.apply(loaded.variables, data.normalize(batch["image"], loaded.pretrained_cfg),
                                 capture=tuple(f"{n}.attn.probs" for n in d["blocks"]))
    for name, b in zip(d["blocks"], d["swin"]):
        probs = np.asarray(aux[f"{name}.attn.probs"], np.float64)              # (I, nW, heads, T, T)
        tokens = decode_array(b["tokens"])
        np.testing.assert_array_equal(tokens, shifted_windows(b["grid"][0], b["window"][0], b["shift"][0]))
        rows = np.concatenate([probs, probs.mean(2, keepdims=True)], 2).transpose(0, 2, 1, 3, 4)
        got = explorer.dequantize_log(decode_array(b["val"]))
        assert got.shape == rows.shape
        seen = rows > 10 ** explorer.LOG_FLOOR
        np.testing.assert_allclose(got[seen], rows[seen], rtol=0.03)
        # mu as the statistics define it: mean over heads and the window's query rows, on the raster grid
        mu_h = np.zeros((IMAGES, b["heads"], b["grid"][0] * b["grid"][1]))
        mu_h[:, :, tokens.reshape(-1)] = probs.mean(3).transpose(0, 2, 1, 3).reshape(IMAGES, b["heads"], -1)
        mu = np.concatenate([mu_h, mu_h.mean(1, keepdims=True)], 1)
        np.testing.assert_allclose(decode_array(b["mu"]), mu, rtol=2e-3)
        assert b["top_n"] == round(0.05 * mu.shape[-1]) and decode_array(b["top"]).shape == (IMAGES, b["heads"] + 1,
                                                                                                b["top_n"])


def test_a_large_swin_keeps_its_top_entries_within_the_budget():
    rows = [(3136 * 4, 49)] * 2 + [(784 * 7, 49)] * 2 + [(196 * 13, 49)] * 6 + [(49 * 25, 49)] * 2  # swin_tiny 224
    k = explorer.swin_row_top_k(4, rows)
    assert 1 <= k < 49 and 4 * sum(r * (2 * k + 2) for r, _ in rows) <= explorer.SWIN_ROWS_BYTES
    assert explorer.swin_row_top_k(1, [(16 * 3, 16)]) == 16
    import jax.numpy as jnp
    a = np.random.default_rng(0).dirichlet(np.ones(16), size=(2, 4, 3, 16)).astype(np.float32)  # (B, nW, h, T, T)
    got = jax.tree.map(np.asarray, explorer.pack_windows(jnp.asarray(a), 5))
    full = np.concatenate([a, a.mean(2, keepdims=True)], 2).transpose(0, 2, 1, 3, 4)
    assert got["vals"].shape == got["idx"].shape == (2, 4, 4, 16, 5)
    np.testing.assert_allclose(np.take_along_axis(full, got["idx"], -1), got["vals"], rtol=1e-6)
    np.testing.assert_allclose(got["rest"] + got["vals"].sum(-1), 1.0, rtol=1e-5)


def canvas(page, name: str) -> str:
    return page.evaluate(f"document.getElementById('sparsity-{name}').toDataURL()")


def test_the_swin_explorer_in_the_browser(swin_run, open_report):
    _, _, _, path = swin_run
    d = explorer_data(path)
    rp = open_report(path)
    page = rp.page
    root = page.locator("#sparsity-explorer")
    page.wait_for_function("document.getElementById('sparsity-explorer').dataset.block !== undefined")
    assert root.get_attribute("data-block") == "3" and root.get_attribute("data-head") == "mean"
    assert page.locator("#sparsity-show-norms").is_disabled() and page.locator("#sparsity-show-prefix").is_disabled()
    assert "n/a" in page.inner_text("#sparsity-prefix") and page.locator("#sparsity-norm-panel").is_hidden()

    page.select_option("#sparsity-block", "1")          # the shifted block: windows wrap around the edge
    assert root.get_attribute("data-block") == "1"
    before, readout = canvas(page, "row"), page.inner_text("#sparsity-readout")
    row = page.locator("#sparsity-row")                 # click token (row 7, col 7) of the 8x8 grid
    size = row.bounding_box()
    row.click(position={"x": size["width"] * 7.5 / 8, "y": size["height"] * 7.5 / 8})
    assert root.get_attribute("data-query") == "63"
    text = page.inner_text("#sparsity-readout")
    assert text != readout and "token 63 (row 7, col 7)" in text and "[pinned]" in text and "shifted by 2,2" in text
    assert canvas(page, "row") != before
    tokens = decode_array(d["swin"][1]["tokens"])
    window = int(root.get_attribute("data-window"))
    assert 63 in tokens[window] and set(tokens[window]) == {r * 8 + c for r in (6, 7, 0, 1) for c in (6, 7, 0, 1)}
    assert int(root.get_attribute("data-row-max-token")) in set(tokens[window])
    assert 0 < float(root.get_attribute("data-row-max")) <= 1

    after = canvas(page, "row")
    page.keyboard.press("ArrowRight")                   # stage 1: 4x4 tokens; the same image corner
    assert root.get_attribute("data-block") == "2" and page.input_value("#sparsity-block") == "2"
    assert root.get_attribute("data-query") == "15" and "layers.1.blocks.0" in page.inner_text("#sparsity-readout")
    assert canvas(page, "row") != after
    page.select_option("#sparsity-head", "3")            # stage 1 has 4 heads
    assert root.get_attribute("data-head") == "3"
    page.keyboard.press("ArrowLeft")                    # stage 0 has 2: the last one is shown
    assert root.get_attribute("data-block") == "1" and root.get_attribute("data-head") == "1"
    page.select_option("#sparsity-head", "mean")
    page.uncheck("#sparsity-show-mu")
    assert page.locator("#sparsity-mu-panel").is_hidden()
    page.check("#sparsity-show-mu")
    page.select_option("#sparsity-image", "2")
    assert root.get_attribute("data-image") == "2"
    row.click(position={"x": size["width"] * 0.5 / 8, "y": size["height"] * 3.5 / 8})   # a wrapped window
    screenshot(rp, "#sparsity-explorer", "explorer_sparsity_swin.png")


def test_a_window_of_near_equal_values_takes_the_top_colour(swin_run, open_report):
    """Stage 1 of the untrained model: one window of 16 tokens whose rows are all about 1/16, so their stored
    values differ by a few quantisation steps (2.4% each) at most. They are drawn near the top of the log colour bar
    (it spans at least one decade), not at its bottom colour as a min-to-max bar of zero width made them."""
    _, _, _, path = swin_run
    d = explorer_data(path)
    b = d["swin"][3]
    vals = explorer.dequantize_log(decode_array(b["val"]))                    # (I, heads + 1, nW, T, T)
    assert b["windows"] == 1 and vals.max() / vals.min() < 1.25             # near-uniform rows
    rp = open_report(path)
    page = rp.page
    root = page.locator("#sparsity-explorer")
    page.wait_for_function("document.getElementById('sparsity-explorer').dataset.block !== undefined")
    assert root.get_attribute("data-block") == "3"
    for name in ("row", "col", "mu"):
        fits = colour_bar_fit(page, cell_colours(page, f"sparsity-{name}", 4, 4), "magma")
        assert max(dist for dist, _ in fits) < 4 and min(t for _, t in fits) > 0.9, (name, fits)
    lo, hi = map(float, root.get_attribute("data-row-range").split(","))
    assert hi / lo == pytest.approx(10, rel=1e-4)
    assert page.inner_text("#sparsity-grid-note") == "4x4 tokens, 80 px per token"
    rp.assert_clean()


def _uniform_window_distance(window: int, token_px: float) -> float:
    """The mean distance between the tokens of one window x window window (a uniform map over it), directly."""
    c = (np.arange(window) + 0.5) * token_px
    y, x = [a.ravel() for a in np.meshgrid(c, c, indexing="ij")]
    return float(np.hypot(y[:, None] - y[None], x[:, None] - x[None]).mean())


def test_the_swin_distance_bars_follow_each_blocks_heads(swin_run, open_report):
    """Stage 0 has 2 heads, stage 1 has 4: each block shows its own heads' bars (the run's padding of stage 0 to
    4 heads is never drawn), equal to the run's results; the 4 example images are the run's 4 images, so their
    own bars average to the run's (rows as they are: a plain mean); no prefix strip (Swin has none); the dashed
    line is a uniform map over one window (4x4 tokens of 4 px in stage 0, of 8 px in stage 1)."""
    _, _, summary, path = swin_run
    att = summary["statistics"]["attention_distance"]
    run = {s: np.asarray(att[k], np.float64) for s, k in (("all", "distance_px"), ("central", "distance_central_px"))}
    d = explorer_data(path)
    assert d["distances"]["heads"] == [2, 2, 4, 4] and np.isnan(run["all"][0, 2:]).all()
    assert [len(b) for b in d["distances"]["image"]["distance_px"][0]] == [2, 2, 4, 4]   # no padding stored
    rp = open_report(path)
    page = rp.page
    page.wait_for_function("document.getElementById('sparsity-explorer').dataset.block !== undefined")
    for block, heads, token_px in ((0, 2, 4.0), (3, 4, 8.0)):
        page.select_option("#sparsity-dist-source", "run")
        page.select_option("#sparsity-block", str(block))
        chart = distance_chart(page)
        assert sorted(chart["all"]) == sorted(chart["central"]) == list(range(heads)) and chart["prefix"] == {}
        for series in ("all", "central"):
            np.testing.assert_allclose([chart[series][h] for h in range(heads)], run[series][block, :heads],
                                       rtol=1e-6)
        assert chart["uniform"]["all"] == pytest.approx(_uniform_window_distance(4, token_px), rel=1e-9)
        page.select_option("#sparsity-dist-source", "image")
        images = []
        for i in range(IMAGES):
            page.select_option("#sparsity-image", str(i))
            chart = distance_chart(page)
            images.append([chart["all"][h] for h in range(heads)])
        np.testing.assert_allclose(np.mean(images, axis=0), run["all"][block, :heads], rtol=1e-5)
    assert "prefix mass" not in page.inner_text("#sparsity-dist-readout")
    rp.assert_clean()


def test_the_swin_report_describes_swin_not_a_class_token(swin_run):
    """report.md's Choices for Swin: its own mu (windows), no class row or prefix columns (Swin has none)."""
    _, _, summary, path = swin_run
    text = (path.parent / "report.md").read_text()
    choices = text.split("## Choices", 1)[1].split("\n## ", 1)[0]
    assert "swin_mu" in choices and "window" in choices
    assert "class" not in choices and "prefix" not in choices and "patch" not in choices
