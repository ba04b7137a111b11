"""The sparsity experiment end to end: outputs, numbers against NumPy on captured maps, invariances, errors."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from configs import sparsity as sparsity_config
from vitsparse_jax import data, main
from vitsparse_jax.experiments import driver
from vitsparse_jax.experiments.sparsity import experiment as sparsity
from vitsparse_jax.runtime import parallel, resumable
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import loading

IMAGES = 12
ATTENTION_FIGURES = ("fig1_example_attention", "fig2a_corr_heads", "fig2b_corr_layers", "fig3a_nu_density_last",
                     "fig3b_top_patches", "figS1_all_heads", "figS4_nu_density_blocks", "top_share",
                     "norms_mu_vs_input_norm", "norms_vs_depth")
NORM_FIGURES = ATTENTION_FIGURES[-2:]   # high-norm tokens: ViT tokens only (not Swin)


def tiny_config(preset=None, images=IMAGES, **sparsity_overrides):
    config = sparsity_config.get_config(preset)
    config.weights = "untrained"
    config.progress = False
    config.data.batch_size = 8             # 4 fake devices (conftest); the last batch of 12 is padded
    config.data.num_images = images        # the first images of the digits' test split
    config.sparsity.update(sparsity_overrides)
    return config


def digits(images=IMAGES):
    return data.subset(data.DigitsSource("test"), num_images=images)


@pytest.fixture(scope="module")
def vit():
    return loading.load_model(sparsity_config.get_config().model, "untrained", seed=0)


@pytest.fixture(scope="module")
def vgg():
    return loading.load_model(sparsity_config.get_config("vgg").model, "untrained", seed=0)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    config = tiny_config()
    config.workdir = str(tmp_path_factory.mktemp("vit_run"))
    return config, main.run(config)


def captured_maps(loaded, images=IMAGES):
    """Post-softmax maps of every block for the first images, straight from the model (numpy, float64)."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    batch = parallel.to_host(next(iter(data.batches(digits(images), loaded.pretrained_cfg, images, mesh))))
    names = tuple(s.removesuffix(".attn") for s in loaded.info.ablation_sites)
    _, aux = loaded.module.apply(loaded.variables, data.normalize(batch["image"], loaded.pretrained_cfg),
                                 capture=tuple(f"{n}.attn.probs" for n in names))
    return [np.asarray(aux[f"{n}.attn.probs"], np.float64) for n in names]


