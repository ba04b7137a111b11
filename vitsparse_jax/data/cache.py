"""On-disk cache of preprocessed uint8 crops, so a sweep decodes each image once.

Layout: <root>/<slug>-<key>/ with `meta.json` (what the key hashes) and one file per image,
<ab>/<sha1 of the image key and its content digest>.npy (the crop) or .skip (why it could not be read). The
directory key hashes the dataset identity and the transform's parameters, so a model with another size,
crop_pct or interpolation gets its own entries; the content digest (of the bytes the decoder reads) keys
each entry, so an image replaced in place (even with its size and mtime kept) is decoded again. Every file
is written to a temporary name and renamed: readers (other threads, processes or hosts on a shared disk) see
a whole file or none. Entries never change results, so writing them never touches a workdir's completion
marker.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Any

import numpy as np

from vitsparse_jax.runtime.workdir import atomic_write_bytes

CACHE_FORMAT = 2   # 2: entries keyed by the image's key and content digest


class CropCache:
    def __init__(self, root: str | os.PathLike, identity: str, transform_params: dict[str, Any]):
        meta = {"format": CACHE_FORMAT, "dataset": identity, "transform": transform_params}
        blob = json.dumps(meta, sort_keys=True).encode()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity).strip("_")[-48:]
        self.dir = os.path.join(os.fspath(root), f"{slug}-{hashlib.sha256(blob).hexdigest()[:16]}")
        os.makedirs(self.dir, exist_ok=True)
        meta_path = os.path.join(self.dir, "meta.json")
        if not os.path.exists(meta_path):
            atomic_write_bytes(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode(), invalidate=False)

    def _path(self, key: str, content: bytes) -> str:
        digest = hashlib.sha1(key.encode() + b"\0" + content).hexdigest()
        return os.path.join(self.dir, digest[:2], digest)

    def get(self, key: str, content: bytes) -> np.ndarray | str | None:
        """The cached crop of image `key` with content digest `content`, the reason string of a cached
        failure, or None (not cached)."""
        path = self._path(key, content)
        try:
            return np.load(path + ".npy", allow_pickle=False)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError):  # damaged entry (e.g. a full disk): recompute it
            return None
        try:
            with open(path + ".skip", encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, content: bytes, value: np.ndarray | str) -> None:
        """Stores a crop (uint8 array) or a failure reason (str) of image `key` with content digest `content`."""
        path = self._path(key, content)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(value, str):
            atomic_write_bytes(path + ".skip", value.encode("utf-8"), invalidate=False)
        else:
            atomic_write_bytes(path + ".npy", _npy_bytes(np.ascontiguousarray(value, dtype=np.uint8)),
                               invalidate=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()

