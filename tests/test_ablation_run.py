"""The ablation experiment end to end through `vitsparse_jax.main.run`: outputs, resume, batch-size and
device-count independence, and errors before compute. Tiny: vit_pico / vgg_pico on 24 digit images."""
from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from vitsparse_jax import data, main, models
from vitsparse_jax.experiments.ablation import report as ablation_report
from vitsparse_jax.experiments.ablation import experiment as ablation
from vitsparse_jax.runtime import parallel, resumable
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import checkpoint
from vitsparse_jax.weights.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
VIT = "vit_pico_patch4_32"
RUN = "vit_pico_patch4_32.random"          # the per-model folder of a run
OUTPUTS = ("results.json", "results.csv", "tables.md", "report.md", "figure4a.png", "figure4b.png",
           "config.json", "versions.json")


def get_config(arg: str | None = None):
    spec = importlib.util.spec_from_file_location("ablate_config", ROOT / "configs" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def random_variables(module, seed: int = 0) -> dict:
    """Variance-preserving random weights (kernels N(0, 1/fan_in), LayerNorm scales ~1, small biases)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            std = (1.0 / np.prod(s.shape[:-1])) ** 0.5 * (2.0 if "qkv" in name else 1.0)  # peaked attention
        elif name.endswith("['scale']"):
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
        else:
            std = 0.02 if name.endswith("['bias']") else 0.5
        return (std * rng.standard_normal(s.shape)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(module))


def fitted_checkpoint(folder: Path, name: str) -> str:
    """Random features + a ridge-regression classifier head fitted on 256 training digits: above chance,
    so that dropping units flips predictions (a run of a constant-prediction model would test nothing)."""
    module = models.create_model(name)
    variables = random_variables(module)
    cfg = dict(models.model_info(module).default_cfg)
    source = data.make_eval_source({"source": "digits", "split": "train", "num_images": 256})
    batch = next(data.batches(source, cfg, 256, parallel.make_mesh()))
    features = jax.jit(lambda v, x: module.apply(v, data.normalize(x, cfg), capture=("pre_logits",))[1])(
        variables, batch["image"])["pre_logits"]
    design = np.concatenate([np.asarray(features, np.float64), np.ones((256, 1))], axis=1)
    targets = np.eye(10)[np.asarray(batch["label"])]
    # ridge regression: a well-conditioned head (plain least squares gives huge, cancelling weights)
    weights = np.linalg.solve(design.T @ design + 1.0 * np.eye(design.shape[1]), design.T @ targets)
    head = variables["params"]["head"]
    head = head.get("fc", head)                                   # ViT: head; VGG: head/fc
    head["kernel"], head["bias"] = weights[:-1].astype(np.float32), weights[-1].astype(np.float32)
    return str(checkpoint.save(folder, name, "random", variables, cfg, "tests: random features, fitted head"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("weights")
    return {name: fitted_checkpoint(folder, name) for name in (VIT, "vgg_pico")}


def small_config(workdir: Path, weights: dict[str, str], **ablation_overrides):
    config = get_config()
    config.weights = weights[VIT]
    config.workdir = str(workdir)
    config.progress = False
    config.data.num_images = 24
    config.data.batch_size = 8
    ab = config.ablation
    ab.p, ab.n, ab.draws, ab.bootstrap = (0.1, 0.3), (1, 2), 2, 200
    ab.update(ablation_overrides)
    return config


def rows_of(workdir: Path, model: str = RUN) -> dict[str, np.ndarray]:
    arrays, meta = Workdir(workdir / model).load_state()
    assert meta["next_index"] == meta["total"]
    return arrays


def test_default_config_is_the_builtin_vit_on_the_digits_with_the_paper_grid():
    config = get_config()
    assert (config.model, config.weights, config.data.source) == ("vit_pico_patch4_32", "auto", "digits")
    assert config.ablation.p == (0.05, 0.1, 0.2, 0.3) and config.ablation.n == (1, 2, 3)
    assert config.ablation.draws == 3 and config.ablation.rank_by == "last_layer"
    paper = get_config("paper")
    names = ablation.model_names(paper)
    assert len(names) == 17 and names[2] == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert "resnet152.tv_in1k" in names and paper.data.name == "imagenet2012"
    for name in names:   # every preset model is registered and its grid is valid
        ablation.Grid.from_config(paper.ablation).plan(models.create_model(name))


def test_the_default_command_runs_the_builtin_vit(tmp_path):
    config = get_config()
    config.workdir, config.progress, config.data.num_images = str(tmp_path), False, 32
    out = main.run(config)
    (model,) = out["models"]
    assert model["name"] == "vit_pico_patch4_32.digits" and model["A0"] > 0.8     # the trained model
    assert len(model["cells"]) == 12 and model["k"]["0.05"] == [3, 3, 3]         # 64 patch tokens
    for name in OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0, name


def test_comma_strings_and_tuples_parse_to_the_same_grid():
    assert ablation.parse_floats("0.05, 0.1", "p") == ablation.parse_floats((0.05, 0.1), "p") == (0.05, 0.1)
    assert ablation.parse_ints("1,2", "n") == ablation.parse_ints((1, 2), "n") == (1, 2)
    assert ablation.parse_ints(3, "n") == (3,)
    with pytest.raises(ValueError, match="integers"):
        ablation.parse_ints("1.5", "n")
    with pytest.raises(ValueError, match="numbers"):
        ablation.parse_floats("five", "p")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, weights) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("ablate") / "full"
    return workdir, main.run(small_config(workdir, weights))


def test_a_run_writes_every_output(finished):
    workdir, out = finished
    for name in OUTPUTS:
        assert (workdir / name).stat().st_size > 0, name
    results = json.loads((workdir / "results.json").read_text())
    (model,) = results["models"]
    assert model["model"] == "vit_pico_patch4_32" and model["images_used"] == 24
    assert model["images_skipped"] == 0 and len(model["cells"]) == 4
    assert model["k"] == {"0.1": [6, 6], "0.3": [19, 19]}
    assert {w["n"] for w in model["whole_layer"]} == {1, 2}
    assert results["versions"]["jax"] == jax.__version__ and results["decisions"]
    assert model["pretrained_cfg"]["input_size"][-1] == 32
    cell = model["cells"][0]
    assert set(cell) >= {"A_t", "A_r", "A_r_draws", "psi", "psi_ci", "drop_r_ci", "unstable"}
    assert len(cell["A_r_draws"]) == 2
    tables = (workdir / "tables.md").read_text()
    assert "Table 1: Transformer models" in tables and "Table 2" not in tables
    assert "p = 10%: A_t / A_r / ψ" in tables
    from vitsparse_jax import science   # the report's definitions, from docs/science.md's source, and the version
    keys = ["preprocessing", "vit_units", "prefix_mass", "accuracies", "psi", "whole_layer"]
    assert "\n".join(science.report_block(keys)) in (workdir / "report.md").read_text()
    assert f"vitsparse_jax {science.version()}" in (workdir / "report.html").read_text()
    csv = (workdir / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + 4 and csv[0].startswith("model,tag,family,n,p,k")


def test_metrics_are_the_means_of_the_per_image_rows(finished):
    workdir, out = finished
    rows = rows_of(workdir)
    model = out["models"][0]
    assert model["A0"] == rows["clean"].mean()
    cell = next(c for c in model["cells"] if (c["n"], c["p"]) == (2, 0.3))
    assert cell["A_t"] == rows["top"][:, 1, 1].mean()
    assert cell["A_r"] == pytest.approx(rows["rand"][:, 1, 1].mean())
    a0, at, ar = rows["clean"].mean(), rows["top"][:, 1, 1].mean(), rows["rand"][:, 1, 1].mean()
    if a0 - ar > 0:
        assert cell["psi"] == pytest.approx((a0 - at) / (a0 - ar))
    assert cell["unstable"] == (cell["drop_r_ci"][0] <= 0)


def test_an_interrupted_run_resumes_to_identical_results(finished, weights, tmp_path):
    full_dir, full = finished
    config = small_config(tmp_path / "resumed", weights, stop_after_batches=1)
    with pytest.raises(resumable.Interrupted):
        main.run(config)
    arrays, meta = Workdir(tmp_path / "resumed" / RUN).load_state()
    assert meta["next_index"] == 8 and arrays["done"].sum() == 8
    config = small_config(tmp_path / "resumed", weights)     # same command, without the interruption
    resumed = main.run(config)
    for name, value in rows_of(full_dir).items():
        np.testing.assert_array_equal(rows_of(tmp_path / "resumed")[name], value, err_msg=name)
    assert resumed["models"] == full["models"]
    assert (tmp_path / "resumed" / "tables.md").read_text() == (full_dir / "tables.md").read_text()


def test_results_do_not_depend_on_batch_size_or_device_count(finished, weights, tmp_path):
    full_dir, _ = finished
    rand = rows_of(full_dir)["rand"]
    assert (rand.any(-1) != rand.all(-1)).any(), "the draws never disagree: a vacuous comparison"
    assert jax.device_count() == 4                            # conftest: 4 fake CPU devices
    make_mesh = parallel.make_mesh
    for batch_size, devices in ((4, 4), (12, 1)):
        config = small_config(tmp_path / f"b{batch_size}", weights)
        config.data.batch_size = batch_size
        with pytest.MonkeyPatch.context() as mp:              # test-only: a mesh of `devices` devices
            mp.setattr(parallel, "make_mesh", functools.partial(make_mesh, jax.devices()[:devices]))
            main.run(config)
        for name, value in rows_of(full_dir).items():
            np.testing.assert_array_equal(rows_of(tmp_path / f"b{batch_size}")[name], value, err_msg=name)


def test_several_models_go_into_one_table_and_finished_models_are_not_rerun(weights, tmp_path):
    config = small_config(tmp_path, weights, cnn_unit="spatial", whole_layer_reference=False)
    config.ablation.models = f"{VIT}.random,vgg_pico.random"
    config.weights, config.checkpoint_dir = "", str(Path(weights[VIT]).parent)
    out = main.run(config)
    vit, vgg = out["models"]
    assert vit["grid"]["rank_by"] == "last_layer" and vgg["grid"]["rank_by"] == "each_layer"
    assert vgg["family"] == "vgg" and vgg["grid"]["cnn_unit"] == "spatial"
    assert [s["units"] for s in vgg["sites"]] == [64, 64]        # 8x8 positions of features.7 and .9
    assert "whole_layer" not in vgg
    tables = (tmp_path / "tables.md").read_text()
    assert "Table 1: Transformer models" in tables and "Table 2: CNN models" in tables
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 2 * 4
    config.ablation.stop_after_batches = 1                      # would interrupt any model that still runs
    assert main.run(config)["models"] == out["models"]


def test_a_saved_run_with_another_config_is_refused(finished, weights, tmp_path):
    shutil.copytree(finished[0], tmp_path / "other")
    config = small_config(tmp_path / "other", weights, draws=3)
    with pytest.raises(ValueError, match=r"another config \(ablation.draws: 2 -> 3\)"):
        main.run(config)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(model="vit_pico_patch4_23"), ValueError, "Did you mean: vit_pico_patch4_32"),
    (dict(p=(0.0, 0.1)), ValueError, "p must lie in"),
    (dict(p=(1.2,)), ValueError, "p must lie in"),
    (dict(p=(0.001,)), ValueError, "too small"),
    (dict(n=(1, 7)), ValueError, "n must be between 1 and"),
    (dict(rank_by="middle"), ValueError, "rank_by"),
    (dict(confidence=1.5), ValueError, "confidence"),
    (dict(weights="no/such/file.safetensors"), FileNotFoundError, "does not exist"),
    (dict(weights=""), FileNotFoundError, "checkpoints_convert"),
])
def test_bad_inputs_fail_before_compute(weights, tmp_path, overrides, error, message):
    config = small_config(tmp_path, weights)
    for key in ("model", "weights"):
        if key in overrides:
            setattr(config, key, overrides.pop(key))
    config.checkpoint_dir = str(tmp_path / "no_checkpoints")
    config.ablation.update(overrides)
    with pytest.raises(error, match=message):
        main.run(config)
    assert not list(tmp_path.glob("*/resume_state.npz"))            # nothing was computed


def test_weights_that_do_not_match_the_model_are_refused(tmp_path):
    shallow = models.create_model("vit_pico_patch4_32", depth=4)        # 4 blocks saved, the model has 6
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), models.variable_shapes(shallow))
    path = checkpoint.save(tmp_path / "ckpt", "vit_pico_patch4_32", "shallow", variables, {"num_classes": 10},
                           "test")
    config = small_config(tmp_path / "run", {VIT: str(path)})
    with pytest.raises(CheckpointError, match="blocks_4"):
        main.run(config)
    assert not (tmp_path / "run" / "vit_pico_patch4_32.shallow").exists()


def test_psi_is_flagged_when_the_random_drop_is_within_noise():
    rng = np.random.default_rng(0)
    t = 400
    clean = rng.random(t) < 0.8
    rows = {"done": np.ones(t, bool), "clean": clean,
            "top": np.stack([clean & (rng.random(t) < 0.5)], 1)[:, :, None].repeat(2, 2),   # (T, 1, 2)
            "rand": clean[:, None, None, None].repeat(2, 2).repeat(3, 3)}                  # A_r == A0
    rows["rand"][:, 0, 1] &= rng.random((t, 3)) < 0.7                                       # A_r << A0 at p2
    stats = ablation_report.summarize(rows, (0.1, 0.3), (1,), samples=300, seed=0)
    flat, real = stats["cells"]
    assert flat["unstable"] and flat["psi"] is None and ablation_report.psi_text(flat) == "n.s."
    assert not real["unstable"] and 0 < real["psi_ci"][0] <= real["psi"] <= real["psi_ci"][1]
    again = ablation_report.summarize(rows, (0.1, 0.3), (1,), samples=300, seed=0)
    assert again == stats                                                                   # seeded