def test_run_writes_every_figure_table_and_the_report(vit_run):
    config, summary = vit_run
    wd = Workdir(config.workdir)
    for stem in ATTENTION_FIGURES:
        for ext in ("png",):   # PDF only on request (config.figures)
            assert wd.path(f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
    for name in ("blocks.csv", "corr_heads.csv", "corr_layers.csv", "nu_density.csv", "top_patches.csv",
                 "config.json", "versions.json"):
        assert wd.path(name).exists(), name
    results = wd.read_json("results.json")
    assert results["images"] == IMAGES and results["images_skipped"] == 0
    assert results["model"]["model"] == "vit_pico_patch4_32" and results["model"]["weights"].startswith("untrained")
    assert results["config"]["sparsity"]["top_by"] == "head_mean" and "jax" in results["versions"]
    assert results["figures"] == list(ATTENTION_FIGURES)
    report = wd.path("report.md").read_text()
    positions = [report.index(f"]({stem}.png)") for stem in ATTENTION_FIGURES]
    assert positions == sorted(positions)
    assert "## Blocks" in report and "Layer-by-layer r" in report
    from vitsparse_jax import science   # the report's definitions, from docs/science.md's source
    keys = ["preprocessing", "mu", "prefix_mass", "nu_density", "correlations", "top_patches", "top_share",
            "high_norm_tokens"]
    assert "\n".join(science.report_block(keys)) in report
    assert summary["statistics"]["corr_layers"].shape == (6, 6)


def test_the_default_config_runs_on_the_builtin_checkpoint(finished_runs):
    workdir = finished_runs.path("sparsity")      # the default config on 8 digits (tests/shared_runs.py)
    summary = Workdir(workdir).read_json("results.json")
    assert summary["name"] == "vit_pico_patch4_32.digits" and summary["images"] == 8
    assert summary["model"]["weights"].endswith("vit_pico_patch4_32.digits.safetensors")
    assert all((workdir / f"{stem}.png").exists() for stem in ATTENTION_FIGURES)


def test_run_statistics_equal_numpy_on_the_captured_maps(vit_run, vit):
    config, summary = vit_run
    stats = summary["statistics"]
    maps = captured_maps(vit)
    mu = np.stack([m.mean(axis=(1, 2)) for m in maps], 1)[:, :, 1:]     # (images, blocks, patches)
    np.testing.assert_allclose(stats["mean_mu"], mu.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats["mean_nu"], (-np.log10(mu)).mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats["std_nu"], (-np.log10(mu)).std(axis=(0, 2)), rtol=1e-3)
    np.testing.assert_allclose(stats["corr_layers"], np.corrcoef(mu.transpose(1, 0, 2).reshape(6, -1)), atol=1e-4)
    mu_h = maps[-1].mean(axis=2)[:, :, 1:]
    np.testing.assert_allclose(stats["corr_heads"], np.corrcoef(mu_h.transpose(1, 0, 2).reshape(4, -1)), atol=1e-4)
    k = round(0.05 * 64)
    counts = np.zeros(64)
    for row in mu[:, -1]:
        counts[np.argsort(-row, kind="stable")[:k]] += 1
    np.testing.assert_array_equal(stats["top_counts"], counts)
    hist = np.histogram(-np.log10(mu[:, -1]), bins=stats["nu_hist"].shape[-1] - 2, range=(0.0, 8.0))[0]
    np.testing.assert_array_equal(stats["nu_hist"][-1, 1:-1], hist)


def test_example_maps_are_the_captured_maps(vit):
    cfg = tiny_config(head=2, s1_block=-3, example_index=5).sparsity
    probe = sparsity.make_probe(vit.module, cfg)
    choice = sparsity.example_choice(probe, digits(), cfg)
    assert (choice.image, choice.head, choice.block) == (5, 2, 3)
    ex = sparsity.example(vit, probe, driver.context(tiny_config(), digits()), choice)
    maps = captured_maps(vit)
    np.testing.assert_allclose(ex.head_map, maps[-1][5, 2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ex.heads, maps[3][5], rtol=1e-5, atol=1e-7)
    top = np.argsort(-maps[-1][5, 2].mean(axis=0)[1:], kind="stable")[:3]
    assert ex.top_cells == [divmod(int(j), 8) for j in top]


STATISTICS = ("nu_hist", "top_counts", "images", "mean_mu", "mean_nu", "std_nu", "mean_prefix_mu", "top_share",
              "corr_layers", "corr_heads")


def assert_same_statistics(got: dict, want: dict) -> None:
    """Equal to the last bit: the host adds each image's statistics one by one in dataset order."""
    for key in STATISTICS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_numbers_do_not_depend_on_batch_size_or_device_count(vit_run, vit, tmp_path):
    """vit_run: batch 8 on 4 devices. Batch 2 on one device computes the same per-image maps (2 images per
    device) and must give the same numbers exactly; at another per-device batch XLA may round the forward
    pass differently, which only the float32 rounding of the model bounds."""
    _, summary = vit_run
    one_device = parallel.make_mesh(jax.devices()[:1])
    for batch_size in (2, 4):
        config = tiny_config()
        config.data.batch_size = batch_size
        got = driver.execute(config, Workdir(tmp_path / str(batch_size)), loaded=[vit], source=digits(),
                             mesh=one_device, write=False)
        if batch_size == 2:
            assert_same_statistics(got["statistics"], summary["statistics"])
        for key in STATISTICS:
            np.testing.assert_allclose(got["statistics"][key], summary["statistics"][key], rtol=1e-5, atol=1e-6,
                                       err_msg=key)


def test_an_interrupted_run_resumes_to_the_same_numbers(vit_run, vit, tmp_path):
    _, summary = vit_run
    config = tiny_config()
    mesh = parallel.make_mesh()
    with pytest.raises(resumable.Interrupted):
        driver.execute(config, Workdir(tmp_path), loaded=[vit], source=digits(), mesh=mesh, write=False,
                       stop_after_batches=1)
    assert Workdir(tmp_path).load_state()[1]["next_index"] == 8
    got = driver.execute(config, Workdir(tmp_path), loaded=[vit], source=digits(), mesh=mesh, write=False)
    assert_same_statistics(got["statistics"], summary["statistics"])


def test_top_by_head_index_ranks_that_head(vit):
    probe = sparsity.make_probe(vit.module, tiny_config(top_by="head_index", top_head=1).sparsity)
    assert probe.layout.top_head == 1 and probe.layout.top_k == 3
    assert sparsity.make_probe(vit.module, tiny_config().sparsity).layout.top_head is None


def small_model(arch, **overrides):
    """An untrained 32 px, 10-class variant of a registered arch (its pretrained_cfg made to match)."""
    loaded = loading.load_model(arch, "untrained", seed=0, num_classes=10, **overrides)
    cfg = {**loaded.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0, "num_classes": 10}
    return dataclasses.replace(loaded, pretrained_cfg=cfg)


def test_swin_blocks_use_window_attention_mapped_to_tokens(tmp_path):
    loaded = small_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(2, 1),
                         num_heads=(2, 4), window_size=(4, 4))
    config = tiny_config(images=8)
    summary = driver.execute(config, Workdir(tmp_path), loaded=[loaded], source=digits(8),
                             mesh=parallel.make_mesh())
    stats, layout = summary["statistics"], summary["layout"]
    assert summary["layers"] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"]   # .0.1 shifted
    assert layout["grids"] == ((8, 8), (8, 8), (4, 4)) and layout["correlation_grid"] == (4, 4)
    # every window's columns sum to 1, so a token's mean mu is 1 / (tokens per window) = 1/16
    np.testing.assert_allclose(stats["mean_mu"], 1 / 16, rtol=1e-5)
    assert stats["corr_layers"].shape == (3, 3) and stats["corr_heads"].shape == (4, 4)
    assert stats["top_distribution"].shape == (4, 4) and stats["top_counts"].sum() == 8 * 1   # k = round(.05*16)
    for stem in ATTENTION_FIGURES:
        assert (tmp_path / f"{stem}.png").exists() == (stem not in NORM_FIGURES), stem
    assert "norms" not in stats and stats["prefix_mu_by_kind"] == {}


def test_distilled_deit_leaves_out_class_and_distillation_columns(tmp_path):
    loaded = small_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, embed_dim=16, depth=2,
                         num_heads=2)
    summary = driver.execute(tiny_config(images=4), Workdir(tmp_path), loaded=[loaded], source=digits(4),
                             mesh=parallel.make_mesh(), write=False)
    stats = summary["statistics"]
    assert loaded.info.num_prefix_tokens == 2 and stats["top_distribution"].shape == (8, 8)
    # mu sums to 1 over all columns: the 64 patch columns + the two prefix columns
    np.testing.assert_allclose(stats["mean_mu"] * 64 + stats["mean_prefix_mu"], 1.0, rtol=1e-5)
    maps = captured_maps(loaded, images=4)
    prefix = np.stack([m.mean(axis=(1, 2))[:, :2].sum(-1).mean() for m in maps])
    np.testing.assert_allclose(stats["mean_prefix_mu"], prefix, rtol=1e-5)


