"""report.html: array encoding, the self-contained page (figures inlined within budget, no network
references), the sparsity explorer's compact rows and size, and the explorer in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vitsparse_jax.experiments.sparsity import explorer
from vitsparse_jax.report_html import (
    Explorer,
    decode_array,
    encode_array,
    image_data_url,
    write_report_html,
)
from vitsparse_jax.report_html import page as report_page
from vitsparse_jax.runtime.workdir import Workdir

NETWORK_REF = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""", re.I)


# --- encode_array ---------------------------------------------------------------------------------------------

def test_float16_round_trip_is_float16_rounding(rng):
    x = rng.normal(size=(3, 5, 7)).astype(np.float32) * 100
    got = decode_array(json.loads(json.dumps(encode_array(x, "float16"))))
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))


def test_uint8_round_trip_within_half_a_step(rng):
    x = rng.uniform(-3, 5, size=(4, 9))
    enc = encode_array(x, "uint8")
    got = decode_array(enc)
    assert np.max(np.abs(got - x)) <= enc["scale"] / 2 + 1e-6
    assert got.min() == pytest.approx(x.min(), abs=1e-6) and got.max() == pytest.approx(x.max(), rel=1e-6)
    np.testing.assert_array_equal(decode_array(encode_array(np.full(3, 2.5), "uint8")), np.full(3, 2.5))


@pytest.mark.parametrize("kind,hi", [("uint8_raw", 255), ("uint16", 65535), ("int32", 2**31 - 1)])
def test_integer_kinds_are_exact(kind, hi):
    x = np.array([[0, 1, hi], [7, hi - 1, 3]])
    got = decode_array(encode_array(x, kind))
    np.testing.assert_array_equal(got, x)
    with pytest.raises(ValueError, match="integers"):
        encode_array(np.array([hi + 1]), kind)
    with pytest.raises(ValueError, match="integers"):
        encode_array(np.array([0.5]), kind)


def test_bad_arrays_are_clear_errors():
    with pytest.raises(ValueError, match="unknown kind"):
        encode_array(np.zeros(2), "float64")
    with pytest.raises(ValueError, match="NaN"):
        encode_array(np.array([1.0, np.nan]))
    assert decode_array(encode_array(np.zeros((0, 3)))).shape == (0, 3)


def test_image_data_url_png_and_jpeg(rng):
    img = (rng.random((300, 200, 3)) * 255).astype(np.uint8)
    for fmt, mime in (("png", "image/png"), ("jpeg", "image/jpeg")):
        url = image_data_url(img, fmt, max_side=100)
        assert url.startswith(f"data:{mime};base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (67, 100)


# --- the page -------------------------------------------------------------------------------------------------

def _data_url_image(url: str) -> tuple[Image.Image, int]:
    raw = base64.b64decode(url.split(",", 1)[1])
    return Image.open(io.BytesIO(raw)), len(raw)


def make_workdir(tmp_path: Path, rng: np.random.Generator) -> Workdir:
    wd = Workdir(tmp_path)
    noisy = (rng.random((2400, 3000, 3)) * 255).astype(np.uint8)   # incompressible: forces the shrinking
    Image.fromarray(noisy).save(wd.path("big.png"))
    Image.fromarray(noisy[:50, :80]).save(wd.path("small.png"))
    (tmp_path / "sub").mkdir()
    wd.write_text("sub/report.html", "<p>sub</p>")
    return wd


REPORT_MD = """# A run

Some *text* and a table:

| a | b |
|---|---|
| 1 | 2.5 |

![small](small.png)

Links: [the pdf](small.pdf), [a sub report](sub/report.md), [a paper](https://example.org/paper).

![remote](https://example.org/x.png)
"""


def test_the_page_is_self_contained_with_every_figure_inlined_within_budget(tmp_path, rng):
    wd = make_workdir(tmp_path, rng)
    ex = Explorer("demo", "Demo", '<div id="demo-x"></div>', "vj.$('demo-x').textContent = data.n;",
                  {"n": 3, "a": encode_array(np.ones(4))})
    path = write_report_html(wd, "A <run>", REPORT_MD, [("big", "a big figure"), ("small", "small"),
                                                        ("gone", "never saved")], [ex])
    text = path.read_text()
    assert path == tmp_path / "report.html" and text.startswith("<!doctype html>")
    assert "<title>A &lt;run&gt;</title>" in text and "<table>" in text and "<td>2.5</td>" in text
    assert not NETWORK_REF.search(text), NETWORK_REF.search(text).group(0)
    assert "<script src" not in text and "<link" not in text
    urls = re.findall(r'src="(data:image/png;base64,[^"]+)"', text)
    assert len(urls) == 2   # small.png once (in place, from the text), big.png in the figures section
    for url in urls:
        img, size = _data_url_image(url)
        assert max(img.size) <= report_page.FIGURE_MAX_SIDE and size <= report_page.FIGURE_MAX_BYTES
    assert "(missing: gone.png)" in text
    assert 'href="sub/report.html"' in text and 'href="small.pdf"' in text   # .md -> existing .html
    assert 'id="demo-data"' in text and "vj.register(\"demo\"" in text


def test_explorer_keys_are_checked(tmp_path):
    bad = Explorer("Bad Key", "x", "", "", {})
    with pytest.raises(ValueError, match="keys"):
        write_report_html(Workdir(tmp_path), "t", "", [], [bad])


def test_script_data_cannot_close_its_tag(tmp_path):
    ex = Explorer("demo", "Demo", "", "", {"s": "</script><script>alert(1)</script>"})
    text = write_report_html(Workdir(tmp_path), "t", "", [], [ex]).read_text()
    assert "</script><script>alert(1)" not in text


def test_the_page_has_one_heading_the_reports_own(tmp_path):
    """The report's leading '# heading' is the page's only <h1> (not a second one under the header's); later
    '#' headings become section headings; a text without one gets the title as its heading."""
    md = "# Run of model x\n\ntext\n\n# Results\n\n## Table 1\n"
    text = write_report_html(Workdir(tmp_path), "window title", md, []).read_text()
    assert re.findall(r"<h1>(.*?)</h1>", text) == ["Run of model x"]
    assert "<h2>Results</h2>" in text and "<h2>Table 1</h2>" in text and "<title>window title</title>" in text
    text = write_report_html(Workdir(tmp_path), "T <1>", "no heading here", []).read_text()
    assert re.findall(r"<h1>(.*?)</h1>", text) == ["T &lt;1&gt;"]


def _save_figure(wd: Workdir, stem: str, inches: tuple[float, float], dpi: int = 300) -> None:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=inches)
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(wd.path(f"{stem}.png"), dpi=dpi)      # exactly inches x dpi pixels, the dpi recorded in the PNG
    plt.close(fig)


