"""The experiment driver's contract with every measurement experiment (experiments/driver.py): all checks
before any work, and a pass whose images are all unreadable stops with the reasons and leaves no state."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitsparse_jax import data, experiments
from vitsparse_jax.experiments import contract, driver
from vitsparse_jax.main import cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"sparsity": ["--config.data.num_images=4", "--config.data.batch_size=4"],
         "ablate": ["--config.data.num_images=4", "--config.data.batch_size=4", "--config.ablation.p=0.1",
                    "--config.ablation.n=1", "--config.ablation.draws=1", "--config.ablation.bootstrap=5",
                    "--config.ablation.explore_images=0"],
         "receptive_field": ["--config.data.num_images=4", "--config.data.batch_size=4",
                             "--config.receptive_field.layers=blocks.0", "--config.receptive_field.variants=trained"]}
MODELS_FIELD = {"sparsity": "sparsity.models", "ablate": "ablation.models", "receptive_field": "receptive_field.models"}


def argv(experiment: str, workdir: Path, *extra: str) -> list[str]:
    return ["vitsparse_jax.main", f"--config={ROOT / 'configs' / experiment}.py", f"--config.workdir={workdir}",
            "--config.progress=False", *SMALL[experiment], *extra]


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_every_experiment_is_registered_by_module_and_implements_the_contract():
    for name in experiments.REGISTRY:
        experiment = experiments.get(name)
        assert experiment.name == name
        assert isinstance(experiment, (contract.Experiment, contract.Standalone))
        assert experiment.result_files[0] == "results.json"
    with pytest.raises(ValueError, match="unknown experiment 'ablation'; one of ablate"):
        experiments.get("ablation")


@pytest.mark.parametrize("experiment", list(MODELS_FIELD))
def test_every_model_name_is_checked_before_any_work(experiment, tmp_path, capsys):
    """A wrong second model name is refused before the first model is measured: nothing is written."""
    workdir = tmp_path / "run"
    status = cli(argv(experiment, workdir, f"--config.{MODELS_FIELD[experiment]}=vit_pico_patch4_32,vit_pico_patch4_23"))
    message = capsys.readouterr().err
    assert status == 2, message
    assert "vit_pico_patch4_23" in message and "vit_pico_patch4_32" in message   # the name and a suggestion
    assert files_in(workdir) == []


def broken_images(folder: Path, n: int = 3, labelled: bool = False) -> list[Path]:
    paths = []
    for i in range(n):
        sub = folder / (str(i % 2) if labelled else "")
        sub.mkdir(parents=True, exist_ok=True)
        paths.append(sub / f"img{i}.png")
        paths[-1].write_bytes(b"\x89PNG not really")
    return paths


@pytest.mark.parametrize("experiment", list(MODELS_FIELD))
def test_a_pass_without_one_readable_image_stops_saying_why_and_leaves_no_state(experiment, tmp_path, capsys):
    labelled = experiment == "ablate"
    folder = tmp_path / "images"
    paths = broken_images(folder, labelled=labelled)
    source = ["--config.data.source=" + ("folder" if labelled else "images"), f"--config.data.folder={folder}",
              "--config.data.num_images=0"]
    workdir = tmp_path / "run"
    status = cli(argv(experiment, workdir, *source))
    message = capsys.readouterr().err
    assert status == 2, message
    assert "none of the 3 images" in message and paths[0].name in message and "check the files" in message
    assert not [p for p in files_in(workdir) if p.suffix == ".npz"], files_in(workdir)   # no resume state left
    digits = data.DigitsSource("test")
    for i, path in enumerate(paths):   # the images fixed in place: the same command now runs from the start
        Image.fromarray(np.asarray(digits.read(i).data)).save(path)
    status = cli(argv(experiment, workdir, *source))
    assert status == 0, capsys.readouterr().err


def test_the_checked_plan_has_every_model_and_its_planned_module(tmp_path):
    from configs import receptive_field as rf_config

    config = rf_config.get_config()
    config.workdir = str(tmp_path)
    plan, modules = driver.plan_models(config)
    assert [(i.name, i.weights) for i in plan.items] == [("vit_pico_patch4_32", "auto"),
                                                          ("vit_pico_patch4_32", "untrained")]
    assert [m.info().name for m in modules] == ["vit_pico_patch4_32"] * 2


def test_a_finished_pass_read_back_checks_its_images_again(tmp_path, capsys):
    """The receptive fields keep each finished model under rf_done/; reused by another config of the same run,
    its images are re-hashed first: one replaced in place (same size, same mtime) is refused, by name."""
    import os

    folder = tmp_path / "images"
    digits = data.DigitsSource("test")
    for i in range(4):
        folder.mkdir(exist_ok=True)
        Image.fromarray(np.asarray(digits.read(i).data)).save(folder / f"img{i}.png")
    source = ["--config.data.source=images", f"--config.data.folder={folder}", "--config.data.num_images=0"]
    workdir = tmp_path / "run"
    assert cli(argv("receptive_field", workdir, *source)) == 0, capsys.readouterr().err
    assert (workdir / "rf_done").is_dir()
    target = folder / "img1.png"
    stat = target.stat()
    other = (folder / "img2.png").read_bytes()
    target.write_bytes(other[:stat.st_size].ljust(stat.st_size, b"\0"))   # same size, other content
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    status = cli(argv("receptive_field", workdir, *source, "--config.receptive_field.max_columns=3"))
    message = capsys.readouterr().err
    assert status == 2, message
    assert "img1.png" in message and "rf_done" in message
