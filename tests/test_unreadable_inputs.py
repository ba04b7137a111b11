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


def test_skipped_images_of_every_source_that_gives_encoded_bytes_are_named_by_their_file(tmp_path):
    """Folders give the decoder the file's bytes (as TFDS does); a file PIL cannot identify was listed with
    PIL's name for the in-memory buffer (`<_io.BytesIO object at 0x...>`) instead of anything useful."""
    folder = images(tmp_path / "imgs", 2)
    (folder / "zz.png").write_bytes(b"GIF89a but truncated")
    (folder / "zzz.jpg").write_bytes(b"plain text, not an image")
    source = FolderSource(folder, labels="none")
    out = parallel.to_host(next(data.batches(source, CFG, 4, parallel.make_mesh(), num_workers=2)))
    assert out["valid"].tolist() == [True, True, False, False]
    listed = {e["file"]: e["reason"] for e in source.describe()["skipped_files"]}
    assert sorted(listed) == ["zz.png", "zzz.jpg"], listed
    assert not any("BytesIO" in reason or " at 0x" in reason for reason in listed.values()), listed
    assert all(reason.startswith(("UnidentifiedImageError", "OSError", "SyntaxError")) for reason in listed.values())


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
    # the reason says what is wrong with the file, not PIL's name for an in-memory buffer (issue 23, point 5)
    assert named["100.png"].startswith("UnidentifiedImageError: not an image format PIL can read"), named
    assert "FileNotFoundError" in named["101.png"] and "object at 0x" not in " ".join(named.values()), named

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"none of the 3 images .* could be read \(3 unreadable: 0.jpg: "):
        main.run(rf_config(tmp_path / "b", bad))


@pytest.mark.parametrize("field, value", [("num_images", -5), ("per_class", -1), ("every_kth_class", -2),
                                          ("num_workers", -1), ("batch_size", 0)])
def test_negative_counts_are_errors_not_all_but_the_last(field, value):
    cfg = {"source": "digits", "split": "test", field: value}
    with pytest.raises(ValueError, match=f"data.{field} must be an integer >= "):
        data.make_eval_source(cfg)
