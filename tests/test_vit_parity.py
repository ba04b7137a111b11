"""Flax ViT / DeiT against timm with random weights: logits, attention maps, intermediates, masks, stages.

Weights: timm's random init, then perturbed (`tests/timm_perturb.py`) so that every parameter matters and attention is peaked.

Tolerances (float32, HIGHEST precision, timm's fused attention off):
  logits and every (B, N, D) intermediate: max|diff| / max|ref| <= 1e-5
  attention probabilities (values in [0, 1]):   max|diff| <= 1e-5
Measured (timm 1.0.31, torch 2.14 CPU, jax 0.10 CPU): logits <= 1.5e-6, intermediates <= 2.2e-6, probs <= 1.9e-6.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from checkpoints_convert import convert_timm_module  # noqa: E402
from tests.random_weights import random_variables, zero_variables  # noqa: E402
from tests.timm_perturb import perturb  # noqa: E402
from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.models import vit  # noqa: E402

REL_TOL = 1e-5
PROB_TOL = 1e-5
BATCH = 2
PICO = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, num_classes=10)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def make_timm(name: str, **kw):
    """A random-weight timm model in eval mode with the explicit (non-fused) attention path."""
    torch.manual_seed(0)
    if name == "vit_pico_patch4_32":   # the project's own arch: same timm class, other sizes
        model = timm.models.vision_transformer.VisionTransformer(**{**PICO, **kw})
    else:
        model = timm.create_model(name, pretrained=False, **kw)
    return perturb(model)


def make_pair(name: str, **kw):
    tm = make_timm(name, **kw)
    module = models.create_model(name, **kw)
    variables, _ = convert_timm_module(tm, module)
    return tm, module, variables


def images(module, seed: int = 0) -> np.ndarray:
    """Random NCHW float32 inputs of the module's size."""
    size = models.model_info(module).img_size
    return np.random.default_rng(seed).standard_normal((BATCH, 3, size, size)).astype(np.float32)


def nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def attn_pool_probs(pool, x: "torch.Tensor") -> np.ndarray:
    """Post-softmax attention (B, heads, 1, N) of timm's AttentionPoolLatent on its input x (B, N, D)."""
    b, n, _ = x.shape
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim)
    k = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)[0]
    q, k = pool.q_norm(q.transpose(1, 2)), pool.k_norm(k)
    return ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1).numpy()


