"""Ablated logits against an independent PyTorch/timm implementation of the same drops (random weights).

Cases: ViT, distilled DeiT, Swin, VGG, ResNet, and one model of every newer family (DeiT III, DINOv2
with registers, CLIP, SigLIP, a registers + average-pool ViT, ConvNeXt channels / positions).

timm side: forward hooks zero the post-softmax attention columns (`attn.attn_drop` output, fused attention
off; prefix columns always kept) or the post-ReLU channels / positions (hooks on the ReLU modules; ConvNeXt:
on the channels-last GELU `mlp.act`); mu, l1 scores and the top sets are
computed in NumPy from a clean timm pass. JAX side: the experiment's jitted `Evaluator.forward`, i.e. the
shared clean prefix plus the vmapped variants started from the ablated stages.

Tolerance: max|diff| / max|ref| of the logits <= 1e-5 for every variant (measured: <= 1.2e-6, timm 1.0.31,
torch 2.14 CPU, jax 0.10 CPU).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from checkpoints_convert import convert_timm_module  # noqa: E402
from tests.timm_perturb import perturb  # noqa: E402
from vitsparse_jax import models  # noqa: E402
from vitsparse_jax.experiments.ablation import experiment as ablation
from vitsparse_jax.experiments.ablation import units as au

TOL = 1e-5
BATCH = 2
PICO_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)
SWIN = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 2), num_classes=10)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# --- timm models with our module and the hook point of each ablation site ----------------------------------

@dataclasses.dataclass
class Case:
    tm: Any
    module: Any
    variables: Any
    hook_module: Callable[[str], Any]         # site -> timm module whose output is the site's tensor
    to_units: Callable[[str, np.ndarray], np.ndarray]        # captured output -> (B, U) scores
    apply_keep: Callable[[str, Any, np.ndarray], Any]         # (site, output, (B, U) keep) -> output


# The newer ViT families at pico size: (timm VisionTransformer kwargs, our overrides of vit_pico_patch4_32)
VIT_FAMILIES = {
    "deit3": (dict(no_embed_class=True, init_values=1e-6), dict(no_embed_class=True, init_values=1e-6)),
    "dinov2_reg4": (dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),
                    dict(reg_tokens=4, no_embed_class=True, init_values=1e-5)),
    "clip": (dict(pre_norm=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)),
             dict(pre_norm=True, norm_eps=1e-5)),
    "siglip": (dict(class_token=False, global_pool="map"), dict(class_token=False, global_pool="map")),
    "reg4_gap": (dict(class_token=False, global_pool="avg", reg_tokens=4, no_embed_class=True, init_values=1e-5),
                 dict(class_token=False, global_pool="avg", reg_tokens=4, no_embed_class=True, init_values=1e-5)),
}


def _vit_case(distilled: bool, family: str | None = None) -> Case:
    from tests.test_vit_families_parity import perturb_family   # + layer-scale gammas of O(1)

    torch.manual_seed(0)
    timm_kw, our_kw = VIT_FAMILIES[family] if family else ({}, {})
    cls = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    tm = perturb_family(cls(**PICO_VIT, **timm_kw))
    module = models.create_model("vit_pico_patch4_32", depth=4, distilled=distilled, **our_kw)
    prefix = tm.num_prefix_tokens
    assert prefix == models.model_info(module).num_prefix_tokens

    def block(site: str):
        return tm.blocks[int(site.split(".")[1])].attn.attn_drop

    def to_units(site, probs):                      # (B, H, N, N) -> mu over heads and all query rows
        return probs.mean(axis=(1, 2))[:, prefix:]

    def apply_keep(site, out, keep):
        full = np.concatenate([np.ones((keep.shape[0], prefix), np.float32), keep], axis=1)
        return out * torch.tensor(full)[:, None, None, :]
    return Case(tm, module, convert_timm_module(tm, module)[0], block, to_units, apply_keep)


def _window_index(blk) -> np.ndarray:
    """(nW, T) raster token of each window column of a timm Swin block (roll by -shift, partition)."""
    (h, w), (wh, ww), (sh, sw) = blk.input_resolution, blk.window_size, blk.shift_size
    idx = np.roll(np.arange(h * w).reshape(h, w), (-sh, -sw), axis=(0, 1))
    return idx.reshape(h // wh, wh, w // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)


def _swin_case() -> Case:
    torch.manual_seed(0)
    tm = perturb(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, window_size=2, **SWIN))
    module = models.create_model("swin_tiny_patch4_window7_224", window_size=(2, 2, 2, 2), **SWIN)

    def blk(site: str):
        _, s, _, b, _ = site.split(".")
        return tm.layers[int(s)].blocks[int(b)]

    def to_units(site, probs):                      # (B*nW, heads, T, T) -> per raster token
        idx = _window_index(blk(site))
        cols = probs.mean(axis=(1, 2)).reshape(BATCH, *idx.shape)
        mu = np.zeros((BATCH, idx.size), np.float32)
        mu[:, idx.reshape(-1)] = cols.reshape(BATCH, -1)
        return mu

    def apply_keep(site, out, keep):
        idx = _window_index(blk(site))
        windows = torch.tensor(keep[:, idx].reshape(-1, 1, 1, idx.shape[1]))
        return out * windows
    return Case(tm, module, convert_timm_module(tm, module)[0], lambda s: blk(s).attn.attn_drop, to_units,
                apply_keep)


def _cnn_units(unit: str):
    def to_units(site, act):                        # (B, C, H, W) post-ReLU
        a = np.abs(act)
        return a.sum(axis=(2, 3)) if unit == "channel" else a.sum(axis=1).reshape(a.shape[0], -1)

    def apply_keep(site, out, keep):
        b, c, h, w = out.shape
        k = torch.tensor(keep)
        return out * (k[:, :, None, None] if unit == "channel" else k.reshape(b, 1, h, w))
    return to_units, apply_keep


def _vgg_case(unit: str) -> Case:
    """timm's VGG class with the sizes of the project's vgg_pico (its head swapped for the smaller one)."""
    from timm.layers import ClassifierHead
    from timm.models.vgg import VGG, ConvMlp

    from vitsparse_jax.models.vgg import CFGS

    torch.manual_seed(0)
    tm = VGG(list(CFGS["vgg_pico"]), num_classes=10)
    tm.pre_logits = ConvMlp(64, 128, kernel_size=4, drop_rate=0.0)
    tm.head = ClassifierHead(128, 10)
    tm = perturb(tm)
    module = models.create_model("vgg_pico")
    return Case(tm, module, convert_timm_module(tm, module)[0], lambda s: tm.features[int(s.split(".")[1])],
                *_cnn_units(unit))


def _convnext_case(unit: str) -> Case:
    """timm's ConvNeXt with small stages; the units live in the channels-last GELU output `mlp.act`."""
    from tests.test_vit_families_parity import perturb_family

    torch.manual_seed(0)
    kw = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)
    tm = perturb_family(timm.create_model("convnext_tiny", pretrained=False, **kw))
    module = models.create_model("convnext_tiny", img_size=64, **kw)

    def act(site: str):
        _, s, _, b, *_ = site.split(".")
        return tm.stages[int(s)].blocks[int(b)].mlp.act

    def to_units(site, a):                          # (B, H, W, C) GELU output, l1
        a = np.abs(a)
        return a.sum(axis=(1, 2)) if unit == "channel" else a.sum(axis=3).reshape(a.shape[0], -1)

    def apply_keep(site, out, keep):
        b, h, w, c = out.shape
        k = torch.tensor(keep)
        return out * (k[:, None, None, :] if unit == "channel" else k.reshape(b, h, w, 1))
    return Case(tm, module, convert_timm_module(tm, module)[0], act, to_units, apply_keep)


