"""Resume keys fingerprint the data and the weights (issue 16, point 2), in every experiment.

Each experiment runs one batch on a folder of 12 digit images and is interrupted; then the folder gains an
image, an image is replaced, or the weights file at the same path is replaced. The rerun must refuse to
mix the two (before the fix: an IndexError, or silently mixed rows / another model's rows), naming what
changed, and the unchanged inputs must still resume.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitsparse_jax import main, models
from vitsparse_jax.data import DigitsSource
from vitsparse_jax.runtime import resumable
from vitsparse_jax.runtime.errors import StateError
from vitsparse_jax.weights import checkpoint, loading

ROOT = Path(__file__).resolve().parents[1]
VIT = "vit_pico_patch4_32"


def get_config(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def digits_folder(path: Path, n: int = 12, offset: int = 0) -> Path:
    source = DigitsSource("test")
    for i in range(offset, offset + n):
        folder = path / str(source.label(i))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(source.read(i).data)).save(folder / f"{i:03d}.png")
    return path


def own_weights(folder: Path) -> Path:
    """A copy of the built-in vit_pico checkpoint at a path of our own."""
    src = loading.ASSETS / f"{VIT}.digits.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(src.with_suffix(suffix), folder / f"{VIT}.digits{suffix}")
    return folder / f"{VIT}.digits.safetensors"


def replace_weights(path: Path) -> None:
    """Other weights of the same model, same size, at the same path."""
    module = models.create_model(VIT, num_classes=10)
    other = checkpoint.save(path.parent / "other", VIT, "digits", models.init_untrained(module, seed=1),
                            checkpoint.read_meta(path)["pretrained_cfg"], "test")
    assert other.stat().st_size == path.stat().st_size
    shutil.copy(other, path)


def config_for(experiment: str, tmp_path: Path, folder: Path, weights: Path):
    config = get_config({"ablate": "ablate", "sparsity": "sparsity", "receptive_field": "receptive_field"}[experiment])
    config.workdir = str(tmp_path / "run")
    config.weights = str(weights)
    config.model = VIT
    config.progress = False
    config.data.source = "folder"
    config.data.folder = str(folder)
    config.data.num_images = 0
    config.data.batch_size = 4
    config.data.num_workers = 2
    if experiment == "ablate":
        config.ablation.update(p=(0.1,), n=(1,), draws=1, bootstrap=10)
    if experiment == "receptive_field":
        config.receptive_field.variants = "trained"
        config.receptive_field.layers = "blocks.0"
    return config


CHANGES = {
    "an image added": lambda folder, weights: digits_folder(folder, n=1, offset=50),
    "an image replaced": lambda folder, weights: Image.fromarray(
        np.full((8, 8, 3), 200, np.uint8)).save(next(folder.glob("*/*.png"))),
    "the weights replaced": lambda folder, weights: replace_weights(weights),
}
EXPECTED = {"an image added": "the images changed", "an image replaced": "the images changed",
            "the weights replaced": "weights file was replaced"}


@pytest.mark.parametrize("experiment", ["ablate", "sparsity", "receptive_field"])
def test_changed_data_or_weights_are_refused_not_mixed(experiment, tmp_path, monkeypatch):
    folder = digits_folder(tmp_path / "images")
    weights = own_weights(tmp_path / "weights")
    config = config_for(experiment, tmp_path, folder, weights)
    with monkeypatch.context() as mp:     # one batch, then stop as if interrupted
        original = resumable.run_resumable
        mp.setattr(resumable, "run_resumable", lambda *a, **kw: original(*a, **{**kw, "stop_after_batches": 1}))
        with pytest.raises(resumable.Interrupted):
            main.run(config)
    snapshot, pristine = tmp_path / "snapshot", tmp_path / "pristine"
    shutil.copytree(tmp_path / "run", snapshot)
    shutil.copytree(folder, pristine)          # copy2: same sizes and mtimes, the same folder identity
    for change, expected in EXPECTED.items():
        # each change starts from the same interrupted run and the original inputs
        for src, dst in ((snapshot, tmp_path / "run"), (pristine, folder)):
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        own_weights(tmp_path / "weights")
        CHANGES[change](folder, weights)
        with pytest.raises(StateError) as info:
            main.run(config)
        text = str(info.value)
        assert expected in text and "--config.resume=False" in text, (change, text)
        other = next(e for c, e in EXPECTED.items() if e != expected)
        assert other not in text, (change, text)               # only what changed is named
        assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "config.json").exists()
    # the original inputs resume and finish
    for src, dst in ((snapshot, tmp_path / "run"), (pristine, folder)):
        shutil.rmtree(dst)
        shutil.copytree(src, dst)
    own_weights(tmp_path / "weights")
    out = main.run(config)
    assert (tmp_path / "run" / "COMPLETE.json").exists() and out


def test_training_refuses_to_resume_from_other_starting_weights(tmp_path):
    from vitsparse_jax.experiments.train import run as train
    from vitsparse_jax.runtime.workdir import Workdir

    spec = importlib.util.spec_from_file_location("train_config", ROOT / "configs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("vit")
    weights = own_weights(tmp_path / "weights")
    config.weights, config.progress = str(weights), False      # fine-tune the built-in model
    config.data.update(num_images=16, batch_size=8)
    config.train.update(steps=4, batch_size=8, warmup_steps=1, eval_every=0, checkpoint_every=0, num_classes=10)
    workdir = Workdir(tmp_path / "run")
    with pytest.raises(resumable.Interrupted):
        train.run(config, workdir, stop_after_steps=1)
    replace_weights(weights)
    with pytest.raises(StateError) as info:
        train.run(config, workdir)
    assert "start.sha256" in str(info.value) and "weights file was replaced" in str(info.value)
    own_weights(tmp_path / "weights")                            # the same content again: resumes
    assert train.run(config, workdir)["start_step"] == 1
