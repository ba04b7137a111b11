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
