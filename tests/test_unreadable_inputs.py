"""Unreadable, vanished and dangling images are counted, never fatal and never silently dropped; bad data
counts are errors (issue 16, point 3)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitsparse_jax import data, main
from vitsparse_jax.data import DigitsSource, FolderSource
from vitsparse_jax.runtime import parallel

ROOT = Path(__file__).resolve().parents[1]
CFG = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5,) * 3,
       "std": (0.5,) * 3, "num_classes": 10}


def images(path: Path, n: int) -> Path:
    source = DigitsSource("test")
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.asarray(source.read(i).data)).save(path / f"{i:03d}.png")
    return path


def test_vanished_files_and_dangling_symlinks_are_counted_not_fatal(tmp_path):
    folder = images(tmp_path / "imgs", 6)
    os.symlink(tmp_path / "nowhere.png", folder / "003b.png")     # dangling from the start
    source = FolderSource(folder, labels="none")
    assert len(source) == 7 and source.identity                   # listing and identity do not crash
    (folder / "001.png").unlink()                                 # vanishes after the listing
    out = [parallel.to_host(b) for b in data.batches(source, CFG, 4, parallel.make_mesh(), num_workers=2)]
    valid = np.concatenate([b["valid"] for b in out])
    index = np.concatenate([b["index"] for b in out])
    skipped = set(index[(index >= 0) & ~valid].tolist())
    names = {source.files[i] for i in skipped}
    assert names == {"001.png", "003b.png"}
    assert all("FileNotFoundError" in source.skipped[i] for i in skipped)
    assert source.describe()["skipped"] == 2


def rf_config(tmp_path: Path, folder: Path):
    spec = importlib.util.spec_from_file_location("rf_config", ROOT / "configs" / "receptive_field.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.workdir = str(tmp_path / "run")
    config.progress = False
    config.data.source = "images"
    config.data.folder = str(folder)
    config.data.num_images = 0
    config.data.batch_size = 4
    config.data.num_workers = 2
    config.receptive_field.variants = "trained"
    config.receptive_field.layers = "blocks.0"
    return config


def test_receptive_fields_count_unreadable_images_and_say_when_none_can_be_read(tmp_path):
    folder = images(tmp_path / "imgs", 6)
    (folder / "100.png").write_bytes(b"not a png")
    os.symlink(tmp_path / "nowhere.png", folder / "101.png")
    out = main.run(rf_config(tmp_path, folder))
    model = out["models"][0]
    assert model["num_images"] == 6 and model["images_skipped"] == 2
    named = {entry["file"]: entry["reason"] for entry in out["data"]["skipped_files"]}   # named, with the reason
    assert sorted(named) == ["100.png", "101.png"] and all(named.values())

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"none of the 3 images .* could be read \(3 unreadable: image 0: "):
        main.run(rf_config(tmp_path / "b", bad))


@pytest.mark.parametrize("field, value", [("num_images", -5), ("per_class", -1), ("every_kth_class", -2),
                                          ("num_workers", -1), ("batch_size", 0)])
def test_negative_counts_are_errors_not_all_but_the_last(field, value):
    cfg = {"source": "digits", "split": "test", field: value}
    with pytest.raises(ValueError, match=f"data.{field} must be an integer >= "):
        data.make_eval_source(cfg)
