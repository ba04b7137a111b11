"""Fingerprints of a run's inputs, for resume keys and the completion marker.

- Weights: the sha256 of the file's content, computed once and kept beside it in `<file>.sha256` (JSON with
  the size, mtime, ctime and inode it was computed for; a file replaced at the same path, even with the same
  size and mtime, gets a new ctime and inode and is hashed again). When the folder is read-only the hash is
  kept in memory for the process only.
- Data: the source's `identity` (an image folder: its ordered file list with sizes and mtimes; TFDS: the
  dataset's full name with its version, and the split; the digits: a constant), its name (with the subset)
  and its number of images.
- Images: `content_digest(data)`, a fixed-size digest (DIGEST_SIZE bytes of sha256) of the bytes the decoder
  reads (an encoded file, or a decoded array with its shape and dtype). The pipeline puts it in every batch
  row (`batch['digest']`) and the resumable pass keeps it for every processed image, so a resume re-reads
  and re-hashes the images already processed instead of trusting sizes and mtimes.

`sha256_file` (runtime/hashing.py) is the one streaming file hash (weights, head files, hub downloads, the
completion marker's file list).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vitsparse_jax.runtime.hashing import DIGEST_SIZE, MISSING_DIGEST, content_digest, sha256_file

__all__ = ["DIGEST_SIZE", "MISSING_DIGEST", "content_digest", "data", "file_sha256", "inputs", "sha256_file",
           "sidecar_path", "weights"]
SIDECAR_SUFFIX = ".sha256"
_memory: dict[tuple, str] = {}
_PACKAGE = Path(__file__).resolve().parents[1]   # vitsparse_jax/ (its assets are never written to)


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read from its `.sha256` sidecar when that is still valid."""
    from vitsparse_jax.runtime.workdir import atomic_write_bytes

    path = Path(path)
    st = path.stat()
    stamp = _stamp(st)
    key = (str(path.resolve()), *stamp.values())
    if key in _memory:
        return _memory[key]
    sidecar = sidecar_path(path)
    try:
        cached = json.loads(sidecar.read_text())
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in stamp.items()):
            _memory[key] = str(cached["sha256"])
            return _memory[key]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    _memory[key] = digest
    if _PACKAGE in path.resolve().parents:   # the shipped built-in checkpoints: small, hashed each time
        return digest
    try:
        atomic_write_bytes(sidecar, (json.dumps({"sha256": digest, "file": path.name, **stamp}) + "\n").encode(),
                           invalidate=False)
    except OSError:   # read-only folder: keep the hash for this process only
        pass
    return digest


def weights(where: Any) -> dict[str, Any]:
    """What identifies a model's weights: {'weights': where, 'sha256': ...} for a file (or, for a folder,
    the hash of its files' hashes); just {'weights': where} for what is not a file (e.g. 'untrained (seed 0)')."""
    where = str(where)
    path = Path(where)
    try:
        if path.is_file():
            return {"weights": where, "sha256": file_sha256(path)}
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(SIDECAR_SUFFIX)
                           and not p.name.startswith("."))
            combined = hashlib.sha256("".join(f"{p.name}\0{file_sha256(p)}\n" for p in files).encode())
            return {"weights": where, "sha256": combined.hexdigest()}
    except OSError:
        pass
    return {"weights": where}


def data(source: Any) -> dict[str, Any]:
    """What identifies the images of a data source (a `vitsparse_jax.data.Source`), subset included."""
    return {"identity": source.identity, "name": source.name, "num_images": len(source)}


def inputs(key: Any) -> list[dict[str, Any]]:
    """The weights ({'weights', 'sha256'}) and data ({'identity'}) entries found in a resume key, in the form
    of the completion marker's `inputs`."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "sha256" in node and "weights" in node:
                found[f"weights:{node['weights']}"] = {"weights": str(node["weights"]), "sha256": node["sha256"]}
            elif "identity" in node:
                found[f"data:{node['identity']}"] = {"identity": str(node["identity"])}
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(key)
    return [found[k] for k in sorted(found)]
