"""The ViT families of docs/science.md#models against timm with random weights: DeiT III, DINOv2 (with and without
registers), CLIP and SigLIP towers, pooled (`*_gap_*`) ViTs; position-embedding resampling; image-size errors.

Same standard as tests/test_vit_parity.py (float32, HIGHEST precision, timm's fused attention off, timm's random
init perturbed by `tests/timm_perturb.py`, plus layer-scale gammas moved from their 1e-5 / 1e-6 init to O(1) so
that every branch matters): logits and every (B, N, D) intermediate max|diff| / max|ref| <= 1e-5, attention
probabilities max|diff| <= 1e-5. Every check uses `depth=2` (each family also at its real width and image size);
the one full-size ViT is in tests/test_vit_parity.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from checkpoints_convert import convert_timm_module  # noqa: E402
from tests.test_vit_parity import PROB_TOL, REL_TOL, nhwc, rel_err, timm_forward  # noqa: E402
from tests.random_weights import zero_variables  # noqa: E402
from tests.timm_perturb import perturb  # noqa: E402
from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.models import pos_embed, vit  # noqa: E402
from vitsparse_jax.weights.checkpoint import CheckpointError, unflatten  # noqa: E402
from vitsparse_jax.weights.timm_keys import vit as vit_convert  # noqa: E402

BATCH = 2


def perturb_family(model):
    """tests/timm_perturb.py, then layer-scale gammas ~ U(0.5, 1.5) (their init 1e-5 / 1e-6 would make the
    branches vanish and the test vacuous)."""
    model = perturb(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def make_timm(name: str, **kw):
    torch.manual_seed(0)
    return perturb_family(timm.create_model(name, pretrained=False, **kw))


@functools.lru_cache(maxsize=4)
def pair(name: str, **kw):
    tm = make_timm(name, **kw)
    module = models.create_model(name, **kw)
    variables, _ = convert_timm_module(tm, module)
    return tm, module, variables


def images(size: int, batch: int = BATCH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def check_forward(tm, module, variables, x: np.ndarray, everything: bool = True) -> None:
    ref_logits, ref = timm_forward(tm, x)
    logits, aux = jax.jit(lambda v, x: module.apply(v, x, capture=("*",) if everything else ()))(variables, nhwc(x))
    assert logits.shape == ref_logits.shape and logits.dtype == jnp.float32
    assert rel_err(logits, ref_logits) <= REL_TOL, rel_err(logits, ref_logits)
    if not everything:
        return
    assert set(aux) == set(ref) == set(models.model_info(module).capture_names)
    for key, value in ref.items():
        assert aux[key].shape == value.shape, key
        if key.endswith("probs"):
            assert float(np.abs(np.asarray(aux[key]) - value).max()) <= PROB_TOL, key
        else:
            assert rel_err(aux[key], value) <= REL_TOL, (key, rel_err(aux[key], value))


# --- registry, parameter counts, ModelInfo ----------------------------------------------------------------

NEW_ARCHS = [
    "deit3_small_patch16_224", "deit3_base_patch16_224", "deit3_small_patch16_384", "deit3_medium_patch16_224",
    "vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2", "vit_base_patch16_clip_224", "vit_base_patch32_clip_224",
    "vit_base_patch16_siglip_224", "vit_base_patch16_siglip_256", "vit_base_patch16_siglip_gap_224",
    "vit_medium_patch16_gap_256", "vit_base_patch16_reg4_gap_256", "vit_medium_patch16_reg4_gap_256",
    "vit_little_patch16_reg4_gap_256", "vit_betwixt_patch16_reg4_gap_256",
]
COUNT_CASES = [(n, {}) for n in NEW_ARCHS] + [
    ("vit_small_patch14_dinov2", {"img_size": 224}), ("vit_base_patch16_clip_224", {"num_classes": 512}),
    ("vit_base_patch16_224", {"global_pool": "avg"}), ("vit_base_patch16_siglip_224", {"num_classes": 1000}),
]


@pytest.mark.parametrize("name,kw", COUNT_CASES, ids=[f"{n}{'-' + str(k) if k else ''}" for n, k in COUNT_CASES])
def test_param_count_matches_timm(name, kw):
    tm = timm.create_model(name, pretrained=False, device="meta", **kw)
    expected = sum(p.numel() for p in tm.parameters())
    shapes = models.variable_shapes(models.create_model(name, **kw))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == expected


def test_new_archs_registered_with_timm_default_cfgs():
    for arch in NEW_ARCHS:
        assert arch in models.list_models()
        ref = timm.models.get_pretrained_cfg(arch)
        info = models.model_info(models.create_model(arch))
        assert info.default_cfg["tag"] == ref.tag, arch
        for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes"):
            assert tuple(np.atleast_1d(info.default_cfg[key])) == tuple(np.atleast_1d(getattr(ref, key))), (arch, key)
        assert info.num_classes == ref.num_classes and info.img_size == ref.input_size[-1]
        tm = timm.create_model(arch, pretrained=False, device="meta")
        assert info.num_prefix_tokens == tm.num_prefix_tokens, arch


@pytest.mark.parametrize("name,kinds,grid", [
    ("deit_small_distilled_patch16_224", ("cls", "dist"), (14, 14)),
    ("deit3_small_patch16_224", ("cls",), (14, 14)),
    ("vit_small_patch14_dinov2", ("cls",), (37, 37)),
    ("vit_small_patch14_reg4_dinov2", ("cls", "reg", "reg", "reg", "reg"), (37, 37)),
    ("vit_base_patch16_siglip_224", (), (14, 14)),
    ("vit_medium_patch16_reg4_gap_256", ("reg",) * 4, (16, 16)),
    ("vit_medium_patch16_gap_256", (), (16, 16)),
])
def test_prefix_kinds(name, kinds, grid):
    info = models.model_info(models.create_model(name))
    assert info.prefix_kinds == kinds and info.num_prefix_tokens == len(kinds) and info.patch_grid == grid
    assert info.family == "vit" and info.mask_sites == info.ablation_sites


def test_capture_names_of_heads():
    siglip = models.model_info(models.create_model("vit_base_patch16_siglip_224", depth=2))
    assert siglip.capture_names[-3:] == ("norm", "attn_pool.probs", "pre_logits")
    gap = models.model_info(models.create_model("vit_medium_patch16_reg4_gap_256", depth=2))   # fc_norm
    assert gap.capture_names[-2:] == ("blocks.1", "pre_logits")
    clip = models.model_info(models.create_model("vit_base_patch16_clip_224", depth=2))
    assert clip.capture_names[0] == "embed" and clip.capture_names[-2:] == ("norm", "pre_logits")


# --- forward parity (small) ---------------------------------------------------------------------------------

PARITY_CASES = [
    ("deit3_small_patch16_224", dict(depth=2)),                                  # no_embed_class, layer scale
    ("vit_small_patch14_dinov2", dict(depth=2, img_size=112)),                   # patch 14, headless
    ("vit_small_patch14_reg4_dinov2", dict(depth=2, img_size=112)),              # + 4 registers
    ("vit_base_patch16_clip_224", dict(depth=2, embed_dim=192, num_heads=3)),    # norm_pre, eps 1e-5, no bias
    ("vit_base_patch16_siglip_224", dict(depth=2, embed_dim=192, num_heads=3)),  # no cls, MAP head, headless
    ("vit_base_patch16_siglip_224", dict(depth=2, embed_dim=192, num_heads=3, num_classes=10)),
    ("vit_base_patch16_siglip_gap_224", dict(depth=2, embed_dim=192, num_heads=3, img_size=96)),
    ("vit_medium_patch16_gap_256", dict(depth=2, img_size=128)),                 # avg, no fc_norm, no qkv bias
    ("vit_medium_patch16_reg4_gap_256", dict(depth=2, img_size=128)),            # avg + fc_norm + registers
    ("vit_tiny_patch16_224", dict(depth=2, global_pool="avg")),                  # cls + avg + fc_norm
    ("vit_tiny_patch16_224", dict(depth=2, global_pool="avg", fc_norm=False)),   # timm's keyword name
]


@pytest.mark.parametrize("name,kw", PARITY_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PARITY_CASES)])
def test_forward_parity(name, kw):
    tm, module, variables = pair(name, **kw)
    check_forward(tm, module, variables, images(models.model_info(module).img_size))


# Each family at its real width and image size (logits and every intermediate; batch 1), at depth 2: every
# block is the same code, and the one full-size ViT is tests/test_vit_parity.py's vit_base_patch16_224.
FULL_CASES = [
    ("deit3_small_patch16_224", {"depth": 2}),
    ("vit_small_patch14_dinov2", {"img_size": 224, "depth": 2}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224, "depth": 2}),
    ("vit_base_patch16_siglip_224", {"depth": 2}),
    ("vit_base_patch16_clip_224", {"depth": 2}),
    ("vit_medium_patch16_reg4_gap_256", {"depth": 2}),
]


@pytest.mark.parametrize("name,kw", FULL_CASES, ids=[n for n, _ in FULL_CASES])
def test_full_size_parity(name, kw):
    tm = make_timm(name, **kw)
    module = models.create_model(name, **kw)
    variables, _ = convert_timm_module(tm, module)
    check_forward(tm, module, variables, images(models.model_info(module).img_size, batch=1))


def test_masks_drop_patch_columns_with_registers_like_timm_hooks():
    """Registers are prefix columns: a mask keeps them; dropped patch columns match timm's hooked model."""
    tm, module, variables = pair("vit_small_patch14_reg4_dinov2", depth=2, img_size=112)
    info = models.model_info(module)
    n = info.num_prefix_tokens + info.patch_grid[0] * info.patch_grid[1]
    keep = np.ones((BATCH, n), np.float32)
    keep[:, info.num_prefix_tokens + np.array([0, 5, 17, 30])] = 0.0
    x = images(info.img_size, seed=3)
    ref_logits, _ = timm_forward(tm, x, {1: keep})
    logits, _ = module.apply(variables, nhwc(x), masks={"blocks.1.attn": jnp.asarray(keep)})
    assert rel_err(logits, ref_logits) <= REL_TOL


