"""Bootstrap intervals of each accuracy and their error bars on Figures 4a / 4b (issue 28, point 9): the
intervals are the percentile bootstrap over images of A0, A_t and A_r, the figures draw exactly them, and the
captions say what they are and at which level. Synthetic correctness rows (no model), plus the session's
shared finished ablation for the captions of a real run."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from vitsparse_jax.experiments.ablation import figures
from vitsparse_jax.experiments.ablation import report as ablation_report

PS, NS, DRAWS = (0.1, 0.3), (1, 2), 2


def rows(t: int, rng: np.random.Generator, acc: tuple[float, float, float] = (0.9, 0.6, 0.8)) -> dict:
    """Correctness rows of t images: clean, top and random right with the given probabilities."""
    return {"done": np.ones(t, bool), "clean": rng.random(t) < acc[0],
            "top": rng.random((t, len(NS), len(PS))) < acc[1],
            "rand": rng.random((t, len(NS), len(PS), DRAWS)) < acc[2]}


def result(t: int = 200, seed: int = 0, **kw) -> dict:
    r = ablation_report.summarize(rows(t, np.random.default_rng(seed), **kw), PS, NS, samples=400, confidence=0.9)
    r.update(name="m.tag", label="m.tag", grid={"p": list(PS), "n": list(NS), "draws": DRAWS})
    return r


def test_each_accuracy_has_its_percentile_bootstrap_interval():
    """Defect caught: no interval (or another quantity's, e.g. A0 - A_r's) behind the error bars. For a mean of
    0/1 outcomes over t images, the 90% interval is close to the normal one, 2 x 1.645 sqrt(a (1 - a) / t)
    wide, and it contains the point estimate."""
    r = result(t=2000)
    checks = [(r["A0"], r["A0_ci"], 1)] + [(c[k], c[f"{k}_ci"], DRAWS if k == "A_r" else 1)
                                           for c in r["cells"] for k in ("A_t", "A_r")]
    for value, (lo, hi), draws in checks:
        assert lo <= value <= hi
        normal = 2 * 1.645 * math.sqrt(value * (1 - value) / 2000 / draws)   # draws: independent per image here
        assert hi - lo == pytest.approx(normal, rel=0.25)


def test_an_accuracy_that_never_varies_has_a_zero_width_interval():
    r = result(acc=(1.0, 0.0, 1.0))
    assert r["A0_ci"] == [1.0, 1.0]
    assert all(c["A_t_ci"] == [0.0, 0.0] and c["A_r_ci"] == [1.0, 1.0] for c in r["cells"])


def _bars(ax) -> set[tuple[float, float, float]]:
    """(x rounded, low, high) of every vertical bar drawn on the axes, in %."""
    out = set()
    for collection in ax.collections:
        for seg in collection.get_segments():
            (x0, y0), (x1, y1) = seg
            assert x0 == x1
            out.add((round(float(x0)), round(float(min(y0, y1)), 9), round(float(max(y0, y1)), 9)))
    return out


def _expected(r: dict, ns) -> set[tuple[float, float, float]]:
    want = {(0, round(100 * r["A0_ci"][0], 9), round(100 * r["A0_ci"][1], 9))}
    for c in r["cells"]:
        if c["n"] in ns:
            want |= {(round(100 * c["p"]), round(100 * c[f"{k}_ci"][0], 9), round(100 * c[f"{k}_ci"][1], 9))
                     for k in ("A_t", "A_r")}
    return want


def test_the_figures_draw_exactly_the_intervals_and_name_their_level():
    r = result()
    a = figures.accuracy_vs_p([r], n=2)
    assert _bars(a.axes[0]) == _expected(r, {2})     # every point's interval, at its p (moved a little apart)
    legend = [t.get_text() for t in a.axes[0].get_legend().get_texts()]
    assert "90% bootstrap interval\n(images resampled)" in legend
    b = figures.accuracy_vs_p_by_n(r)
    assert _bars(b.axes[0]) == _expected(r, set(NS))
    plt.close("all")


def test_results_without_intervals_are_drawn_without_bars():
    """results.json written before the intervals existed still draws (and its legend claims no interval)."""
    r = result()
    del r["A0_ci"]
    fig = figures.accuracy_vs_p([r], n=1)
    assert not fig.axes[0].collections
    assert not any("bootstrap" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert ablation_report.band_text([r]) == ""
    plt.close("all")


def test_a_real_runs_captions_say_what_the_bars_are(finished_runs):
    workdir = finished_runs.path("ablate")    # the built-in default on 8 digits (tests/shared_runs.py)
    html, md = (workdir / "report.html").read_text(), (workdir / "report.md").read_text()
    said = "error bars: the 95% percentile bootstrap interval of each accuracy (A0 at p = 0, A_t, A_r) over 1000"
    assert said in md and html.count(said) >= 2           # report.md's files line; both figures' captions
