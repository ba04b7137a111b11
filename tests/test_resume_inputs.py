"""Resume keys fingerprint the data and the weights (issue 16, point 2), in every experiment.

Each experiment runs one batch on a folder of 12 digit images and is interrupted; then the folder gains an
image, an image is replaced, or the weights file at the same path is replaced. The rerun must refuse to
mix the two (before the fix: an IndexError, or silently mixed rows / another model's rows), naming what
changed, and the unchanged inputs must still resume.
"""
from __future__ import annotations

import importlib.util
import os
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


# ------------------------------------------- issue 23, point 6: resume checks content, not size and mtime

SMALL_GRID = ["--config.progress=False", "--config.data.batch_size=4", "--config.data.num_workers=2",
              "--config.data.num_images=0", "--config.ablation.p=0.1", "--config.ablation.n=1",
              "--config.ablation.draws=1", "--config.ablation.bootstrap=10"]


def bmp_folder(path: Path, n: int = 12) -> Path:
    """Labelled 8x8 BMPs: every file has the same byte size, whatever its pixels."""
    source = DigitsSource("test")
    for i in range(n):
        folder = path / str(source.label(i))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(source.read(i).data)).save(folder / f"{i:03d}.bmp")
    return path


def replace_keeping_size_and_mtime(path: Path, pixels: np.ndarray) -> None:
    """What `cp -p`, `rsync -t` or a tar extraction leave: other content, the same size and mtime."""
    st = path.stat()
    other = path.with_name(".replacement.bmp")
    Image.fromarray(pixels).save(other)
    assert other.stat().st_size == st.st_size
    os.replace(other, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def ablate(folder: Path, workdir: Path, *extra: str) -> int:
    return main.cli(["vitsparse_jax.main", "--config=configs/ablate.py", f"--config.workdir={workdir}",
                     "--config.data.source=folder", f"--config.data.folder={folder}", *SMALL_GRID, *extra])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A folder of 12 same-size images and an ablation stopped after its first batch of 4."""
    root = tmp_path_factory.mktemp("interrupted")
    folder = bmp_folder(root / "images")
    shutil.copytree(folder, root / "pristine", copy_function=shutil.copy2)
    assert ablate(folder, root / "run", "--config.ablation.stop_after_batches=1") == 75
    return root


def copy_of(interrupted: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The interrupted run (a copy) and its image folder, at its own path (part of the resume key), as it was."""
    shutil.rmtree(interrupted / "images")
    shutil.copytree(interrupted / "pristine", interrupted / "images", copy_function=shutil.copy2)
    shutil.copytree(interrupted / "run", tmp_path / "run")
    return interrupted / "images", tmp_path / "run"


def test_an_image_replaced_with_its_size_and_mtime_kept_is_refused_at_resume(interrupted, tmp_path, capsys):
    from vitsparse_jax.data import FolderSource

    folder, run = copy_of(interrupted, tmp_path)
    source = FolderSource(folder)
    identity, processed = source.identity, source.files[1]         # image 1 was in the first batch
    replace_keeping_size_and_mtime(folder / processed, np.full((8, 8, 3), 200, np.uint8))
    assert FolderSource(folder).identity == identity                # names, sizes and mtimes: all the same
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    status = ablate(folder, run)
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and processed in last and "other content" in last, last
    assert "--config.resume=False" in last and "Traceback" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before   # nothing written

    shutil.copy2(interrupted / "pristine" / processed, folder / processed)   # the original back: resumes
    assert ablate(folder, run) == 0, capsys.readouterr().err[-3000:]
    assert (run / "COMPLETE.json").exists()


def test_an_image_not_processed_yet_may_change(interrupted, tmp_path, capsys):
    from vitsparse_jax.data import FolderSource

    folder, run = copy_of(interrupted, tmp_path)
    later = FolderSource(folder).files[-1]                          # not in the first batch
    replace_keeping_size_and_mtime(folder / later, np.full((8, 8, 3), 90, np.uint8))
    assert ablate(folder, run) == 0, capsys.readouterr().err[-3000:]


def test_a_state_of_an_older_version_is_refused_as_such(interrupted, tmp_path, capsys):
    from vitsparse_jax.runtime.workdir import Workdir

    folder, run = copy_of(interrupted, tmp_path)
    wd = Workdir(run / f"{VIT}.digits")
    arrays, meta = wd.load_state()
    del arrays[resumable.DIGESTS], meta["format"]                  # the layout before content digests
    wd.save_state(arrays, meta)
    first = next(folder.glob("*/*.bmp"))
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))   # and a touched file
    status = ablate(folder, run)
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "older version" in last and "--config.resume=False" in last, last
    assert "images changed" not in last and "different config" not in last, last
    assert ablate(folder, run, "--config.resume=False") == 0        # the way out works as written


def test_the_crop_cache_decodes_an_image_replaced_in_place_again(tmp_path):
    from vitsparse_jax import data
    from vitsparse_jax.data import FolderSource
    from vitsparse_jax.runtime import parallel

    folder = bmp_folder(tmp_path / "images", n=4)
    cfg = {"input_size": (3, 8, 8), "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": 10}
    mesh = parallel.make_mesh()

    def crops():
        batch = parallel.to_host(next(data.batches(FolderSource(folder), cfg, 4, mesh, cache_dir=tmp_path / "c")))
        return batch["image"], batch["digest"]

    first, digests = crops()
    name = FolderSource(folder).files[0]
    replace_keeping_size_and_mtime(folder / name, np.full((8, 8, 3), 200, np.uint8))
    second, new_digests = crops()
    assert (second[0] == 200).all() and not (first[0] == 200).all()  # not the old crop from the cache
    assert (new_digests[0] != digests[0]).any() and (new_digests[1:] == digests[1:]).all()


def test_the_resume_check_benchmark_runs(monkeypatch, capsys):
    import runpy

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr("sys.argv", ["benchmarks/resume_check.py", "--num_files", "30", "--size_kb", "1"])
    runpy.run_path(str(root / "benchmarks" / "resume_check.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "30 files of 1 kB" in out and out.count("verify_images (") == 2 and "us CPU" in out
