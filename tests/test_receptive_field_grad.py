"""The batched receptive-field program: analytic support of 3x3 conv stacks, agreement with per-layer
jax.grad, and with torch.autograd through timm on the same random weights and images.

Tolerance against timm: per layer, max|M_ours - M_timm| / max|M_timm| <= 1e-5 (measured <= 1.1e-6; float32,
HIGHEST precision; the forward passes agree to 1e-5, see test_vit_parity / test_cnn_parity).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitsparse_jax import models
from vitsparse_jax.measures import gradient_fields as rf
from vitsparse_jax.models import ModelInfo

TIMM_TOL = 1e-5


class ConvStack(nn.Module):
    """Linear 3x3 convs, stride 1, padding 1: the receptive field of conv{k} grows by 1 pixel per side."""

    depth: int = 3

    @nn.compact
    def __call__(self, x, *, masks=None, capture=(), start=None, renormalize=False):
        found = {}
        for i in range(self.depth):
            x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), precision="highest", name=f"conv{i}")(x)
            found[f"conv{i}"] = x
        return x.mean(axis=(1, 2)), {k: v for k, v in found.items() if k in capture}

    def info(self) -> ModelInfo:
        names = tuple(f"conv{i}" for i in range(self.depth))
        return ModelInfo("conv_stack", "cnn", 0, 21, 0, (0, 0), names + ("head",), (), (), names, {})


def random_variables(module, x, seed: int = 0):
    """N(0, 0.1) weights drawn with numpy: no init program to compile (all weights non-zero)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    return jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), shapes)


def support(m: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


@pytest.mark.parametrize("fraction,central", [(1 / 7, (9, 12)), (1 / 21, (10, 11))])
def test_conv_stack_support_has_analytic_size(fraction, central):
    module = ConvStack(depth=3)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 21, 21, 3))
    variables = random_variables(module, x)
    info = module.info()
    layers = rf.layer_specs(module, variables, info, info.capture_names, fraction, (21, 21))
    maps = rf.receptive_field_maps(module, variables, x, layers, 0, chunk_size=2)
    lo, hi = central
    for k, m in enumerate(maps, start=1):
        # conv_k's central block [lo, hi)^2 sees input pixels [lo - k, hi + k)^2, and every one of them
        assert support(m) == (lo - k, hi + k, lo - k, hi + k)
        assert (m[lo - k:hi + k, lo - k:hi + k] > 0).all()


def test_vgg_pico_first_conv_support():
    module = models.create_model("vgg_pico")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = random_variables(module, x)
    info = models.model_info(module)
    layers = rf.layer_specs(module, variables, info, ("features.0",), 1 / 7, (32, 32))
    assert layers[0].region.row0 == 13 and layers[0].region.row1 == 18      # 32/7 -> 5 positions
    m = rf.receptive_field_maps(module, variables, x, layers, 0)[0]
    assert support(m) == (12, 19, 12, 19)


def test_batched_program_equals_per_layer_jax_grad():
    """vmapped / chunked pullbacks == one jax.grad per layer, hand-sliced; padding rows are excluded."""
    module = models.create_model("vit_pico_patch4_32", depth=1)
    variables = models.init_untrained(module, 0)
    info = models.model_info(module)
    names = rf.select_layers(info, ["embed", "blocks.0.attn*", "blocks.0", "pre_logits", "logits"])
    layers = rf.layer_specs(module, variables, info, names, 1 / 7, (32, 32))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))

    def central(name, out, aux):   # 8x8 patch grid, f = 1/7 -> cell (3, 3); cls token first
        if name == "logits":
            return out.sum()
        y = aux[name]
        if y.ndim == 2:
            return y.sum()
        return y[:, 1:].reshape(3, 8, 8, -1)[:, 3, 3].sum()

    ref = []
    for name in names:
        def f(x, name=name):
            out, aux = module.apply(variables, x, capture=() if name == "logits" else (name,))
            return central(name, out, aux)
        g = jax.grad(f)(x)
        ref.append(np.abs(np.asarray(g)).sum(-1)[:2].mean(0))    # images 0 and 1 only
    ref = np.stack(ref)
    weight = jnp.array([1.0, 1.0, 0.0])                           # image 2 is padding
    fn = rf.make_rf_fn(module, tuple(layers), info.num_prefix_tokens, 4)    # chunks of 4 and 2 layers
    ours = np.asarray(fn(variables, x, weight)) / 2
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_uint8_images_are_normalised_inside_the_program():
    module = ConvStack(depth=1)
    images = np.random.default_rng(0).integers(0, 256, (2, 21, 21, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    x = (images / 255.0 - np.array(mean)) / np.array(std)
    variables = random_variables(module, jnp.asarray(x, jnp.float32))
    layers = tuple(rf.layer_specs(module, variables, module.info(), ("conv0",), 1 / 7, (21, 21)))
    from_uint8 = rf.make_rf_fn(module, layers, 0, 0, (mean, std))(variables, jnp.asarray(images), jnp.ones(2))
    from_float = rf.make_rf_fn(module, layers, 0, 0)(variables, jnp.asarray(x, jnp.float32), jnp.ones(2))
    # d/dx of a function of (u/255 - mean)/std w.r.t. the normalised x: the same in both cases
    np.testing.assert_allclose(np.asarray(from_uint8), np.asarray(from_float), rtol=1e-5)


# --- torch.autograd through timm ---------------------------------------------------------------------

def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_maps(tmodel, x_nchw: np.ndarray, outputs, central) -> dict[str, np.ndarray]:
    """M per layer by torch.autograd: `outputs(tmodel, x)` -> {name: tensor}; `central(name, y)` -> sum."""
    import torch

    x = torch.from_numpy(x_nchw).requires_grad_(True)
    ys = outputs(tmodel, x)
    maps = {}
    for name, y in ys.items():
        (g,) = torch.autograd.grad(central(name, y), x, retain_graph=True)
        maps[name] = g.abs().sum(1).mean(0).numpy()
    return maps


def hooked(tmodel, x, modules: dict[str, object], pre: dict[str, object] = {}):  # noqa: B006
    found, handles = {}, []
    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(lambda m, a, o, name=name: found.__setitem__(name, o)))
    for name, mod in pre.items():
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: found.__setitem__(name, a[0])))
    found["logits"] = tmodel(x)
    for h in handles:
        h.remove()
    return found