def test_cnn_statistics_are_written_and_equal_numpy_on_the_captured_maps(vgg, tmp_path):
    summary = driver.execute(tiny_config("vgg"), Workdir(tmp_path), loaded=[vgg], source=digits(),
                             mesh=parallel.make_mesh())
    assert summary["kind"] == "cnn" and summary["layers"] == ["features.1", "features.4", "features.7", "features.9"]
    for stem in ("cnn_channel_density", "top_share"):
        assert (tmp_path / f"{stem}.png").exists()
    assert (tmp_path / "layers.csv").exists() and json.loads((tmp_path / "results.json").read_text())["images"] == 12
    assert "![top_share](top_share.png)" in (tmp_path / "report.md").read_text()

    mesh = parallel.make_mesh(jax.devices()[:1])
    batch = parallel.to_host(next(iter(data.batches(digits(), vgg.pretrained_cfg, IMAGES, mesh))))
    _, aux = vgg.module.apply(vgg.variables, data.normalize(batch["image"], vgg.pretrained_cfg),
                              capture=tuple(summary["layers"]))
    stats = summary["statistics"]
    for l, name in enumerate(summary["layers"]):
        score = np.abs(np.asarray(aux[name], np.float64)).sum(axis=(1, 2))
        np.testing.assert_allclose(stats["mean_l1"][l], score.mean(), rtol=1e-5)
        ordered = -np.sort(-score, axis=-1)
        k = round(0.05 * score.shape[1])
        np.testing.assert_allclose(stats["top_share"][l, 0], (ordered[:, :k].sum(1) / ordered.sum(1)).mean(),
                                   rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Errors

def test_attention_statistics_of_a_cnn_are_a_clear_error(vgg):
    with pytest.raises(ValueError, match="no attention maps"):
        sparsity.make_probe(vgg.module, tiny_config(kind="attention").sparsity)
    assert sparsity.make_probe(vgg.module, tiny_config().sparsity).kind == "cnn"   # 'auto' picks channels


def test_cnn_statistics_of_a_transformer_are_a_clear_error(vit):
    with pytest.raises(ValueError, match=r"needs a CNN \(VGG, ResNet, ConvNeXt\)"):
        sparsity.make_probe(vit.module, tiny_config(kind="cnn").sparsity)
    with pytest.raises(ValueError, match="sparsity.kind must be one of"):
        sparsity.make_probe(vit.module, tiny_config(kind="heads").sparsity)


@pytest.mark.parametrize("option, value, message", [
    ("s1_block", 6, "s1_block"), ("s1_block", -7, "s1_block"), ("head", 4, "sparsity.head"),
    ("example_index", IMAGES, "example_index")])
def test_indices_out_of_range_are_clear_errors(vit, option, value, message):
    cfg = tiny_config(**{option: value}).sparsity
    with pytest.raises(ValueError, match=f"{message}.*out of range"):
        sparsity.example_choice(sparsity.make_probe(vit.module, cfg), digits(), cfg)


def test_bad_switches_are_clear_errors(vit):
    with pytest.raises(ValueError, match="top_by"):
        sparsity.make_probe(vit.module, tiny_config(top_by="head_max").sparsity)
    with pytest.raises(ValueError, match="top_head.*out of range"):
        sparsity.make_probe(vit.module, tiny_config(top_by="head_index", top_head=9).sparsity)
    with pytest.raises(ValueError, match="nu_min < nu_max"):
        sparsity.make_probe(vit.module, tiny_config(nu_min=3.0, nu_max=1.0).sparsity)


def test_an_empty_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="is empty"):
        driver.check(tiny_config(), source=data.Subset(data.DigitsSource("test"), []))