def timm_forward(tm, x: np.ndarray, col_masks: dict[int, np.ndarray] | None = None,
                 renormalize: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """timm logits plus every intermediate under this project's capture names, via forward hooks.
    `col_masks[l]` (B, N) multiplies the post-softmax attention of block l (hook on attn_drop).

    Layer scale: the `attn` / `mlp` captures are the outputs of `ls1` / `ls2` (the branch as it is added to the
    residual stream); `norm` only when the model has a final token norm (not for fc_norm models)."""
    found: dict[str, np.ndarray] = {}
    handles = []

    def save(name):
        return lambda mod, args, out: found.__setitem__(name, out.detach().numpy().copy())

    def save_input(name):
        return lambda mod, args: found.__setitem__(name, args[0].detach().numpy().copy())

    def mask_hook(l):
        keep = torch.from_numpy(col_masks[l])[:, None, None, :]

        def hook(mod, args, out):
            out = out * keep
            if renormalize:
                total = out.sum(-1, keepdim=True)
                out = torch.where(total > 0, out / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
            found[f"blocks.{l}.attn.probs"] = out.detach().numpy().copy()
            return out
        return hook

    def branch(blk, attn: bool):
        scale = blk.ls1 if attn else blk.ls2
        return (blk.attn if attn else blk.mlp) if isinstance(scale, torch.nn.Identity) else scale

    handles.append(tm.blocks[0].register_forward_pre_hook(save_input("embed")))
    for l, blk in enumerate(tm.blocks):
        if col_masks and l in col_masks:
            handles.append(blk.attn.attn_drop.register_forward_hook(mask_hook(l)))
        else:
            handles.append(blk.attn.attn_drop.register_forward_hook(save(f"blocks.{l}.attn.probs")))
        handles.append(branch(blk, True).register_forward_hook(save(f"blocks.{l}.attn")))
        handles.append(blk.norm2.register_forward_pre_hook(save_input(f"blocks.{l}.attn_res")))
        handles.append(branch(blk, False).register_forward_hook(save(f"blocks.{l}.mlp")))
        handles.append(blk.register_forward_hook(save(f"blocks.{l}")))
    handles.append(tm.norm.register_forward_hook(save("norm")))
    pool = getattr(tm, "attn_pool", None)
    if pool is not None:
        handles.append(pool.register_forward_pre_hook(
            lambda mod, args: found.__setitem__("attn_pool.probs", attn_pool_probs(mod, args[0]))))
    try:
        with torch.no_grad():
            logits = tm(torch.from_numpy(x))
            found["pre_logits"] = tm.forward_head(torch.from_numpy(found["norm"]), pre_logits=True).numpy()
    finally:
        for h in handles:
            h.remove()
    if isinstance(tm.norm, torch.nn.Identity):
        del found["norm"]
    return logits.numpy(), found


@pytest.fixture(scope="module")
def deit_tiny_distilled():
    return make_pair("deit_tiny_distilled_patch16_224", depth=3)   # real width and size; 3 blocks to mask


# --- static facts ------------------------------------------------------------------------------------------

COUNT_CASES = [
    ("vit_tiny_patch16_224", {}), ("vit_small_patch16_224", {}), ("vit_base_patch16_224", {}),
    ("deit_tiny_patch16_224", {}), ("deit_tiny_distilled_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}), ("deit_base_distilled_patch16_224", {}),
    ("vit_small_patch16_224", {"num_classes": 0}), ("vit_base_patch16_224", {"num_classes": 0}),   # DINO
    ("vit_base_patch32_384", {}), ("vit_large_patch16_224", {}),
]


@pytest.mark.parametrize("name,kw", COUNT_CASES, ids=[f"{n}{'-headless' if k else ''}" for n, k in COUNT_CASES])
def test_param_count_matches_timm(name, kw):
    tm = timm.create_model(name, pretrained=False, device="meta", **kw)   # no allocation
    expected = sum(p.numel() for p in tm.parameters())
    shapes = models.variable_shapes(models.create_model(name, **kw))        # jax.eval_shape, no allocation
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == expected


def test_registry_covers_spec_models_and_default_cfgs():
    for name in ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                 "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
                 "deit_base_distilled_patch16_224", "deit_tiny_patch16_224", "vit_large_patch32_384",
                 "vit_base_patch32_224", "vit_small_patch16_384", "vit_pico_patch4_32"]:
        assert name in models.list_models()
    for arch in vit.ARCHS:
        if arch == "vit_pico_patch4_32":
            continue
        ref = timm.models.get_pretrained_cfg(arch)   # the arch's default tag
        cfg = models.model_info(models.create_model(arch)).default_cfg
        assert cfg["tag"] == ref.tag, arch
        for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "num_classes"):
            assert tuple(np.atleast_1d(cfg[key])) == tuple(np.atleast_1d(getattr(ref, key))), (arch, key)
        assert models.model_info(models.create_model(arch)).num_classes == ref.num_classes


def test_model_info():
    info = models.model_info(models.create_model("deit_small_distilled_patch16_224.fb_in1k"))
    assert (info.family, info.num_prefix_tokens, info.patch_grid, info.num_classes) == ("vit", 2, (14, 14), 1000)
    assert info.stages == ("embed", *(f"blocks.{l}" for l in range(12)), "head")
    assert info.mask_sites == info.ablation_sites == tuple(f"blocks.{l}.attn" for l in range(12))
    assert info.capture_names[:6] == ("embed", "blocks.0.attn.probs", "blocks.0.attn", "blocks.0.attn_res",
                                      "blocks.0.mlp", "blocks.0")
    pico = models.model_info(models.create_model("vit_pico_patch4_32"))
    assert (pico.img_size, pico.patch_grid, pico.num_classes, pico.num_prefix_tokens) == (32, (8, 8), 10, 1)
    assert pico.default_cfg["input_size"] == (3, 32, 32) and pico.default_cfg["crop_pct"] == 1.0


# --- forward parity ------------------------------------------------------------------------------------------

# Real widths and image sizes at depth 2 (every block is the same code); one full-size model.
PARITY_CASES = [
    ("vit_tiny_patch16_224", {"depth": 2}),
    ("deit_tiny_distilled_patch16_224", {"depth": 2}),
    ("deit_tiny_patch16_224", {"depth": 2}),
    ("vit_base_patch32_224", {"depth": 3}),                      # patch 32
    ("vit_small_patch16_224", {"num_classes": 0, "depth": 4}),   # DINO-like: pooled features out
    ("vit_pico_patch4_32", {}),
    pytest.param("vit_base_patch16_224", {}, marks=pytest.mark.slow),   # one full-size model
]


@pytest.mark.parametrize("name,kw", PARITY_CASES)
def test_forward_parity(name, kw):
    tm, module, variables = make_pair(name, **kw)
    x = images(module)
    ref_logits, ref = timm_forward(tm, x)
    fwd = jax.jit(lambda v, x: module.apply(v, x, capture=("*",)))
    logits, aux = fwd(variables, nhwc(x))
    assert logits.shape == ref_logits.shape
    assert logits.dtype == jnp.float32
    assert rel_err(logits, ref_logits) <= REL_TOL
    assert set(aux) == set(ref) == set(models.model_info(module).capture_names)
    for key, value in ref.items():
        assert aux[key].shape == value.shape, key
        if key.endswith(".probs"):
            assert aux[key].dtype == jnp.float32
            assert float(np.abs(np.asarray(aux[key]) - value).max()) <= PROB_TOL, key
        else:
            assert rel_err(aux[key], value) <= REL_TOL, key


def test_capture_patterns():
    module = models.create_model("vit_pico_patch4_32", depth=2)
    variables = zero_variables(module)
    x = jnp.zeros((1, 32, 32, 3))
    _, aux = module.apply(variables, x)
    assert aux == {}
    _, aux = module.apply(variables, x, capture=("blocks.*.attn.probs", "norm"))
    assert sorted(aux) == ["blocks.0.attn.probs", "blocks.1.attn.probs", "norm"]
    assert aux["blocks.0.attn.probs"].shape == (1, 4, 65, 65)
    with pytest.raises(ValueError, match="blocks.0.attn.probs"):   # message lists the valid names
        module.apply(variables, x, capture=("blocks.99",))
    with pytest.raises(ValueError, match="blocks.0.attn"):
        module.apply(variables, x, masks={"blocks.2.attn": jnp.ones((1, 65))})
    with pytest.raises(ValueError, match="shape"):
        module.apply(variables, x, masks={"blocks.0.attn": jnp.ones((1, 64))})
    with pytest.raises(ValueError, match="embed"):
        module.apply(variables, x, start="blocks.2")


# --- masks -------------------------------------------------------------------------------------------------

def drop_masks(batch: int, n: int, prefix: int, k: int, seed: int) -> np.ndarray:
    """(B, N) keep factors dropping k random patch columns per image (prefix tokens kept)."""
    rng = np.random.default_rng(seed)
    keep = np.ones((batch, n), np.float32)
    for b in range(batch):
        keep[b, prefix + rng.choice(n - prefix, size=k, replace=False)] = 0.0
    return keep


@pytest.mark.parametrize("renormalize", [False, True])
def test_ablated_logits_match_timm_hooks(deit_tiny_distilled, renormalize):
    tm, module, variables = deit_tiny_distilled
    info = models.model_info(module)
    x = images(module, seed=1)
    n = info.num_prefix_tokens + info.patch_grid[0] * info.patch_grid[1]
    last = len(info.ablation_sites) - 1
    col = {l: drop_masks(BATCH, n, info.num_prefix_tokens, k=39, seed=l) for l in (last - 2, last - 1, last)}
    col[last][0, info.num_prefix_tokens:] = 0.0   # a whole-layer drop (paper Fig. 4b) on image 0
    ref_logits, ref = timm_forward(tm, x, col, renormalize)
    masks = {f"blocks.{l}.attn": jnp.asarray(m) for l, m in col.items()}
    logits, aux = jax.jit(lambda v, x, m: module.apply(v, x, masks=m, renormalize=renormalize,
                                                        capture=("blocks.*.attn.probs",)))(variables, nhwc(x), masks)
    clean, _ = module.apply(variables, nhwc(x))
    assert rel_err(logits, ref_logits) <= REL_TOL
    assert rel_err(logits, clean) > 1e-3   # the ablation did change the output
    for l in col:
        probs = np.asarray(aux[f"blocks.{l}.attn.probs"])
        assert float(np.abs(probs - ref[f"blocks.{l}.attn.probs"]).max()) <= PROB_TOL
        dropped = probs[:, :, :, col[l][0] == 0]
        assert not dropped[0].any()


@pytest.mark.parametrize("renormalize", [False, True])
def test_all_ones_mask_is_exactly_no_mask(deit_tiny_distilled, renormalize):
    _, module, variables = deit_tiny_distilled
    x = nhwc(images(module))
    info = models.model_info(module)
    ones = {site: jnp.ones((BATCH, 198)) for site in info.mask_sites}   # every block: 2 prefix + 196 patches
    last = f"{info.ablation_sites[-1].removesuffix('.attn')}*"
    fwd = jax.jit(lambda v, x, m: module.apply(v, x, masks=m, renormalize=renormalize, capture=(last,)))
    plain = jax.jit(lambda v, x: module.apply(v, x, capture=(last,)))
    (a, aux_a), (b, aux_b) = fwd(variables, x, ones), plain(variables, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for key in aux_b:
        np.testing.assert_array_equal(np.asarray(aux_a[key]), np.asarray(aux_b[key]))


def test_mask_columns_renormalize_guards_zero_rows():
    probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 4)), jnp.float32))
    keep = jnp.asarray([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    out = np.asarray(vit.mask_columns(probs, keep, renormalize=True))
    assert np.isfinite(out).all() and not out[0].any()
    np.testing.assert_allclose(out[1].sum(-1), 1.0, rtol=1e-6)
    assert not out[1, :, :, 1].any()
    plain = np.asarray(vit.mask_columns(probs, keep, renormalize=False))
    np.testing.assert_array_equal(plain[1], np.asarray(probs)[1] * np.asarray(keep)[1])


def test_mask_values_do_not_recompile():
    module = models.create_model("vit_pico_patch4_32", depth=2)
    variables = random_variables(module)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, 32, 32, 3)), jnp.float32)
    fwd = jax.jit(lambda v, x, m: module.apply(v, x, masks=m)[0])
    outs = []
    for seed in range(3):
        m = {"blocks.0.attn": jnp.asarray(drop_masks(BATCH, 65, 1, k=5 * seed, seed=seed)),
             "blocks.1.attn": jnp.asarray(drop_masks(BATCH, 65, 1, k=3, seed=seed + 10))}
        outs.append(np.asarray(fwd(variables, x, m)))
    assert fwd._cache_size() == 1
    assert not np.array_equal(outs[0], outs[1])