def _resnet_case(arch: str, unit: str) -> Case:
    torch.manual_seed(0)
    tm = perturb(timm.create_model(arch, pretrained=False, layers=[1, 1, 1, 1], num_classes=10))
    module = models.create_model(arch, layers=(1, 1, 1, 1), num_classes=10, img_size=64)

    def act(site: str):
        layer, b, name = site.split(".")
        return getattr(getattr(tm, layer)[int(b)], name)
    return Case(tm, module, convert_timm_module(tm, module)[0], act, *_cnn_units(unit))


CASES = {
    "vit": lambda: _vit_case(False),
    "deit_distilled": lambda: _vit_case(True),
    "swin": _swin_case,
    "vgg_channel": lambda: _vgg_case("channel"),
    "vgg_spatial": lambda: _vgg_case("spatial"),
    "resnet_basic": lambda: _resnet_case("resnet18", "channel"),
    "resnet_bottleneck": lambda: _resnet_case("resnet50", "channel"),
    **{family: functools.partial(_vit_case, False, family) for family in VIT_FAMILIES},
    "convnext_channel": lambda: _convnext_case("channel"),
    "convnext_spatial": lambda: _convnext_case("spatial"),
}


# --- the timm side -----------------------------------------------------------------------------------------

def timm_run(case: Case, x: np.ndarray, capture: tuple[str, ...] = (),
             keeps: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits of the timm model; `capture` records site outputs, `keeps` (B, U) drops units via hooks."""
    found, hooks = {}, []

    def hook(site):
        def fn(mod, inp, out):
            if site in capture:
                found[site] = out.detach().numpy().copy()
            return case.apply_keep(site, out, keeps[site]) if keeps and site in keeps else None
        return fn

    for site in set(capture) | set(keeps or ()):
        hooks.append(case.hook_module(site).register_forward_hook(hook(site)))
    try:
        with torch.no_grad():
            return case.tm(torch.from_numpy(x)).numpy(), found
    finally:
        for h in hooks:
            h.remove()


def assert_top_set(scores: np.ndarray, keep: np.ndarray, k: int) -> None:
    """The dropped units are the k largest scores (a unit within 1e-5 of the boundary may swap)."""
    for s, kp in zip(scores, keep):
        dropped = np.flatnonzero(kp == 0)
        assert dropped.size == k
        boundary = np.sort(s)[::-1][k - 1]
        expected = set(np.argsort(-s, kind="stable")[:k])
        for u in set(dropped) ^ expected:
            assert abs(s[u] - boundary) <= 1e-5 * abs(boundary), (u, s[u], boundary)


@functools.lru_cache(maxsize=None)
def case_of(name: str) -> Case:
    return CASES[name]()


@pytest.mark.parametrize("name", CASES)
def test_ablated_logits_equal_timm_with_hooks(name):
    case = case_of(name)
    unit = "spatial" if name.endswith("spatial") else "channel"
    ps = (0.3, 0.5) if name in ("swin", "convnext_spatial") else (0.1, 0.3)   # last stage: 4 tokens / positions
    plan = au.make_plan(case.module, ps=ps, ns=(1, 2, 3) if name == "swin" else (1, 2), draws=1, cnn_unit=unit)
    size = models.model_info(case.module).img_size
    x = np.random.default_rng(0).standard_normal((BATCH, 3, size, size)).astype(np.float32)
    xj, index = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.arange(BATCH)

    ev = ablation.Evaluator(case.module, case.variables, plan, {})
    clean, group_logits = jax.jit(ev.forward)(case.variables, xj, index, ev.key)
    _, aux = jax.jit(lambda v, x: case.module.apply(v, x, capture=plan.captures))(case.variables, xj)
    keeps = {k: np.asarray(v) for k, v in jax.jit(functools.partial(au.all_keeps, plan))(aux, ev.key, index).items()}

    rankers = sorted({s.score_from.removesuffix(".probs") for g in plan.groups for s in g.sites})
    ref_clean, captured = timm_run(case, x, capture=tuple(rankers))
    assert rel_err(clean, ref_clean) < TOL
    scores = {site: case.to_units(site, out) for site, out in captured.items()}

    per_p = 1 + plan.draws
    for group, logits in zip(plan.groups, group_logits):
        for v in range(plan.variants_per_group):
            keep = {s.site: keeps[s.site][v] for s in group.sites}
            for s in group.sites:
                if v == plan.variants_per_group - 1:               # whole-layer reference
                    assert (keep[s.site] == 0).all()
                elif v % per_p == 0:                               # top set of p index v // per_p
                    assert_top_set(scores[s.score_from.removesuffix(".probs")], keep[s.site],
                                   plan.ks[s.site][v // per_p])
            ref, _ = timm_run(case, x, keeps=keep)
            err = rel_err(logits[v], ref)
            assert err < TOL, f"n={group.n} variant {v}: rel err {err:.2e}"
        assert rel_err(ref, ref_clean) > 1e-3, "dropping whole layers changed nothing: a vacuous test"
