"""Eval batches as global jax.Arrays sharded over the 'data' mesh axis.

Batch b holds images [start + b*B, start + (b+1)*B) of the source, in order; rows past the end are
padding (valid=False, index=-1, label=-1). An image that cannot be decoded keeps its row and index with
valid=False and is recorded in `source.skipped`, so `(index >= 0) & ~valid` counts failures on device,
across hosts. Each process reads, decodes and crops only the rows that live on its own devices, on a
thread pool (PIL releases the GIL), `prefetch` batches ahead of the consumer. Every row also carries the
content digest of the bytes its image was decoded from (`digest`, zeros for padding and vanished files), so
the resumable pass can keep it with its state wherever the row was read.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from vitsparse_jax.data.cache import CropCache
from vitsparse_jax.data.sources import Source, check_labels
from vitsparse_jax.data.transforms import EvalTransform, decode_image
from vitsparse_jax.runtime import parallel
from vitsparse_jax.runtime.fingerprint import DIGEST_SIZE, MISSING_DIGEST, content_digest

Batch = dict[str, jax.Array]  # image uint8 (B,S,S,3), label int32, index int32, valid bool, digest uint8 (B,16)


def default_num_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ImageLoader:
    """Image i of a source -> (uint8 crop or None if unreadable, label, content digest); thread-safe,
    cache-aware. The bytes are always read (their digest is the image's content); the cache saves the decode
    and is keyed by that digest, so a file replaced in place is never served from the old entry."""

    def __init__(self, source: Source, transform: EvalTransform, cache: CropCache | None = None):
        self.source, self.transform, self.cache = source, transform, cache

    def __call__(self, i: int) -> tuple[np.ndarray | None, int, bytes]:
        try:
            record = self.source.read(i)
        except OSError as e:   # the file vanished, a dangling symlink, no permission: skipped and counted,
            self.source.mark_skipped(i, f"{type(e).__name__}: {e.strerror or e}")   # not cached (may come back)
            return None, self.source.label(i), MISSING_DIGEST
        digest = content_digest(record.data)
        key = self.source.key(i) if self.cache else None
        crop = self.cache.get(key, digest) if self.cache else None
        if crop is None:
            try:
                crop = self.transform(decode_image(record.data))
            except Exception as e:  # unreadable image content of any kind: skipped and counted, never fatal
                crop = f"{type(e).__name__}: {e}"
            if self.cache:
                self.cache.put(key, digest, crop)
        if isinstance(crop, str):
            self.source.mark_skipped(i, crop)
            return None, record.label, digest
        return crop, record.label, digest

    def local_batch(self, indices: np.ndarray, futures: list[cf.Future | None],
                    num_classes: int | None) -> dict[str, np.ndarray]:
        """Host arrays of one process's rows from finished loads (index -1 = padding)."""
        n, (h, w) = len(indices), self.transform.size
        out = {"image": np.zeros((n, h, w, 3), np.uint8), "label": np.full(n, -1, np.int32),
               "index": indices.astype(np.int32), "valid": np.zeros(n, bool),
               "digest": np.zeros((n, DIGEST_SIZE), np.uint8)}
        for r, future in enumerate(futures):
            if future is None:
                continue
            crop, label, digest = future.result()
            out["digest"][r] = np.frombuffer(digest, np.uint8)
            if num_classes and label >= num_classes:
                raise ValueError(f"image {indices[r]} of {self.source.name} has label {label}, outside the "
                                 f"model's {num_classes} classes")
            out["label"][r] = label
            if crop is not None:
                out["image"][r], out["valid"][r] = crop, True
        return out


def num_batches(num_images: int, batch_size: int, start: int = 0) -> int:
    return max(0, -(-(num_images - start) // batch_size))


def batches(source: Source, pretrained_cfg: Mapping[str, Any], batch_size: int, mesh: Mesh | None = None,
            start: int = 0, *, stop: int | None = None, num_workers: int | None = None,
            prefetch: int = 2, cache_dir: str | os.PathLike | None = None) -> Iterator[Batch]:
    """Iterator over global batches of images [start, stop) (default: to the end), preprocessed for the
    model. Arguments are checked here, before the first batch.

    `pretrained_cfg`: the model's timm pretrained_cfg (input_size, crop_pct, interpolation, num_classes).
    `batch_size` is global and a multiple of the mesh size. Every process must iterate in lockstep.
    `mesh`: default `parallel.make_mesh()`, every device (one CPU or GPU: no mesh to build).
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    cache_dir = os.path.expandvars(os.path.expanduser(os.fspath(cache_dir))) if cache_dir else None
    transform = EvalTransform.from_cfg(pretrained_cfg)
    num_classes = pretrained_cfg.get("num_classes")
    check_labels(source, num_classes)
    stop = len(source) if stop is None else min(stop, len(source))
    if not 0 <= start <= stop:
        raise ValueError(f"start={start} must be in [0, {stop}]")
    rows = parallel.process_rows(mesh, batch_size)
    cache = CropCache(cache_dir, source.identity, transform.params()) if cache_dir else None
    loader = ImageLoader(source, transform, cache)
    batch_rows = [np.where(r < stop, r, -1) for r in
                  (start + b * batch_size + rows for b in range(num_batches(stop, batch_size, start)))]
    return _prefetched(loader, batch_rows, num_classes, mesh, batch_size,
                       num_workers or default_num_workers(), prefetch)


def _prefetched(loader: ImageLoader, batch_rows: list[np.ndarray], num_classes: int | None, mesh: Mesh,
                batch_size: int, num_workers: int, prefetch: int) -> Iterator[Batch]:
    """Loads the images of batch b + 1 ... b + prefetch on the thread pool while batch b is consumed."""
    pool = cf.ThreadPoolExecutor(num_workers, thread_name_prefix="decode")
    pending: collections.deque[tuple[np.ndarray, list[cf.Future | None]]] = collections.deque()
    try:
        for b in range(len(batch_rows)):
            while len(pending) <= prefetch and b + len(pending) < len(batch_rows):
                indices = batch_rows[b + len(pending)]
                pending.append((indices, [pool.submit(loader, int(i)) if i >= 0 else None for i in indices]))
            indices, futures = pending.popleft()
            yield parallel.global_batch(loader.local_batch(indices, futures, num_classes), mesh, batch_size)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
