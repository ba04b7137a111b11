"""Every sparsity statistic against a direct NumPy computation on small random tensors."""
import jax
import numpy as np
import pytest

from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.runtime.ordered import OrderedSums


def add_up(values: dict, valid: np.ndarray, lay=None, batch: int | None = None, bins=None) -> dict:
    """The totals of per-image values (images 0..n-1 on the leading axis) as the experiment adds them (ordered
    sums, `st.totals_for` when a layout is given), in batches of `batch` (default: one batch)."""
    n = len(valid)
    sums = st.totals_for(values, n, lay) if lay is not None else OrderedSums.like(values, n, block=4, bins=bins or {})
    state, batch = sums.init(), batch or n
    for s in range(0, n, batch):
        sums.add(state, {k: v[s:s + batch] for k, v in values.items()}, valid[s:s + batch], np.arange(s, min(n, s + batch)))
    return sums.result(state)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_maps(rng, images=5, heads=3, tokens=10, scale=3.0, noise=1.0) -> np.ndarray:
    """Post-softmax maps (B, H, N, N) with a few bright columns, float32 (small scale and noise: nearly
    uniform maps, like an untrained model's)."""
    bright = rng.normal(size=(images, 1, 1, tokens)) * scale
    return softmax(noise * rng.normal(size=(images, heads, tokens, tokens)) + bright).astype(np.float32)


def test_column_means_average_heads_and_all_query_rows(rng):
    probs = random_maps(rng)
    mu, mu_h = st.attention_column_means(probs)
    np.testing.assert_allclose(mu_h, probs.mean(axis=2), rtol=1e-6)
    np.testing.assert_allclose(mu, probs.sum(axis=(1, 2)) / (probs.shape[1] * probs.shape[2]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mu).sum(-1), 1.0, rtol=1e-5)   # sum_j mu_j = 1


def test_window_column_means_map_window_columns_back_to_tokens(rng):
    b, nw, heads, t = 2, 4, 3, 5
    probs = softmax(rng.normal(size=(b, nw, heads, t, t))).astype(np.float32)
    token_index = rng.permutation(nw * t).reshape(nw, t)
    mu, mu_h = st.window_column_means(probs, token_index)
    want_h = np.zeros((b, heads, nw * t))
    for w in range(nw):
        for col in range(t):
            want_h[:, :, token_index[w, col]] = probs[:, w, :, :, col].mean(axis=-1)
    np.testing.assert_allclose(mu_h, want_h, rtol=1e-5)
    np.testing.assert_allclose(mu, want_h.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mu).sum(-1), nw, rtol=1e-5)    # each window's columns sum to 1


def test_window_column_means_on_a_shifted_swin_block(rng):
    swin = pytest.importorskip("vitsparse_jax.models.swin")
    module = swin.build("swin_tiny_patch4_window7_224", img_size=32, depths=(2,), num_heads=(2,),
                        window_size=(4,), embed_dim=8)
    index = swin.window_token_index(module, 0, 1)    # a shifted block: windows straddle the roll
    assert sorted(index.reshape(-1)) == list(range(64))
    probs = softmax(rng.normal(size=(1, *index.shape, index.shape[1]))[:, :, None]).astype(np.float32)
    mu, _ = st.window_column_means(probs, index)
    for w, cols in enumerate(index):
        np.testing.assert_allclose(np.asarray(mu)[0, cols], probs[0, w, 0].mean(axis=0), rtol=1e-5)


def test_histogram_matches_numpy_and_counts_out_of_range(rng):
    values = rng.uniform(-1, 5, size=(6, 40)).astype(np.float32)
    weights = np.array([1, 1, 0, 1, 1, 1], np.float32)   # image 2 is padding
    counts = add_up({"h": st.bin_index(values, 0.0, 4.0, 16)}, weights > 0, bins={"h": 18})["h"]
    np.testing.assert_array_equal(st.histogram(values, 0.0, 4.0, 16)[weights > 0].sum(axis=0), counts)
    kept = values[weights > 0]
    inner, _ = np.histogram(kept, bins=16, range=(0.0, 4.0))
    inner[-1] -= np.sum(kept == 4.0)                     # numpy's last bin is closed; ours is [lo, hi)
    np.testing.assert_array_equal(counts[1:-1], inner)
    assert counts[0] == np.sum(kept < 0) and counts[-1] == np.sum(kept >= 4.0)
    assert counts.sum() == kept.size


