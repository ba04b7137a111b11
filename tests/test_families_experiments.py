"""Every experiment on every newer family (random weights, tiny sizes): DeiT III, DINOv2 with and
without registers, CLIP and SigLIP towers, pooled ViTs, ConvNeXt.

- Units: prefix tokens (class, distillation, registers) are never candidates; models without a class token
  have only patch candidates; ConvNeXt units are the channels (or positions) of every block's `mlp.act`.
- Sparsity: mu sums to 1 over all columns = patch mass + the mass on each kind of prefix token (reported per
  block and kind).
- Receptive fields: the ViT sub-stages with layer scale (the scaled branch, before the residual add) and the
  ConvNeXt block outputs.
- End to end through `vitsparse_jax.main.run` (sparsity, ablation, receptive fields), with a loader that builds
  the registered arch at a tiny size (32 px digits, 10 classes) with random weights.

Each family's exact numerics against timm: tests/test_vit_families_parity.py, tests/test_convnext_parity.py,
tests/test_ablation_parity.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablate as ablate_config
from configs import receptive_field as rf_config
from configs import sparsity as sparsity_config
from vitsparse_jax import main, models
from vitsparse_jax.experiments.ablation import units as au
from vitsparse_jax.measures import gradient_fields as rf_grad
from vitsparse_jax.runtime.workdir import Workdir, atomic_write_bytes
from vitsparse_jax.weights import loading
from vitsparse_jax.weights.loading import LoadedModel

VIT_TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
TINY = {   # one registered arch per family, at 32 px with 10 classes (64 patches)
    "deit3": ("deit3_small_patch16_224", VIT_TINY),
    "dinov2": ("vit_small_patch14_dinov2", VIT_TINY),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", VIT_TINY),
    "clip": ("vit_base_patch16_clip_224", VIT_TINY),
    "siglip": ("vit_base_patch16_siglip_224", VIT_TINY),
    "reg4_gap": ("vit_medium_patch16_reg4_gap_256", VIT_TINY),
    "convnext": ("convnext_tiny", dict(img_size=32, depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=10)),
}
ARCH_FAMILY = {arch: family for family, (arch, _) in TINY.items()}
PREFIX = {"deit3": ("cls",), "dinov2": ("cls",), "dinov2_reg4": ("cls",) + ("reg",) * 4, "clip": ("cls",),
          "siglip": (), "reg4_gap": ("reg",) * 4, "convnext": ()}


def random_variables(module, seed: int = 0) -> dict:
    """Variance-preserving random weights drawn with numpy (no init program): kernels N(0, 1/fan_in) (q/k
    doubled: peaked attention), LayerNorm scales and layer-scale gammas ~1, small biases, tokens O(1)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            std = (1.0 / np.prod(s.shape[:-1])) ** 0.5 * (2.0 if "qkv" in name else 1.0)
        elif name.endswith("['scale']") or name.endswith("['gamma']"):
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
        else:
            std = 0.02 if name.endswith("['bias']") else 0.5
        return (std * rng.standard_normal(s.shape)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(module))


@functools.lru_cache(maxsize=None)
def tiny(family: str, untrained: bool = False) -> LoadedModel:
    arch, kw = TINY[family]
    module = models.create_model(arch, **kw)
    info = models.model_info(module)
    variables = models.init_untrained(module, 0) if untrained else random_variables(module)
    cfg = {**info.default_cfg, "tag": "tiny", "input_size": (3, 32, 32), "crop_pct": 1.0, "num_classes": 10}
    weights = "untrained (seed 0)" if untrained else "tests: random weights"
    return LoadedModel(module, variables, info, cfg, arch, "tiny", weights, "tests")


def tiny_loader(name, weights="auto", checkpoint_dir="", seed=0, **overrides):
    arch, _ = models.split_name(name)
    return tiny(ARCH_FAMILY[arch], untrained=str(weights).startswith("untrained"))