def test_a_dataset_of_unreadable_images_is_a_clear_error(vit, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        (folder / f"broken{i}.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="none of the 2 images"):
        source = data.make_eval_source({"source": "images", "folder": str(folder)})
        driver.execute(tiny_config(), Workdir(tmp_path / "run"), loaded=[vit], source=source,
                       mesh=parallel.make_mesh())


# ---------------------------------------------------------------------------------------------------------
# docs/science.md#high-norm-tokens, per-image outputs, several models

def captured_norms(loaded, images=IMAGES) -> np.ndarray:
    """Token norms (images, blocks + 1, N) of the embedding and every block output, straight from the model."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    batch = parallel.to_host(next(iter(data.batches(digits(images), loaded.pretrained_cfg, images, mesh))))
    names = ("embed", *(s.removesuffix(".attn") for s in loaded.info.ablation_sites))
    _, aux = loaded.module.apply(loaded.variables, data.normalize(batch["image"], loaded.pretrained_cfg),
                                 capture=names)
    return np.stack([np.linalg.norm(np.asarray(aux[n], np.float64), axis=-1) for n in names], axis=1)


def test_token_norm_statistics_equal_numpy_on_the_captured_tokens(vit_run, vit):
    _, summary = vit_run
    got = summary["statistics"]["norms"]
    norms, maps = captured_norms(vit), captured_maps(vit)
    patch = norms[:, :, 1:]
    high = patch > 2.0 * np.median(patch, axis=-1, keepdims=True)
    np.testing.assert_allclose(got["high_norm_share_input"], high.mean(axis=(0, 2))[:-1], atol=1e-12)
    np.testing.assert_allclose(got["high_norm_share_output"], high.mean(axis=(0, 2))[1:], atol=1e-12)
    np.testing.assert_allclose(got["patch_norm_median"], np.median(patch, axis=-1).mean(axis=0), rtol=1e-5)
    for l, m in enumerate(maps):
        mu = m.mean(axis=(1, 2))[:, 1:]
        rho = [np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]   # no ties in floats
               for a, b in zip(mu, patch[:, l])]
        np.testing.assert_allclose(got["spearman_mu_input_norm"][l], np.mean(rho), rtol=1e-4, atol=1e-6)
        top = np.argsort(-mu, axis=-1, kind="stable")[:, :round(0.05 * 64)]
        np.testing.assert_allclose(got["top5_overlap_high_norm_input"][l],
                                   np.take_along_axis(high[:, l], top, -1).mean(), atol=1e-12)
    wd = Workdir(vit_run[0].workdir)
    assert wd.path("norms.csv").exists() and wd.path("norms_mu_vs_input_norm.png").exists()
    assert wd.path("norms_vs_depth.png").exists()


def test_per_image_outputs_hold_every_image_once(vit, tmp_path):
    config = tiny_config(per_image=True)
    config.workdir = str(tmp_path)
    mesh = parallel.make_mesh()
    with pytest.raises(resumable.Interrupted):   # rows survive an interruption through the resume state
        driver.execute(config, Workdir(tmp_path), loaded=[vit], source=digits(), mesh=mesh, stop_after_batches=1)
    driver.execute(config, Workdir(tmp_path), loaded=[vit], source=digits(), mesh=mesh)
    z = np.load(tmp_path / "per_image.npz")
    np.testing.assert_array_equal(z["index"], np.arange(IMAGES))
    assert list(z["file_name"]) == [digits().key(i) for i in range(IMAGES)]
    mu = captured_maps(vit)[-1].mean(axis=(1, 2))
    np.testing.assert_allclose(z["mu_last"], mu, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(z["mu_last"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(z["top_columns"], np.argsort(-mu[:, 1:], axis=-1, kind="stable")[:, :3] + 1)
    np.testing.assert_allclose(z["norm_in"], captured_norms(vit)[:, -2], rtol=1e-5)


def test_docs_per_image_example_runs(tmp_path, monkeypatch, capsys, finished_runs):
    """docs/sparsity.md's numpy example, on the file the default run writes with per_image=True (the shared
    run: the default config on 8 digits, tests/shared_runs.py), in its default workdir runs/sparsity: it
    prints the image whose brightest patch column is the brightest of all, that column first, and 1."""
    import pathlib
    import re

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "sparsity").symlink_to(finished_runs.path("sparsity"), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "sparsity.md").read_text()
    block = re.search(r"```python\n(.*?)```", doc[doc.index("## Per-image outputs"):], re.S).group(1)
    exec(compile(block, "docs/sparsity.md", "exec"), {})
    name, columns, total = re.fullmatch(r"(\S+) \[([\d\s]+)\] (\S+)", capsys.readouterr().out.strip()).groups()
    z = np.load(tmp_path / "runs" / "sparsity" / "per_image.npz")
    brightest = [z["mu_last"][j, z["top_columns"][j, 0]] for j in range(len(z["index"]))]
    best = int(np.argmax(brightest))
    assert len(brightest) == 8 and brightest[best] > min(brightest)       # the images differ: a real choice
    assert name == str(z["file_name"][best]) and [int(c) for c in columns.split()] == list(z["top_columns"][best])
    assert int(z["top_columns"][best, 0]) == 1 + int(np.argmax(z["mu_last"][best, 1:]))   # its brightest patch
    assert float(total) == pytest.approx(1.0, abs=1e-5)


def test_several_models_on_the_same_images(tmp_path):
    config = tiny_config(models="vit_pico_patch4_32,deit_tiny_distilled_patch16_224")
    config.workdir = str(tmp_path)
    config.data.batch_size = 4
    config.data.num_images = 4
    result = main.run(config)
    assert result["models"] == ["vit_pico_patch4_32", "deit_tiny_distilled_patch16_224"]
    for folder in result["folders"].values():
        assert (tmp_path / folder / "results.json").exists() and (tmp_path / folder / "report.md").exists()
    for stem in ("compare_nu_density", "compare_top_share_depth", "compare_norms"):
        assert (tmp_path / f"{stem}.png").exists()
    rows = (tmp_path / "models.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 + 12 and "prefix_mu_dist" in rows[0] and "top5_overlap_high_norm_input" in rows[0]
    from vitsparse_jax import science   # the comparison's definitions, from docs/science.md's source
    keys = ["mu", "prefix_mass", "nu_density", "top_share", "block_depth", "high_norm_tokens"]
    assert "\n".join(science.report_block(keys)) in (tmp_path / "report.md").read_text()
    deit = Workdir(tmp_path / result["folders"]["deit_tiny_distilled_patch16_224"]).read_json("results.json")
    by_kind = deit["statistics"]["prefix_mu_by_kind"]
    assert set(by_kind) == {"cls", "dist"}
    np.testing.assert_allclose(np.add(by_kind["cls"], by_kind["dist"]), deit["statistics"]["mean_prefix_mu"])


def test_registers_preset_names_models_with_and_without_registers():
    config = sparsity_config.get_config("registers")
    names = config.sparsity.models.split(",")
    assert "vit_small_patch14_dinov2.lvd142m" in names and "vit_small_patch14_reg4_dinov2.lvd142m" in names
    assert config.weights == "auto"


def test_unreadable_images_are_named_in_the_results(vit, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f"ok{i}.png")
    (folder / "z_broken.png").write_bytes(b"not an image")      # last: the example image (0) stays readable
    source = data.make_eval_source({"source": "images", "folder": str(folder)})
    config = tiny_config()
    config.data.batch_size = 4
    summary = driver.execute(config, Workdir(tmp_path / "run"), loaded=[vit], source=source,
                             mesh=parallel.make_mesh())
    assert summary["images"] == 3 and summary["images_skipped"] == 1
    (skipped,) = Workdir(tmp_path / "run").read_json("results.json")["data"]["skipped_files"]
    assert skipped["file"].endswith("z_broken.png") and skipped["index"] == 3 and skipped["reason"]