def test_density_integrates_to_the_in_range_fraction():
    counts = np.array([1, 2, 3, 4, 0])                   # 1 below, 7 inside, 0 above
    dens = st.density(counts, 0.0, 3.0)
    np.testing.assert_allclose(dens, np.array([2, 3, 4]) / 10.0)
    np.testing.assert_allclose(dens.sum() * 1.0, 0.9)


def test_nu_moments_skip_zero_mu(rng):
    mu = rng.uniform(0, 0.1, size=(4, 9)).astype(np.float32)
    mu[1, 3] = 0.0
    weights = np.array([1, 1, 1, 0], np.float32)
    values = {f"nu_{k}": v for k, v in st.nu_moments(mu.astype(np.float64)).items()}
    m = {k.removeprefix("nu_"): v for k, v in add_up(values, weights > 0).items()}
    kept = mu[:3][mu[:3] > 0].astype(np.float64)
    nu = -np.log10(kept)
    assert float(m["n"]) == kept.size and float(m["zeros"]) == 1
    np.testing.assert_allclose(float(m["mean"][0]), nu.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["cm"][0, 0]), ((nu - nu.mean()) ** 2).sum(), rtol=1e-4)
    assert float(st.nu_of(np.float32(0.0))) == pytest.approx(-np.log10(st.TINY))


def moments_in_batches(x: np.ndarray, weights: np.ndarray, batch: int) -> dict:
    values = {f"m_{k}": v for k, v in st.image_moments(x).items()}
    return add_up(values, weights > 0, batch=batch)


@pytest.mark.parametrize("spread", [1.0, 1e-4])   # 1e-4: nearly uniform attention (an untrained model)
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_pooled_pearson_equals_corrcoef_on_stacked_values(rng, spread, batch):
    x = (1 / 50 + spread / 50 * rng.normal(size=(7, 50, 4))).astype(np.float32)
    x[..., 1] += 0.5 * x[..., 0] + 3 / 50 * rng.integers(0, 2, size=(7, 1))   # means differ between batches
    weights = np.array([1, 1, 1, 1, 1, 0, 1], np.float32)
    acc = moments_in_batches(x, weights, batch)
    r = st.pearson(acc["m_n"], acc["m_cm"])
    stacked = x[weights > 0].reshape(-1, 4).astype(np.float64)   # all (image, unit) rows pooled
    assert acc["m_n"] == stacked.shape[0]
    np.testing.assert_allclose(acc["m_mean"], stacked.mean(0), rtol=1e-6)
    np.testing.assert_allclose(r, np.corrcoef(stacked.T), atol=1e-5)


def test_pearson_of_a_constant_variable_is_nan():
    x = np.ones((2, 5, 2), np.float32)
    x[..., 1] = np.arange(5)
    values = {f"m_{k}": v for k, v in st.image_moments(x).items()}
    sums = add_up(values, np.ones(2, bool))
    r = st.pearson(sums["m_n"], sums["m_cm"])
    assert np.isnan(r[0, 0]) and np.isnan(r[0, 1]) and r[1, 1] == 1.0


def test_top_k_indicator_matches_argsort(rng):
    scores = rng.normal(size=(8, 20)).astype(np.float32)
    weights = np.array([1] * 6 + [0] * 2, np.float32)
    counts = st.top_k_indicator(scores, 3)[weights > 0].sum(axis=0)
    want = np.zeros(20, int)
    for row in scores[:6]:
        want[np.argsort(-row, kind="stable")[:3]] += 1
    np.testing.assert_array_equal(counts, want)


def test_top_shares_match_numpy(rng):
    scores = rng.exponential(size=(5, 30)).astype(np.float32)
    scores[2] = 0.0                                   # a dead layer: no share, not counted
    weights = np.array([1, 1, 1, 1, 0], np.float32)
    share, ok = st.top_shares(scores.astype(np.float64), (1, 3, 30))
    sums, n_ok = share[weights > 0].sum(axis=0), ok[weights > 0].sum()
    ordered = -np.sort(-scores[[0, 1, 3]].astype(np.float64), axis=-1)
    want = np.stack([ordered[:, :k].sum(-1) / ordered.sum(-1) for k in (1, 3, 30)], -1).sum(0)
    np.testing.assert_allclose(sums, want, rtol=1e-5)
    assert float(n_ok) == 3