def drawn_not_rendered(self, fig, stem, dpi=300):
    """Workdir.save_figure without the rendering (most of a tiny run's time; the experiments' own tests
    render): the figure was built; its PNG is a 1x1 image (report.html inlines it), its PDF empty."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    assert fig.axes, stem
    plt.close(fig)
    png = io.BytesIO()
    Image.new("RGB", (1, 1)).save(png, format="PNG")
    return [atomic_write_bytes(self.path(f"{stem}.png"), png.getvalue()),
            atomic_write_bytes(self.path(f"{stem}.pdf"), b"")]


@pytest.fixture
def patched_loader(monkeypatch):
    """The experiments load the tiny variants (the driver's `load_model`); figures are not rendered."""
    monkeypatch.setattr(loading, "load_model", tiny_loader)
    monkeypatch.setattr(Workdir, "save_figure", drawn_not_rendered)


def digits_config(config, workdir, images: int = 8):
    config.model = TINY[workdir.name][0]
    config.workdir = str(workdir)
    config.weights = "untrained"
    config.progress = False
    config.data.batch_size = 4
    config.data.num_images = images
    return config


# --- units ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [f for f in TINY if f != "convnext"])
def test_prefix_tokens_are_never_candidates(family):
    loaded = tiny(family)
    info = loaded.info
    assert info.prefix_kinds == PREFIX[family] and info.num_prefix_tokens == len(PREFIX[family])
    plan = au.make_plan(loaded.module, ps=(0.1, 0.5), ns=(1, 2), draws=2)
    prefix = info.num_prefix_tokens
    for group in plan.groups:
        for site in group.sites:
            assert site.kind == "token" and site.prefix == prefix and site.units == 64   # the patches only
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 3)), jnp.float32)
    _, aux = loaded.module.apply(loaded.variables, x, capture=plan.captures)
    keeps = au.all_keeps(plan, aux, jax.random.PRNGKey(0), jnp.arange(3))
    for group in plan.groups:
        for site, mask in au.group_masks(group, keeps).items():
            mask = np.asarray(mask)                                        # (V, B, prefix + 64)
            assert mask.shape == (plan.variants_per_group, 3, prefix + 64)
            assert (mask[..., :prefix] == 1).all(), f"{site}: a prefix token was dropped"
            assert (mask[-1, :, prefix:] == 0).all()                       # whole layer: every patch
            dropped = (mask[:-1, :, prefix:] == 0).sum(-1)                 # top + draws: k per p
            np.testing.assert_array_equal(dropped[:, 0], np.repeat([6, 32], 3))


def test_convnext_units_are_mlp_act_channels_and_positions():
    loaded = tiny("convnext")
    info = loaded.info
    assert info.ablation_sites == tuple(f"stages.{s}.blocks.{b}.mlp.act" for s, b in
                                        ((0, 0), (1, 0), (2, 0), (2, 1), (3, 0)))
    plan = au.make_plan(loaded.module, ps=(0.1,), ns=(1, 3), draws=1)
    sites = {s.site: s for g in plan.groups for s in g.sites}
    assert [sites[s].units for s in info.ablation_sites[-3:]] == [96, 96, 128]   # 4 x the stage width
    assert all(s.kind == "channel" and s.stage == s.site.removesuffix(".mlp.act") for s in sites.values())
    spatial = au.make_plan(loaded.module, ps=(0.75,), ns=(2,), draws=1, cnn_unit="spatial")
    assert [s.units for s in spatial.groups[0].sites] == [4, 1] and spatial.ks[info.ablation_sites[-1]] == (1,)


# --- receptive fields -------------------------------------------------------------------------------------------

def test_layer_scale_branches_are_the_sub_stages_before_the_residual_add():
    loaded = tiny("dinov2_reg4")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
    _, aux = loaded.module.apply(loaded.variables, x, capture=("*",))
    for l in range(2):
        before = aux["embed"] if l == 0 else aux[f"blocks.{l - 1}"]
        np.testing.assert_allclose(aux[f"blocks.{l}.attn_res"], before + aux[f"blocks.{l}.attn"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(aux[f"blocks.{l}"], aux[f"blocks.{l}.attn_res"] + aux[f"blocks.{l}.mlp"],
                                   rtol=1e-6, atol=1e-6)
    gamma = np.asarray(loaded.variables["params"]["blocks_1"]["ls2"]["gamma"])
    assert not np.allclose(gamma, 1.0)   # the scale is not the identity: the captures include it
    layers = rf_grad.default_layers(loaded.info)
    assert layers == ("embed", "blocks.0.attn", "blocks.0.attn_res", "blocks.0.mlp", "blocks.0",
                      "blocks.1.attn", "blocks.1.attn_res", "blocks.1.mlp", "blocks.1")
    assert [rf_grad.layer_group(n) for n in layers[1:5]] == ["attn", "attn_res", "mlp", "mlp_res"]


def test_convnext_receptive_field_layers_are_the_stem_and_block_outputs():
    loaded = tiny("convnext")
    layers = rf_grad.default_layers(loaded.info)
    assert layers == ("stem", "stages.0.blocks.0", "stages.1.blocks.0", "stages.2.blocks.0", "stages.2.blocks.1",
                      "stages.3.blocks.0")
    assert {rf_grad.layer_group(n) for n in layers[1:]} == {"block"}
    specs = rf_grad.layer_specs(loaded.module, loaded.variables, loaded.info, layers, 1 / 7, (32, 32))
    assert [s.region.grid for s in specs] == [(8, 8), (8, 8), (4, 4), (2, 2), (2, 2), (1, 1)]
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 32, 3)), jnp.float32)
    maps = rf_grad.receptive_field_maps(loaded.module, loaded.variables, x, specs, 0)
    assert maps.shape == (6, 32, 32) and np.isfinite(maps).all() and (maps.reshape(6, -1).max(1) > 0).all()
    # the deepest layer sees more of the image than the stem's 4x4 patch
    assert (maps[-1] > 0).sum() > (maps[0] > 0).sum()