def test_figures_are_shown_at_their_natural_size(tmp_path, open_report):
    """A small figure is not stretched to the page's width and a wide one fills it: width = inches x
    FIGURE_PX_PER_INCH, at most the column (a 300 dpi PNG shown pixel for pixel would be 3x too large)."""
    wd = Workdir(tmp_path)
    _save_figure(wd, "small", (2.0, 1.5))
    _save_figure(wd, "wide", (16.0, 3.0))
    path = write_report_html(wd, "t", "# r\n\n![small](small.png)\n", [("wide", "a wide figure")])
    text = path.read_text()
    per_inch = report_page.FIGURE_PX_PER_INCH
    assert f'width="{2 * per_inch}"' in text and f'width="{16 * per_inch}"' in text
    rp = open_report(path)
    shown = rp.page.evaluate("""() => Object.fromEntries(Array.from(document.images).map(i => [i.alt,
        [i.getBoundingClientRect().width, i.getBoundingClientRect().height, i.parentElement.clientWidth]]))""")
    width, height, _ = shown["small"]
    assert width == pytest.approx(2 * per_inch, abs=1) and height == pytest.approx(1.5 * per_inch, abs=1)
    width, height, column = shown["wide"]
    assert column < 16 * per_inch and width == pytest.approx(column, abs=1)      # scaled down to the column
    assert height == pytest.approx((width - 2) * 3 / 16 + 2, abs=1)               # its aspect (1 px border)
    rp.assert_clean()


def test_a_wide_table_scrolls_in_its_own_box(tmp_path, open_report):
    """A table wider than the page scrolls sideways inside its box (the page itself does not overflow) and
    its last column can be scrolled into view; snake_case column names may break after an underscore."""
    names = [f"column_name_{i}" for i in range(30)]
    md = ("# r\n\n| " + " | ".join(names) + " |\n|" + "---|" * 30 + "\n| "
          + " | ".join("123.456" for _ in names) + " |\n")
    path = write_report_html(Workdir(tmp_path), "t", md, [])
    assert "<th>column_<wbr>name_<wbr>0</th>" in path.read_text()
    rp = open_report(path)
    got = rp.page.evaluate("""() => {
        const box = document.querySelector('.vj-table'), last = box.querySelector('th:last-child');
        const before = [box.scrollWidth, box.clientWidth, last.getBoundingClientRect().right,
                        box.getBoundingClientRect().right, document.documentElement.scrollWidth, window.innerWidth];
        box.scrollLeft = box.scrollWidth;
        return before.concat([last.getBoundingClientRect().right, box.getBoundingClientRect().right]); }""")
    scroll_width, client_width, last_right, box_right, page_width, window_width, last_after, box_after = got
    assert scroll_width > client_width and last_right > box_right    # wider than its box: the end is hidden ...
    assert page_width <= window_width                                  # ... inside the box, not off the page
    assert last_after <= box_after + 1                                 # and scrolls into view
    rp.assert_clean()


# --- the sparsity explorer's compact rows ---------------------------------------------------------------------

