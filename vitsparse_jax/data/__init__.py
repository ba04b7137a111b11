"""Eval data: sources (TFDS, image folders, digits), timm-exact preprocessing, sharded batches.

    x = data.load_images(["cat.jpg", "dog.png"], pretrained_cfg)  # files -> normalised (B, S, S, 3) batch
    x = data.load_images([data.example_image()], pretrained_cfg)   # the photograph shipped for examples
    source = data.make_eval_source(config.data)
    for batch in data.batches(source, pretrained_cfg, batch_size):   # mesh: every device unless given
        x = data.normalize(batch["image"], pretrained_cfg)     # on device, float32
See docs/design.md ("Data"), docs/data.md and docs/api.md.
"""
from __future__ import annotations

from typing import Any, Mapping

from vitsparse_jax.data.cache import CropCache
from vitsparse_jax.data.examples import example_image
from vitsparse_jax.data.pipeline import Batch, ImageLoader, batches, default_num_workers, num_batches
from vitsparse_jax.data.sources import (
    DatasetNotPreparedError,
    DigitsSource,
    FolderSource,
    Record,
    Source,
    Subset,
    TfdsSource,
    check_data_config,
    check_labels,
    imagenet_wnids,
    subset,
)
from vitsparse_jax.data.transforms import EvalTransform, ImageLike, decode_image, load_images, normalize, read_image
from vitsparse_jax.runtime.paths import expand_path

SOURCES = ("digits", "tfds", "folder", "images")
# `config.data` fields (vitsparse_jax.runtime.config_defaults.data_config);
# batch_size / num_workers / cache_dir are read by the experiments for `batches`.
CONFIG_FIELDS = ("source", "name", "split", "data_dir", "manual_dir", "folder", "num_images",
                 "per_class", "every_kth_class", "label_space", "batch_size", "cache_dir", "num_workers")

# fields that name files or folders: `~` and environment variables are expanded
PATH_FIELDS = ("data_dir", "manual_dir", "folder", "cache_dir")


def make_eval_source(cfg: Mapping[str, Any]) -> Source:
    """The source described by `config.data` (fields: `vitsparse_jax.runtime.config_defaults.data_config`), with
    its subset applied. Empty strings and 0 mean 'not set'; an unknown field is an error."""
    unknown = sorted(set(cfg.keys()) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown data config field(s) {unknown}; valid: {', '.join(CONFIG_FIELDS)}")
    check_data_config(cfg)   # negative counts are errors, not 'all but the last N'

    def get(key: str, default: Any = None) -> Any:
        value = cfg.get(key) or default
        return expand_path(value) if key in PATH_FIELDS and value else value

    num_images = get("num_images")

    kind = get("source", "digits")
    label_space = get("label_space", "auto")
    if kind == "tfds":
        if not get("name"):
            raise ValueError("data.source='tfds' needs data.name, e.g. 'imagenet2012', 'imagenet_v2', 'imagenette'")
        source: Source = TfdsSource(get("name"), get("split", "validation"), data_dir=get("data_dir"),
                                    manual_dir=get("manual_dir"), label_space=label_space)
    elif kind in ("folder", "images"):
        if not get("folder"):
            raise ValueError(f"data.source={kind!r} needs data.folder (the image folder)")
        source = FolderSource(get("folder"), labels="folders" if kind == "folder" else "none",
                              label_space=label_space)
    elif kind == "digits":
        split = get("split", "test")
        source = DigitsSource("test" if split == "validation" else split)
    else:
        raise ValueError(f"data.source must be one of {SOURCES}, got {kind!r}")
    stride = get("every_kth_class", 1)
    return subset(source, num_images=num_images, every_kth_class=stride if stride > 1 else None,
                  per_class=get("per_class"))


__all__ = ["Batch", "CropCache", "DatasetNotPreparedError", "DigitsSource", "EvalTransform", "FolderSource",
           "ImageLike", "ImageLoader", "Record", "SOURCES", "Source", "Subset", "TfdsSource", "batches",
           "check_labels", "decode_image", "default_num_workers", "example_image", "imagenet_wnids", "load_images",
           "make_eval_source", "normalize", "num_batches", "read_image", "subset"]