# --- end to end: every experiment on every family ----------------------------------------------------------------

@pytest.mark.parametrize("family", list(TINY))
def test_sparsity_runs(family, tmp_path, patched_loader):
    config = digits_config(sparsity_config.get_config(), tmp_path / family)
    out = main.run(config)
    assert out["images"] == 8
    if family == "convnext":
        assert out["kind"] == "cnn" and out["layers"] == list(tiny(family).info.ablation_sites)
    else:
        assert out["kind"] == "attention" and out["layers"] == ["blocks.0", "blocks.1"]
        stats = out["statistics"]
        by_kind = stats["prefix_mu_by_kind"]   # the mass on each kind of prefix token, per block
        assert set(by_kind) == set(PREFIX[family])
        # mu sums to 1 over all columns: 64 patch columns + every prefix column, per block
        np.testing.assert_allclose(stats["mean_mu"] * 64 + sum(by_kind.values(), np.zeros(2)), 1.0, rtol=1e-5)
    assert (tmp_path / family / "report.md").stat().st_size > 0


def clean_accuracy(loaded: LoadedModel, images: int = 8) -> float:
    """Top-1 accuracy of the model on the first digits of the test split, computed here in one batch."""
    from vitsparse_jax import data
    from vitsparse_jax.runtime import parallel

    source = data.subset(data.DigitsSource("test"), num_images=images)
    mesh = parallel.make_mesh(jax.devices()[:1])
    batch = parallel.to_host(next(iter(data.batches(source, loaded.pretrained_cfg, images, mesh))))
    logits, _ = loaded.module.apply(loaded.variables, data.normalize(batch["image"], loaded.pretrained_cfg))
    return float(np.mean(np.asarray(logits).argmax(-1) == np.asarray(batch["label"])))


@pytest.mark.parametrize("family", ["deit3", "clip", "reg4_gap", "convnext"])   # the families with a classifier
def test_ablation_runs(family, tmp_path, patched_loader):
    config = digits_config(ablate_config.get_config(), tmp_path / family)
    config.ablation.p, config.ablation.n, config.ablation.draws, config.ablation.bootstrap = (0.1,), (1, 2), 1, 20
    out = main.run(config)
    (model,) = out["models"]
    assert len(model["cells"]) == 2 and model["A0"] == pytest.approx(clean_accuracy(tiny(family, untrained=True)))
    if family != "convnext":
        assert model["k"]["0.1"] == [6, 6]   # round(0.1 * 64) patch tokens in each of the last 2 blocks
    assert (tmp_path / family / "report.md").stat().st_size > 0


@pytest.mark.parametrize("family", list(TINY))
def test_receptive_fields_run(family, tmp_path, patched_loader):
    config = digits_config(rf_config.get_config(), tmp_path / family, images=4)
    out = main.run(config)
    assert len(out["models"]) == 2   # trained and untrained
    layers = rf_grad.default_layers(tiny(family).info)
    for model in out["models"]:
        assert [layer["layer"] for layer in model["layers"]] == list(layers)
        assert all(np.isfinite(layer["mean_radius"]) and layer["max_M"] > 0 for layer in model["layers"])
    assert (tmp_path / family / "report.md").stat().st_size > 0