def test_num_top_rounds_like_the_spec_and_the_ablation():
    assert [st.num_top(p, 196) for p in (0.05, 0.10, 0.20, 0.30)] == [10, 20, 39, 59]
    assert [st.num_top(p, 49) for p in (0.05, 0.10, 0.20, 0.30)] == [2, 5, 10, 15]
    assert st.num_top(0.1, 25) == 2 == round(2.5)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        st.num_top(0.0, 10)
    with pytest.raises(ValueError, match="= 0 units"):
        st.num_top(0.05, 4)


def test_region_matrix_sum_pools_the_fine_grid(rng):
    fine = rng.normal(size=(3, 8 * 8))
    pooled = fine @ st.region_matrix((8, 8), (2, 2))
    want = fine.reshape(3, 2, 4, 2, 4).sum(axis=(2, 4)).reshape(3, 4)
    np.testing.assert_allclose(pooled, want)
    np.testing.assert_array_equal(st.region_matrix((3, 3), (3, 3)), np.eye(9))


def test_channel_l1_and_shares(rng):
    act = np.maximum(rng.normal(size=(2, 4, 4, 6)), 0).astype(np.float32)
    score = np.asarray(st.channel_l1(act))
    np.testing.assert_allclose(score, np.abs(act).sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(st.shares(score.astype(np.float64)).sum(-1), 1.0, rtol=1e-6)
    assert np.all(st.shares(np.zeros((1, 3))) == 0)


# ---------------------------------------------------------------------------------------------------------
# Whole-model statistics against NumPy, and their independence of the batch split

def vit_layout(**kw) -> st.AttentionLayout:
    base = dict(grids=((3, 3),) * 3, prefix=1, heads=2, corr_grid=(3, 3),
                nu_range=(0.0, 4.0, 20), top_k=2, top_head=None, top_fractions=(0.2, 0.5))
    base.update(kw)
    return st.AttentionLayout(**base)


def attention_totals(maps: list[np.ndarray], lay: st.AttentionLayout, batch: int) -> dict:
    """Device column means of the images in batches of `batch` (last one padded), host statistics per image,
    added up as the experiment does."""
    fn = jax.jit(lambda m: [st.attention_column_means_split(x) for x in m])
    images = maps[0].shape[0]
    sums, state = None, None
    for start in range(0, images, batch):
        part = [m[start:start + batch] for m in maps]
        n = part[0].shape[0]
        pad = [np.concatenate([x, np.repeat(x[:1], batch - n, axis=0)]) for x in part]   # junk padding
        means = jax.device_get(fn(pad))
        values = st.attention_image_values([st.hi_lo(mu) for mu, _ in means], st.hi_lo(means[-1][1]), lay)
        if sums is None:
            sums = st.totals_for(values, images, lay)
            state = sums.init()
        index = np.where(np.arange(batch) < n, start + np.arange(batch), -1)       # padding rows: index -1
        sums.add(state, values, np.arange(batch) < n, index)
    return sums.result(state)


@pytest.mark.parametrize("noise", [1.0, 1e-3])
def test_attention_statistics_match_numpy(rng, noise):
    lay = vit_layout()
    maps = [random_maps(rng, images=7, heads=2, tokens=10, scale=s * noise, noise=noise) for s in (0.5, 2.0, 4.0)]
    res = st.attention_results(attention_totals(maps, lay, batch=3), lay)

    mu = np.stack([m.astype(np.float64).mean(axis=(1, 2)) for m in maps], 1)     # (images, blocks, N)
    patch = mu[:, :, 1:]
    np.testing.assert_allclose(res["mean_mu"], patch.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(res["mean_prefix_mu"], mu[:, :, 0].mean(0), rtol=1e-5)
    np.testing.assert_allclose(res["nu_reference"], -np.log10(patch.mean(axis=(0, 2))), rtol=1e-5)
    nu = -np.log10(patch)
    np.testing.assert_allclose(res["mean_nu"], nu.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(res["std_nu"], nu.std(axis=(0, 2)), rtol=1e-3)
    for l in range(3):
        inner, _ = np.histogram(nu[:, l], bins=20, range=(0.0, 4.0))
        np.testing.assert_array_equal(res["nu_hist"][l, 1:-1], inner)
    # layer-by-layer: one Pearson r over all (image, patch column) pairs
    np.testing.assert_allclose(res["corr_layers"], np.corrcoef(patch.transpose(1, 0, 2).reshape(3, -1)), atol=1e-5)
    mu_h = maps[-1].astype(np.float64).mean(axis=2)[:, :, 1:]                   # (images, heads, patches)
    np.testing.assert_allclose(res["corr_heads"], np.corrcoef(mu_h.transpose(1, 0, 2).reshape(2, -1)), atol=1e-5)
    counts = np.zeros(9)
    for row in patch[:, -1]:
        counts[np.argsort(-row, kind="stable")[:2]] += 1
    np.testing.assert_array_equal(res["top_counts"], counts)
    np.testing.assert_allclose(res["top_distribution"], (counts / counts.sum()).reshape(3, 3))
    ordered = -np.sort(-patch, axis=-1)
    share = np.stack([ordered[..., :k].sum(-1) / ordered.sum(-1) for k in (2, 4)], -1).mean(0)
    np.testing.assert_allclose(res["top_share"], share, rtol=1e-5)   # k = round(1.8), round(4.5) = 2, 4


def test_top_distribution_can_rank_one_head_like_the_published_code(rng):
    lay = vit_layout(top_head=1)
    maps = [random_maps(rng, images=6, heads=2, tokens=10) for _ in range(3)]
    res = st.attention_results(attention_totals(maps, lay, batch=4), lay)
    head1 = maps[-1].astype(np.float64).mean(axis=2)[:, 1, 1:]
    counts = np.zeros(9)
    for row in head1:
        counts[np.argsort(-row, kind="stable")[:2]] += 1
    np.testing.assert_array_equal(res["top_counts"], counts)


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_attention_statistics_do_not_depend_on_batch_size(rng, batch):
    lay = vit_layout()
    maps = [random_maps(np.random.default_rng(1), images=8, heads=2, tokens=10, scale=s) for s in (1, 2, 3)]
    ref = st.attention_results(attention_totals(maps, lay, batch=8), lay)
    got = st.attention_results(attention_totals(maps, lay, batch=batch), lay)
    for key in ("nu_hist", "top_counts", "images", "mean_mu", "mean_nu", "std_nu", "corr_layers", "corr_heads",
                "top_share"):   # ordered sums over blocks aligned to the image index: equal to the last bit
        np.testing.assert_array_equal(got[key], ref[key])


def test_layer_correlation_pools_finer_grids_onto_the_coarsest(rng):
    """Swin-like blocks on a 4x4 and a 2x2 grid: the 4x4 block's mu is summed onto 2x2 cells first."""
    lay = vit_layout(grids=((4, 4), (2, 2)), prefix=0, corr_grid=(2, 2),
                     top_fractions=(0.25,))
    fine = rng.dirichlet(np.ones(16), size=6).astype(np.float32)
    coarse = rng.dirichlet(np.ones(4), size=6).astype(np.float32)
    heads = np.stack([coarse, coarse ** 2], axis=1)
    values = st.attention_image_values([fine.astype(np.float64), coarse.astype(np.float64)], heads.astype(np.float64), lay)
    sums = add_up(values, np.ones(6, bool), lay)
    r = st.pearson(sums["layers_n"], sums["layers_cm"])
    pooled = fine.astype(np.float64).reshape(6, 2, 2, 2, 2).sum(axis=(2, 4)).reshape(-1)
    np.testing.assert_allclose(r[0, 1], np.corrcoef(pooled, coarse.reshape(-1))[0, 1], atol=1e-5)


def test_channel_statistics_match_numpy(rng):
    acts = [np.maximum(rng.normal(size=(5, 4, 4, c)), 0).astype(np.float32) for c in (8, 20)]
    acts[0][1, :, :, 3] = 0.0                         # one silent channel
    lay = st.ChannelLayout(channels=(8, 20), nu_range=(0.0, 4.0, 16), top_fractions=(0.1, 0.5))
    w = np.array([1, 1, 1, 1, 0], np.float32)
    scores, active = jax.device_get(([st.channel_l1(a) for a in acts], np.stack([st.active_fraction(a) for a in acts], 1)))
    values = st.channel_image_values(scores, active, lay)
    res = st.channel_results(add_up(values, w > 0, lay), lay)
    assert res["images"] == 4
    for l, act in enumerate(acts):
        a = act[:4].astype(np.float64)
        score = a.sum(axis=(1, 2))
        share = score / score.sum(-1, keepdims=True)
        np.testing.assert_allclose(res["mean_l1"][l], score.mean(), rtol=1e-5)
        np.testing.assert_allclose(res["active_fraction"][l], (a > 0).mean(), rtol=1e-5)
        pos = share[share > 0]
        np.testing.assert_allclose(res["mean_nu"][l], (-np.log10(pos)).mean(), rtol=1e-5)
        assert res["zero_channels"][l] == pytest.approx((share == 0).mean())
        ordered = -np.sort(-score, axis=-1)
        ks = [round(p * act.shape[-1]) for p in (0.1, 0.5)]
        want = [(ordered[:, :k].sum(-1) / ordered.sum(-1)).mean() for k in ks]
        np.testing.assert_allclose(res["top_share"][l], want, rtol=1e-5)
        nu = -np.log10(np.maximum(share, st.TINY))
        inner, _ = np.histogram(nu, bins=16, range=(0.0, 4.0))
        np.testing.assert_array_equal(res["nu_hist"][l, 1:-1], inner)
        assert res["nu_hist"][l, -1] == np.sum(nu >= 4.0)


# ---------------------------------------------------------------------------------------------------------
# docs/science.md#high-norm-tokens: sparse columns against high-norm tokens

def test_average_ranks_match_scipy(rng):
    scipy_stats = pytest.importorskip("scipy.stats")
    x = rng.integers(0, 5, size=(3, 12)).astype(np.float64)     # many ties
    np.testing.assert_array_equal(st.average_ranks(x), np.stack([scipy_stats.rankdata(r) for r in x]))


def test_norm_statistics_match_numpy(rng):
    scipy_stats = pytest.importorskip("scipy.stats")
    images, blocks, prefix, patches = 6, 3, 2, 20
    lay = vit_layout(grids=((4, 5),) * blocks, prefix=prefix, prefix_kinds=("cls", "reg"), norm_factor=2.0)
    mus = [rng.dirichlet(np.ones(prefix + patches) * 0.5, size=images) for _ in range(blocks)]
    norms = rng.uniform(1.0, 1.5, size=(images, blocks + 1, prefix + patches))
    artifacts = rng.integers(prefix, prefix + patches, size=(images, 3))
    for b in range(images):
        norms[b, 1:, artifacts[b]] *= 5.0                                     # high-norm tokens after block 0
    norms[0, :, :] = 1.0                                                      # a constant image: no Spearman r
    values = st.norm_image_values(mus, norms, lay)
    res = st.norm_results(add_up({**values, "images": np.ones(images, np.int64)}, np.ones(images, bool)), lay)

    patch_norms = norms[:, :, prefix:]
    high = patch_norms > 2.0 * np.median(patch_norms, axis=-1, keepdims=True)
    np.testing.assert_allclose(res["high_norm_share_output"], high.mean(axis=(0, 2))[1:])
    k = round(0.05 * patches)
    for l in range(blocks):
        overlap, rhos = [], []
        for b in range(images):
            top = np.argsort(-mus[l][b, prefix:], kind="stable")[:k]
            overlap.append(high[b, l, top].mean())
            if b > 0:
                rhos.append(scipy_stats.spearmanr(mus[l][b, prefix:], patch_norms[b, l]).statistic)
        np.testing.assert_allclose(res["top5_overlap_high_norm_input"][l], np.mean(overlap))
        np.testing.assert_allclose(res["spearman_mu_input_norm"][l], np.mean(rhos))
        assert res["spearman_images"][l] == images - 1
    np.testing.assert_allclose(res["high_norm_share_input"], high.mean(axis=(0, 2))[:-1])   # the overlap's chance
    np.testing.assert_allclose(res["prefix_norm"], norms[:, :, :prefix].mean(axis=0))


def test_prefix_mass_is_reported_per_kind(rng):
    lay = vit_layout(grids=((3, 3),) * 2, prefix=4, prefix_kinds=("cls", "reg", "reg", "reg"))
    mus = [rng.dirichlet(np.ones(13), size=5) for _ in range(2)]
    heads = np.stack([mus[-1], mus[-1]], axis=1)
    values = st.attention_image_values(mus, heads, lay)
    res = st.attention_results(add_up(values, np.ones(5, bool), lay), lay)
    for l in range(2):
        np.testing.assert_allclose(res["prefix_mu_by_kind"]["cls"][l], mus[l][:, 0].mean())
        np.testing.assert_allclose(res["prefix_mu_by_kind"]["reg"][l], mus[l][:, 1:4].sum(axis=1).mean())
        np.testing.assert_allclose(res["mean_prefix_mu"][l] + res["mean_mu"][l] * 9, 1.0)   # mu sums to 1


# ---------------------------------------------------------------------------------------------------------
# The vectorised host path against the per-image path it replaced (tests/host_reference.py)

def _with_ties(rng, mu: np.ndarray, prefix: int) -> np.ndarray:
    """mu (B, N) with the cases a vectorised ranking can get wrong: a tie at the top-k boundary, zeros (left out
    of nu), a value below TINY (floored in the histogram) and a row that is all ties."""
    mu = mu.copy()
    mu[0, prefix:prefix + 3] = mu[0, prefix:].max()          # three columns tied for the top
    mu[1, prefix + 1] = 0.0
    mu[1, prefix + 2] = st.TINY / 4
    mu[2, prefix:] = mu[2, prefix:].mean()                   # a constant row: Spearman r undefined
    return mu


def _compare_totals(new: dict, old: dict) -> None:
    """Counts equal; floats within 1e-12 of the largest magnitude of the same total (sums of signed values
    such as co-moments and Spearman r can be near 0, where a relative error says nothing)."""
    assert new.keys() == old.keys()
    for key, want in old.items():
        got = np.asarray(new[key]).reshape(np.shape(want))
        if np.issubdtype(np.asarray(want).dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            scale = np.max(np.abs(want)) if np.size(want) else 0.0
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale, err_msg=key)


def _old_totals(values: list[dict], valid: list[np.ndarray]) -> dict:
    from tests import host_reference as ref

    acc = ref.empty_totals(values[0])
    for v, ok in zip(values, valid):
        acc = ref.accumulate(acc, v, ok)
    return acc


def _new_totals(values: list[dict], valid: list[np.ndarray], lay) -> dict:
    sums = st.totals_for(values[0], sum(len(ok) for ok in valid), lay)
    state, start = sums.init(), 0
    for v, ok in zip(values, valid):
        sums.add(state, v, ok, np.arange(start, start + len(ok)))
        start += len(ok)
    return sums.result(state)


@pytest.mark.parametrize("top_head", [None, 1])
def test_vit_statistics_with_token_norms_match_the_per_image_path(rng, top_head):
    """ViT-like blocks with token norms: every total within 1e-12 of the image-by-image path (ties, zeros, a
    constant row, an unreadable image)."""
    from tests import host_reference as ref

    blocks, prefix, grid = 3, 2, (4, 5)
    lay = vit_layout(grids=(grid,) * blocks, prefix=prefix, heads=3, corr_grid=grid, prefix_kinds=("cls", "reg"),
                     norm_factor=2.0, top_k=3, top_head=top_head, nu_range=(0.0, 4.0, 40))
    n = prefix + grid[0] * grid[1]
    new_values, old_values, valid = [], [], []
    for b in (5, 4):   # two batches
        mus = [_with_ties(rng, rng.dirichlet(np.ones(n) * 0.4, size=b), prefix) for _ in range(blocks)]
        heads = np.stack([rng.dirichlet(np.ones(n), size=b) for _ in range(3)], axis=1)
        norms = rng.uniform(1.0, 2.0, size=(b, blocks + 1, n)).astype(np.float32).astype(np.float64)
        norms[0, 1, prefix + 4] = norms[0, 1, prefix + 5]        # tied norms
        norms[1, :, prefix + 3] *= 6.0                           # a high-norm token
        new_values.append(st.attention_image_values(mus, heads, lay, norms))
        old_values.append({**ref.attention_image_values(mus, heads, lay), **ref.norm_image_values(mus, norms, lay)})
        valid.append(np.arange(b) != 3)
    _compare_totals(_new_totals(new_values, valid, lay), _old_totals(old_values, valid))


def test_swin_like_blocks_of_several_sizes_match_the_per_image_path(rng):
    """Blocks on 4x4, 4x4 and 2x2 grids (two groups, pooled onto 2x2 for the layer correlation)."""
    from tests import host_reference as ref

    lay = vit_layout(grids=((4, 4), (4, 4), (2, 2)), prefix=0, heads=2, corr_grid=(2, 2), top_k=1,
                     top_fractions=(0.25, 0.5))
    mus = [_with_ties(rng, rng.dirichlet(np.ones(g), size=6) * 4, 0) for g in (16, 16, 4)]
    heads = np.stack([rng.dirichlet(np.ones(4), size=6) for _ in range(2)], axis=1)
    valid = [np.ones(6, bool)]
    _compare_totals(_new_totals([st.attention_image_values(mus, heads, lay)], valid, lay),
                    _old_totals([ref.attention_image_values(mus, heads, lay)], valid))


def test_channel_statistics_match_the_per_image_path(rng):
    from tests import host_reference as ref

    lay = st.ChannelLayout(channels=(8, 20, 8), nu_range=(0.0, 4.0, 16), top_fractions=(0.1, 0.5))
    scores = [rng.exponential(size=(5, c)) * (rng.random((5, c)) > 0.3) for c in lay.channels]
    scores[0][2] = 0.0                                            # a dead layer in one image
    scores[1][0, :3] = scores[1][0].max()                         # tied top channels
    active = rng.random((5, 3))
    valid = [np.array([1, 1, 1, 0, 1], bool)]
    _compare_totals(_new_totals([st.channel_image_values(scores, active, lay)], valid, lay),
                    _old_totals([ref.channel_image_values(scores, active, lay)], valid))


def test_an_images_values_do_not_depend_on_the_batch_it_is_in(rng):
    """The per-image values of an image are the same bits whether it comes with 6 other images or 2 (the
    batched matrix products and sorts work image by image)."""
    lay = vit_layout(grids=((4, 5),) * 2, prefix=1, heads=2, corr_grid=(4, 5), norm_factor=2.0, top_k=2)
    mus = [rng.dirichlet(np.ones(21), size=7) for _ in range(2)]
    heads = np.stack([rng.dirichlet(np.ones(21), size=7) for _ in range(2)], axis=1)
    norms = rng.uniform(1, 2, size=(7, 3, 21))
    whole = st.attention_image_values(mus, heads, lay, norms)
    part = st.attention_image_values([m[4:] for m in mus], heads[4:], lay, norms[4:])
    for key, value in whole.items():
        assert value[4:].tobytes() == part[key].tobytes(), key


def test_top_k_ties_go_to_the_lower_index():
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 4.0, 4.0, 0.0]])
    want = np.zeros(scores.shape, np.int64)
    for row, s in enumerate(scores):
        want[row, np.argsort(-s, kind="stable")[:2]] = 1
    np.testing.assert_array_equal(st.top_k_indicator(scores, 2), want)
    np.testing.assert_array_equal(st.top_k_indicator(scores, 2), [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0]])


