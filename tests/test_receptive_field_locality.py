"""Locality math (central regions, radial profile, S, mean radius) against hand-computed NumPy, and the
layer naming / grouping / error rules of the receptive-field experiment. No model forward passes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vitsparse_jax import models
from vitsparse_jax.measures import gradient_fields as rfg
from vitsparse_jax.measures import locality
from vitsparse_jax.experiments.receptive_field import series as rf


@pytest.mark.parametrize("grid,expected", [
    ((14, 14), (6, 8, 6, 8)),        # docs/science.md#receptive-fields: 14x14 -> 2x2
    ((56, 56), (24, 32, 24, 32)),    # 56x56 -> 8x8
    ((7, 7), (3, 4, 3, 4)),          # 7x7 -> 1x1
    ((8, 8), (3, 4, 3, 4)),          # 8/7 -> 1, off by half a cell (8 - 1 is odd)
    ((32, 32), (13, 18, 13, 18)),    # 32/7 = 4.57 -> 5
    ((2, 2), (0, 1, 0, 1)),          # 2/7 -> 0 -> at least one position
    ((1, 1), (0, 1, 0, 1)),
    ((14, 7), (6, 8, 3, 4)),
])
def test_central_region(grid, expected):
    r = locality.central_region(grid, 1 / 7)
    assert (r.row0, r.row1, r.col0, r.col1) == expected
    assert r.grid == grid


def test_central_side_rounds_halves_up_and_fraction_one_is_whole_grid():
    assert locality.central_side(7, 0.5) == 4          # 3.5 -> 4 (not banker's 4/2 rounding)
    assert locality.central_side(5, 0.5) == 3          # 2.5 -> 3
    assert locality.central_region((6, 9), 1.0) == locality.Region((6, 9), 0, 6, 0, 9)


@pytest.mark.parametrize("f", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_that_leaves_no_central_position_is_an_error(f):
    with pytest.raises(ValueError, match="no central position"):
        locality.central_region((14, 14), f)


def test_centre_maps_grid_cells_to_pixels():
    assert locality.central_region((14, 14), 1 / 7).centre_px((224, 224)) == (112.0, 112.0)
    assert locality.central_region((7, 7), 1 / 7).centre_px((224, 224)) == (112.0, 112.0)
    assert locality.central_region((8, 8), 1 / 7).centre_px((32, 32)) == (14.0, 14.0)   # cell 3 = px 12..16
    assert locality.central_region((1, 1), 1 / 7).centre_px((32, 32)) == (16.0, 16.0)


def brute_force_profile(m: np.ndarray, centre: tuple[float, float]) -> tuple[list[float], int]:
    """E_r by explicit loops over pixels, and floor(R)."""
    h, w = m.shape
    dist = {(i, j): math.hypot(i + 0.5 - centre[0], j + 0.5 - centre[1]) for i in range(h) for j in range(w)}
    rmax = math.floor(max(dist.values()))
    profile = []
    for r in range(rmax + 1):
        vals = [m[i, j] for (i, j), d in dist.items() if r <= d < r + 1]
        profile.append(sum(vals) / len(vals))
    return profile, rmax


@pytest.mark.parametrize("shape,centre", [((32, 32), (16.0, 16.0)), ((32, 32), (14.0, 14.0)),
                                          ((21, 17), (10.5, 3.5)), ((9, 9), (0.0, 9.0))])
def test_profile_s_and_mean_radius_match_hand_computation(shape, centre, rng):
    m = rng.random(shape) ** 3
    profile, rmax = brute_force_profile(m, centre)
    loc = locality.locality(m, centre)
    np.testing.assert_allclose(loc.profile, profile, rtol=1e-12)
    assert len(loc.profile) == rmax + 1
    moment = sum(r * e for r, e in enumerate(profile))
    assert loc.s == pytest.approx(moment / m.max(), rel=1e-12)
    assert loc.mean_radius == pytest.approx(moment / sum(profile), rel=1e-12)
    assert loc.max_m == m.max()


def test_synthetic_maps_with_known_answers():
    centre = (16.0, 16.0)          # a pixel corner: the 4 nearest pixels are at distance 0.707
    d = locality.pixel_distances((32, 32), centre)
    point = (d < 1).astype(float)
    assert locality.locality(point, centre).s == 0.0
    assert locality.locality(point, centre).mean_radius == 0.0
    ring = (np.floor(d) == 5).astype(float)
    assert locality.locality(ring, centre).s == pytest.approx(5.0)
    assert locality.locality(ring, centre).mean_radius == pytest.approx(5.0)
    uniform = np.full((32, 32), 2.0)
    rmax = math.floor(math.hypot(15.5, 15.5))        # 21
    assert locality.locality(uniform, centre).s == pytest.approx(rmax * (rmax + 1) / 2)
    assert locality.locality(uniform, centre).mean_radius == pytest.approx(rmax / 2)
    # scale: S and the mean radius do not change when M is multiplied by a constant
    rng_map = np.random.default_rng(1).random((32, 32))
    a, b = locality.locality(rng_map, centre), locality.locality(7.0 * rng_map, centre)
    assert (a.s, a.mean_radius) == pytest.approx((b.s, b.mean_radius))
    # a wider map is less local
    assert locality.locality(np.exp(-d ** 2 / 50), centre).s > locality.locality(np.exp(-d ** 2 / 5), centre).s


def test_zero_map_gives_nan():
    loc = locality.locality(np.zeros((8, 8)), (4.0, 4.0))
    assert math.isnan(loc.s) and math.isnan(loc.mean_radius) and loc.max_m == 0.0


# --- layers -------------------------------------------------------------------------------------------

def vit_info(**kw) -> models.ModelInfo:
    return models.model_info(models.create_model("vit_pico_patch4_32", **kw))


def test_default_layers_vit_has_embed_and_four_substages_per_block():
    info = vit_info()
    names = rfg.default_layers(info)
    assert names[:5] == ("embed", "blocks.0.attn", "blocks.0.attn_res", "blocks.0.mlp", "blocks.0")
    assert len(names) == 1 + 4 * 6 and names[-1] == "blocks.5"
    assert [rfg.layer_group(n) for n in names[1:5]] == ["attn", "attn_res", "mlp", "mlp_res"]
    assert rfg.relative_depth(info, "embed") == 0.0
    assert rfg.relative_depth(info, "blocks.0.attn") == pytest.approx(1 / 6)
    assert rfg.relative_depth(info, "blocks.5") == 1.0
    assert rfg.relative_depth(info, rfg.LOGITS) == 1.0


def test_default_layers_cnns():
    vgg = models.model_info(models.create_model("vgg_pico"))
    assert rfg.default_layers(vgg) == vgg.ablation_sites              # the ReLU after every conv
    assert [rfg.layer_group(n) for n in rfg.default_layers(vgg)] == ["features"] * 4
    assert rfg.relative_depth(vgg, vgg.stages[0]) == 0.0
    resnet = models.model_info(models.create_model("resnet50"))
    names = rfg.default_layers(resnet)
    assert names[0] == "stem" and names[-1] == "layer4.2" and len(names) == 1 + 16
    assert rfg.layer_group("layer2.3") == "block" and rfg.layer_group("layer2.3.act2") == "act2"
    assert rfg.relative_depth(resnet, "act1") == 0.0 and rfg.relative_depth(resnet, "layer4.2") == 1.0


def test_select_layers_patterns_and_errors():
    info = vit_info()
    assert rfg.select_layers(info, ["blocks.1", "embed"]) == ("embed", "blocks.1")          # forward order
    assert rfg.select_layers(info, ["blocks.*.attn"]) == tuple(f"blocks.{l}.attn" for l in range(6))
    with pytest.raises(ValueError, match=r"'blocks\.9' matches no layer.*valid layers: embed, blocks\.0\.attn"):
        rfg.select_layers(info, ["blocks.9"])
    with pytest.raises(ValueError, match="matches no layer"):
        rfg.select_layers(info, ["blocks.0.attn.probs"])                  # attention maps have no grid
    assert rfg.select_layers(info, ["logits"]) == ("logits",)
    with pytest.raises(ValueError, match="headless.*pre_logits"):
        rfg.select_layers(vit_info(num_classes=0), ["logits"])


def test_checkpoint_series_steps_from_json_or_name(tmp_path):
    for step in (0, 250, 1000):
        (tmp_path / f"m.step{step}.safetensors").write_bytes(b"")
    (tmp_path / "m.step250.json").write_text('{"model": "m", "step": 7}')
    series = rf.checkpoint_series(str(tmp_path / "*.safetensors"))
    assert [s for s, _ in series] == [0, 7, 1000]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        rf.checkpoint_series(str(tmp_path / "nothing*.safetensors"))
