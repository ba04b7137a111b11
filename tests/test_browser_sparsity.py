"""The sparsity run's report.html: written for every run (ViT with its explorer, CNN, several models), and
the attention explorer driven in headless Chromium (tests/browser.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from configs import sparsity as sparsity_config
from tests.browser import page_data, screenshot
from vitsparse_jax import main

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
def vit_report(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("sparsity_html")
    main.run(small_config(workdir, example_index=2))
    return workdir / "report.html"


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
    assert vit_folder == "models/vit_pico_patch4_32"     # the folder the run wrote, not the tagged name
    assert len(explorer_data(tmp_path / vit_folder / "report.html")["images"]) == 2
