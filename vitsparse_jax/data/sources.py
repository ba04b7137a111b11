"""Image sources: TFDS datasets, ImageNet-style / plain folders, the built-in digits set, subsets.

A `Source` is an indexable dataset: `len(source)`, `source.read(i) -> Record` (encoded image bytes or a
uint8 array, and the label), `source.labels` (int32, -1 = unlabelled). Labels are in the source's label
space: with `label_space='auto'`, datasets whose classes are ImageNet wnids (an ImageNet folder, imagenette,
imagenet_v2, ...) get the index of the wnid in the sorted list of the 1000 ImageNet-1k wnids (timm's
class order), whatever subset of classes is present; other datasets keep their own class indices.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib.util
import os
import re
import threading
from typing import Any, Sequence

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                              ".pgm", ".pbm"})
LABEL_SPACES = ("auto", "dataset", "imagenet")
_WNID = re.compile(r"^n\d{8}$")


@dataclasses.dataclass(frozen=True)
class Record:
    data: bytes | np.ndarray  # encoded image file, or a decoded uint8 (H, W, 3) array
    label: int                # -1 = unlabelled


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset that is not in data_dir (and cannot be downloaded here)."""


SKIPPED_LISTED = 100   # unreadable images named in the results (all are counted)


class Source(abc.ABC):
    """Indexable image dataset. Subclasses implement `__len__`, `read`, `key`, `identity`."""

    name: str = "source"
    class_names: tuple[str, ...] | None = None  # label space; None = unlabelled

    def __init__(self) -> None:
        self.skipped: dict[int, str] = {}  # index -> why it could not be read (filled by the pipeline)
        self._skip_lock = threading.Lock()
        self._labels: np.ndarray | None = None

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, i: int) -> Record: ...

    @abc.abstractmethod
    def key(self, i: int) -> str:
        """Stable name of image i within `identity` (cache key; shared by subsets of the source)."""

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """Stable name of the underlying dataset (cache key)."""

    @property
    def num_classes(self) -> int:
        """Size of the label space (0 = unlabelled)."""
        return len(self.class_names) if self.class_names else 0

    def label(self, i: int) -> int:
        return self.read(i).label

    @property
    def labels(self) -> np.ndarray:
        """Labels of every image, int32 (may read the whole dataset once, e.g. TFDS)."""
        if self._labels is None:
            self._labels = np.array([self.label(i) for i in range(len(self))], dtype=np.int32)
        return self._labels

    def digest(self, i: int) -> bytes:
        """The content digest of image i as it is now (`runtime.fingerprint.content_digest` of the bytes the
        decoder reads; read only, no decode); `fingerprint.MISSING_DIGEST` if it cannot be read at all."""
        from vitsparse_jax.runtime.fingerprint import MISSING_DIGEST, content_digest

        try:
            return content_digest(self.read(i).data)
        except OSError:
            return MISSING_DIGEST

    def file_name(self, i: int) -> str:
        """Image i's name for messages and skipped lists: its file (a folder: the path below the root)."""
        return self.key(i)

    def mark_skipped(self, i: int, reason: str) -> None:
        with self._skip_lock:
            self.skipped[i] = reason

    def skipped_files(self, limit: int = SKIPPED_LISTED) -> list[dict[str, Any]]:
        """The first `limit` images that could not be read, by index: index, file (`file_name`) and reason.

        On several hosts each host decodes only its share of every batch, so this lists this host's."""
        with self._skip_lock:
            first = sorted(self.skipped.items())[:limit]
        return [{"index": i, "file": self.file_name(i), "reason": reason} for i, reason in first]

    def describe(self) -> dict[str, Any]:
        """For results metadata: `skipped` counts the unreadable images, `skipped_files` names the first 100."""
        return {"name": self.name, "identity": self.identity, "num_images": len(self),
                "num_classes": self.num_classes, "skipped": len(self.skipped), "skipped_files": self.skipped_files()}

    def _check_index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range for {self.name} with {len(self)} images")
        return int(i)


# ----------------------------------------------------------------------------------------- label spaces