def test_median_of_sorted_rows_equals_numpy_median(rng):
    for u in (5, 6):
        x = rng.normal(size=(4, u))
        x[1, 2] = np.nan
        np.testing.assert_array_equal(st.Ranked.of(x).median(), np.median(x, axis=-1))


def test_per_image_top_columns_are_ranked_by_mu_with_ties_to_the_lower_index(rng):
    """Probe.image_rows (sparsity.per_image): the top-k columns of the last block, best first, as a stable
    argsort of -mu ranks them."""
    from vitsparse_jax.experiments.sparsity.probe import Probe

    lay = vit_layout(prefix=1, top_k=3)
    mu = rng.dirichlet(np.ones(10), size=4).astype(np.float32)
    mu[0, 2:6] = mu[0].max()                                       # four tied columns for three places
    mu[1, 1:] = 0.1
    reduced = {"mu": [(mu, np.zeros_like(mu))] * 3, "last_mu_h": (np.stack([mu, mu], 1), np.zeros((4, 2, 10), np.float32))}
    rows = Probe("attention", ("b0", "b1", "b2"), (), lay, (None,) * 3).image_rows(reduced)
    want = np.argsort(-mu[:, 1:].astype(np.float64), axis=-1, kind="stable")[:, :3] + 1
    np.testing.assert_array_equal(rows["top_columns"], want)


