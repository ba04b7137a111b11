"""Ablation units, ranking, counting and masks against NumPy (docs/science.md#ablation-units); small models."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitsparse_jax import models
from vitsparse_jax.experiments.ablation import experiment as ablation
from vitsparse_jax.experiments.ablation import units as au

PS = (0.05, 0.1, 0.2, 0.3)
VIT = "vit_pico_patch4_32"


def random_variables(module, seed: int = 1) -> dict:
    """Cheap random weights of the right shapes (timm's init is slow to compile on a busy CPU)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):               # BatchNorm running variance
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(module))


@functools.lru_cache(maxsize=None)
def model(name: str, **overrides):
    module = models.create_model(name, **overrides)
    return module, random_variables(module)


def images(module, batch: int = 4, seed: int = 0) -> jax.Array:
    size = models.model_info(module).img_size
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3)), jnp.float32)


def apply(module, variables, x, **kwargs):
    """module.apply, jitted (eager Flax is slow on a busy CPU)."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, x)


def keeps_for(plan: au.Plan, module, variables, x, index, seed: int = 0) -> dict[str, np.ndarray]:
    def fn(variables, x, index):
        _, aux = module.apply(variables, x, capture=plan.captures)
        return au.all_keeps(plan, aux, jax.random.key(seed), index)
    return {k: np.asarray(v) for k, v in jax.jit(fn)(variables, x, index).items()}


def random_scores(seed: int, index, draws: int, units: int, ks) -> np.ndarray:
    fn = jax.jit(lambda i: au.random_scores(jax.random.key(seed), i, draws, units, ks))
    return np.asarray(fn(jnp.asarray(index)))


def numpy_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row; ties to the lower index (as jax.lax.top_k)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def test_k_is_round_p_times_units_as_in_the_spec():
    assert [au.count(p, 196) for p in PS] == [10, 20, 39, 59]
    assert [au.count(p, 49) for p in PS] == [2, 5, 10, 15]


def test_stage_of_takes_the_longest_dotted_prefix():
    stages = ("embed", "blocks.1", "blocks.11", "head")
    assert au.stage_of("blocks.11.attn", stages) == "blocks.11"
    assert au.stage_of("blocks.1.attn", stages) == "blocks.1"
    assert au.stage_of("layer4.2.act2", ("stem", "layer4.2", "head")) == "layer4.2"
    assert au.stage_of("features.3", ("features.2", "features.3")) == "features.3"


def test_drop_ranks_give_the_numpy_top_sets(rng):
    scores = rng.standard_normal((6, 40)).astype(np.float32)
    scores[0, :5] = scores[0, 5]            # ties: the lower index wins, as in top_k
    ranks = np.asarray(au.drop_ranks(jnp.asarray(scores), 12))
    for k in (0, 1, 5, 12):
        dropped = ranks < k
        expected = np.zeros_like(dropped)
        np.put_along_axis(expected, numpy_top(scores, k), True, axis=1)
        np.testing.assert_array_equal(dropped, expected)


def test_vit_plan_counts_patch_tokens_only_and_groups_start_at_the_right_stage():
    module, _ = model(VIT, distilled=True)           # cls + dist prefix tokens
    plan = au.make_plan(module, ps=PS, ns=(1, 2, 3))
    info = models.model_info(module)
    assert info.num_prefix_tokens == 2
    assert all(s.units == 64 and s.prefix == 2 for g in plan.groups for s in g.sites)
    assert plan.ks["blocks.5.attn"] == (3, 6, 13, 19)
    assert [(g.n, g.start, g.start_input) for g in plan.groups] == [
        (1, "blocks.5", "blocks.4"), (2, "blocks.4", "blocks.3"), (3, "blocks.3", "blocks.2")]
    assert {s.score_from for g in plan.groups for s in g.sites} == {"blocks.5.attn.probs"}


def test_vit_top_sets_are_the_largest_mu_patch_columns_and_never_prefix_tokens():
    module, variables = model(VIT, distilled=True)
    plan = au.make_plan(module, ps=PS, ns=(1, 2), draws=3)
    x, index = images(module), jnp.arange(4)
    _, aux = apply(module, variables, x, capture=plan.captures)
    mu = np.asarray(aux["blocks.5.attn.probs"]).mean(axis=(1, 2))       # (B, N): heads and all query rows
    np.testing.assert_allclose(mu.sum(-1), 1.0, rtol=1e-5)
    keeps = keeps_for(plan, module, variables, x, index)
    masks = {k: np.asarray(v) for k, v in au.group_masks(plan.groups[-1], keeps).items()}
    v_per_p = 1 + plan.draws
    for site in ("blocks.4.attn", "blocks.5.attn"):
        m = masks[site]                                                   # (V, B, N)
        assert m.shape == (plan.variants_per_group, 4, 66)
        np.testing.assert_array_equal(m[:, :, :2], 1.0)                   # prefix never dropped, never drawn
        for i, k in enumerate(plan.ks[site]):
            expected = np.ones((4, 66))
            np.put_along_axis(expected, 2 + numpy_top(mu[:, 2:], k), 0.0, axis=1)
            np.testing.assert_array_equal(m[i * v_per_p], expected)
            assert ((m[i * v_per_p + 1: (i + 1) * v_per_p] == 0).sum(-1) == k).all()   # draws drop exactly k
        np.testing.assert_array_equal(m[-1, :, 2:], 0.0)                  # whole-layer reference
    # n = 2 drops the same sets (top and random) in both blocks (published code)
    np.testing.assert_array_equal(masks["blocks.4.attn"], masks["blocks.5.attn"])


def test_rank_by_each_layer_ranks_every_block_by_its_own_mu():
    module, variables = model(VIT)
    plan = au.make_plan(module, ps=(0.2,), ns=(2,), rank_by="each_layer", draws=1)
    assert [s.score_from for s in plan.groups[0].sites] == ["blocks.4.attn.probs", "blocks.5.attn.probs"]
    x = images(module)
    keeps = keeps_for(plan, module, variables, x, jnp.arange(4))
    _, aux = apply(module, variables, x, capture=("blocks.4.attn.probs",))
    mu4 = np.asarray(aux["blocks.4.attn.probs"]).mean(axis=(1, 2))[:, 1:]
    expected = np.ones((4, 64))
    np.put_along_axis(expected, numpy_top(mu4, 13), 0.0, axis=1)
    np.testing.assert_array_equal(keeps["blocks.4.attn"][0], expected)
    assert not np.array_equal(keeps["blocks.4.attn"][0], keeps["blocks.5.attn"][0])
    np.testing.assert_array_equal(keeps["blocks.4.attn"][1], keeps["blocks.5.attn"][1])   # same draw


def test_random_draws_depend_on_the_image_index_not_on_the_batch():
    index = jnp.arange(100, 108)
    whole = random_scores(3, index, 3, 64, (3, 13))
    halves = [random_scores(3, index[i:i + 4], 3, 64, (3, 13)) for i in (0, 4)]
    np.testing.assert_array_equal(whole, np.concatenate(halves, axis=2))
    ranks = np.asarray(au.drop_ranks(jnp.asarray(whole), 13))
    sets = [set(np.flatnonzero(ranks[1, d, 0] < 13)) for d in range(3)]
    assert len({frozenset(s) for s in sets}) == 3                        # the draws are independent
    other = random_scores(4, index, 3, 64, (3, 13))
    assert not np.array_equal(whole, other)                               # and depend on the seed


def test_random_draws_are_uniform_without_replacement():
    units, k, n = 10, 3, 4000
    scores = random_scores(0, np.arange(n), 1, units, (k,))
    dropped = np.asarray(au.drop_ranks(jnp.asarray(scores), k))[0, 0] < k   # (n, U)
    assert (dropped.sum(-1) == k).all()
    freq = dropped.mean(0)
    np.testing.assert_allclose(freq, k / units, atol=0.03)                # each unit equally likely


def test_empty_set_reproduces_the_clean_logits_exactly():
    module, variables = model(VIT)
    x = images(module)
    clean, aux = apply(module, variables, x, capture=("blocks.3",))
    plan = au.make_plan(module, ps=(0.1,), ns=(2,))
    site = plan.groups[0].sites[0]
    keep = (au.drop_ranks(jnp.zeros((4, 64)), 1) >= 0).astype(jnp.float32)   # k = 0: keep all
    mask = au.site_mask(site, keep)
    masks = {s.site: mask for s in plan.groups[0].sites}
    masked = jax.jit(lambda v, x, m: module.apply(v, x, masks=m)[0])
    np.testing.assert_array_equal(masked(variables, x, masks), clean)
    from_stage = apply(module, variables, aux["blocks.3"], masks=masks, start="blocks.4")[0]
    np.testing.assert_array_equal(from_stage, clean)


def test_evaluator_variants_without_drops_give_the_clean_predictions():
    """The whole jitted, vmapped path with k = 0 everywhere (a plan edited past its checks)."""
    module, variables = model(VIT)
    plan = au.make_plan(module, ps=(0.1,), ns=(1, 3), draws=1, whole_layer=False)
    plan = au.Plan(**{**plan.__dict__, "ks": {s: (0,) for s in plan.ks}})
    ev = ablation.Evaluator(module, variables, plan, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    x = images(module)
    clean, groups = jax.jit(ev.forward)(variables, x, jnp.arange(4), ev.key)
    for logits in groups:
        np.testing.assert_allclose(logits, np.broadcast_to(clean, logits.shape), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(np.argmax(logits, -1), np.broadcast_to(np.argmax(clean, -1), (2, 4)))


def test_swin_scores_follow_the_window_partition_back_to_tokens():
    module, variables = model("swin_tiny_patch4_window7_224", img_size=64, window_size=(2, 2, 2, 2),
                              embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 2))
    plan = au.make_plan(module, ps=(0.25,), ns=(1, 3), draws=1)
    sites = {s.site: s for s in plan.groups[-1].sites}
    shifted = "layers.2.blocks.1.attn"                                    # 4x4 map, 2x2 windows, shift 1
    assert list(sites) == [shifted, "layers.3.blocks.0.attn", "layers.3.blocks.1.attn"]
    assert sites[shifted].units == 16 and sites["layers.3.blocks.1.attn"].units == 4
    x = images(module)
    _, aux = apply(module, variables, x, capture=plan.captures)
    probs = np.asarray(aux[f"{shifted}.probs"])                           # (B, nW, heads, T, T)
    cols = probs.mean(axis=(2, 3))                                        # (B, nW, T)
    # numpy window geometry: roll the raster index by -shift, then partition into 2x2 windows
    idx = np.roll(np.arange(16).reshape(4, 4), (-1, -1), axis=(0, 1))
    idx = idx.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
    mu = np.zeros((4, 16))
    mu[:, idx.reshape(-1)] = cols.reshape(4, -1)
    np.testing.assert_allclose(au.unit_scores(sites[shifted], aux[f"{shifted}.probs"]), mu, rtol=1e-6)
    keeps = keeps_for(plan, module, variables, x, jnp.arange(4))
    expected = np.ones((4, 16))
    np.put_along_axis(expected, numpy_top(mu, 4), 0.0, axis=1)
    np.testing.assert_array_equal(keeps[shifted][0], expected)


@pytest.mark.parametrize("unit", ["channel", "spatial"])
def test_cnn_units_are_ranked_by_l1_of_the_post_relu_map(unit):
    module, variables = model("vgg_pico")
    plan = au.make_plan(module, ps=(0.2,), ns=(1, 2), cnn_unit=unit, draws=1)
    site = plan.groups[-1].sites[0]                                       # features.7
    assert site.site == "features.7" and plan.rank_by == "each_layer"
    x = images(module)
    _, aux = apply(module, variables, x, capture=plan.captures)
    act = np.asarray(aux[site.site])                                      # (B, H, W, C)
    scores = np.abs(act).sum(axis=(1, 2)) if unit == "channel" else np.abs(act).sum(-1).reshape(4, -1)
    assert site.units == scores.shape[1]
    keeps = keeps_for(plan, module, variables, x, jnp.arange(4))
    expected = np.ones_like(scores)
    np.put_along_axis(expected, numpy_top(scores, plan.ks[site.site][0]), 0.0, axis=1)
    np.testing.assert_array_equal(keeps[site.site][0], expected)
    mask = np.asarray(au.site_mask(site, jnp.asarray(keeps[site.site])))
    assert mask.shape == ((3, 4, 1, 1, 64) if unit == "channel" else (3, 4, 8, 8, 1))


def test_resnet_basic_blocks_ablate_act1_and_act2_in_forward_order():
    module, _ = model("resnet_pico")
    plan = au.make_plan(module, ps=(0.1,), ns=(1, 2, 3))
    assert [s.site for s in plan.groups[-1].sites] == ["layer3.0.act2", "layer4.0.act1", "layer4.0.act2"]
    assert [(g.start, g.start_input) for g in plan.groups] == [
        ("layer4.0", "layer3.0"), ("layer4.0", "layer3.0"), ("layer3.0", "layer2.0")]


@pytest.mark.parametrize("kwargs, message", [
    (dict(ps=(0.0,)), "p must lie in"),
    (dict(ps=(1.0,)), "p must lie in"),
    (dict(ps=(0.001,)), "too small"),
    (dict(ns=(7,)), "n must be between 1 and"),
    (dict(ns=(0,)), "n must be between 1 and"),
    (dict(rank_by="first_layer"), "rank_by"),
    (dict(cnn_unit="pixel"), "cnn_unit"),
    (dict(draws=0), "draws"),
])
def test_bad_grids_are_rejected_before_compute(kwargs, message):
    module, _ = model(VIT)
    args = dict(ps=PS, ns=(1, 2, 3)) | kwargs
    with pytest.raises(ValueError, match=message):
        au.make_plan(module, **args)


def test_a_headless_model_is_rejected():
    module, _ = model(VIT, num_classes=0)
    with pytest.raises(ValueError, match="no classifier head"):
        au.make_plan(module, ps=PS, ns=(1,))


def test_variants_in_chunks_give_the_same_logits_as_one_vmap():
    module, variables = model(VIT)
    plan = au.make_plan(module, ps=(0.1, 0.3), ns=(2,), draws=1)           # 5 variants: chunks of 2, 2, 1
    x = images(module)
    outs = []
    for variant_batch in (0, 2):
        ev = ablation.Evaluator(module, variables, plan, {}, variant_batch=variant_batch)
        outs.append(np.asarray(jax.jit(ev.forward)(variables, x, jnp.arange(4), ev.key)[1][0]))
    assert outs[0].shape == (5, 4, 10)
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)