def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in sorted order (timm's class indices); shipped with TFDS."""
    from importlib import resources
    path = resources.files("tensorflow_datasets") / "datasets" / "imagenet2012" / "labels.txt"
    wnids = tuple(path.read_text().split())
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids), "unexpected TFDS imagenet2012/labels.txt"
    return wnids


def label_map(class_names: Sequence[str], label_space: str) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """(dataset class index -> output label array or None for identity, output class names)."""
    if label_space not in LABEL_SPACES:
        raise ValueError(f"label_space {label_space!r} is not one of {LABEL_SPACES}")
    is_wnids = bool(class_names) and all(_WNID.match(c) for c in class_names)
    if label_space == "dataset" or (label_space == "auto" and not is_wnids):
        return None, tuple(class_names)
    wnids = imagenet_wnids()
    position = {w: k for k, w in enumerate(wnids)}
    unknown = [c for c in class_names if c not in position]
    if unknown:
        raise ValueError(f"label_space='imagenet' but classes {unknown[:5]} are not ImageNet-1k wnids; "
                         "use label_space='dataset' to keep the dataset's own class indices")
    mapping = np.array([position[c] for c in class_names], dtype=np.int32)
    if np.array_equal(mapping, np.arange(len(wnids))):
        return None, wnids
    return mapping, wnids


def check_labels(source: Source, num_classes: int | None) -> None:
    """Raises if the source's labels can exceed the model's classes (0 / None: headless, no check)."""
    if not num_classes or not source.num_classes:
        return
    if source.num_classes > num_classes:
        raise ValueError(
            f"{source.name} has labels in [0, {source.num_classes}) but the model has {num_classes} classes. "
            "Use a model trained on this label space; for a dataset of ImageNet wnids, either a 1000-class "
            "model (data.label_space='imagenet') or data.label_space='dataset' for the dataset's own "
            "class indices.")


# ----------------------------------------------------------------------------------------------- TFDS

