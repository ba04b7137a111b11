"""The high-norm-token columns say whose tokens they measure (issue 23, point 9): in models.csv the share was
the block OUTPUT's while its neighbour, the overlap's chance, was the INPUT's, both without saying so.

Per-block statistics with different shares at every depth go through `norm_results` (results.json), the
per-model table (norms.csv), the comparison table (models.csv) and the depth figure; each named column must
hold the share of the tokens its name says."""
from __future__ import annotations

import types

import matplotlib.pyplot as plt
import numpy as np

from vitsparse_jax.experiments.sparsity import compare, norms, stats

# share of high-norm patch tokens in the embedding, block 0's output, block 1's output (2 images' totals)
STREAM = np.array([0.05, 0.10, 0.30])
OVERLAP = np.array([0.5, 0.9])


def statistics() -> dict:
    totals = {"images": np.array(2.0), "norm_high_share": 2 * STREAM, "norm_patch_median": 2 * np.array([1., 2., 3.]),
              "norm_prefix": np.zeros((3, 1)), "norm_overlap": 2 * OVERLAP, "norm_spearman": np.array([0.2, 0.4]),
              "norm_spearman_images": np.array([2, 2])}
    res = stats.norm_results(totals, types.SimpleNamespace(norm_factor=2.0))
    return {"norms": res, "prefix_mu_by_kind": {"cls": np.array([0.1, 0.2])}, "mean_mu": np.ones(2),
            "mean_nu": np.ones(2), "top_share": np.ones((2, 1))}


def test_each_high_norm_column_holds_the_share_its_name_says():
    res = statistics()
    n = res["norms"]
    np.testing.assert_allclose(n["high_norm_share_input"], STREAM[:-1])    # block l's input: the stream before it
    np.testing.assert_allclose(n["high_norm_share_output"], STREAM[1:])    # block l's output
    np.testing.assert_allclose(n["top5_overlap_high_norm_input"], OVERLAP)
    assert not {"high_norm_share", "top_overlap", "top_overlap_chance"} & set(n)   # the ambiguous names are gone

    for row, l in zip(norms.rows(["blocks.0", "blocks.1"], res), range(2)):    # norms.csv
        assert (row["high_norm_share_input"], row["high_norm_share_output"]) == (STREAM[l], STREAM[l + 1])
        assert row["top5_overlap_high_norm_input"] == OVERLAP[l]

    summary = {"kind": "attention", "name": "m", "layers": ["blocks.0", "blocks.1"], "statistics": res}
    for row, l in zip(compare.rows([summary]), range(2)):                     # models.csv
        assert (row["high_norm_share_input"], row["high_norm_share_output"]) == (STREAM[l], STREAM[l + 1])
        assert row["top5_overlap_high_norm_input"] == OVERLAP[l]
        assert not {"high_norm_share", "top_overlap", "top_overlap_chance"} & set(row)

    fig = norms.depth_figure([("m", res)])                                     # the dotted chance line: the input's
    overlap, chance = fig.axes[0].lines[:2]
    np.testing.assert_allclose(overlap.get_ydata(), OVERLAP)
    np.testing.assert_allclose(chance.get_ydata(), STREAM[:-1])
    plt.close(fig)
