"""Mean attention distance, prefix mass and entropy (vitsparse_jax.measures.attention_distance) against an
independent numpy computation on captured maps of tiny models with peaked attention (a ViT with a class token,
a distilled DeiT, a register model, a Swin with shifted windows), on hand-built maps with known answers, and
the uniform-map reference values."""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitsparse_jax import models
from vitsparse_jax.measures import attention_distance as ad
from vitsparse_jax.measures import locality
from vitsparse_jax.models import swin
from vitsparse_jax.weights import checkpoint

TINY_SWIN = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=(4, 4), num_classes=0)
MODELS = {   # tiny configs, one block per attention kind; fraction: the central region's side
    "vit": ("vit_pico_patch4_32", dict(depth=2), 1 / 7),                       # 8x8 + cls
    "deit_distilled": ("deit_tiny_distilled_patch16_224",
                       dict(depth=1, img_size=48, patch_size=8, embed_dim=48, num_heads=3), 1 / 3),  # 6x6 + cls, dist
    "registers": ("vit_small_patch14_reg4_dinov2", dict(depth=1, img_size=84, embed_dim=48, num_heads=3), 1 / 3),
    "swin_shifted": ("swin_tiny_patch4_window7_224", TINY_SWIN, 1 / 7),        # 16x16 / 8x8, windows 4, shift 2
}


def peaked(variables: dict, seed: int) -> dict:
    """timm's init with q/k weights large enough for peaked attention (attention logits of std ~6, rows with
    a mean maximum near 0.7), a spread Swin relative-position bias, and prefix tokens away from 0."""
    flat = checkpoint.flatten(variables)
    rng = np.random.default_rng(seed)
    for key, value in flat.items():
        if key.endswith("qkv/kernel"):
            flat[key] = rng.normal(size=value.shape) * math.sqrt(6.0 / value.shape[0])
        elif "relative_position_bias_table" in key or key.endswith(("cls_token", "dist_token", "reg_token")):
            flat[key] = rng.normal(size=value.shape)
        flat[key] = np.asarray(flat[key], np.float32)
    return checkpoint.unflatten(flat)


@functools.lru_cache(maxsize=None)
def captured(kind: str) -> tuple[models.ModelInfo, Any, dict, dict, dict]:
    """The maps of 3 random images and, from the same jitted step, the measures of every block (both switches)."""
    name, kw, fraction = MODELS[kind]
    module = models.create_model(name, **kw)
    info = models.model_info(module)
    geoms = ad.geometries(module, fraction)
    variables = peaked(models.init_untrained(module, 0), 1)
    x = np.random.default_rng(2).normal(size=(3, info.img_size, info.img_size, 3)).astype(np.float32)

    @jax.jit
    def step(variables, x):
        _, aux = module.apply(variables, x, capture=("*.attn.probs",))
        measures = {(block, renorm): ad.attention_measures(aux[f"{block}.attn.probs"], geom, renorm)
                    for block, geom in geoms.items() for renorm in (False, True)}
        return aux, measures

    aux, measures = step(variables, x)
    maps = {block: np.asarray(aux[f"{block}.attn.probs"], np.float64) for block in geoms}
    return info, module, geoms, maps, jax.tree.map(np.asarray, measures)


# --- the independent computation: explicit token positions, plain broadcasting --------------------------

def reference(rows: np.ndarray, pos: np.ndarray, keys_from: int, central: np.ndarray,
              renormalize: bool) -> dict[str, np.ndarray]:
    """rows (B, Q, heads, K) of patch queries, pos_q (Q, 2) / pos_k (Q, K, 2) given as pos = (query positions,
    key positions); keys [keys_from:] are patch keys. Means over Q per (B, heads)."""
    qpos, kpos = pos
    d = np.linalg.norm(qpos[:, None, :] - kpos, axis=-1)                 # (Q, K)
    patch = rows[..., keys_from:]
    row_d = np.sum(patch * d[None, :, None, keys_from:], axis=-1)        # (B, Q, heads)
    mass = patch.sum(-1)
    prefix = rows[..., :keys_from].sum(-1)
    ent = -np.sum(np.where(rows > 0, rows * np.log(np.where(rows > 0, rows, 1.0)), 0.0), axis=-1)
    out = {"entropy": ent.mean(1)}
    for suffix, q in (("", np.ones(rows.shape[1], bool)), ("_central", central)):
        if renormalize:
            kept = (mass >= 1e-6) & q[None, :, None]
            out[f"distance{suffix}"] = np.where(kept, row_d / np.where(kept, mass, 1), 0).sum(1) / kept.sum(1)
            out[f"skipped{suffix}"] = ((mass < 1e-6) & q[None, :, None]).sum(1)
        else:
            out[f"distance{suffix}"] = row_d[:, q].mean(1)
        out[f"prefix_mass{suffix}"] = prefix[:, q].mean(1)
    return out


