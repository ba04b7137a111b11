"""ConvNeXt against timm with random weights: logits, every captured activation, masks, stages, conversion.

timm's random init perturbed as the other parity tests (`tests/timm_perturb.py`: LayerNorm scales != 1, non-zero
biases) and the layer-scale gammas moved from 1e-6 to U(0.5, 1.5) so that every block matters. Tolerances, max|diff|
/ max|ref| per tensor: logits <= 1e-5, every capture <= 1e-5 (float32, HIGHEST precision).
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
from tests.test_vit_families_parity import perturb_family  # noqa: E402
from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.weights.checkpoint import CheckpointError  # noqa: E402
from vitsparse_jax.weights.timm_keys import convnext as convnext_convert  # noqa: E402

TOL = 1e-5
SMALL = dict(depths=(1, 2, 1, 1), dims=(16, 32, 48, 64), num_classes=10)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@functools.lru_cache(maxsize=3)
def pair(name: str, img_size: int = 224, **kw):
    torch.manual_seed(0)
    tm = perturb_family(timm.create_model(name, pretrained=False, **kw))
    module = models.create_model(name, img_size=img_size, **kw)
    return tm, module, convert_timm_module(tm, module)[0]


def nhwc(t) -> np.ndarray:
    a = t.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def timm_modules(tm) -> dict:
    """Capture name -> (timm module, its output is NCHW)."""
    mods = {"stem": (tm.stem, True)}
    for s, stage in enumerate(tm.stages):
        if not isinstance(stage.downsample, torch.nn.Identity):
            mods[f"stages.{s}.downsample"] = (stage.downsample, True)
        for b, blk in enumerate(stage.blocks):
            p = f"stages.{s}.blocks.{b}"
            mods.update({f"{p}.conv_dw": (blk.conv_dw, True), f"{p}.mlp.act": (blk.mlp.act, False),
                         f"{p}.mlp": (blk.mlp, False), p: (blk, True)})
    return mods


def run_timm(tm, x: np.ndarray, channel_keep: dict[str, np.ndarray] | None = None):
    """timm logits and every capture (NHWC); `channel_keep[site]` (B, C) multiplies that GELU output."""
    found, handles, channel_keep = {}, [], channel_keep or {}

    def hook(name, nchw):
        def fn(mod, args, out):
            if name in channel_keep:
                out = out * torch.from_numpy(channel_keep[name])[:, None, None, :]   # channels last
            found[name] = nhwc(out) if nchw else out.detach().numpy().copy()
            return out
        return fn

    for name, (mod, nchw) in timm_modules(tm).items():
        handles.append(mod.register_forward_hook(hook(name, nchw)))
    try:
        with torch.no_grad():
            feats = tm.forward_features(torch.from_numpy(x))
            logits = tm.forward_head(feats)
            found["pre_logits"] = tm.forward_head(feats, pre_logits=True).numpy()
    finally:
        for h in handles:
            h.remove()
    return logits.numpy(), found


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def check(tm, module, variables, x):
    ref_logits, ref = run_timm(tm, x)
    logits, aux = jax.jit(lambda v, x: module.apply(v, x, capture=("*",)))(variables, x.transpose(0, 2, 3, 1))
    assert rel_err(logits, ref_logits) <= TOL
    assert set(aux) == set(ref) == set(models.model_info(module).capture_names)
    for key, value in ref.items():
        assert aux[key].shape == value.shape, key
        assert rel_err(aux[key], value) <= TOL, (key, rel_err(aux[key], value))


# --- static facts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_small", "convnext_base"])
def test_param_count_and_cfg_match_timm(name):
    tm = timm.create_model(name, pretrained=False, device="meta")
    shapes = models.variable_shapes(models.create_model(name))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == sum(p.numel() for p in tm.parameters())
    cfg = models.model_info(models.create_model(name)).default_cfg
    ref = timm.models.get_pretrained_cfg(f"{name}.fb_in1k")   # the pinned tag (docs/science.md#models)
    assert cfg["tag"] == "fb_in1k"
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes"):
        assert tuple(np.atleast_1d(cfg[key])) == tuple(np.atleast_1d(getattr(ref, key))), key


def test_model_info():
    info = models.model_info(models.create_model("convnext_tiny"))
    assert info.family == "convnext" and info.num_prefix_tokens == 0 and info.prefix_kinds == ()
    assert len(info.mask_sites) == 18 and info.mask_sites == info.ablation_sites
    assert info.mask_sites[0] == "stages.0.blocks.0.mlp.act" and info.mask_sites[-1] == "stages.3.blocks.2.mlp.act"
    assert info.stages[:5] == ("stem", "stages.0.blocks.0", "stages.0.blocks.1", "stages.0.blocks.2",
                               "stages.1.downsample")
    assert info.stages[-1] == "head" and len(info.stages) == 1 + 3 + 18 + 1
    assert info.capture_names[:5] == ("stem", "stages.0.blocks.0.conv_dw", "stages.0.blocks.0.mlp.act",
                                      "stages.0.blocks.0.mlp", "stages.0.blocks.0")


# --- forward parity --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [64, 96])
def test_small_convnext_matches_timm(size):
    check(*pair("convnext_tiny", img_size=size, **SMALL), images(size))


def test_headless_convnext_matches_timm():
    kw = {**SMALL, "num_classes": 0}
    tm, module, variables = pair("convnext_tiny", img_size=64, **kw)
    x = images(64)
    ref_logits, _ = run_timm(tm, x)
    out, _ = module.apply(variables, x.transpose(0, 2, 3, 1))
    assert out.shape == (2, 64) and rel_err(out, ref_logits) <= TOL


@pytest.mark.slow
def test_convnext_tiny_full_size_matches_timm():
    check(*pair("convnext_tiny"), images(224, batch=1))


def test_channel_masks_match_timm_hooks():
    tm, module, variables = pair("convnext_tiny", img_size=64, **SMALL)
    info = models.model_info(module)
    rng = np.random.default_rng(1)
    keep = {}
    for site in info.mask_sites[-3:]:
        c = 4 * module.dims[int(site.split(".")[1])]
        keep[site] = (rng.random((2, c)) > 0.3).astype(np.float32)
    x = images(64, seed=2)
    ref_logits, _ = run_timm(tm, x, keep)
    masks = {k: jnp.asarray(v)[:, None, None, :] for k, v in keep.items()}
    logits, aux = module.apply(variables, x.transpose(0, 2, 3, 1), masks=masks, capture=("*.mlp.act",))
    clean, _ = module.apply(variables, x.transpose(0, 2, 3, 1))
    assert rel_err(logits, ref_logits) <= TOL and rel_err(logits, clean) > 1e-3
    site = info.mask_sites[-1]
    assert not np.asarray(aux[site])[..., keep[site][0] == 0][0].any()
    ones = {k: jnp.ones_like(v) for k, v in masks.items()}
    np.testing.assert_array_equal(np.asarray(module.apply(variables, x.transpose(0, 2, 3, 1), masks=ones)[0]),
                                  np.asarray(clean))


def test_chained_stages_equal_the_full_forward():
    _, module, variables = pair("convnext_tiny", img_size=64, **SMALL)
    x = jnp.asarray(images(64).transpose(0, 2, 3, 1))
    stages = models.model_info(module).stages
    full, aux = module.apply(variables, x, capture=("*",))
    h, got = x, {}
    for stage in stages:
        h, part = module.apply(variables, h, start=stage, stop=stage, capture=("*",))
        assert not set(part) & set(got), stage
        got.update(part)
        if stage != stages[-1]:
            np.testing.assert_allclose(h, aux[stage], rtol=1e-6, atol=1e-6, err_msg=stage)
    np.testing.assert_allclose(h, full, rtol=1e-6, atol=1e-6)
    assert set(got) == set(aux)
    with pytest.raises(ValueError, match="before start stage"):
        module.apply(variables, aux["stages.2.blocks.0"], start="stages.3.downsample",
                     masks={"stages.2.blocks.0.mlp.act": jnp.ones((2, 1, 1, 192))})


# --- conversion and init -------------------------------------------------------------------------------------

def test_converter_is_strict():
    tm, module, _ = pair("convnext_tiny", img_size=64, **SMALL)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    bad = dict(sd, **{"stages.0.blocks.0.ls.gamma": np.ones(16, np.float32)})
    with pytest.raises(CheckpointError, match="stages.0.blocks.0.ls.gamma"):
        convnext_convert.convert_state_dict(bad, module)
    bad = {k: v for k, v in sd.items() if k != "stages.1.downsample.0.weight"}
    with pytest.raises(CheckpointError, match="stages.1.downsample.0.weight"):
        convnext_convert.convert_state_dict(bad, module)
    bad = dict(sd, **{"stages.1.blocks.1.gamma": np.ones(31, np.float32)})
    with pytest.raises(CheckpointError, match="stages_1/blocks_1/gamma"):
        convnext_convert.convert_state_dict(bad, module)


def test_untrained_init_follows_timm_scheme():
    module = models.create_model("convnext_tiny", img_size=64, **SMALL)
    params = models.init_untrained(module, seed=0)["params"]
    np.testing.assert_array_equal(np.asarray(params["stages_0"]["blocks_0"]["gamma"]), np.full(16, 1e-6, np.float32))
    for w in (params["stem_0"]["kernel"], params["stages_2"]["blocks_0"]["mlp"]["fc1"]["kernel"],
              params["head"]["fc"]["kernel"]):
        w = np.asarray(w)
        assert abs(w.std() - 0.02) < 0.004 and not np.asarray(params["stem_0"]["bias"]).any()
