"""Swin: parity with timm (random weights, float32, HIGHEST precision), masks, `start`, conversion, init.

Tolerances (max|diff| / max|ref|): logits 1e-5; every block output, MLP branch, patch_embed, downsample
and final norm 1e-5; attention probabilities max|diff| 2e-5 (absolute; probabilities are <= 1).
Measured on this setup: logits ~8e-7, maps <= 2e-6, probabilities <= 6.2e-6 (swin_base).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.models.swin_transformer import window_partition  # noqa: E402

from tests.random_weights import zero_variables  # noqa: E402
from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.models import swin  # noqa: E402
from vitsparse_jax.weights import checkpoint
from vitsparse_jax.weights.checkpoint import CheckpointError  # noqa: E402
from vitsparse_jax.weights.timm_keys.swin import convert_state_dict  # noqa: E402

TINY = "swin_tiny_patch4_window7_224"
TINY_KW = {"depths": (2, 2, 2, 2)}   # Swin-T at its real widths and size, 2 blocks per stage; one full-size Swin-B
LOGITS_TOL = 1e-5
MAP_TOL = 1e-5
PROBS_TOL = 2e-5
# last block of stage 3 (shifted windows) and both blocks of stage 4 (one 7x7 window, no shift)
MASK_SITES = ("layers.2.blocks.1.attn", "layers.3.blocks.0.attn", "layers.3.blocks.1.attn")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_timm(arch: str, **kwargs):
    """timm model in eval mode, fused attention off, timm's init perturbed so that biases, LayerNorms and
    the relative position bias table all matter."""
    torch.manual_seed(0)
    tm = timm.create_model(arch, pretrained=False, **kwargs).eval()
    for mod in tm.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    with torch.no_grad():
        for name, p in tm.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "relative_position" in name else 0.05))
    return tm


def converted(tm, module) -> dict:
    return checkpoint.unflatten(convert_state_dict({k: v.numpy() for k, v in tm.state_dict().items()}, module))


@functools.lru_cache(maxsize=None)
def pair(arch: str):
    """(timm model, flax module, flax variables) with the same random weights (Swin-T: TINY_KW)."""
    kw = TINY_KW if arch == TINY else {}
    tm = random_timm(arch, **kw)
    module = models.create_model(arch, **kw)
    return tm, module, converted(tm, module)


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """NCHW for torch; `.transpose(0, 2, 3, 1)` for flax."""
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def timm_forward(tm, x: np.ndarray, keeps: dict[str, np.ndarray] | None = None, renormalize: bool = False):
    """Logits and named intermediates of timm; `keeps` zeroes columns via hooks on attn_drop."""
    found, hooks = {}, []

    def save(name, reshape=None):
        def hook(mod, inp, out):
            found[name] = (reshape(out) if reshape else out).detach().numpy()
        return hook

    b = x.shape[0]
    mods = dict(tm.named_modules())
    hooks.append(mods["patch_embed"].register_forward_hook(save("patch_embed")))
    hooks.append(mods["norm"].register_forward_hook(save("norm")))
    for s, stage in enumerate(tm.layers):
        if s > 0:
            hooks.append(stage.downsample.register_forward_hook(save(f"layers.{s}.downsample")))
        for i, blk in enumerate(stage.blocks):
            name = f"layers.{s}.blocks.{i}"
            h, w = blk.input_resolution
            hooks.append(blk.register_forward_hook(save(name)))
            hooks.append(blk.mlp.register_forward_hook(
                save(f"{name}.mlp", lambda o, h=h, w=w: o.view(b, h, w, -1))))
            if keeps and f"{name}.attn" in keeps:
                keep = torch.from_numpy(keeps[f"{name}.attn"]).view(b, h, w, 1)
                keep = torch.roll(keep, (-blk.shift_size[0], -blk.shift_size[1]), dims=(1, 2))
                cols = window_partition(keep, blk.window_size).reshape(-1, 1, 1, blk.window_area)

                def drop(mod, inp, out, cols=cols):
                    out = out * cols
                    if renormalize:
                        total = out.sum(-1, keepdim=True)
                        out = out / torch.where(total > 0, total, torch.ones_like(total))
                    return out
                hooks.append(blk.attn.attn_drop.register_forward_hook(drop))
            # attn_drop (identity in eval) follows the softmax; this hook sees the output after `drop`
            n_heads, t = blk.attn.num_heads, blk.window_area
            hooks.append(blk.attn.attn_drop.register_forward_hook(
                save(f"{name}.attn.probs", lambda o, n=n_heads, t=t: o.view(b, -1, n, t, t))))
    try:
        with torch.no_grad():
            logits = tm(torch.from_numpy(x)).numpy()
    finally:
        for hk in hooks:
            hk.remove()
    return logits, found


@functools.lru_cache(maxsize=None)
def jitted(arch: str, capture: tuple[str, ...] = (), start: str | None = None, renormalize: bool = False):
    _, module, _ = pair(arch)
    return jax.jit(lambda v, x, masks: module.apply(v, x, masks=masks, capture=capture, start=start,
                                                    renormalize=renormalize))


def random_keeps(module, sites, batch: int = 2, seed: int = 1, p_drop: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    geoms = module.geometry()
    out = {}
    for site in sites:
        s, b = int(site.split(".")[1]), int(site.split(".")[3])
        h, w = geoms[s][b].grid
        out[site] = (rng.random((batch, h * w)) >= p_drop).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(swin.ARCHS))
def test_param_count_matches_timm(arch):
    with torch.device("meta"):
        ref = sum(p.numel() for p in timm.create_model(arch, pretrained=False).parameters())
    shapes = models.variable_shapes(models.create_model(arch))
    assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes)) == ref


@pytest.mark.parametrize("arch", [TINY, pytest.param("swin_base_patch4_window7_224", marks=pytest.mark.slow)])
def test_parity_with_timm(arch):
    tm, module, variables = pair(arch)
    x = images(module.img_size)
    ref_logits, ref = timm_forward(tm, x)
    logits, aux = jitted(arch, ("*",))(variables, x.transpose(0, 2, 3, 1), None)
    assert rel_err(logits, ref_logits) <= LOGITS_TOL

    info = module.info()
    assert set(aux) == set(info.capture_names)
    for name, value in ref.items():
        if name.endswith(".attn.probs"):
            assert aux[name].shape == value.shape, name
            assert np.abs(np.asarray(aux[name]) - value).max() <= PROBS_TOL, name
        else:
            assert rel_err(aux[name], value) <= MAP_TOL, name
    # the branch captures timm has no module for: consistent with the residual adds
    for s, depth in enumerate(module.depths):
        for b in range(depth):
            name = f"layers.{s}.blocks.{b}"
            prev = info.stages[info.stages.index(name) - 1]
            np.testing.assert_allclose(aux[f"{name}.attn_res"], aux[prev] + aux[f"{name}.attn"], atol=1e-6)
            np.testing.assert_allclose(aux[name], aux[f"{name}.attn_res"] + aux[f"{name}.mlp"], atol=1e-6)
            np.testing.assert_allclose(np.asarray(aux[f"{name}.attn.probs"]).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(aux["pre_logits"], np.asarray(aux["norm"]).mean((1, 2)), atol=1e-6)


def test_small_config_with_odd_maps_and_clamped_windows_matches_timm():
    """40 px, window 5: maps 10 -> 5 -> 3 (PatchMerging pads the odd map; 3x3 window clamped), headless."""
    kw = dict(img_size=40, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 2), num_classes=0)
    tm = random_timm(TINY, window_size=5, **kw)
    module = models.create_model(TINY, window_size=(5, 5, 5), **kw)
    variables = converted(tm, module)
    x = images(40)
    ref_logits, ref = timm_forward(tm, x)
    out, aux = jax.jit(lambda v, x: module.apply(v, x, capture=("*",)))(variables, x.transpose(0, 2, 3, 1))
    assert out.shape == (2, 64) and rel_err(out, ref_logits) <= LOGITS_TOL
    assert aux["layers.2.blocks.1.attn.probs"].shape == (2, 1, 2, 9, 9)
    for name in ("layers.0.blocks.1", "layers.2.downsample", "layers.2.blocks.1"):
        assert rel_err(aux[name], ref[name]) <= MAP_TOL, name


@pytest.mark.parametrize("renormalize", [False, True])
def test_masked_logits_match_timm_hooks(renormalize):
    tm, module, variables = pair(TINY)
    x = images(module.img_size)
    keeps = random_keeps(module, MASK_SITES)
    ref_logits, ref = timm_forward(tm, x, keeps, renormalize)
    logits, aux = jitted(TINY, ("*",), None, renormalize)(variables, x.transpose(0, 2, 3, 1), keeps)
    clean_logits, _ = timm_forward(tm, x)
    assert rel_err(ref_logits, clean_logits) > 1e-3  # the masks do change the output
    assert rel_err(logits, ref_logits) <= LOGITS_TOL
    for name in ("layers.3.blocks.0.attn.probs", "layers.3.blocks.1.attn.probs"):
        assert np.abs(np.asarray(aux[name]) - ref[name]).max() <= PROBS_TOL, name


def test_all_ones_mask_is_exact_and_mask_values_do_not_recompile():
    _, module, variables = pair(TINY)
    x = jnp.asarray(images(module.img_size).transpose(0, 2, 3, 1))
    traces = []

    @jax.jit
    def run(v, x, masks):
        traces.append(1)
        return module.apply(v, x, masks=masks)[0]

    sites = module.info().mask_sites
    ones = {k: np.ones_like(v) for k, v in random_keeps(module, sites).items()}
    # masks=None in an otherwise identical call (XLA rounding differs between programs with other captures)
    clean = np.asarray(jitted(TINY)(variables, x, None)[0])
    np.testing.assert_array_equal(np.asarray(run(variables, x, ones)), clean)
    masked = np.asarray(run(variables, x, random_keeps(module, sites, seed=5)))
    assert len(traces) == 1 and not np.array_equal(masked, clean)


def test_start_reproduces_logits():
    _, module, variables = pair(TINY)
    x = jnp.asarray(images(module.img_size).transpose(0, 2, 3, 1))
    keeps = random_keeps(module, MASK_SITES)
    logits, aux = jitted(TINY, ("*",), None, False)(variables, x, keeps)
    stages = module.info().stages
    for start in ("layers.2.blocks.1", "layers.3.downsample", "head"):
        prev = stages[stages.index(start) - 1]
        running = {site: k for site, k in keeps.items()  # masks of blocks that run from `start` on
                   if stages.index(site.removesuffix(".attn")) >= stages.index(start)}
        out, _ = jitted(TINY, (), start)(variables, aux[prev], running)
        assert rel_err(out, logits) <= 1e-6, start
    with pytest.raises(ValueError, match="before start stage"):
        module.apply(variables, aux["layers.3.blocks.1"], masks=keeps, start="head")
    with pytest.raises(ValueError, match="start stage"):
        module.apply(variables, x, start="layers.9.blocks.0")
    with pytest.raises(ValueError, match="must be"):
        module.apply(variables, x, start="layers.3.blocks.0")


def test_window_token_index():
    module = models.create_model(TINY)
    for s, geoms in enumerate(module.geometry()):
        for b, geom in enumerate(geoms):
            idx = swin.window_token_index(module, s, b)
            (h, w), (wh, ww), (sh, sw) = geom
            assert idx.shape == (h * w // (wh * ww), wh * ww)
            np.testing.assert_array_equal(np.sort(idx.ravel()), np.arange(h * w))  # every token once
            assert idx[0, 0] == sh * w + sw and idx[0, 1] == sh * w + (sw + 1) % w
            assert bool(sh) == (b % 2 == 1 and h > 7)
    # 7x7 stage: one window, no shift even in the odd block (timm clamps)
    np.testing.assert_array_equal(swin.window_token_index(module, 3, 1), np.arange(49)[None])


def test_info_and_argument_errors():
    module = models.create_model(TINY)                     # the full Swin-T (its errors come before any compute)
    variables = zero_variables(module)
    info = module.info()
    assert info.family == "swin" and info.patch_grid == (56, 56) and info.num_prefix_tokens == 0
    assert info.stages[:4] == ("patch_embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample")
    assert info.stages[-1] == "head" and len(info.stages) == 1 + 12 + 3 + 1
    assert info.ablation_sites == info.mask_sites and len(info.mask_sites) == 12
    assert info.default_cfg["crop_pct"] == 0.9 and info.default_cfg["input_size"] == (3, 224, 224)
    x = jnp.zeros((1, 224, 224, 3))
    with pytest.raises(ValueError, match="matches no name"):
        module.apply(variables, x, capture=("blocks.*",))
    with pytest.raises(ValueError, match="unknown mask site"):
        module.apply(variables, x, masks={"layers.0.blocks.0": np.ones((1, 3136))})
    with pytest.raises(ValueError, match=r"\(B, 49\)"):
        module.apply(variables, x, masks={"layers.3.blocks.0.attn": np.ones((1, 50))})


def test_converter_is_strict_and_round_trips(tmp_path):
    tm, module, variables = pair(TINY)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    sd["layers.0.blocks.1.attn_mask"] = np.zeros((64, 49, 49), np.float32)  # a buffer: skipped
    assert set(convert_state_dict(sd, module)) == set(checkpoint.flatten(variables))

    bad = dict(sd, **{"layers.0.blocks.0.attn.extra.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(CheckpointError, match=rf"{TINY}.*layers\.0\.blocks\.0\.attn\.extra\.weight"):
        convert_state_dict(bad, module)
    bad = {k: v for k, v in sd.items() if k != "layers.2.blocks.1.mlp.fc1.bias"}
    with pytest.raises(CheckpointError, match=rf"{TINY}.*params/layers_2/blocks_1/mlp/fc1/bias"):
        convert_state_dict(bad, module)
    bad = dict(sd, **{"head.fc.weight": np.zeros((10, 768), np.float32)})
    with pytest.raises(CheckpointError, match=r"head\.fc\.weight.*shape"):
        convert_state_dict(bad, module)

    # original Microsoft layout (PatchMerging at the end of a stage, `head.weight`) maps to the same variables
    legacy = {}
    for key, value in sd.items():
        if ".downsample." in key:
            s = int(key.split(".")[1])
            key = key.replace(f"layers.{s}.", f"layers.{s - 1}.", 1)
        legacy[key.replace("head.fc.", "head.")] = value
    flat = checkpoint.flatten(variables)
    for key, value in convert_state_dict(legacy, module).items():
        np.testing.assert_array_equal(value, flat[key])


def test_convert_from_file_round_trips(tmp_path):
    """checkpoints_convert.convert (generic part) dispatches to the swin mapping; checkpoint.load reads it."""
    from safetensors.torch import save_file

    import checkpoints_convert

    tm = random_timm(TINY)                                   # full size: the converter builds the arch's module
    module = models.create_model(TINY)
    variables = converted(tm, module)
    save_file(tm.state_dict(), str(tmp_path / "model.safetensors"))
    path = checkpoints_convert.convert(f"{TINY}.random", tmp_path / "out", from_file=tmp_path / "model.safetensors")
    loaded, meta = checkpoint.load(path, module)
    assert meta["model"] == TINY and meta["tag"] == "random"
    loaded = checkpoint.flatten(loaded)
    for key, value in checkpoint.flatten(variables).items():
        np.testing.assert_array_equal(loaded[key], value)


def test_untrained_init_follows_timm_scheme():
    module = models.create_model(TINY)
    flat = checkpoint.flatten(models.init_untrained(module, seed=0))
    other = checkpoint.flatten(models.init_untrained(module, seed=1))
    key = "params/layers_2/blocks_0/mlp/fc1/kernel"
    assert not np.array_equal(flat[key], other[key])
    assert abs(float(np.std(flat[key])) - 0.02) < 1e-3
    assert abs(float(np.std(flat["params/layers_2/blocks_0/attn/relative_position_bias_table"])) - 0.02) < 2e-3
    assert not np.any(flat["params/layers_2/blocks_0/mlp/fc1/bias"])
    np.testing.assert_array_equal(flat["params/norm/scale"], 1.0)
    bound = 1 / np.sqrt(4 * 4 * 3)  # torch's default Conv2d init on the patch embedding
    assert np.abs(flat["params/patch_embed/proj/kernel"]).max() <= bound