def vit_reference(maps: np.ndarray, info: models.ModelInfo, fraction: float, renormalize: bool) -> dict:
    """ViT maps (B, heads, N, N): patch k at pixel (p (k // g_w + 1/2), p (k % g_w + 1/2)), p = side / g."""
    p, (gh, gw) = info.num_prefix_tokens, info.patch_grid
    size = info.img_size / gh
    pos = np.array([((k // gw + 0.5) * size, (k % gw + 0.5) * size) for k in range(gh * gw)])
    keys = np.concatenate([np.zeros((p, 2)), pos])                        # prefix keys carry no distance
    region = locality.central_region((gh, gw), fraction)
    central = np.array([region.row0 <= k // gw < region.row1 and region.col0 <= k % gw < region.col1
                        for k in range(gh * gw)])
    rows = maps[:, :, p:, :].transpose(0, 2, 1, 3)                        # (B, patch queries, heads, N)
    return reference(rows, (pos, np.broadcast_to(keys, (len(pos),) + keys.shape)), p, central, renormalize)


def swin_reference(maps: np.ndarray, module, block: str, fraction: float, renormalize: bool) -> dict:
    """Swin maps (B, nW, heads, T, T): window column t is token window_token_index[w, t] of the block's map, at
    its true pixel position; the masked keys of shifted windows (a ~ e^-100) are not treated specially."""
    s, b = int(block.split(".")[1]), int(block.split(".")[3])
    index = swin.window_token_index(module, s, b)                         # (nW, T)
    grid = module.geometry()[s][b].grid
    size = module.img_size / grid[0]
    pos = np.stack([(index // grid[1] + 0.5) * size, (index % grid[1] + 0.5) * size], -1)  # (nW, T, 2)
    region = locality.central_region(grid, fraction)
    r, c = index // grid[1], index % grid[1]
    central = ((r >= region.row0) & (r < region.row1) & (c >= region.col0) & (c < region.col1)).ravel()
    bsz, nw, heads, t, _ = maps.shape
    rows = maps.transpose(0, 1, 3, 2, 4).reshape(bsz, nw * t, heads, t)   # (B, queries, heads, T keys)
    keys = np.repeat(pos, t, axis=0)                                      # (nW * T, T, 2): the query's window
    return reference(rows, (pos.reshape(-1, 2), keys), 0, central, renormalize)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("renormalize", [False, True])
def test_measures_of_captured_peaked_maps_match_numpy(kind, renormalize):
    info, module, geoms, maps, measures = captured(kind)
    name, _, fraction = MODELS[kind]
    assert list(geoms) == list(ad.attention_blocks(info))
    for block, geom in geoms.items():
        a = maps[block]
        # the premise: attention is peaked (uniform rows would have a maximum of 1/N)
        assert a.max(-1).mean() > 0.5, block
        if info.family == "swin":
            ref = swin_reference(a, module, block, fraction, renormalize)
        else:
            ref = vit_reference(a, info, fraction, renormalize)
        got = measures[(block, renormalize)]
        for key, value in ref.items():
            np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-6, err_msg=f"{block} {key}")
            assert got[key].shape == (3, a.shape[-3])                     # (B, heads)
        np.testing.assert_allclose(got["distance_rel"], ref["distance"] / info.img_size, rtol=2e-5)
        np.testing.assert_allclose(got["distance_central_rel"], ref["distance_central"] / info.img_size, rtol=2e-5)
        np.testing.assert_allclose(got["entropy_norm"], ref["entropy"] / math.log(a.shape[-1]), rtol=2e-5)
        if not renormalize:
            assert not got["skipped"].any() and not got["skipped_central"].any()
        # distances differ between heads and images: the test compares more than one constant
        assert np.ptp(got["distance"]) > 0.05 * got["distance"].mean()
        if info.num_prefix_tokens:
            assert got["prefix_mass"].min() > 0


def test_swin_key_groups_are_the_unmasked_pairs_of_shifted_windows():
    """The geometry's key groups are exactly the pairs the model does not mask (timm's -100 mask, which the Swin
    parity tests check), and the captured maps put no weight on the others (catches wrong regions)."""
    info, module, geoms, maps, _ = captured("swin_shifted")
    shifted = []
    for block, geom in geoms.items():
        block_geometry = module.geometry()[int(block.split(".")[1])][int(block.split(".")[3])]
        mask = swin._shift_attention_mask(block_geometry)                  # (nW, T, T): 0 or -100; None: no shift
        if mask is None:
            assert geom.counted_keys().all(), block
        else:
            shifted.append(block)
            np.testing.assert_array_equal(geom.counted_keys(), mask == 0, err_msg=block)
        counted = np.broadcast_to(geom.counted_keys()[None, :, None], maps[block].shape)
        assert maps[block][~counted].max(initial=0.0) < 1e-30, block
    assert shifted == ["layers.0.blocks.1", "layers.1.blocks.1"]


def test_right_neighbour_map_gives_exactly_one_patch():
    """Every patch query attends only to its right neighbour (the last column: its left one): one patch size."""
    geom = ad.vit_geometry(models.model_info(models.create_model("vit_base_patch16_224")))
    n, gw = geom.num_keys, geom.grid[1]
    a = np.zeros((1, 2, n, n), np.float32)
    a[:, :, 0, 0] = 1.0                                                   # the class token's own row: not a query
    for k in range(gw * gw):
        a[:, :, 1 + k, 1 + (k + 1 if k % gw < gw - 1 else k - 1)] = 1.0
    out = jax.tree.map(np.asarray, jax.jit(ad.attention_measures, static_argnums=(1, 2))(a, geom, False))
    assert np.all(out["distance"] == 16.0) and np.all(out["distance_central"] == 16.0)
    assert np.allclose(out["distance_rel"], 16 / 224)
    assert np.all(out["prefix_mass"] == 0) and np.all(out["entropy"] == 0)


@pytest.mark.parametrize("block", ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.1"])
def test_right_neighbour_in_true_coordinates_gives_one_stage_patch_in_swin(block):
    """In (shifted) windows, the key at the query's true right (else left) neighbour: one stage patch (4, 8 px)."""
    module = models.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN)
    s, b = int(block.split(".")[1]), int(block.split(".")[3])
    geom = ad.swin_geometry(module, s, b)
    index, grid = swin.window_token_index(module, s, b), module.geometry()[s][b].grid
    nw, t = index.shape
    a = np.zeros((1, nw, 1, t, t), np.float32)
    for w in range(nw):
        where = {divmod(int(k), grid[1]): u for u, k in enumerate(index[w])}
        for i, k in enumerate(index[w]):
            r, c = divmod(int(k), grid[1])
            a[0, w, 0, i, where.get((r, c + 1), where.get((r, c - 1)))] = 1.0
    out = ad.attention_measures(jnp.asarray(a), geom)
    patch_px = 64 / grid[0]
    assert float(out["distance"][0, 0]) == patch_px and float(out["distance_central"][0, 0]) == patch_px


def test_renormalize_divides_rows_by_their_patch_mass_and_skips_prefix_only_rows():
    info = models.model_info(models.create_model("vit_pico_patch4_32"))      # 8x8 patches of 4 px, a class token
    geom = ad.vit_geometry(info)                                          # central region: the one cell (3, 3)
    n, gw = geom.num_keys, 8
    a = np.zeros((1, 2, n, n), np.float32)
    a[0, :, 0, 0] = 1.0
    prefix_only = [3 * gw + 3, 0, 5]                                      # the central query and two more
    for k in range(gw * gw):
        neighbour = 1 + (k + 1 if k % gw < gw - 1 else k - 1)
        if k in prefix_only:
            a[0, :, 1 + k, 0] = 1.0                                       # all on the class token
        else:
            a[0, 0, 1 + k, [0, neighbour]] = 0.5                          # head 0: half class token, half a patch
            a[0, 1, 1 + k, [0, neighbour]] = [0.75, 0.25]                 # head 1: a quarter on the patch
    plain = jax.tree.map(np.asarray, ad.attention_measures(jnp.asarray(a), geom, False))
    renorm = jax.tree.map(np.asarray, ad.attention_measures(jnp.asarray(a), geom, True))
    rest = gw * gw - len(prefix_only)
    np.testing.assert_allclose(plain["distance"][0], [rest * 0.5 * 4 / 64, rest * 0.25 * 4 / 64], rtol=1e-6)
    np.testing.assert_allclose(plain["prefix_mass"][0], [(3 + rest * 0.5) / 64, (3 + rest * 0.75) / 64], rtol=1e-6)
    assert list(plain["distance_central"][0]) == [0.0, 0.0] and list(plain["prefix_mass_central"][0]) == [1, 1]
    np.testing.assert_allclose(renorm["distance"][0], [4.0, 4.0], rtol=1e-6)  # one patch once renormalised
    assert renorm["skipped"].tolist() == [[3, 3]] and renorm["skipped_central"].tolist() == [[1, 1]]
    assert np.all(np.isnan(renorm["distance_central"]))                  # no central row left
    np.testing.assert_allclose(renorm["prefix_mass"], plain["prefix_mass"])  # the switch changes distances only


def test_entropy_is_zero_for_one_hot_rows_and_log_n_for_uniform_rows():
    vit = ad.vit_geometry(models.model_info(models.create_model("vit_pico_patch4_32")))
    n = vit.num_keys
    one_hot = np.zeros((2, 3, n, n), np.float32)
    one_hot[..., np.arange(n), (np.arange(n) * 7) % n] = 1.0
    uniform = np.full((2, 3, n, n), 1.0 / n, np.float32)
    out_hot, out_uni = (ad.attention_measures(jnp.asarray(m), vit) for m in (one_hot, uniform))
    assert np.all(np.asarray(out_hot["entropy"]) == 0.0)
    np.testing.assert_allclose(out_uni["entropy"], math.log(n), rtol=1e-5)
    np.testing.assert_allclose(out_uni["entropy_norm"], 1.0, rtol=1e-5)
    module = models.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN)
    geom = ad.swin_geometry(module, 0, 1)
    t = geom.num_keys
    out = ad.attention_measures(jnp.full((1, geom.windows, 2, t, t), 1.0 / t), geom)
    np.testing.assert_allclose(out["entropy"], math.log(t), rtol=1e-5)    # N = the window's tokens


def test_uniform_reference_values_on_a_224_px_16_px_grid():
    """The reference values of the 224 px ViT grid (14x14 patches of 16 px, central 2x2) as documented."""
    geom = ad.vit_geometry(models.model_info(models.create_model("vit_base_patch16_224")))
    ref = ad.uniform_reference(geom)
    assert ref.distance == pytest.approx(116.5, abs=0.05)
    assert ref.distance_central == pytest.approx(86.0, abs=0.05)
    assert ref.entropy == pytest.approx(math.log(196)) and ref.entropy_norm == pytest.approx(math.log(196) / math.log(197))
    # near the continuous values: the mean distance of two random points of a square, side 224 (0.5214 s)
    assert ref.distance == pytest.approx(224 * (2 + math.sqrt(2) + 5 * math.log(1 + math.sqrt(2))) / 15, rel=0.01)


@pytest.mark.parametrize("kind", ["vit", "registers", "swin_shifted"])
def test_uniform_reference_equals_the_measures_of_the_uniform_map(kind):
    name, kw, fraction = MODELS[kind]
    for block, geom in ad.geometries(models.create_model(name, **kw), fraction).items():
        u = ad.uniform_map(geom)
        assert np.allclose(u.sum(-1)[geom.patch], 1.0)
        maps = u[None, None, 0] if geom.windows == 1 else u[None, :, None]
        out = ad.attention_measures(jnp.asarray(np.repeat(maps, 2, axis=-3), jnp.float32), geom)
        ref = ad.uniform_reference(geom)
        for key in ("distance", "distance_central", "entropy", "entropy_norm"):
            np.testing.assert_allclose(out[key], getattr(ref, key), rtol=1e-5, err_msg=f"{block} {key}")
        assert np.all(np.asarray(out["prefix_mass"]) == 0)


def test_per_image_values_do_not_depend_on_the_batch():
    """Each image's vector is the same, to the bit, alone or in a batch of 3 (exact ordered merges on the host)."""
    info, module, geoms, maps, measures = captured("registers")
    block = next(iter(geoms))
    fn = jax.jit(ad.attention_measures, static_argnums=(1, 2))
    for i in range(3):
        alone = fn(jnp.asarray(maps[block][i:i + 1], jnp.float32), geoms[block], False)
        batch = fn(jnp.asarray(maps[block], jnp.float32), geoms[block], False)
        for key in alone:
            np.testing.assert_array_equal(np.asarray(alone[key])[0], np.asarray(batch[key])[i], err_msg=key)


def test_geometry_errors():
    with pytest.raises(ValueError, match="no attention maps"):
        ad.geometries(models.create_model("vgg_pico"))
    geom = ad.vit_geometry(models.model_info(models.create_model("vit_pico_patch4_32")))
    with pytest.raises(ValueError, match=r"do not fit.*expected \(B, heads, 65, 65\)"):
        ad.attention_measures(jnp.zeros((1, 4, 64, 64)), geom)
    swin_geom = ad.swin_geometry(models.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN), 1, 0)
    with pytest.raises(ValueError, match=r"expected \(B, 4, heads, 16, 16\)"):
        ad.attention_measures(jnp.zeros((1, 16, 2, 16, 16)), swin_geom)
