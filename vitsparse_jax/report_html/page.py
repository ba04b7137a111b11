"""report.html: one self-contained page (no network: scripts, styles and images inline) per experiment.

`write_report_html` renders the run's report.md text (Python-Markdown with `tables`; its first `# heading` is
the page's one heading, any later one becomes a section heading; every table scrolls sideways in its own box),
inlines every figure as a base64 PNG within a size budget (`FIGURE_MAX_SIDE`, `FIGURE_MAX_BYTES`), shown at its
natural size (`FIGURE_PX_PER_INCH`, from the PNG's dpi) but never wider than the page, then the interactive
explorers:
each `Explorer` brings its markup, its JS (run after load as a function body with `data` and `vj` in scope,
`vj` = the helpers of static/common.js) and its JSON data, numpy arrays encoded with `encode_array`.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from vitsparse_jax.runtime.workdir import Workdir

log = logging.getLogger(__name__)

FIGURE_MAX_SIDE = 1400          # px, longest side of an inlined figure
FIGURE_MAX_BYTES = 300_000      # bytes of PNG per inlined figure (shrunk by 0.8 steps until it fits)
FIGURE_PX_PER_INCH = 100        # CSS px per inch of a figure: its natural size, as matplotlib and Jupyter show it
ARRAY_KINDS = ("float16", "uint8", "uint8_raw", "uint16", "int32")


@dataclasses.dataclass
class Explorer:
    """One interactive panel of report.html."""
    key: str            # short unique id, e.g. "sparsity"; every DOM id of this explorer starts with f"{key}-"
    title: str
    html: str           # markup of the explorer (controls, canvases)
    script: str         # JS source; runs after load as a function body with `data` (the decoded JSON below)
    #                     and `vj` (the shared helpers of common.js) in scope
    data: dict          # JSON-able; numpy arrays encoded with encode_array()


def encode_array(x: np.ndarray, kind: str = "float16") -> dict[str, Any]:
    """A numpy array as JSON: {"kind", "shape", "b64"} (+ "scale", "offset" for "uint8"); `vj.decode` reads it.

    kinds: "float16" (little-endian IEEE half), "uint8" (min/max-scaled to 0..255: x ~ q * scale + offset,
    decoded to floats), "uint8_raw" / "uint16" / "int32" (integers stored as they are, range-checked).
    Decoded arrays are flat, in C order; NaN/inf are not allowed (they would not survive the scaling).
    """
    x = np.asarray(x)
    if kind not in ARRAY_KINDS:
        raise ValueError(f"encode_array: unknown kind {kind!r}; valid: {', '.join(ARRAY_KINDS)}")
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError("encode_array: the array holds NaN or inf")
    out: dict[str, Any] = {"kind": kind, "shape": [int(s) for s in x.shape]}
    if kind == "float16":
        raw = x.astype("<f2")
    elif kind == "uint8":
        lo = float(x.min()) if x.size else 0.0
        hi = float(x.max()) if x.size else 0.0
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        raw = np.clip(np.rint((x.astype(np.float64) - lo) / scale), 0, 255).astype(np.uint8)
        out.update(scale=scale, offset=lo)
    else:
        dtype = {"uint8_raw": np.dtype("u1"), "uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}[kind]
        info = np.iinfo(dtype)
        if x.size and (not np.all(x == np.rint(x)) or x.min() < info.min or x.max() > info.max):
            raise ValueError(f"encode_array: values are not integers in [{info.min}, {info.max}] for {kind!r}")
        raw = x.astype(dtype)
    out["b64"] = base64.b64encode(np.ascontiguousarray(raw).tobytes()).decode("ascii")
    return out


def decode_array(enc: dict[str, Any]) -> np.ndarray:
    """The inverse of `encode_array`, as common.js's `vj.decode` does it (float32 for float kinds)."""
    raw = base64.b64decode(enc["b64"])
    kind, shape = enc["kind"], tuple(enc["shape"])
    if kind == "float16":
        return np.frombuffer(raw, "<f2").astype(np.float32).reshape(shape)
    if kind == "uint8":
        q = np.frombuffer(raw, np.uint8).astype(np.float32)
        return (q * np.float32(enc["scale"]) + np.float32(enc["offset"])).reshape(shape)
    dtype = {"uint8_raw": "u1", "uint16": "<u2", "int32": "<i4"}[kind]
    return np.frombuffer(raw, dtype).reshape(shape)


