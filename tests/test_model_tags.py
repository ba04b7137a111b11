"""Two tags of one arch are two models everywhere (issue 28, point 2): rows, legends, titles, folders, explorers
and result keys carry the name with its tag, in every experiment; config fields that pick models for a figure
take an arch (every tag of it) or arch.tag (one); a workdir interrupted under the names from before (folders and
finished passes named without the tag) resumes there.

The two tags are the built-in `vit_pico_patch4_32.digits`, listed as `vit_pico_patch4_32` (so that the name as
listed differs from the name loaded), and a random-weight checkpoint `.b` in a checkpoint_dir; each experiment
runs once through the real command line on 4 digits, at its smallest."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import jax
import matplotlib.text
import numpy as np
import pytest

from tests.browser import page_data
from vitsparse_jax import models
from vitsparse_jax.experiments import driver, names
from vitsparse_jax.experiments.ablation import report as ablation_report
from vitsparse_jax.experiments.receptive_field import figures as rf_figures
from vitsparse_jax.main import cli
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import checkpoint

ARCH = "vit_pico_patch4_32"
A, B = f"{ARCH}.a", f"{ARCH}.b"
BUILTIN = f"{ARCH}.digits"          # what ARCH listed without a tag loads (the built-in checkpoint)
LISTED = f"{ARCH},{B}"              # two tags of one arch, one of them listed without its tag
ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--config.data.num_images=4", "--config.data.batch_size=4", "--config.progress=False")


def save_checkpoint(folder: Path, tag: str, seed: int) -> Path:
    """Random weights drawn with numpy (no init program to compile) in the converted format."""
    module = models.create_model(ARCH)
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
        + 0.1 * rng.standard_normal(a.shape).astype(np.float32), models.variable_shapes(module))
    cfg = dict(models.model_info(module).default_cfg, tag=tag)
    return checkpoint.save(folder, ARCH, tag, variables, cfg, "test: random weights")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two_tags")
    save_checkpoint(folder, "a", seed=1)
    save_checkpoint(folder, "b", seed=2)
    return folder


@pytest.fixture
def figure_texts(monkeypatch) -> dict[str, list[str]]:
    """Every text (titles, legend entries, labels) of every figure a run saves, by the figure's path."""
    texts: dict[str, list[str]] = {}
    save = Workdir.save_figure

    def recording(self, fig, stem, dpi=None):
        texts[str(self.path(stem))] = [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
        return save(self, fig, stem, dpi)

    monkeypatch.setattr(Workdir, "save_figure", recording)
    return texts


def run(experiment: str, workdir: Path, ckpt: Path, *args: str) -> None:
    status = cli(["vitsparse_jax.main", f"--config={ROOT / 'configs' / f'{experiment}.py'}",
                  f"--config.workdir={workdir}", f"--config.checkpoint_dir={ckpt}", *SMALL, *args])
    assert status == 0


def texts_of(figures: dict[str, list[str]], path: Path) -> str:
    return "\n".join(figures[str(path)])


def csv_models(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return list(dict.fromkeys(row["model"] for row in csv.DictReader(f)))


# --- every experiment, two tags in one run ------------------------------------------------------------------

def test_ablation_tables_legends_and_folders_name_each_tag(ckpt, tmp_path, figure_texts):
    """Defect caught: labels made of the arch (`"label": loaded.arch`) give two rows and two legend entries
    called vit_pico_patch4_32. The figure fields name the arch: both tags are drawn."""
    workdir = tmp_path / "ablate"
    run("ablate", workdir, ckpt, f"--config.ablation.models={LISTED}", "--config.ablation.p=0.25",
        "--config.ablation.n=1", "--config.ablation.draws=1", "--config.ablation.bootstrap=20",
        "--config.ablation.explore_images=0", f"--config.ablation.figure_models={ARCH}",
        f"--config.ablation.figure_b_model={ARCH}")
    out = json.loads((workdir / "results.json").read_text())
    assert [(m["name"], m["label"]) for m in out["models"]] == [(BUILTIN, BUILTIN), (B, B)]
    tables = (workdir / "tables.md").read_text()
    assert f"| {BUILTIN} | " in tables and f"| {B} | " in tables
    assert csv_models(workdir / "results.csv") == [ARCH]   # the CSV's model column is the arch; its tag column ...
    with open(workdir / "results.csv", newline="") as f:
        assert [r["tag"] for r in csv.DictReader(f)] == ["digits", "b"]   # ... tells the two apart
    fig4a, fig4b = texts_of(figure_texts, workdir / "figure4a"), texts_of(figure_texts, workdir / "figure4b")
    assert BUILTIN in fig4a and B in fig4a    # two legend entries
    assert BUILTIN in fig4b and B in fig4b    # a panel per tag of the arch named by figure_b_model
    assert (workdir / BUILTIN / "resume_state.npz").exists() and (workdir / B / "resume_state.npz").exists()


def test_sparsity_folders_comparison_and_keys_name_each_tag(ckpt, tmp_path, figure_texts):
    workdir = tmp_path / "sparsity"
    run("sparsity", workdir, ckpt, f"--config.sparsity.models={LISTED}", "--config.sparsity.explore_images=0")
    out = json.loads((workdir / "results.json").read_text())
    assert out["models"] == [BUILTIN, B] and out["folders"] == {BUILTIN: f"models/{BUILTIN}", B: f"models/{B}"}
    assert sorted(p.name for p in (workdir / "models").iterdir()) == sorted([BUILTIN, B])   # resume states too
    for name in (BUILTIN, B):
        assert json.loads((workdir / "models" / name / "results.json").read_text())["name"] == name
        assert f"Sparsity: {name}" in (workdir / "models" / name / "report.md").read_text()
    assert csv_models(workdir / "models.csv") == [BUILTIN, B]
    depth = texts_of(figure_texts, workdir / "compare_top_share_depth")
    assert BUILTIN in depth and B in depth
    assert f"| {BUILTIN} |" in (workdir / "report.md").read_text()


def test_receptive_field_rows_legend_and_explorer_name_each_tag(ckpt, tmp_path, figure_texts):
    """Defect caught: the colour key and the explorer's model list use the name as listed."""
    workdir = tmp_path / "rf"
    run("receptive_field", workdir, ckpt, f"--config.receptive_field.models={LISTED}",
        "--config.receptive_field.variants=trained", "--config.receptive_field.layers=blocks.1")
    out = json.loads((workdir / "results.json").read_text())
    assert [m["label"] for m in out["models"]] == [f"{BUILTIN} (trained)", f"{B} (trained)"]
    assert csv_models(workdir / "receptive_fields.csv") == [BUILTIN, B]
    legend = texts_of(figure_texts, workdir / "locality_vs_depth")
    assert BUILTIN in legend and B in legend
    assert [m["name"] for m in page_data(workdir / "report.html", "rf")["models"]] == [BUILTIN, B]


def test_locality_rows_and_legend_name_each_tag(ckpt, tmp_path, figure_texts):
    workdir = tmp_path / "locality"
    run("locality", workdir, ckpt, f"--config.locality.models={LISTED}", "--config.locality.variants=trained",
        "--config.locality.blocks=blocks.1")
    out = json.loads((workdir / "results.json").read_text())
    assert [m["label"] for m in out["models"]] == [f"{BUILTIN} (trained)", f"{B} (trained)"]
    assert csv_models(workdir / "locality.csv") == [BUILTIN, B]
    legend = "\n".join(t for path, ts in figure_texts.items() if path.startswith(str(workdir)) for t in ts)
    assert BUILTIN in legend and B in legend


# --- picking models, names of pairs and series ---------------------------------------------------------------

def test_figure_fields_take_an_arch_for_every_tag_or_one_tag():
    results = [{"name": A}, {"name": B}, {"name": "vgg_pico.digits"}]
    pick = ablation_report.figure_models
    assert [r["name"] for r in pick(results, [ARCH], "f")] == [A, B]
    assert [r["name"] for r in pick(results, [B], "f")] == [B]
    assert pick(results, [], "f") == []


def test_a_figure_field_naming_no_listed_model_is_refused_before_any_work(ckpt, tmp_path, capsys):
    status = cli(["vitsparse_jax.main", f"--config={ROOT / 'configs' / 'ablate.py'}",
                  f"--config.workdir={tmp_path / 'w'}", f"--config.checkpoint_dir={ckpt}",
                  f"--config.ablation.models={A},{B}", "--config.ablation.figure_b_model=vgg_pico", *SMALL])
    err = capsys.readouterr().err
    assert status == 2 and "error: ablation.figure_b_model: vgg_pico is not among the models" in err
    assert not (tmp_path / "w" / A).exists() and not (tmp_path / "w" / B).exists()


def test_two_listed_names_of_the_same_weights_are_refused(tmp_path, capsys):
    """`vit_pico_patch4_32` resolves to the built-in `.digits`: listing both would give two rows of one name."""
    status = cli(["vitsparse_jax.main", f"--config={ROOT / 'configs' / 'sparsity.py'}",
                  f"--config.workdir={tmp_path / 'w'}", f"--config.sparsity.models={ARCH},{ARCH}.digits", *SMALL])
    err = capsys.readouterr().err
    assert status == 2 and f"{ARCH} and {ARCH}.digits are the same model" in err and "list it once" in err


def test_a_pair_is_shown_by_its_trained_name_and_a_series_by_its_run():
    pair = [{"listed": ARCH, "name": ARCH, "trained": False}, {"listed": ARCH, "name": BUILTIN, "trained": True},
            {"listed": A, "name": A, "trained": False}]
    assert names.pair_names(pair) == {ARCH: BUILTIN, A: A}
    assert names.series_name(f"{ARCH}.digits_step0000500") == f"{ARCH}.digits" == names.series_name(f"{ARCH}.digits")


def test_two_training_runs_in_one_series_figure_are_told_apart():
    layer = {"layer": "blocks.0", "group": "mlp_res", "relative_depth": 1.0, "S": 1.0, "mean_radius": 1.0}
    entries = [{"model": run, "step": step, "layers": [layer]} for run in (A, B) for step in (1, 2)]
    fig = rf_figures.locality_over_training(entries)
    assert fig.get_suptitle() == f"Locality over training: {A} (solid), {B} (dashed)"
    lines = fig.axes[0].get_lines()
    assert [ln.get_linestyle() for ln in lines] == ["-", "--"]
    assert [list(ln.get_xdata()) for ln in lines] == [[1, 2]] * 2


# --- workdirs from before names carried the tag --------------------------------------------------------------

def test_a_sparsity_run_interrupted_under_the_listed_folder_name_resumes(ckpt, tmp_path, caplog):
    """Before, `models/vit_pico_patch4_32/` held the pass of the listed `vit_pico_patch4_32` (built-in
    `.digits`); now the folder is `models/vit_pico_patch4_32.digits/`. The old folder is moved, and the pass goes
    on from its saved image instead of starting over in an empty folder."""
    from configs import sparsity as sparsity_config
    from vitsparse_jax.runtime.resumable import Interrupted

    workdir = tmp_path / "sparsity"
    config = sparsity_config.get_config()
    config.update_from_flattened_dict({"workdir": str(workdir), "checkpoint_dir": str(ckpt), "progress": False,
                                       "data.num_images": 8, "data.batch_size": 4, "sparsity.models": f"{ARCH},{A}",
                                       "sparsity.explore_images": 0})
    with pytest.raises(Interrupted):
        driver.execute(config, Workdir(workdir), stop_after_batches=1)
    new, old = workdir / "models" / f"{ARCH}.digits", workdir / "models" / ARCH
    new.rename(old)                                       # the layout an earlier version left
    caplog.set_level(logging.INFO)
    status = cli(["vitsparse_jax.main", f"--config={ROOT / 'configs' / 'sparsity.py'}", f"--config.workdir={workdir}",
                  f"--config.checkpoint_dir={ckpt}", f"--config.sparsity.models={ARCH},{A}",
                  "--config.sparsity.explore_images=0", "--config.data.num_images=8", "--config.data.batch_size=4",
                  "--config.progress=False"])
    assert status == 0
    assert f"moved {old} to {new}" in caplog.text and f"resuming at image 4 of 8 from {new}" in caplog.text
    assert not old.exists() and (new / "report.md").exists()


def test_a_checkpoint_series_finished_under_the_arch_only_label_is_not_measured_again(ckpt, tmp_path, caplog):
    """Before, a series checkpoint's finished pass was kept as `rf_done/vit_pico_patch4_32_step_1.npz`; now its
    name carries the run's tag. The kept pass is moved and read, not measured again."""
    series = tmp_path / "series"
    for step in (1, 2):
        save_checkpoint(series, f"run_step{step:07d}", seed=10 + step)
    workdir = tmp_path / "rf"
    argv = ["vitsparse_jax.main", f"--config={ROOT / 'configs' / 'receptive_field.py'}", f"--config.workdir={workdir}",
            f"--config.checkpoint_dir={ckpt}", f"--config.receptive_field.models={A}",
            "--config.receptive_field.variants=trained", "--config.receptive_field.layers=blocks.1",
            f"--config.receptive_field.checkpoints={series}", *SMALL]
    assert cli(argv) == 0
    out = json.loads((workdir / "results.json").read_text())
    assert [m["label"] for m in out["training"]] == [f"{ARCH}.run step 1", f"{ARCH}.run step 2"]
    done = workdir / "rf_done"
    for step in (1, 2):   # the names an earlier version gave these passes
        (done / f"{ARCH}.run_step_{step}.npz").rename(done / f"{ARCH}_step_{step}.npz")
    (workdir / "COMPLETE.json").unlink()                  # as if interrupted in the run's last pass
    caplog.set_level(logging.INFO)
    assert cli(argv) == 0
    for step in (1, 2):
        assert f"receptive fields {ARCH}.run step {step}: already measured" in caplog.text
        assert not (done / f"{ARCH}_step_{step}.npz").exists()
    assert json.loads((workdir / "results.json").read_text())["training"] == out["training"]
