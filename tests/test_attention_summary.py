"""The attention measures of every block of a model (vitsparse_jax.measures.attention_summary): stacked and padded
on the device as the per-block measures are, summed over images into per-head results (renormalised rows pooled
over images), and computed by the gradient program from its own forward pass (`make_rf_fn(side=...)`)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from vitsparse_jax import models
from vitsparse_jax.measures import attention_distance as ad
from vitsparse_jax.measures import attention_summary as summary
from vitsparse_jax.measures import gradient_fields
from vitsparse_jax.runtime.ordered import OrderedSums

# stage 0: 2 heads, stage 1: 4 heads (padded to 4 in stage 0); shifted windows in each stage's second block
TINY_SWIN = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=(4, 4), num_classes=0)


def totals_of(measures: summary.BlockMeasures, values: dict, chunks: int = 2) -> dict:
    """Exact ordered totals of the per-image host values, added a few images at a time."""
    host = measures.host_values(jax.tree.map(np.asarray, values))
    images = len(next(iter(host.values())))
    sums = OrderedSums.like(host, images, block=2)
    state = sums.init()
    for part in np.array_split(np.arange(images), chunks):
        sums.add(state, {k: v[part] for k, v in host.items()}, np.ones(len(part), bool), part)
    return sums.result(state)


@pytest.mark.parametrize("renormalize", [False, True])
def test_swin_blocks_are_stacked_padded_and_averaged_over_images(renormalize):
    """Catches a head of one stage read as another stage's (padding), padded heads reported as 0 instead of
    NaN, and a mean over images that is not the mean of each image's measures."""
    module = models.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN)
    measures = summary.block_measures(module, 1 / 7, renormalize)
    assert measures.heads == (2, 2, 4, 4) and measures.blocks[2] == "layers.1.blocks.0"
    variables = models.init_untrained(module, 0)
    x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
    _, aux = jax.jit(lambda v, x: module.apply(v, x, capture=measures.captures))(variables, x)
    values = jax.jit(measures)(aux)
    res = measures.results(totals_of(measures, values), 3)
    for b, (block, geom) in enumerate(zip(measures.blocks, measures.geometries)):
        direct = jax.tree.map(np.asarray, ad.attention_measures(aux[f"{block}.attn.probs"], geom, renormalize))
        heads = measures.heads[b]
        for key in ("distance", "distance_central", "prefix_mass", "entropy", "entropy_norm"):
            np.testing.assert_allclose(values[key][:, b, :heads], direct[key], rtol=1e-5, err_msg=key)
            assert np.all(np.asarray(values[key])[:, b, heads:] == 0), key
        np.testing.assert_allclose(res["distance_px"][b, :heads], direct["distance"].mean(0), rtol=1e-5)
        np.testing.assert_allclose(res["distance_central_rel"][b, :heads], direct["distance_central"].mean(0) / 64,
                                   rtol=1e-5)
        np.testing.assert_allclose(res["entropy_norm"][b, :heads], direct["entropy_norm"].mean(0), rtol=1e-5)
        assert np.isnan(res["distance_px"][b, heads:]).all() and np.isnan(res["entropy"][b, heads:]).all()
        assert res["uniform"]["distance_px"][b] == pytest.approx(ad.uniform_reference(geom).distance)
    mean, lo, hi = summary.head_band(res["distance_px"])
    np.testing.assert_allclose(mean[:2], np.nanmean(res["distance_px"][:2], axis=1))
    assert (lo <= mean).all() and (mean <= hi).all()
    assert len(summary.rows(res)) == sum(measures.heads)


def test_renormalized_distance_pools_the_kept_rows_of_every_image():
    """Image 0 attends only to the class token in head 0 (every row skipped), image 1 only to the right
    neighbour: the renormalised distance of head 0 is image 1's (one patch, 4 px), not a mean with image 0's
    empty set (NaN) or with 0; the skipped rows are counted."""
    info = models.model_info(models.create_model("vit_pico_patch4_32"))     # 8x8 patches of 4 px + class token
    geom = ad.vit_geometry(info)
    measures = summary.BlockMeasures(("blocks.0",), (geom,), (2,), 1 / 7, True)
    n, p = geom.num_keys, 1
    maps = np.zeros((2, 2, n, n), np.float32)
    maps[:, :, :, 0] = 1.0                                   # every row on the class token ...
    for q in range(64):                                      # ... but image 1, head 0: a neighbour in the row
        r, c = divmod(q, 8)
        maps[1, 0, p + q, 0] = 0.0
        maps[1, 0, p + q, p + r * 8 + (c + 1 if c < 7 else c - 1)] = 1.0
    values = jax.jit(measures)({"blocks.0.attn.probs": maps})
    res = measures.results(totals_of(measures, values, chunks=1), 2)
    assert res["distance_px"][0, 0] == pytest.approx(4.0)
    assert res["skipped"][0, 0] == 64                        # image 0's patch rows (the class row is no query)
    assert np.isnan(res["distance_px"][0, 1]) and res["skipped"][0, 1] == 128
    assert res["prefix_mass"][0, 1] == pytest.approx(1.0)


def test_gradient_program_gives_side_values_of_its_own_forward_pass():
    """The receptive fields are unchanged by a side, whose values equal the measures of a plain forward pass, also
    for a block after the deepest requested layer (the forward must go on to compute it)."""
    module = models.create_model("vit_pico_patch4_32", depth=2)
    info = models.model_info(module)
    variables = models.init_untrained(module, 0)
    layers = tuple(gradient_fields.layer_specs(module, variables, info, ["blocks.0.attn"], 1 / 7, (32, 32)))
    measures = summary.block_measures(module)                 # blocks 0 and 1
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    weight = np.ones(2, np.float32)
    plain = gradient_fields.make_rf_fn(module, layers, 1, 0, per_image=True)(variables, x, weight)
    maps, side = gradient_fields.make_rf_fn(module, layers, 1, 0, per_image=True, side=measures)(variables, x, weight)
    np.testing.assert_allclose(maps, plain, rtol=1e-6, atol=1e-9)
    _, aux = module.apply(variables, x, capture=measures.captures)
    direct = measures(aux)
    for key in summary.DEVICE_VALUES:
        np.testing.assert_allclose(side[key], direct[key], rtol=1e-5, err_msg=key)