def test_vit_matches_torch_autograd_through_timm():
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from checkpoints_convert import convert_timm_module

    kw = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    torch.manual_seed(0)
    tmodel = timm.models.vision_transformer.VisionTransformer(**kw).eval()
    module = models.create_model("vit_pico_patch4_32", depth=2)
    variables, _ = convert_timm_module(tmodel, module)
    info = models.model_info(module)
    # 'norm' and 'pre_logits' (the class token after the final LayerNorm) are left out: with LayerNorm's
    # initial gamma = 1, beta = 0 their sum over channels is constant, so the gradient is rounding noise.
    names = tuple(n for n in rf.select_layers(info, ["*"]) if n not in ("norm", "pre_logits"))
    layers = rf.layer_specs(module, variables, info, names, 1 / 7, (32, 32))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ours = rf.receptive_field_maps(module, variables, jnp.asarray(x.transpose(0, 2, 3, 1)), layers,
                                   info.num_prefix_tokens, chunk_size=4)

    def outputs(tm, x):
        mods, pre = {}, {"embed": tm.blocks[0]}
        for l, blk in enumerate(tm.blocks):
            mods.update({f"blocks.{l}.attn": blk.attn, f"blocks.{l}.mlp": blk.mlp, f"blocks.{l}": blk})
            pre[f"_in{l}"] = blk
        ys = hooked(tm, x, mods, pre)
        for l in range(len(tm.blocks)):   # timm Block: x + ls1(attn(norm1(x))), ls1 / drop_path identities
            ys[f"blocks.{l}.attn_res"] = ys.pop(f"_in{l}") + ys[f"blocks.{l}.attn"]
        return ys

    def central(name, y):   # 8x8 patch grid, f = 1/7 -> cell (3, 3); cls token first
        if y.ndim == 2:
            return y.sum()
        return y[:, 1:].reshape(2, 8, 8, -1)[:, 3:4, 3:4].sum()

    ref = torch_maps(tmodel, x, outputs, central)
    assert set(ref) == set(names)
    for layer, m in zip(names, ours):
        assert rel_err(m, ref[layer]) <= TIMM_TOL, layer


def test_resnet_matches_torch_autograd_through_timm():
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from checkpoints_convert import convert_timm_module

    torch.manual_seed(0)
    tmodel = timm.create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():   # non-trivial BatchNorm statistics
        for mod in tmodel.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5), mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1), mod.running_var.uniform_(0.5, 1.5)
    module = models.create_model("resnet18")
    variables, _ = convert_timm_module(tmodel, module)
    info = models.model_info(module)
    names = rf.default_layers(info) + ("act1", "layer3.1.act2", "logits")
    names = rf.select_layers(info, names)
    layers = rf.layer_specs(module, variables, info, names, 1 / 7, (64, 64))
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ours = rf.receptive_field_maps(module, variables, jnp.asarray(x.transpose(0, 2, 3, 1)), layers, 0)
    grids = {layer.name: layer.region for layer in layers}

    def outputs(tm, x):
        mods = {"act1": tm.act1, "stem": tm.maxpool, "layer3.1.act2": tm.layer3[1].act2}
        for s in range(1, 5):
            for b, blk in enumerate(getattr(tm, f"layer{s}")):
                mods[f"layer{s}.{b}"] = blk
        return {k: v for k, v in hooked(tm, x, mods).items() if k in grids}

    def central(name, y):
        if y.ndim == 2:
            return y.sum()
        r = grids[name]
        assert y.shape[2:] == r.grid
        return y[:, :, r.row0:r.row1, r.col0:r.col1].sum()

    ref = torch_maps(tmodel, x, outputs, central)
    assert set(ref) == set(names)
    for layer, m in zip(names, ours):
        assert rel_err(m, ref[layer]) <= TIMM_TOL, layer
