"""Sources: ImageNet-style and plain folders, TFDS written offline (no TensorFlow), digits, subsets."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitsparse_jax import data
from vitsparse_jax.data import sources
from vitsparse_jax.data.imagenet_folder import extract_validation, validation_wnids
from vitsparse_jax.runtime import parallel
from vitsparse_jax.runtime.config_defaults import data_config

WNIDS = ["n01440764", "n01443537", "n15075141"]  # imagenet indices 0, 1, 999


def jpeg(value: int, size: tuple[int, int] = (30, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_folder(root, classes: dict[str, int]) -> None:
    """`count` images per class folder; file names in reverse order of creation."""
    for c, count in classes.items():
        os.makedirs(root / c, exist_ok=True)
        for k in range(count):
            (root / c / f"img_{count - k:02d}.JPEG").write_bytes(jpeg(10 * k))
    (root / "README.txt").write_text("not an image")


def test_imagenet_folder_gets_sorted_wnid_labels(tmp_path):
    write_folder(tmp_path, {WNIDS[2]: 2, WNIDS[0]: 3, WNIDS[1]: 1})
    src = data.make_eval_source(data_config(source="folder", folder=str(tmp_path)))
    assert len(src) == 6 and src.num_classes == 1000
    # Sorted wnids, then sorted file names; label = position among ImageNet's 1000 sorted wnids.
    assert src.files[0] == os.path.join(WNIDS[0], "img_01.JPEG")
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 999, 999])
    assert [src.read(i).label for i in range(6)] == [0, 0, 0, 1, 999, 999]
    assert sources.imagenet_wnids()[999] == WNIDS[2]


def test_class_folders_without_wnids_use_sorted_folder_index(tmp_path):
    write_folder(tmp_path, {"dog": 2, "cat": 1})
    src = sources.FolderSource(tmp_path)
    assert src.class_names == ("cat", "dog")
    np.testing.assert_array_equal(src.labels, [0, 1, 1])
    # label_space='dataset' keeps a wnid folder's own order too
    wnid_dir = tmp_path / "w"
    write_folder(wnid_dir, {WNIDS[2]: 1, WNIDS[1]: 1})
    np.testing.assert_array_equal(sources.FolderSource(wnid_dir, label_space="dataset").labels, [0, 1])


def test_plain_folder_is_unlabelled(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.png").write_bytes(jpeg(1))
    (tmp_path / "a.jpg").write_bytes(jpeg(2))
    (tmp_path / "sub" / "c.jpeg").write_bytes(jpeg(3))
    src = data.make_eval_source(data_config(source="images", folder=str(tmp_path)))
    assert src.files == ["a.jpg", "b.png", os.path.join("sub", "c.jpeg")]
    assert src.num_classes == 0 and src.read(0).label == -1
    np.testing.assert_array_equal(src.labels, [-1, -1, -1])
    with pytest.raises(FileNotFoundError, match="source='images'"):
        data.make_eval_source(data_config(source="folder", folder=str(tmp_path / "sub")))


def test_folder_identity_changes_with_contents(tmp_path):
    write_folder(tmp_path, {"a": 2})
    before = sources.FolderSource(tmp_path).identity
    assert sources.FolderSource(tmp_path).identity == before
    (tmp_path / "a" / "img_01.JPEG").write_bytes(jpeg(200, (31, 20)))
    assert sources.FolderSource(tmp_path).identity != before


def test_subsets(tmp_path):
    write_folder(tmp_path, {WNIDS[0]: 4, WNIDS[1]: 3, WNIDS[2]: 2})  # labels 0 x4, 1 x3, 999 x2
    base = sources.FolderSource(tmp_path)
    first = data.make_eval_source(data_config(source="folder", folder=str(tmp_path), num_images=5))
    np.testing.assert_array_equal(first.labels, [0, 0, 0, 0, 1])
    assert first.key(4) == base.key(4) and first.identity == base.identity
    per = sources.subset(base, per_class=2)
    np.testing.assert_array_equal(per.indices, [0, 1, 4, 5, 7, 8])
    every = sources.subset(base, every_kth_class=3)  # classes 0 and 999
    np.testing.assert_array_equal(every.labels, [0, 0, 0, 0, 999, 999])
    both = data.make_eval_source(data_config(source="folder", folder=str(tmp_path), every_kth_class=3,
                                             per_class=1, num_images=1))
    np.testing.assert_array_equal(both.indices, [0])
    with pytest.raises(ValueError, match="empty"):
        sources.subset(base, num_images=0)
    first_two = data.make_eval_source(data_config(source="folder", folder=str(tmp_path), num_images=2))
    assert len(first_two) == 2
    with pytest.raises(ValueError, match=r"unknown data config field\(s\) \['path'\]"):
        data.make_eval_source(data_config(source="folder", path=str(tmp_path)))


def test_labels_outside_model_classes_are_an_error(tmp_path):
    write_folder(tmp_path, {WNIDS[0]: 1, WNIDS[2]: 1})
    src = sources.FolderSource(tmp_path)
    sources.check_labels(src, 1000)
    sources.check_labels(src, 0)  # headless model: no labels to check
    with pytest.raises(ValueError, match="model has 10 classes"):
        sources.check_labels(src, 10)


def test_digits_fixed_split():
    test, train = sources.DigitsSource("test"), sources.DigitsSource("train")
    assert (len(test), len(train)) == (400, 1397)
    assert not set(test.indices) & set(train.indices)
    np.testing.assert_array_equal(test.indices, sources.DigitsSource("test").indices)  # fixed
    rec = test.read(0)
    assert rec.data.dtype == np.uint8 and rec.data.shape == (8, 8, 3) and rec.data.max() == 255
    assert set(np.unique(train.labels)) == set(range(10))
    assert data.make_eval_source(data_config()).name == "digits:test"  # the project's default data


def test_digits_read_without_sklearn_are_sklearns_digits():
    from sklearn.datasets import load_digits

    images, targets = sources.load_digits()
    want = load_digits()
    assert images.dtype == want.images.dtype and targets.dtype == want.target.dtype
    np.testing.assert_array_equal(images, want.images)
    np.testing.assert_array_equal(targets, want.target)


def test_digits_come_from_sklearn_when_its_file_is_not_found(monkeypatch):
    want = sources.load_digits()
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    images, targets = sources.load_digits()
    np.testing.assert_array_equal(images, want[0])
    np.testing.assert_array_equal(targets, want[1])


# ------------------------------------------------------------------------------------- TFDS, offline

def _tiny_builder_class(images: list[bytes], labels: list[str], class_names: list[str]):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A few JPEGs/PNGs; read back through the files only (not registered by name)."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "label": tfds.features.ClassLabel(names=class_names),
                "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for k, (img, label) in enumerate(zip(images, labels)):
                yield f"img{k}", {"image": img, "label": label, "file_name": f"img{k}"}

    return TinyImages


def test_tfds_dataset_written_offline_reads_back_with_labels(tmp_path):
    from sklearn.datasets import load_sample_images

    photos = [io.BytesIO() for _ in range(2)]
    for buf, arr in zip(photos, load_sample_images().images):
        Image.fromarray(arr).save(buf, "JPEG")
    png = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(png, "PNG")
    images = [photos[0].getvalue(), photos[1].getvalue(), png.getvalue(), jpeg(7), jpeg(99)]
    # imagenette-style: wnid class names NOT in sorted order -> labels become ImageNet indices
    names = [WNIDS[2], WNIDS[0], WNIDS[1]]
    labels = [WNIDS[0], WNIDS[2], WNIDS[1], WNIDS[0], WNIDS[2]]
    builder = _tiny_builder_class(images, labels, names)(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()

    src = data.make_eval_source(data_config(source="tfds", name="tiny_images", split="validation",
                                            data_dir=str(tmp_path)))
    assert len(src) == 5 and src.num_classes == 1000 and src.identity.startswith("tfds:tiny_images/1.0.0")
    index = {WNIDS[0]: 0, WNIDS[1]: 1, WNIDS[2]: 999}
    got = {src.read(i).data: src.read(i).label for i in range(len(src))}  # TFDS shuffles the order
    assert got == {img: index[w] for img, w in zip(images, labels)}  # exact bytes, right labels
    assert sorted(src.labels.tolist()) == sorted(index[w] for w in labels)

    # through the threaded pipeline on 4 devices: every image once, crops as decoded directly
    cfg = {"input_size": (3, 24, 24), "crop_pct": 0.875, "interpolation": "bicubic", "num_classes": 1000}
    seen = []
    for batch in data.batches(src, cfg, 4, parallel.make_mesh(), num_workers=3):
        host = parallel.to_host(batch)
        for row, i in enumerate(host["index"]):
            if i < 0:
                continue
            record = src.read(int(i))
            expected = data.EvalTransform.from_cfg(cfg)(data.decode_image(record.data))
            np.testing.assert_array_equal(host["image"][row], expected)
            assert host["valid"][row] and host["label"][row] == record.label
            seen.append(int(i))
    assert seen == list(range(len(src)))

    own = sources.TfdsSource("tiny_images", "validation", data_dir=str(tmp_path), label_space="dataset")
    assert own.class_names == tuple(names)
    assert sorted(own.labels.tolist()) == sorted(names.index(w) for w in labels)


def test_missing_imagenet_explains_how_to_prepare(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(sources.DatasetNotPreparedError) as err:
        data.make_eval_source(data_config(source="tfds", name="imagenet2012", split="validation",
                                          data_dir=str(tmp_path)))
    msg = str(err.value)
    for hint in ("ILSVRC2012_img_val.tar", "tfds build imagenet2012", "--manual_dir", "array_record",
                 "tensorflow-cpu", "docs/data.md"):
        assert hint in msg
    with pytest.raises(sources.DatasetNotPreparedError, match="no dataset named"):
        sources.TfdsSource("no_such_dataset_xyz", data_dir=str(tmp_path))


def test_imagenet_val_tar_to_wnid_folder(tmp_path):
    wnids = validation_wnids()
    assert len(wnids) == 50000
    tar_path = tmp_path / "ILSVRC2012_img_val.tar"
    with tarfile.open(tar_path, "w") as tar:
        for n in (1, 2, 50000):
            payload = jpeg(n % 256)
            info = tarfile.TarInfo(f"ILSVRC2012_val_{n:08d}.JPEG")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert extract_validation(tar_path, tmp_path / "val") == 3
    src = sources.FolderSource(tmp_path / "val")
    expected = sorted((wnids[n - 1], f"ILSVRC2012_val_{n:08d}.JPEG") for n in (1, 2, 50000))
    assert src.files == [os.path.join(w, f) for w, f in expected]
    wnid_index = {w: k for k, w in enumerate(sources.imagenet_wnids())}
    np.testing.assert_array_equal(src.labels, [wnid_index[w] for w, _ in expected])
    for i, (_, name) in enumerate(expected):  # bytes copied unchanged
        assert src.read(i).data == jpeg(int(name[15:23]) % 256)
