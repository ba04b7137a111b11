"""Browser tests of report.html: headless system Chromium (Debian's `chromium`) driven by playwright.

Fixtures (imported by tests/conftest.py):
- `browser_context` (session): one headless Chromium with a fresh user-data-dir; every request that is not
  `file:` or `data:` is aborted and recorded (the page must be self-contained).
- `open_report` (test): `open_report(path) -> ReportPage` opens `file://<path>`, waits for load, collects
  console errors, page errors (uncaught exceptions) and blocked requests; the test FAILS at teardown if any.
No Chromium or no playwright: the tests are skipped locally and fail on CI (the `CI` variable is set).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def page_data(path: Path, key: str) -> dict:
    """The JSON data of explorer `key`, read back from a report.html."""
    found = re.search(rf'<script type="application/json" id="{key}-data">(.*?)</script>', path.read_text(), re.S)
    assert found, f"no {key} explorer in {path}"
    return json.loads(found.group(1))


def chromium_path() -> str | None:
    """$CHROMIUM, else /usr/bin/chromium, else `chromium` on PATH."""
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs Debian's chromium)")
    pytest.skip(reason)


@dataclasses.dataclass
class ReportPage:
    page: Any                                   # playwright.sync_api.Page
    errors: list[str] = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        return list(self.errors)

    def assert_clean(self) -> None:
        assert not self.errors, "the page logged errors:\n" + "\n".join(self.errors)


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    exe = chromium_path()
    if exe is None:
        _unavailable("no Chromium at /usr/bin/chromium (apt-get install chromium)")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=exe, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 1000}, offline=True)
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture
def open_report(browser_context: Any) -> Iterator[Callable[[Path], ReportPage]]:
    opened: list[ReportPage] = []

    def open_(path: Path) -> ReportPage:
        page = browser_context.new_page()
        rp = ReportPage(page)
        page.on("console", lambda m: rp.errors.append(f"console.{m.type}: {m.text}")
                if m.type in ("error", "assert") else None)
        page.on("pageerror", lambda e: rp.errors.append(f"page error: {e}"))

        def route(r: Any) -> None:
            url = r.request.url
            if url.startswith(("file:", "data:")):
                r.continue_()
            else:
                rp.errors.append(f"network request (the page must be self-contained): {url}")
                r.abort()

        page.route("**/*", route)
        page.on("requestfailed", lambda q: rp.errors.append(f"request failed: {q.url}")
                if not q.url.startswith(("http:", "https:")) else None)
        page.goto(Path(path).resolve().as_uri(), wait_until="load")
        opened.append(rp)
        return rp

    yield open_
    problems = [p for rp in opened for p in rp.problems()]
    for rp in opened:
        rp.page.close()
    if problems:
        pytest.fail("report.html logged errors:\n" + "\n".join(problems))


def cell_colours(page: Any, canvas_id: str, h: int, w: int) -> list[list[int]]:
    """The RGB of the centre pixel of every cell of an (h, w) grid drawn on canvas #canvas_id, row-major."""
    return page.evaluate("""([id, h, w]) => { const c = document.getElementById(id), g = c.getContext('2d'), out = [];
        for (let r = 0; r < h; r++) for (let q = 0; q < w; q++) {
          const x = Math.floor((q + 0.5) * c.width / w), y = Math.floor((r + 0.5) * c.height / h);
          const d = g.getImageData(x, y, 1, 1).data;
          out.push([d[0], d[1], d[2]]); }
        return out; }""", [canvas_id, h, w])


def colour_bar_fit(page: Any, colours: list[list[int]], cmap: str) -> list[tuple[float, float]]:
    """For each RGB: (distance to the nearest colour of the page's colour map `cmap`, its position t in [0, 1])
    over 1001 samples of `vj.color`; a distance of a few units = a colour of the bar."""
    return [tuple(x) for x in page.evaluate("""([rgbs, cmap]) => rgbs.map(p => { let best = [1e9, 0];
        for (let i = 0; i <= 1000; i++) { const c = vj.color(cmap, i / 1000);
          const d = Math.hypot(c[0] - p[0], c[1] - p[1], c[2] - p[2]); if (d < best[0]) best = [d, i / 1000]; }
        return best; })""", [colours, cmap])]


def distance_chart(page: Any) -> dict[str, Any]:
    """The sparsity explorer's attention-distance chart (#sparsity-dist, an SVG) as drawn: per head h the values
    its bars show, read off their geometry against the axis (`all`, `central`: distances in px; `prefix`: mass,
    against the 0..1 strip), the uniform lines' values, the selected head, and the axis (px per unit, baseline).
    Fails unless every bar stands on its baseline."""
    raw = page.evaluate("""() => { const s = document.getElementById('sparsity-dist'), out = {rects: {}, lines: {}};
        out.ticks = Array.from(s.querySelectorAll('.sparsity-dist-tick')).map(
            t => [+t.dataset.value, +t.getAttribute('y') - 4]);
        s.querySelectorAll('rect[id]').forEach(r => { out.rects[r.id] = ['x', 'y', 'width', 'height'].map(
            a => +r.getAttribute(a)); });
        s.querySelectorAll('line[id]').forEach(l => { out.lines[l.id] = +l.getAttribute('y1'); });
        out.block = +s.dataset.block; out.source = s.dataset.source; out.image = +s.dataset.image;
        return out; }""")
    (zero, base), (top, y_top) = min(raw["ticks"]), max(raw["ticks"])
    assert zero == 0 and top > 0
    k = (base - y_top) / top                                    # px per px of distance
    out: dict[str, Any] = {"all": {}, "central": {}, "prefix": {}, "x": {}, "k": k, "baseline": base, "block": raw["block"],
                           "source": raw["source"], "image": raw["image"], "top": top,
                           "selected": raw["rects"].get("sparsity-dist-selected")}
    frame = raw["rects"].get("sparsity-dist-prefix-frame")
    for name, (x, y, w, h) in raw["rects"].items():
        parts = name.split("-")
        if name.startswith("sparsity-dist-bar-"):              # sparsity-dist-bar-{all|central}-{h}
            assert y + h == pytest.approx(base, abs=1e-6), name
            out[parts[3]][int(parts[4])] = h / k
            if parts[3] == "all":
                out["x"][int(parts[4])] = x
        elif name.startswith("sparsity-dist-prefix-") and parts[3].isdigit():
            assert frame is not None and y + h == pytest.approx(frame[1] + frame[3], abs=1e-6), name
            out["prefix"][int(parts[3])] = h / frame[3]
    out["uniform"] = {s: (base - raw["lines"][f"sparsity-dist-uniform-{s}"]) / k for s in ("all", "central")}
    return out


def screenshot(rp: ReportPage, selector: str, name: str) -> Path | None:
    """Saves a screenshot of `selector` as `$VITSPARSE_JAX_SCREENSHOTS/<name>` (the docs' images:
    VITSPARSE_JAX_SCREENSHOTS=docs/img python -m pytest tests/test_browser_sparsity.py); nothing when unset."""
    folder = os.environ.get("VITSPARSE_JAX_SCREENSHOTS")
    if not folder:
        return None
    out = Path(folder) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    rp.page.locator(selector).screenshot(path=str(out))
    return out