class TfdsSource(Source):
    """A TFDS image classification dataset read with `tfds.data_source` (ArrayRecord; no TensorFlow)."""

    def __init__(self, name: str, split: str = "validation", data_dir: str | None = None,
                 manual_dir: str | None = None, label_space: str = "auto", image_key: str | None = None,
                 label_key: str | None = None):
        """`data_dir`: local path or gs://bucket/path (gs:// needs `pip install gcsfs`); None: TFDS's
        default (~/tensorflow_datasets). `manual_dir`: if the dataset is not prepared yet, prepare it
        from the files there (as ArrayRecord); TFDS's imagenet2012 writer needs tensorflow for that."""
        super().__init__()
        import tensorflow_datasets as tfds

        if str(data_dir or "").startswith("gs://") and not any(
                importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
            raise ImportError(f"data_dir={data_dir} needs `pip install gcsfs` (TFDS reads gs:// through it)")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise DatasetNotPreparedError(
                f"TFDS has no dataset named {name!r} and none is prepared under data_dir={data_dir!r}. "
                f"{_PREPARE_HINT}") from e
        if not builder.is_prepared():
            if manual_dir is None:
                raise DatasetNotPreparedError(_not_prepared_message(name, split, builder.data_dir))
            try:
                builder.download_and_prepare(
                    file_format="array_record",
                    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
            except ImportError as e:  # TFDS writers import tensorflow & co. lazily
                raise DatasetNotPreparedError(
                    f"preparing {name} from manual_dir={manual_dir} needs the missing module {e.name!r} "
                    f"(pip install it). " + _not_prepared_message(name, split, builder.data_dir)) from e
            except AssertionError as e:  # TFDS's way of saying the manual files are missing
                raise DatasetNotPreparedError(
                    f"preparing {name} from manual_dir={manual_dir} failed: {e}\n"
                    + _not_prepared_message(name, split, builder.data_dir)) from e
        features = builder.info.features
        self.image_key = image_key or _feature_key(features, tfds.features.Image, name)
        self.label_key = label_key or _feature_key(features, tfds.features.ClassLabel, name, optional=True)
        self._file_key = ("file_name" if "file_name" in features.keys()
                          and isinstance(features["file_name"], tfds.features.Text) else None)
        try:
            self._ds = builder.as_data_source(split=split,
                                              decoders={self.image_key: tfds.decode.SkipDecoding()})
        except NotImplementedError as e:  # prepared as TFRecord: no random access without TensorFlow
            raise DatasetNotPreparedError(
                f"{name} in {builder.data_dir} is stored as {builder.info.file_format}; this project reads "
                "ArrayRecord. Rebuild with `tfds build ... --file_format=array_record` (docs/data.md), or "
                f"convert it with `tfds convert_format` (needs tensorflow). TFDS said: {e}") from e
        self.name, self._split = f"tfds:{name}:{split}", split
        self._identity = f"tfds:{builder.info.full_name}:{split}"
        self._map: np.ndarray | None = None
        if self.label_key:
            self._map, self.class_names = label_map(features[self.label_key].names, label_space)

    def __len__(self) -> int:
        return len(self._ds)

    @property
    def identity(self) -> str:
        return self._identity

    def key(self, i: int) -> str:
        return str(self._check_index(i))

    def file_name(self, i: int) -> str:
        """The example's original file name where the dataset keeps one (ImageNet's `file_name`), else
        `<split>[i]`."""
        if self._file_key:
            try:
                name = self._ds[self._check_index(i)][self._file_key]
                return name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # noqa: BLE001  (the record itself is unreadable: name it by position)
                pass
        return f"{self._split}[{i}]"

    def read(self, i: int) -> Record:
        return self._record(self._ds[self._check_index(i)])

    @property
    def labels(self) -> np.ndarray:
        """One pass over the split, in parallel chunks (array_record reads them concurrently)."""
        if self._labels is None:
            chunk = 512
            self._labels = np.array(
                [self._record(ex).label for start in range(0, len(self), chunk)
                 for ex in self._ds.__getitems__(list(range(start, min(start + chunk, len(self)))))],
                dtype=np.int32)
        return self._labels

    def _record(self, example: dict[str, Any]) -> Record:
        label = -1
        if self.label_key:
            label = int(example[self.label_key])
            label = int(self._map[label]) if self._map is not None else label
        return Record(data=example[self.image_key], label=label)


_PREPARE_HINT = "See docs/data.md for preparing datasets, or use data.source='folder' for a local folder."


def _not_prepared_message(name: str, split: str, data_dir: Any) -> str:
    msg = f"TFDS dataset {name!r} (split {split!r}) is not prepared in {data_dir}. "
    if name.startswith("imagenet2012"):
        msg += ("ImageNet cannot be downloaded automatically. Once, on any machine:\n"
                "  1. download ILSVRC2012_img_val.tar (and ILSVRC2012_img_train.tar for train) from "
                "https://image-net.org/download-images into MANUAL_DIR;\n"
                "  2. pip install tensorflow-cpu   (TFDS's ImageNet writer needs it; reading here does not);\n"
                "  3. tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=MANUAL_DIR "
                "--file_format=array_record\n"
                "then set data.data_dir=DATA_DIR (a local path or gs://bucket/path). Without TensorFlow: "
                "python -m vitsparse_jax.data.imagenet_folder ILSVRC2012_img_val.tar OUT_DIR and "
                "data.source='folder', data.folder=OUT_DIR. ")
    else:
        msg += f"Prepare it with `tfds build {name} --data_dir=DATA_DIR --file_format=array_record`. "
    return msg + _PREPARE_HINT


def _feature_key(features: Any, kind: type, name: str, optional: bool = False) -> str | None:
    keys = [k for k, f in features.items() if isinstance(f, kind)]
    if len(keys) == 1:
        return keys[0]
    if not keys and optional:
        return None
    preferred = {"Image": "image", "ClassLabel": "label"}[kind.__name__]
    if preferred in keys:
        return preferred
    raise ValueError(f"cannot tell which {kind.__name__} feature of {name} to use among {keys or 'none'}; "
                     f"pass image_key= / label_key=")


# -------------------------------------------------------------------------------------------- folders

class FolderSource(Source):
    """Images under `root`. labels='folders': one subfolder per class (ImageNet style: wnid folders);
    labels='none': every image file below root, unlabelled; 'auto': folders if root has no images itself.
    Order: sorted class, then sorted relative path."""

    def __init__(self, root: str | os.PathLike, labels: str = "auto", label_space: str = "auto"):
        super().__init__()
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root} does not exist"
                                    + (" (it is a file)" if os.path.exists(self.root) else "")
                                    + "; set --config.data.folder to a folder of images (data.source='folder': one "
                                    "subfolder per class; 'images': unlabelled images)")
        if labels not in ("auto", "folders", "none"):
            raise ValueError(f"labels must be 'auto', 'folders' or 'none', got {labels!r}")
        with os.scandir(self.root) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        if labels == "auto":
            has_images = any(e.is_file() and _is_image(e.name) for e in entries)
            labels = "none" if has_images else "folders"
        if labels == "folders":
            dirs = sorted(e.name for e in entries if e.is_dir())
            self.files = [os.path.join(d, f) for d in dirs for f in _image_files(os.path.join(self.root, d))]
            folder_label = {d: k for k, d in enumerate(dirs)}
            raw = np.array([folder_label[f.split(os.sep, 1)[0]] for f in self.files], dtype=np.int32)
            self._map, self.class_names = label_map(dirs, label_space)
            self._labels = raw if self._map is None else self._map[raw]
        else:
            self.files = _image_files(self.root)
            self._labels = np.full(len(self.files), -1, dtype=np.int32)
        if not self.files:
            hint = (" It has no class subfolders; for a folder of unlabelled images use data.source='images'."
                    if labels == "folders" and not any(e.is_dir() for e in entries) else "")
            raise FileNotFoundError(
                f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}.{hint}")
        self.name = f"folder:{self.root}"
        self._identity: str | None = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def identity(self) -> str:
        """Root + a hash of every file's path, size and mtime: any change gives a new identity."""
        if self._identity is None:
            h = hashlib.sha256()
            for f in self.files:
                try:
                    st = os.stat(os.path.join(self.root, f))
                    h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                except OSError:   # vanished, or a dangling symlink: read() fails and the image is counted skipped
                    h.update(f"{f}\0missing\n".encode())
            self._identity = f"folder:{self.root}:{h.hexdigest()[:16]}"
        return self._identity

    def key(self, i: int) -> str:
        return self.files[self._check_index(i)]

    def label(self, i: int) -> int:
        return int(self._labels[self._check_index(i)])

    def read(self, i: int) -> Record:
        with open(os.path.join(self.root, self.files[self._check_index(i)]), "rb") as f:
            return Record(data=f.read(), label=int(self._labels[i]))