def test_log_quantisation_keeps_values_within_3_percent(rng):
    v = 10 ** rng.uniform(explorer.LOG_FLOOR + 0.01, 0, size=1000)
    got = explorer.dequantize_log(explorer.quantize_log(v))
    assert np.max(np.abs(got / v - 1)) < 0.03
    np.testing.assert_array_equal(explorer.quantize_log(np.array([0.0, 1e-9])), [0, 0])
    assert explorer.quantize_log(np.array([1.0]))[0] == 255


def _random_maps(rng, b, heads, n):
    logits = rng.normal(size=(b, heads, n, n)) * 3
    a = np.exp(logits - logits.max(-1, keepdims=True))
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


def test_pack_keeps_prefix_columns_top_k_and_the_rest_of_each_row(rng):
    a = _random_maps(rng, 2, 3, 1 + 16)
    got = jax.tree.map(np.asarray, explorer.pack(jnp.asarray(a), 1, 4))
    full = np.concatenate([a, a.mean(1, keepdims=True)], 1)
    np.testing.assert_allclose(got["prefix"][..., 0], full[..., 0], rtol=1e-6)
    np.testing.assert_allclose(got["mu"], full.mean(-2), rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full[..., 1:], got["idx"], -1), got["vals"], rtol=1e-6)
    np.testing.assert_allclose(got["vals"], -np.sort(-full[..., 1:], -1)[..., :4], rtol=1e-6)
    np.testing.assert_allclose(got["prefix"].sum(-1) + got["vals"].sum(-1) + got["rest"], 1, atol=1e-5)


def test_four_vit_b_images_stay_under_the_budget(rng):
    """4 images x 12 blocks x (12 heads + mean) x 197 x 197 maps of ViT-B/16: the page's data < 8 MB."""
    images, blocks, heads, prefix, grid = 4, 12, 12, 1, (14, 14)
    n = prefix + grid[0] * grid[1]
    k = explorer.row_top_k(images, blocks, heads, prefix, n - prefix)
    assert k == explorer.ROW_TOP_K
    packed = [jax.tree.map(np.asarray, explorer.pack(jnp.asarray(_random_maps(rng, images, heads, n)), prefix, k))
              for _ in range(blocks)]
    photo = image_data_url((rng.random((224, 224, 3)) * 255).astype(np.uint8), "jpeg")   # worst case: noise
    meta = {"model": "vit_base_patch16_224", "blocks": [f"blocks.{i}" for i in range(blocks)], "heads": heads,
            "grid": list(grid), "prefix": prefix, "prefix_kinds": ["cls"], "top_fraction": 0.05,
            "images": [photo] * images, "image_index": list(range(images)), "label": [0] * images}
    data = explorer.encode(packed, rng.random((images, blocks + 1, n)).astype(np.float32), meta)
    size = len(json.dumps(data))
    assert size < 8_000_000, size
    assert decode_array(data["idx"]).shape == (images, blocks, heads + 1, n, k)


# --- in the browser -------------------------------------------------------------------------------------------

def test_common_js_decodes_like_python(tmp_path, rng, open_report):
    arrays = {"f16": (rng.normal(size=(2, 3)) * 1000, "float16"), "u8": (rng.uniform(-1, 2, 5), "uint8"),
              "raw": (np.array([0, 9, 255]), "uint8_raw"), "u16": (np.array([1, 65535]), "uint16"),
              "i32": (np.array([-5, 2**31 - 1]), "int32"),
              "special": (np.array([0.0, -0.0, 6.1e-5, 1e-7, 65504.0]), "float16")}
    enc = {k: encode_array(x, kind) for k, (x, kind) in arrays.items()}
    script = ("var out = {}; Object.keys(data).forEach(function (k) { out[k] = Array.from(data[k]);"
              " out[k + '_shape'] = data[k].shape; }); vj.$('demo-out').textContent = JSON.stringify(out);")
    path = write_report_html(Workdir(tmp_path), "decode", "", [],
                             [Explorer("demo", "Demo", '<pre id="demo-out"></pre>', script, enc)])
    rp = open_report(path)
    got = json.loads(rp.page.inner_text("#demo-out"))
    for k, e in enc.items():
        want = decode_array(e)
        assert got[k + "_shape"] == list(want.shape)
        np.testing.assert_allclose(np.asarray(got[k], np.float64), want.ravel().astype(np.float64), rtol=1e-6)


def test_an_explorer_that_throws_is_reported(tmp_path, browser_context):
    path = write_report_html(Workdir(tmp_path), "t", "", [], [Explorer("demo", "Demo", "", "throw new Error('x')", {})])
    page = browser_context.new_page()
    seen: list[str] = []
    page.on("console", lambda m: seen.append(m.type))
    page.goto(path.resolve().as_uri(), wait_until="load")
    assert "failed: x" in page.inner_text("#demo-error") and "error" in seen
    page.close()
