"""Headless towers (DINOv2, SigLIP, CLIP, MAE: timm's tags with num_classes=0) and the shared config fields
`img_size`, `num_classes`, `head_weights` (docs/science.md#models), through the real loader (`load_model`) and
`vitsparse_jax.main`:

- head_weights: a linear classifier file (.npz / .safetensors, weight (C, D), bias (C,)) gives logits =
  pre_logits @ weight.T + bias; strict shape checks name the shapes expected;
- the ablation end to end on a DINOv2-style model with a head file and on a SigLIP-style model (MAP pooling)
  with num_classes; without a classifier it stops before any work with the ways out;
- img_size from the config: the position embedding resampled, the eval crop at that size; a size that is not
  a whole number of patches is one line and exit status 2 on the command line;
- `vit_base_patch16_224.mae` (token-pooled and headless in timm) resolves and runs sparsity and receptive fields.

The registered archs are built small (depth 2, width 32: `small_archs`) with random weights, on 8 digits.
"""
from __future__ import annotations

import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from configs import ablate as ablate_config
from configs import receptive_field as rf_config
from configs import sparsity as sparsity_config
from vitsparse_jax import experiments, main, models
from vitsparse_jax.runtime.workdir import Workdir, atomic_write_bytes
from vitsparse_jax.weights import checkpoint, heads, loading, pretrained

ROOT = Path(__file__).resolve().parents[1]
DINOV2, SIGLIP, MAE = "vit_small_patch14_dinov2", "vit_base_patch16_siglip_224", "vit_base_patch16_224"
SMALL = dict(depth=2, embed_dim=32, num_heads=2)


def use_small_archs(monkeypatch) -> None:
    """`create_model` builds DINOv2, SigLIP and ViT-B at depth 2, width 32 (what the loader, the planned module
    and the experiments all build); figures are built but not rendered."""
    create = models.create_model

    def small(name, **overrides):
        arch, _ = models.split_name(name)
        return create(name, **({**SMALL, **overrides} if arch in (DINOV2, SIGLIP, MAE) else overrides))

    def drawn_not_rendered(self, fig, stem, dpi=300):   # a 1 x 1 PNG stands for the figure
        import io

        import matplotlib.pyplot as plt
        from PIL import Image

        plt.close(fig)
        png = io.BytesIO()
        Image.new("RGB", (1, 1)).save(png, format="PNG")
        return [atomic_write_bytes(self.path(f"{stem}.png"), png.getvalue()),
                atomic_write_bytes(self.path(f"{stem}.pdf"), b"")]

    monkeypatch.setattr(models, "create_model", small)
    monkeypatch.setattr(Workdir, "save_figure", drawn_not_rendered)


@pytest.fixture
def small_archs(monkeypatch):
    use_small_archs(monkeypatch)


def dinov2_checkpoint(folder: Path) -> Path:
    """A converted headless DINOv2 checkpoint (timm's lvd142m cfg: 518 px, no classifier), random weights."""
    module = models.create_model(DINOV2)
    rng = np.random.default_rng(0)
    flat = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in checkpoint.flatten(models.variable_shapes(module)).items()}
    cfg = pretrained.resolve_cfg(DINOV2, "lvd142m")
    assert cfg["num_classes"] == 0 and cfg["input_size"][-1] == 518
    return checkpoint.save(folder, DINOV2, "lvd142m", checkpoint.unflatten(flat), cfg, "tests: random weights")


def head_file(path: Path, classes: int = 10, dim: int = 32, seed: int = 1) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((classes, dim)).astype(np.float32)
    bias = rng.standard_normal(classes).astype(np.float32)
    if path.suffix == ".npz":
        np.savez(path, weight=weight, bias=bias)
    else:
        safetensors.numpy.save_file({"weight": weight, "bias": bias}, str(path))
    return path, weight, bias


def digits(config, workdir: Path, model: str, images: int = 8):
    config.model = model
    config.workdir = str(workdir)
    config.progress = False
    config.data.batch_size = 4
    config.data.num_images = images
    return config


def small_grid(config, p: float):
    config.ablation.p, config.ablation.n, config.ablation.draws, config.ablation.bootstrap = (p,), (1, 2), 1, 20
    return config