def _is_image(filename: str) -> bool:
    return os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


def _image_files(root: str) -> list[str]:
    """Image files below root (recursive), as sorted paths relative to root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        found += [os.path.normpath(os.path.join(rel, f)) for f in filenames
                  if _is_image(f) and not f.startswith(".")]
    return sorted(found)


# --------------------------------------------------------------------------------------------- digits

DIGITS_TEST_SIZE = 400
DIGITS_SPLIT_SEED = 0


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float64 in 0..16 and targets (1797,) int.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`: 64 pixels and the digit per
    row), found without importing scikit-learn: its import takes 0.7-1 s, a tenth of a small run's fixed cost
    (BENCHMARKS.md). The same numbers as `sklearn.datasets.load_digits()` (tests/test_data_sources.py), which
    is used if the file is not where it has always been.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            rows = np.loadtxt(path, delimiter=",")
            return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return digits.images, digits.target


class DigitsSource(Source):
    """scikit-learn's 8x8 handwritten digits (1797 images, BSD-3): grey 0..16 -> uint8 RGB.

    Fixed split: a permutation seeded with 0; its first 400 images are 'test', the other 1397 'train';
    each split in increasing original index order.
    """

    def __init__(self, split: str = "test"):
        super().__init__()
        images, targets = load_digits()
        order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(targets))
        splits = {"test": np.sort(order[:DIGITS_TEST_SIZE]), "train": np.sort(order[DIGITS_TEST_SIZE:])}
        if split not in splits:
            raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
        self.indices = splits[split]
        grey = np.round(images[self.indices] * (255.0 / 16.0)).astype(np.uint8)
        self.images = np.repeat(grey[..., None], 3, axis=-1)  # (N, 8, 8, 3)
        self._labels = targets[self.indices].astype(np.int32)
        self.class_names = tuple(str(d) for d in range(10))
        self.name = f"digits:{split}"

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def identity(self) -> str:
        return "digits:v1"

    def key(self, i: int) -> str:
        return str(int(self.indices[self._check_index(i)]))

    def label(self, i: int) -> int:
        return int(self._labels[self._check_index(i)])

    def read(self, i: int) -> Record:
        return Record(data=self.images[self._check_index(i)], label=int(self._labels[i]))


# -------------------------------------------------------------------------------------------- subsets

class Subset(Source):
    """The images `indices` of `base`, in that order (shares its identity, keys and cache)."""

    def __init__(self, base: Source, indices: Sequence[int] | np.ndarray, description: str = "subset"):
        super().__init__()
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.class_names = base.class_names
        self.name = f"{base.name}[{description}]"

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def identity(self) -> str:
        return self.base.identity

    def key(self, i: int) -> str:
        return self.base.key(int(self.indices[self._check_index(i)]))

    def file_name(self, i: int) -> str:
        return self.base.file_name(int(self.indices[self._check_index(i)]))

    def label(self, i: int) -> int:
        return self.base.label(int(self.indices[self._check_index(i)]))

    def read(self, i: int) -> Record:
        return self.base.read(int(self.indices[self._check_index(i)]))


def subset(source: Source, *, num_images: int | None = None, every_kth_class: int | None = None,
           per_class: int | None = None) -> Source:
    """Quick subsets, applied in this order: keep classes 0, k, 2k, ... (`every_kth_class`=k); the first
    `per_class` images of each class (dataset order); the first `num_images` images."""
    for name, value, least in (("num_images", num_images, 0), ("per_class", per_class, 0),
                               ("every_kth_class", every_kth_class, 1)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < least):
            raise ValueError(f"data.{name} must be an integer >= {least} ({'0 = all' if least == 0 else '1 = all'}"
                             f"), got {value!r}")
    idx = np.arange(len(source))
    parts = []
    if every_kth_class or per_class:
        if not source.num_classes:
            raise ValueError(f"every_kth_class / per_class need a labelled source; {source.name} has no labels")
        labels = source.labels
        if every_kth_class:
            idx = idx[labels[idx] % every_kth_class == 0]
            parts.append(f"every {every_kth_class}th class")
        if per_class:
            seen: dict[int, int] = {}
            keep = []
            for i in idx:
                seen[labels[i]] = seen.get(labels[i], 0) + 1
                keep.append(seen[labels[i]] <= per_class)
            idx = idx[np.array(keep, dtype=bool)] if len(idx) else idx
            parts.append(f"{per_class} per class")
    if num_images is not None:
        idx = idx[:num_images]
        parts.append(f"first {num_images}")
    if not parts:
        return source
    if not len(idx):
        raise ValueError(f"the subset ({', '.join(parts)}) of {source.name} is empty")
    return Subset(source, idx, ", ".join(parts))


def check_data_config(cfg: Any) -> None:
    """The numeric fields of config.data (vitsparse_jax.runtime.config_defaults.data_config) are in range."""
    limits = {"num_images": 0, "per_class": 0, "every_kth_class": 0, "num_workers": 0, "batch_size": 1}
    for name, least in limits.items():
        value = cfg.get(name) if hasattr(cfg, "get") else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            meaning = {"num_images": " (0 = all images)", "per_class": " (0 = all)", "every_kth_class":
                       " (1 = every class)", "num_workers": " (0 = one per core)", "batch_size": ""}[name]
            raise ValueError(f"data.{name} must be an integer >= {least}{meaning}, got {value!r}; set "
                             f"--config.data.{name}=...")