# --- position embedding resampling ---------------------------------------------------------------------------

@pytest.mark.parametrize("old,new,prefix", [(37, 16, 1), (37, 16, 0), (14, 24, 1), (14, 24, 2), (16, 12, 5),
                                            (7, 9, 0)])
def test_resample_matches_timm(old, new, prefix):
    from timm.layers import resample_abs_pos_embed

    x = np.random.default_rng(old * new).standard_normal((1, prefix + old * old, 24)).astype(np.float32)
    ref = resample_abs_pos_embed(torch.from_numpy(x), (new, new), num_prefix_tokens=prefix).numpy()
    out = pos_embed.resample_abs_pos_embed(x, (new, new), num_prefix_tokens=prefix)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert rel_err(out, ref) <= 2e-6   # float64 here, float32 in torch (exact in float64)
    np.testing.assert_array_equal(out[:, :prefix], x[:, :prefix])


def _timm_at_other_size(name: str, size: int, source, **kw):
    """timm's own path: a model created at `size`, loaded with the source model's weights through timm's
    checkpoint_filter_fn (which resamples the position embedding)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    target = timm.create_model(name, pretrained=False, img_size=size, **kw)
    target.load_state_dict(checkpoint_filter_fn(dict(source.state_dict()), target))
    return perturb_family_flags(target)


def perturb_family_flags(model):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model.eval()


@pytest.mark.parametrize("name,src,dst,kw", [
    ("vit_small_patch14_dinov2", 518, 224, dict(depth=2)),           # DINOv2's 518 px weights at 224
    ("vit_small_patch14_reg4_dinov2", 518, 224, dict(depth=2)),      # no_embed_class: no prefix entries
    ("vit_tiny_patch16_224", 224, 384, dict(depth=2)),               # a 224 px ViT at 384
    ("deit_tiny_distilled_patch16_224", 224, 384, dict(depth=2)),    # two prefix entries kept
])
def test_load_at_other_size_equals_timm(name, src, dst, kw):
    source = make_timm(name, **kw)                                   # weights at the source size
    assert source.patch_embed.img_size[0] == src
    target = _timm_at_other_size(name, dst, source, **kw)
    module = models.create_model(name, img_size=dst, **kw)
    sd = {k: v.detach().numpy() for k, v in source.state_dict().items()}
    flat = vit_convert.convert_state_dict(sd, module)                # resampled here, once
    ref_pos = target.pos_embed.detach().numpy()
    assert flat["params/pos_embed"].shape == ref_pos.shape
    assert rel_err(flat["params/pos_embed"], ref_pos) <= 2e-6
    variables = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    x = images(dst, batch=1)
    ref_logits, _ = timm_forward(target, x)
    logits, _ = jax.jit(module.apply)(variables, nhwc(x))
    assert rel_err(logits, ref_logits) <= REL_TOL


def test_converter_names_bad_pos_embed():
    module = models.create_model("vit_tiny_patch16_224", depth=1)
    tm = make_timm("vit_tiny_patch16_224", depth=1)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    sd["pos_embed"] = sd["pos_embed"][:, :150]   # 149 grid entries: not a square
    with pytest.raises(CheckpointError, match="pos_embed"):
        vit_convert.convert_state_dict(sd, module)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    sd["blocks.0.ls1.gamma"] = np.ones(192, np.float32)   # a layer scale this model does not have
    with pytest.raises(CheckpointError, match="blocks.0.ls1.gamma"):
        vit_convert.convert_state_dict(sd, module)
    del sd["blocks.0.ls1.gamma"], sd["blocks.0.norm1.weight"]
    with pytest.raises(CheckpointError, match="blocks.0.norm1.weight"):
        vit_convert.convert_state_dict(sd, module)


# --- image sizes --------------------------------------------------------------------------------------------

def test_img_size_not_a_whole_number_of_patches_is_a_clear_error():
    with pytest.raises(ValueError, match=r"img_size=200 .*valid sizes near it: 176, 192, 208, 224"):
        models.create_model("vit_base_patch16_224", img_size=200)
    with pytest.raises(ValueError, match=r"valid sizes near it: 196, 210, 224, 238"):
        models.create_model("vit_small_patch14_dinov2", img_size=220)
    module = models.create_model("vit_pico_patch4_32", depth=1)
    variables = zero_variables(module)
    with pytest.raises(ValueError, match=r"built for 32x32 images, got 30x30.*img_size=S.*28, 32"):
        module.apply(variables, jnp.zeros((1, 30, 30, 3)))
    with pytest.raises(ValueError, match=r"built for 32x32 images, got 36x36.*36"):
        module.apply(variables, jnp.zeros((1, 36, 36, 3)))


@pytest.mark.parametrize("size", [112, 168, 252])
def test_any_whole_patch_size_runs(size):
    module = models.create_model("vit_small_patch14_reg4_dinov2", depth=1, img_size=size)
    info = models.model_info(module)
    assert info.patch_grid == (size // 14, size // 14)
    out, aux = jax.eval_shape(lambda v, x: module.apply(v, x, capture=("blocks.0",)), models.variable_shapes(module),
                              jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    assert out.shape == (1, 384) and aux["blocks.0"].shape == (1, 5 + (size // 14) ** 2, 384)


def test_option_errors():
    with pytest.raises(ValueError, match="class token"):
        models.create_model("vit_tiny_patch16_224", class_token=False)          # token pooling without cls
    with pytest.raises(ValueError, match="global_pool"):
        models.create_model("vit_tiny_patch16_224", global_pool="max")


# --- untrained init ------------------------------------------------------------------------------------------

def test_untrained_init_of_new_parameters_follows_timm():
    """Layer scale = init_values, registers ~ N(0, 1e-6), MAP latent ~ trunc_normal_tf(std=D^-0.5)."""
    module = models.create_model("vit_base_patch16_siglip_224", depth=1, embed_dim=192, num_heads=3)
    flat = models.init_untrained(module, seed=0)["params"]
    latent = np.asarray(flat["attn_pool"]["latent"])
    assert latent.shape == (1, 1, 192) and abs(latent.std() - 192 ** -0.5) < 0.2 * 192 ** -0.5
    assert np.abs(latent).max() <= 2 * 192 ** -0.5
    reg = models.init_untrained(models.create_model("vit_small_patch14_reg4_dinov2", depth=1, img_size=56))
    np.testing.assert_array_equal(np.asarray(reg["params"]["blocks_0"]["ls1"]["gamma"]), np.full(384, 1e-5, np.float32))
    assert np.abs(np.asarray(reg["params"]["reg_token"])).max() < 1e-5
    assert reg["params"]["pos_embed"].shape == (1, 16, 384)   # patches only (no_embed_class)
    with pytest.raises(KeyError):
        vit.ARCHS["vit_base_patch16_224"]["kwargs"]["reg_tokens"]


def test_fit_variables_resamples_converted_weights_of_another_size():
    """A checkpoint converted at DINOv2's 518 px, loaded into a 224 px module (the loaders' hook)."""
    source = make_timm("vit_small_patch14_reg4_dinov2", depth=1)
    sd = {k: v.detach().numpy() for k, v in source.state_dict().items()}
    flat518 = vit_convert.convert_state_dict(sd, models.create_model("vit_small_patch14_reg4_dinov2", depth=1))
    module = models.create_model("vit_small_patch14_reg4_dinov2", depth=1, img_size=224)
    fitted = models.fit_variables(module, flat518)
    direct = vit_convert.convert_state_dict(sd, module)
    assert set(fitted) == set(direct)
    for key in direct:
        np.testing.assert_array_equal(fitted[key], direct[key], err_msg=key)
    assert models.fit_variables(module, direct)["params/pos_embed"] is direct["params/pos_embed"]   # fits: as is
    convnext = models.create_model("convnext_tiny", depths=(1, 1, 1, 1))
    assert models.fit_variables(convnext, {"params/x": 1}) == {"params/x": 1}