# --- head_weights ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_head_weights_logits_are_the_features_times_weight_plus_bias(suffix, tmp_path, small_archs):
    ckpt = dinov2_checkpoint(tmp_path / "ckpt")
    path, weight, bias = head_file(tmp_path / f"probe{suffix}")
    features = loading.load_model(DINOV2, weights=str(ckpt), img_size=42)
    headed = loading.load_model(DINOV2, weights=str(ckpt), img_size=42, head_weights=str(path))
    assert features.info.num_classes == 0 and headed.info.num_classes == 10
    assert headed.pretrained_cfg["num_classes"] == 10 and headed.pretrained_cfg["input_size"][-1] == 42
    assert headed.describe()["head_weights"] == {"weights": str(path), "sha256": heads.read_head(path).sha256}
    assert loading.planned_module(DINOV2, str(ckpt), img_size=42, head_weights=str(path)) == headed.module
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 42, 42, 3)), jnp.float32)
    pooled, _ = features.module.apply(features.variables, x)
    logits, aux = headed.module.apply(headed.variables, x, capture=("pre_logits",))
    np.testing.assert_array_equal(np.asarray(aux["pre_logits"]), np.asarray(pooled))   # the backbone is unchanged
    want = np.asarray(pooled, np.float64) @ weight.T.astype(np.float64) + bias
    assert np.abs(np.asarray(logits) - want).max() <= 1e-5 * np.abs(want).max()