def image_data_url(img: np.ndarray | Image.Image, fmt: str = "png", max_side: int | None = None,
                   quality: int = 85) -> str:
    """A small PNG (or JPEG: fmt="jpeg") data URL of an image: uint8 (H, W[, 3|4]) or float in [0, 1]."""
    if not isinstance(img, Image.Image):
        a = np.asarray(img)
        if a.dtype != np.uint8:
            a = np.clip(np.rint(a.astype(np.float64) * 255), 0, 255).astype(np.uint8)
        img = Image.fromarray(a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a)
    if max_side and max(img.size) > max_side:
        img = _resized(img, max_side / max(img.size))
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True)
        mime = "image/jpeg"
    elif fmt == "png":
        img.save(buf, "PNG", optimize=True)
        mime = "image/png"
    else:
        raise ValueError(f"image_data_url: fmt must be 'png' or 'jpeg', not {fmt!r}")
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_width(path: Path) -> int | None:
    """The natural display width of a figure PNG in CSS px: its width in inches (pixels / the dpi its PNG
    records, as matplotlib writes it) x FIGURE_PX_PER_INCH; None when the PNG records no dpi."""
    with Image.open(path) as im:
        dpi = im.info.get("dpi")
        width = im.width
    if not dpi or not dpi[0] or dpi[0] <= 0:
        return None
    return max(1, round(width / float(dpi[0]) * FIGURE_PX_PER_INCH))


def figure_img(path: Path, alt: str) -> str:
    """An <img> of a figure PNG: inlined within the budget (`figure_data_url`), at its natural width."""
    width = figure_width(path)
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="{figure_data_url(path)}"{size}>'


def figure_data_url(path: Path, max_side: int = FIGURE_MAX_SIDE, max_bytes: int = FIGURE_MAX_BYTES) -> str:
    """A figure PNG within the budget: its own bytes when they fit (longest side <= max_side, PNG bytes <=
    max_bytes), else re-encoded (a 256-colour palette, fast octree quantisation, then shrunk by 0.8 steps)."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        if im.format == "PNG" and max(im.size) <= max_side and len(raw) <= max_bytes:
            return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")
        img = im.convert("RGB")
    if max(img.size) > max_side:
        img = _resized(img, max_side / max(img.size))
    while True:
        buf = io.BytesIO()
        img.quantize(256, method=Image.Quantize.FASTOCTREE).save(buf, "PNG")
        if buf.tell() <= max_bytes or max(img.size) < 200:
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        img = _resized(img, 0.8)


def _resized(img: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, Image.Resampling.LANCZOS)


def static_text(name: str, package: str = "vitsparse_jax.report_html") -> str:
    """A text file shipped with a package: by default the page's own `static/` files (common.js, style.css);
    an experiment's explorer script sits in its own folder (`static_text("explorer.js", __package__)`)."""
    folder = resources.files(package)
    return (folder.joinpath("static", name) if package == "vitsparse_jax.report_html" else folder.joinpath(name)
            ).read_text(encoding="utf-8")