def test_start_from_captured_stage_reproduces_logits():
    tm, module, variables = make_pair("vit_tiny_patch16_224", depth=3)
    x = nhwc(images(module))
    stages = models.model_info(module).stages
    full, aux = module.apply(variables, x, capture=stages[:-1])
    for i, stage in enumerate(stages):
        inp = x if i == 0 else aux[stages[i - 1]]
        out, _ = jax.jit(lambda v, a, s=stage: module.apply(v, a, start=s))(variables, inp)
        assert rel_err(out, full) <= 1e-6, stage
    # the ablation use: a clean prefix shared with masked suffixes
    m = {"blocks.2.attn": jnp.asarray(drop_masks(BATCH, 197, 1, k=20, seed=0))}
    masked_full, _ = module.apply(variables, x, masks=m)
    masked_tail, _ = module.apply(variables, aux["blocks.0"], masks=m, start="blocks.1")
    assert rel_err(masked_tail, masked_full) <= 1e-6
    with pytest.raises(ValueError, match="before start stage"):  # that block would not run
        module.apply(variables, aux["blocks.1"], masks=m, start="head")


# --- untrained init -----------------------------------------------------------------------------------------

def test_untrained_init_follows_timm_scheme():
    """Same distributions as timm's init_weights (per-tensor mean/std/extremes), seeded and reproducible."""
    torch.manual_seed(0)
    tm = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1)
    module = models.create_model("vit_small_patch16_224", depth=1)
    variables = models.init_untrained(module, seed=0)
    again = models.init_untrained(module, seed=0)
    other = models.init_untrained(module, seed=1)
    from vitsparse_jax.weights.timm_keys.vit import timm_key
    from vitsparse_jax.weights.checkpoint import flatten
    flat, flat_again, flat_other = flatten(variables), flatten(again), flatten(other)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    for path, value in flat.items():
        ref = sd[timm_key(path)]
        value = np.asarray(value)
        np.testing.assert_array_equal(value, np.asarray(flat_again[path]))
        assert value.size == ref.size
        if ref.std() == 0:   # zeros / ones (biases, LayerNorm)
            np.testing.assert_array_equal(value.ravel(), np.full(value.size, ref.ravel()[0]))
            continue
        assert not np.array_equal(value, np.asarray(flat_other[path])), path
        assert abs(value.std() - ref.std()) <= 0.1 * ref.std() + 1e-12, path
        assert abs(value.mean()) <= 0.25 * ref.std(), path
        if "patch_embed" in path:   # torch's default conv init: uniform(+-1/sqrt(fan_in))
            assert np.abs(value).max() <= 768 ** -0.5
