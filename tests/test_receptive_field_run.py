"""The receptive-field experiment end to end through `vitsparse_jax.main.run`: files, figures, the
checkpoint series (locality over training), agreement with a direct computation, resume, errors."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import receptive_field as rf_config
from vitsparse_jax import data, main, models
from vitsparse_jax.experiments import driver
from vitsparse_jax.experiments.receptive_field import experiment as rf
from vitsparse_jax.measures import gradient_fields as rf_grad
from vitsparse_jax.runtime import parallel
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import checkpoint, loading

ARCH = "vit_pico_patch4_32"
IMAGES = 6                                  # batches of 4 (4 fake devices): the second batch is padded
LAYERS = "embed,blocks.0*,blocks.5"         # 6 layers: every ViT sub-stage group, shallow and deep
FIGURES = ("receptive_field_maps", "locality_vs_depth", "locality_over_training")


def save_checkpoint(folder, tag: str, seed: int, num_classes: int = 10):
    """Random weights drawn with numpy (no init program to compile) in the converted format."""
    module = models.create_model(ARCH, num_classes=num_classes)
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
        + 0.1 * rng.standard_normal(a.shape).astype(np.float32), models.variable_shapes(module))
    cfg = dict(models.model_info(module).default_cfg, tag=tag, num_classes=num_classes)
    return checkpoint.save(folder, ARCH, tag, variables, cfg, "test: random weights")


def tiny_config(workdir, weights: str, **rf_overrides):
    config = rf_config.get_config()
    config.workdir = str(workdir)
    config.weights = weights
    config.progress = False
    config.data.batch_size = 4
    config.data.num_images = IMAGES
    config.receptive_field.layers = LAYERS
    config.receptive_field.update(rf_overrides)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt"), "fake", seed=1))   # stands in for trained weights


@pytest.fixture(scope="module")
def run(tmp_path_factory, trained):
    folder = tmp_path_factory.mktemp("series")
    series = [save_checkpoint(folder, f"digits_step{s:07d}", seed=s + 2) for s in (0, 10)]
    (folder / "series.json").write_text(json.dumps([{"step": s, "path": str(p)} for s, p in zip((0, 10), series)]))
    config = tiny_config(tmp_path_factory.mktemp("run"), trained, checkpoints=str(folder))
    return config, main.run(config)


def test_writes_results_tables_figures_and_report(run):
    config, _ = run
    wd = Workdir(config.workdir)
    for stem in FIGURES:
        for ext in ("png",):   # PDF only on request (config.figures)
            assert wd.path(f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
    for name in ("results.json", "receptive_fields.csv", "receptive_fields.npz", "locality_over_training.csv",
                 "report.md", "config.json", "versions.json"):
        assert wd.path(name).exists(), name
    results = wd.read_json("results.json")
    assert results["config"]["receptive_field"]["layers"] == LAYERS and results["versions"]["jax"]
    assert [(m["name"], m["trained"]) for m in results["models"]] == [(f"{ARCH}.fake", True), (ARCH, False)]
    names = ["embed", "blocks.0.attn", "blocks.0.attn_res", "blocks.0.mlp", "blocks.0", "blocks.5"]
    for m in results["models"]:
        assert m["num_images"] == IMAGES
        assert [l["layer"] for l in m["layers"]] == names
        assert [l["group"] for l in m["layers"]] == ["embed", "attn", "attn_res", "mlp", "mlp_res", "mlp_res"]
        assert all(np.isfinite(l["S"]) and l["S"] > 0 and l["mean_radius"] > 0 for l in m["layers"])
        assert all(l["central"] == [3, 4, 3, 4] and l["centre_px"] == [14.0, 14.0] for l in m["layers"])
    assert [m["step"] for m in results["training"]] == [0, 10]
    rows = (wd.path("receptive_fields.csv").read_text().strip().splitlines())
    assert rows[0].startswith("model,tag,trained,step,weights,layer,group,relative_depth,grid,S,mean_radius,max_M")
    assert len(rows) == 1 + 2 * len(names)
    assert "| attn |" in wd.path("report.md").read_text()
    from vitsparse_jax import science   # the report's definitions, from docs/science.md's source
    keys = ["preprocessing", "receptive_field", "locality", "sub_stages"]
    assert "\n".join(science.report_block(keys)) in wd.path("report.md").read_text()


def test_maps_equal_a_direct_computation_on_the_same_images(run):
    config, out = run
    loaded = loading.load_model(ARCH, config.weights)
    mesh = parallel.make_mesh(jax.devices()[:1])
    source = data.subset(data.DigitsSource("test"), num_images=IMAGES)
    batch = parallel.to_host(next(iter(data.batches(source, loaded.pretrained_cfg, IMAGES, mesh))))
    x = data.normalize(batch["image"], loaded.pretrained_cfg)
    names = rf_grad.select_layers(loaded.info, LAYERS.split(","))
    layers = rf_grad.layer_specs(loaded.module, loaded.variables, loaded.info, names, 1 / 7, (32, 32))
    direct = rf_grad.receptive_field_maps(loaded.module, loaded.variables, x, layers, loaded.info.num_prefix_tokens)
    with np.load(Workdir(config.workdir).path("receptive_fields.npz")) as z:
        assert str(z["0/label"]) == f"{ARCH}.fake (trained)"
        np.testing.assert_allclose(z["0/maps"], direct, rtol=1e-4, atol=1e-6 * direct.max())
    summary = out["models"][0]["layers"][1]
    assert summary["max_M"] == pytest.approx(direct[1].max(), rel=1e-4)


def test_second_run_reads_finished_models_and_other_config_is_an_error(run):
    config, out = run
    again = config.copy_and_resolve_references()
    again.receptive_field.variants = "trained"        # the untrained twin would only recompile its init
    again = main.run(again)
    assert again["models"] == out["models"][:1] and again["training"] == out["training"]
    other = tiny_config(config.workdir, config.weights, checkpoints="", fraction=0.5)
    with pytest.raises(ValueError, match="another config"):
        main.run(other)


@pytest.mark.parametrize("overrides,match", [
    (dict(layers="blocks.0,blocks.77"), r"'blocks\.77' matches no layer of vit_pico_patch4_32; valid layers: embed"),
    (dict(fraction=0.0), "no central position"),
    (dict(variants="trained,random"), "variants"),
    (dict(checkpoints="/nonexistent/*.safetensors"), "matches no file"),
])
def test_clear_errors(tmp_path, trained, overrides, match):
    config = tiny_config(tmp_path, trained, **overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        main.run(config)


def test_headless_model_asked_for_logits(tmp_path):
    headless = save_checkpoint(tmp_path, "headless", seed=0, num_classes=0)
    config = tiny_config(tmp_path / "run", str(headless), layers="embed,logits", variants="trained")
    with pytest.raises(ValueError, match="headless.*no logits"):
        main.run(config)
    config.model, config.weights = "vit_small_patch16_224.dino", "untrained"   # headless tag; caught before loading
    with pytest.raises(ValueError, match="headless.*no logits"):
        main.run(config)


def test_default_config_runs_on_the_builtin_models(finished_runs):
    """The default command on the shipped vit_pico and its untrained twin (fewer images: the shared run of
    tests/shared_runs.py, 8 digits): paper 2's finding holds, training makes the slow (attention) pathway
    more local."""
    config = rf_config.get_config()
    assert (config.model, config.weights, config.data.source) == (ARCH, "auto", "digits")
    assert rf.model_variants(config) == [(ARCH, "auto"), (ARCH, "untrained")]
    workdir = Workdir(finished_runs.path("receptive_field"))
    trained, untrained = workdir.read_json("results.json")["models"]
    assert (trained["trained"], untrained["trained"]) == (True, False)
    assert len(trained["layers"]) == 1 + 4 * 6

    def slow_radius(m):
        return np.mean([l["mean_radius"] for l in m["layers"] if l["group"] == "attn"])
    assert slow_radius(trained) < 0.9 * slow_radius(untrained)
    for stem in FIGURES[:2]:
        assert workdir.path(f"{stem}.png").exists()


def test_presets():
    paper = rf_config.get_config("paper")
    assert [n for n, _ in rf.model_variants(paper)][::2] == list(rf_config.PAPER_MODELS)
    assert rf_config.get_config("training").receptive_field.checkpoints == "runs/train_vit"
    with pytest.raises(ValueError, match="unknown preset"):
        rf_config.get_config("nope")


def test_maps_do_not_depend_on_batch_size_or_device_count(tmp_path, trained):
    """The host adds each image's maps one by one in dataset order, so the same per-image gradients give the
    same maps to the last bit (4 devices x 1 image = 1 device x 1 image). At another per-device batch XLA
    may round the model's own gradient differently: bounded by float32 rounding (measured 8e-7 relative)."""
    loaded = loading.load_model(ARCH, weights=trained)
    source = data.make_eval_source(tiny_config(tmp_path, trained).data)
    got = []
    for batch_size, devices in ((4, jax.devices()), (1, jax.devices()[:1]), (2, jax.devices()[:1])):
        config = tiny_config(tmp_path / f"b{batch_size}d{len(devices)}", trained, layers="embed,blocks.5",
                             variants="trained")
        config.data.batch_size = batch_size
        (measured,) = driver.measure(config, Workdir(config.workdir), loaded=[loaded], source=source,
                                     mesh=parallel.make_mesh(devices))
        got.append(measured.result.maps)
    np.testing.assert_array_equal(got[1], got[0])
    np.testing.assert_allclose(got[2], got[0], rtol=0, atol=1e-5 * np.abs(got[0]).max())