def test_long_blocks_give_the_same_statistics_when_partitioned_instead_of_sorted(rng):
    """Swin's first stages have thousands of tokens; without token norms their columns are only partitioned
    (st.PARTITION_ABOVE): the top shares and top-k counts still match the per-image path."""
    from tests import host_reference as ref

    big = (33, 33)   # 1089 tokens > PARTITION_ABOVE
    assert big[0] * big[1] > st.PARTITION_ABOVE
    lay = vit_layout(grids=(big, big, (3, 11)), prefix=0, heads=2, corr_grid=(3, 11), top_k=3,
                     top_fractions=(0.05, 0.3))
    mus = [rng.dirichlet(np.ones(g[0] * g[1]) * 0.3, size=3) * 20 for g in lay.grids]
    mus[0][1, :] = mus[0][1].mean()                              # all tied
    heads = np.stack([rng.dirichlet(np.ones(33), size=3) for _ in range(2)], axis=1)
    valid = [np.ones(3, bool)]
    _compare_totals(_new_totals([st.attention_image_values(mus, heads, lay)], valid, lay),
                    _old_totals([ref.attention_image_values(mus, heads, lay)], valid))


def test_a_large_batch_gives_each_image_the_values_it_has_in_a_small_one(rng):
    """Probe.host_values computes a batch larger than HOST_CHUNK in parts: the same bits as small batches."""
    from vitsparse_jax.experiments.sparsity.probe import HOST_CHUNK, Probe

    images = HOST_CHUNK + 45
    lay = vit_layout(grids=((4, 5),) * 2, prefix=1, heads=2, corr_grid=(4, 5), norm_factor=2.0, top_k=2)
    mus = [rng.dirichlet(np.ones(21), size=images).astype(np.float32) for _ in range(2)]
    reduced = {"mu": [(m, np.zeros_like(m)) for m in mus],
               "last_mu_h": (np.stack([mus[-1]] * 2, 1), np.zeros((images, 2, 21), np.float32)),
               "norms": rng.uniform(1, 2, size=(images, 3, 21)).astype(np.float32)}
    probe = Probe("attention", ("b0", "b1"), (), lay, (None, None), ("embed", "b0", "b1"))
    whole = probe.host_values(reduced)
    for part in (slice(0, 7), slice(HOST_CHUNK + 20, images)):   # in the first chunk, across the last two
        small = probe.host_values(jax.tree.map(lambda x, part=part: np.asarray(x)[part], reduced))
        for key, value in whole.items():
            assert value[part].tobytes() == small[key].tobytes(), key