def _script_json(obj: Any) -> str:
    """JSON safe inside <script type="application/json">: no '</', no '<!--'."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^"]*)(")', re.I)
_H1 = re.compile(r"<h1>(.*?)</h1>", re.I | re.S)
_TH = re.compile(r"(<th\b[^>]*>)([^<]*)(</th>)", re.I)   # a header cell of plain text
_HREF = re.compile(r'(<a\b[^>]*?\bhref=")([^"]*)(")', re.I)
_NETWORK = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)
_EXTERNAL = re.compile(r'<a\b[^>]*?\bhref="((?:https?:)?//[^"]*)"[^>]*>(?P<text>.*?)</a>', re.I | re.S)


def _fix_links(body: str, workdir: Workdir, inlined: set[str]) -> str:
    """Inline relative <img> sources that exist in the workdir (their names are added to `inlined`), else
    drop the image (its alt text stays); point relative links to `x.md` at `x.html` where that exists;
    network links become text with their address."""
    def img(m: re.Match) -> str:
        src = html.unescape(m.group(2))
        p = workdir.path(src) if not _NETWORK.match(src) and ":" not in src.split("/")[0] else None
        if p is not None and p.suffix.lower() == ".png" and p.is_file():
            inlined.add(src)
            width = figure_width(p)
            return m.group(1) + figure_data_url(p) + m.group(3) + (f' width="{width}"' if width else "")
        return m.group(1) + m.group(3)   # an empty src loads nothing

    def link(m: re.Match) -> str:
        href = html.unescape(m.group(2))
        if not _NETWORK.match(href) and href.endswith(".md") and workdir.path(href[:-3] + ".html").is_file():
            href = href[:-3] + ".html"
        return m.group(1) + html.escape(href) + m.group(3)

    def external(m: re.Match) -> str:   # the page references nothing on the network: the address as text
        return f'<span class="vj-link">{m.group("text")} &lt;{m.group(1)}&gt;</span>'

    body = _EXTERNAL.sub(external, _SRC.sub(img, body))
    return _HREF.sub(link, body)


def one_heading(body_html: str, title: str) -> tuple[str, str]:
    """(page heading as HTML, body): a body that starts with an <h1> gives the page its heading (else the
    escaped `title`); every other <h1> of the body becomes an <h2>, so the page has one <h1>."""
    first = _H1.match(body_html.lstrip())
    heading = html.escape(title)
    if first:
        heading, body_html = first.group(1).strip(), body_html.lstrip()[first.end():]
    return heading, _H1.sub(r"<h2>\1</h2>", body_html)


def _scrolling_tables(body_html: str) -> str:
    """Every <table> in a box that scrolls sideways (style.css .vj-table), so a wide table is never clipped;
    column names may break after an underscore (<wbr>), so tables of long snake_case names stay narrow."""
    body_html = re.sub(r"<table\b", '<div class="vj-table"><table', body_html, flags=re.I)
    body_html = re.sub(r"</table>", "</table></div>", body_html, flags=re.I)
    return _TH.sub(lambda m: m.group(1) + m.group(2).replace("_", "_<wbr>") + m.group(3), body_html)


def render_page(title: str, body_html: str, figures_html: str, explorers: Sequence[Explorer]) -> str:
    """The whole page as text (no I/O besides the package's static files). `title`: the window title, and the
    page heading unless the body starts with its own <h1> (`one_heading`)."""
    keys = [e.key for e in explorers]
    if len(set(keys)) != len(keys) or any(not re.fullmatch(r"[a-z][a-z0-9_]*", k) for k in keys):
        raise ValueError(f"explorer keys must be unique lower-case identifiers, got {keys}")
    heading, body_html = one_heading(body_html, title)
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title>", f"<style>{static_text('style.css')}</style></head><body>",
             f'<header><h1>{heading}</h1><nav><a href="#report">report</a>'
             + (' · <a href="#figures">figures</a>' if figures_html else "")
             + "".join(f' · <a href="#{e.key}-explorer">{html.escape(e.title)}</a>' for e in explorers)
             + "</nav></header><main>"]
    parts.append(f'<section id="report" class="report">{body_html}</section>')
    if figures_html:
        parts.append(f'<section id="figures"><h2>Figures</h2>{figures_html}</section>')
    for e in explorers:
        parts.append(f'<section class="explorer" id="{e.key}-explorer"><h2>{html.escape(e.title)}</h2>'
                     f'{e.html}<p class="vj-error" id="{e.key}-error" hidden></p></section>')
    parts.append("</main>")
    for e in explorers:
        parts.append(f'<script type="application/json" id="{e.key}-data">{_script_json(e.data)}</script>')
    parts.append(f"<script>{static_text('common.js')}</script>")
    for e in explorers:
        parts.append(f'<script>vj.register("{e.key}", function (data, vj) {{\n"use strict";\n'
                     f"{e.script}\n}});</script>")
    parts.append("<script>vj.start();</script></body></html>")
    return "\n".join(parts)


def write_report_html(workdir: Workdir, title: str, report_markdown: str, figures: list[tuple[str, str]],
                      explorers: Sequence[Explorer] = ()) -> Path:
    """Writes `<workdir>/report.html` (atomically) and returns its path.

    `report_markdown`: the text of the run's report.md; `figures`: (file stem, caption) of figures already
    saved in the workdir by `Workdir.save_figure` (`<stem>.png` is read and inlined after the text, unless
    the text already shows it as `![..](<stem>.png)`; a missing one is named in the page instead);
    `explorers`: the interactive panels, after the figures (the header links to each).
    """
    from vitsparse_jax.runtime import figure_pool, timing

    figure_pool.wait()   # the figures drawn by worker processes are on disk
    with timing.phase("report_html"):   # the run's time: report.html apart from the other files
        return _write_report_html(workdir, title, report_markdown, figures, explorers)


def _write_report_html(workdir: Workdir, title: str, report_markdown: str, figures: list[tuple[str, str]],
                       explorers: Sequence[Explorer]) -> Path:
    import markdown  # the well-kept Python-Markdown

    start = time.perf_counter()
    log.info("writing %s (%d figures, %d explorers)", workdir.path("report.html"), len(figures), len(explorers))
    body = markdown.markdown(report_markdown, extensions=["tables"], output_format="html")
    inlined: set[str] = set()
    body = _scrolling_tables(_fix_links(body, workdir, inlined))
    figs = []
    for stem, caption in figures:
        if f"{stem}.png" in inlined:   # report.md already shows it in place
            continue
        p = workdir.path(f"{stem}.png")
        cap = f"<figcaption><b>{html.escape(stem)}</b> {html.escape(caption)}</figcaption>"
        if p.is_file():
            figs.append(f'<figure id="fig-{html.escape(stem)}">{figure_img(p, stem)}{cap}</figure>')
        else:
            figs.append(f'<figure id="fig-{html.escape(stem)}"><p>(missing: {html.escape(p.name)})</p>{cap}</figure>')
    path = workdir.write_text("report.html", render_page(title, body, "\n".join(figs), explorers))
    log.info("report.html written (%.1f s)", time.perf_counter() - start)
    return path