def test_head_weights_strict_checks(tmp_path, small_archs):
    ckpt = str(dinov2_checkpoint(tmp_path / "ckpt"))
    wrong_dim, _, _ = head_file(tmp_path / "dim48.npz", dim=48)
    with pytest.raises(ValueError, match=r"needs weight \(10, 32\) and bias \(10,\).*has weight \(10, 48\)"):
        loading.load_model(DINOV2, weights=ckpt, head_weights=str(wrong_dim))
    with pytest.raises(ValueError, match=r"needs weight \(10, 32\)"):   # before anything is loaded
        loading.planned_module(DINOV2, ckpt, head_weights=str(wrong_dim))
    np.savez(tmp_path / "nobias.npz", weight=np.zeros((10, 32), np.float32))
    with pytest.raises(ValueError, match=r"lacks 'bias'; it holds \['weight'\]"):
        heads.read_head(tmp_path / "nobias.npz")
    np.savez(tmp_path / "bias9.npz", weight=np.zeros((10, 32), np.float32), bias=np.zeros(9, np.float32))
    with pytest.raises(ValueError, match=r"weight \(10, 32\) and bias \(9,\); expected weight \(num_classes, dim\)"):
        heads.read_head(tmp_path / "bias9.npz")
    (tmp_path / "probe.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="neither .npz nor .safetensors"):
        heads.read_head(tmp_path / "probe.pt")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        heads.read_head(tmp_path / "missing.npz")
    good, _, _ = head_file(tmp_path / "probe.npz")
    with pytest.raises(ValueError, match="num_classes=5 but head_weights .* is a classifier of 10 classes"):
        loading.load_model(DINOV2, weights=ckpt, head_weights=str(good), num_classes=5)
    with pytest.raises(ValueError, match="no classifier .* --config.head_weights=PATH"):   # no random trained head
        loading.load_model(DINOV2, weights=ckpt, num_classes=10)


# --- the ablation on headless towers ------------------------------------------------------------------------------

def test_ablation_on_a_dinov2_tower_with_a_head_file_at_another_size(tmp_path, small_archs):
    """Converted 518 px weights run at 42 px (3 x 3 patches of 14): pos_embed resampled, crops of 42 px."""
    ckpt = dinov2_checkpoint(tmp_path / "ckpt")
    probe, _, _ = head_file(tmp_path / "probe.npz")
    config = small_grid(digits(ablate_config.get_config(), tmp_path / "run", f"{DINOV2}.lvd142m"), p=0.25)
    config.weights, config.img_size, config.head_weights = str(ckpt), 42, str(probe)
    out = main.run(config)
    (model,) = out["models"]
    assert model["pretrained_cfg"]["input_size"][-1] == 42 and model["pretrained_cfg"]["num_classes"] == 10
    assert model["head_weights"]["weights"] == str(probe) and len(model["head_weights"]["sha256"]) == 64
    assert [s["units"] for s in model["sites"]] == [9, 9]                  # 3 x 3 patches; the class token is not one
    assert model["k"]["0.25"] == [2, 2] and 0.0 <= model["A0"] <= 1.0 and model["images_used"] == 8
    assert (tmp_path / "run" / "COMPLETE.json").exists()


def test_ablation_on_a_siglip_tower_with_num_classes(tmp_path, small_archs):
    """SigLIP (no class token, MAP pooling), untrained with a 10-class classifier: the smoke-test way out."""
    config = small_grid(digits(ablate_config.get_config(), tmp_path, f"{SIGLIP}.webli"), p=0.25)
    config.weights, config.num_classes, config.img_size = "untrained", 10, 32
    out = main.run(config)
    (model,) = out["models"]
    assert model["pretrained_cfg"]["num_classes"] == 10 and model["pretrained_cfg"]["input_size"][-1] == 32
    assert [s["units"] for s in model["sites"]] == [4, 4] and model["k"]["0.25"] == [1, 1]   # every token a patch
    assert 0.0 <= model["A0"] <= 1.0 and len(model["cells"]) == 2


def test_a_headless_ablation_stops_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("weights or data were loaded")

    assert experiments.REGISTRY["ablate"]   # imported first: their own `load_model` names stay the real one
    monkeypatch.setattr(loading, "load_model", no_work)
    monkeypatch.setattr("vitsparse_jax.data.make_eval_source", no_work)
    config = digits(ablate_config.get_config(), tmp_path / "dinov2", f"{DINOV2}.lvd142m")
    with pytest.raises(ValueError) as e:
        main.run(config)   # weights='auto': not even looked for
    text = str(e.value)
    for part in ("has no classifier", "top-1 accuracy", "vit_base_patch16_clip_224.openai_ft_in1k",
                 "--config.head_weights=PATH", "--config.weights=untrained --config.num_classes=N"):
        assert part in text, (part, text)
    assert not (tmp_path / "dinov2" / "results.json").exists()
    # an arch with tags that have a classifier: one of them is named
    config = digits(ablate_config.get_config(), tmp_path / "mae", f"{MAE}.mae")
    with pytest.raises(ValueError, match=rf"has no classifier .* e.g. --config.model={MAE}\.augreg2_in21k_ft_in1k"):
        main.run(config)
    # CLIP's image-text tags: timm's num_classes=512 is the projection into the joint embedding, not classes
    config = digits(ablate_config.get_config(), tmp_path / "clip", "vit_base_patch16_clip_224.openai")
    with pytest.raises(ValueError, match=r"its 512 outputs .* not classes.* e.g. --config.model=vit_base_patch16_"
                                         r"clip_224\.laion2b_ft_in12k_in1k"):
        main.run(config)


def _main(capsys, caplog, *args: str) -> tuple[int, list[str]]:
    """`python -m vitsparse_jax.main <args>` in this process: its status and what it would print on stderr
    (its messages and its log records at INFO and above; not absl's note on resetting the flags)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = main.cli(["vitsparse_jax.main", *args])
    logged = [r.getMessage() for r in caplog.records if "absl/flags" not in r.pathname.replace("\\", "/")]
    return status, capsys.readouterr().err.strip().splitlines() + logged


def test_the_command_line_gives_one_line_for_a_headless_ablation_and_a_size_that_does_not_divide(
        tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)
    status, lines = _main(capsys, caplog, "--config=configs/ablate.py", f"--config.model={DINOV2}.lvd142m",
                          "--config.weights=untrained", f"--config.workdir={tmp_path / 'a'}")
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and "top-1 accuracy" in lines[0], lines
    status, lines = _main(capsys, caplog, "--config=configs/sparsity.py", f"--config.model={DINOV2}.lvd142m",
                          "--config.weights=untrained", "--config.img_size=50", f"--config.workdir={tmp_path / 's'}")
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "img_size=50 is not a whole number of 14x14 patches" in lines[0] and "28, 42, 56, 70" in lines[0]
    assert "Traceback" not in lines[0] and not (tmp_path / "s" / "results.json").exists()


# --- img_size and headless sparsity / receptive fields --------------------------------------------------------------

def test_sparsity_of_a_headless_dinov2_at_the_configured_size(tmp_path, small_archs):
    config = digits(sparsity_config.get_config(), tmp_path, f"{DINOV2}.lvd142m")
    config.weights, config.img_size = "untrained", 112                    # 8 x 8 patches of 14
    out = main.run(config)
    assert out["images"] == 8 and out["layers"] == ["blocks.0", "blocks.1"]
    np.testing.assert_allclose(out["statistics"]["mean_mu"] * 64 + out["statistics"]["prefix_mu_by_kind"]["cls"],
                               1.0, rtol=1e-5)


def test_mae_tag_is_token_pooled_headless_and_runs_sparsity_and_receptive_fields(tmp_path, small_archs):
    """timm's vit_base_patch16_224.mae: num_classes=0, global_pool 'token' (not a pooled ViT: those are the
    *_gap_* archs), so sparsity and receptive fields run and the ablation asks for a classifier."""
    name = f"{MAE}.mae"
    assert pretrained.resolve_cfg(MAE, "mae")["num_classes"] == 0
    assert loading.resolve_weights(name, "auto").kind == loading.HUB
    module = loading.planned_module(name, "untrained")
    assert module.global_pool == "token" and models.model_info(module).num_classes == 0
    assert models.model_info(module).prefix_kinds == ("cls",)

    config = digits(sparsity_config.get_config(), tmp_path / "sparsity", name, images=4)
    config.weights, config.img_size = "untrained", 128                    # 8 x 8 patches of 16
    assert main.run(config)["images"] == 4
    config = digits(rf_config.get_config(), tmp_path / "rf", name, images=4)
    config.weights, config.img_size, config.receptive_field.variants = "untrained", 32, "untrained"   # 2 x 2
    (model,) = main.run(config)["models"]
    assert all(np.isfinite(layer["mean_radius"]) for layer in model["layers"])
    assert "logits" not in [layer["layer"] for layer in model["layers"]]
    config = digits(ablate_config.get_config(), tmp_path / "ablate", name)
    config.weights = "untrained"
    with pytest.raises(ValueError, match="has no classifier"):
        main.run(config)


def test_config_options():
    config = ablate_config.get_config()
    assert loading.config_options(config) == {}
    config.img_size, config.num_classes, config.head_weights = 224, 0, "probe.npz"
    assert loading.config_options(config) == {"img_size": 224, "num_classes": 0, "head_weights": "probe.npz"}
    config.num_classes = -2
    with pytest.raises(ValueError, match="num_classes must be -1"):
        loading.config_options(config)


# --- the documented commands -------------------------------------------------------------------------------------

def _commands(text: str) -> list[list[str]]:
    from tests.test_readme import readme_commands

    return [c for c in readme_commands(text) if c[:3] == ["python", "-m", "vitsparse_jax.main"]]


def _sections() -> tuple[str, str]:
    docs = (ROOT / "docs" / "ablation.md").read_text().split("## Headless towers", 1)[1].split("\n## ", 1)[0]
    readme = (ROOT / "README.md").read_text().split("Headless towers:", 1)[1].split("\n### ", 1)[0]
    return docs, readme


def documented_commands() -> list[list[str]]:
    """The commands of docs/ablation.md's "Headless towers" and of the README's paragraph, each once."""
    return [list(c) for c in dict.fromkeys(tuple(c) for section in _sections() for c in _commands(section))]


def test_the_headless_commands_are_documented():
    docs, readme = (_commands(section) for section in _sections())
    assert len(docs) == 3 and readme and all(c in docs for c in readme)   # the README's is the docs' smoke test
    commands = [" ".join(c) for c in docs]
    assert any("--config.head_weights=" in c for c in commands) and any("_ft_in1k" in c for c in commands)


@pytest.mark.parametrize("argv", documented_commands(), ids=lambda argv: " ".join(argv[4:6])[:80])
def test_documented_headless_command(argv, tmp_path, monkeypatch):
    """The smoke-test commands run (small archs, 16 digits); the others (ImageNet, hub weights) plan their
    models as the run would, before any work: a classifier, the image size, the probe's shapes."""
    from tests.test_readme import experiment_config
    from vitsparse_jax.experiments import driver

    config = experiment_config(argv[3:])
    if config.weights == "untrained":
        use_small_archs(monkeypatch)
        config.workdir, config.progress = str(tmp_path), False
        (model,) = main.run(config)["models"]
        assert model["pretrained_cfg"]["num_classes"] == config.num_classes and len(model["cells"]) == 2
        return
    if config.head_weights:
        dim = heads.feature_dim(models.create_model(config.model))
        config.head_weights = str(head_file(tmp_path / "probe.npz", classes=1000, dim=dim)[0])
    _, (module,) = driver.plan_models(config)
    assert models.model_info(module).num_classes == 1000
    assert models.model_info(module).img_size == (config.img_size or models.model_info(module).img_size)
    assert loading.resolve_weights(config.model, config.weights, config.checkpoint_dir).kind == loading.HUB