def test_float32_norms_and_split_columns_give_the_same_bits_as_the_general_path(rng):
    """The ViT fast paths (float32 token norms ranked along with mu's places, Spearman r without ranks put back,
    mu given as `SplitMu`) against the general path (float64 norms of the same values, stacked mu): the same
    bits, with ties, NaNs, negative zeros and ties at the top-k boundary; the top-k overlap gathered from the
    sort against the top-k mask."""
    blocks, prefix, n, b = 3, 1, 1 + 40, 9
    lay = vit_layout(grids=((5, 8),) * blocks, prefix=prefix, heads=2, corr_grid=(5, 8), norm_factor=1.2, top_k=3)
    mus = np.stack([_with_ties(rng, rng.dirichlet(np.ones(n) * 0.4, size=b), prefix) for _ in range(blocks)], axis=1)
    mus[3, 1, prefix:prefix + 4] = np.sort(mus[3, 1, prefix:])[-2]     # ties across the k-th largest (k = 2)
    mus[4, 0, prefix + 5] = np.nan
    heads = np.stack([rng.dirichlet(np.ones(n), size=b) for _ in range(2)], axis=1)
    norms = rng.uniform(1.0, 2.0, size=(b, blocks + 1, n)).astype(np.float32)
    norms[0, 1, prefix + 4:prefix + 9] = norms[0, 1, prefix + 2]        # tied norms
    norms[1, 0, prefix + 3] = np.nan
    norms[2, 2, prefix:] = 1.5                                          # a constant row
    norms[5] -= 1.5                                                     # negative values and zeros
    norms[5, 0, prefix:prefix + 2] = (-0.0, 0.0)
    fast = st.attention_image_values(st.SplitMu(mus[..., :prefix].copy(), mus[..., prefix:].copy()), heads, lay, norms)
    general = st.attention_image_values(mus, heads, lay, norms.astype(np.float64))
    assert fast.keys() == general.keys()
    for key, value in general.items():
        assert fast[key].dtype == value.dtype and fast[key].tobytes() == value.tobytes(), key
    patch = np.ascontiguousarray(mus[..., prefix:])
    top, mask = st.top_mask_of_sorted(patch, np.sort(patch, axis=-1), 2), rng.random(patch.shape) > 0.5
    inside, count = st._top_in(patch, st.Ranked.of(patch), 2, mask)
    np.testing.assert_array_equal(inside, np.count_nonzero(top & mask, axis=-1))
    np.testing.assert_array_equal(count, np.count_nonzero(top, axis=-1))
