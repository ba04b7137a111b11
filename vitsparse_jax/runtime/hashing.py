"""The project's content hashes, with no dependency on the rest of the package (workdir and fingerprint
both use them).

- `sha256_file(path)`: the one streaming file hash (weights, head files, hub downloads, COMPLETE.json's list).
- `content_digest(data)`: DIGEST_SIZE bytes identifying an image's content, kept per processed image with a
  resume state and carried by every batch row (`batch['digest']`).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

_CHUNK = 1 << 20
DIGEST_SIZE = 16                          # bytes of an image's content digest (the first 16 of its sha256)
MISSING_DIGEST = bytes(DIGEST_SIZE)       # an image that could not be read at all (vanished, no permission)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks (the project's one streaming file hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_digest(data: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    """DIGEST_SIZE bytes identifying an image's content: the sha256 of the bytes the decoder reads (an
    encoded file), or of a decoded array's dtype, shape and bytes."""
    if isinstance(data, np.ndarray):
        h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
        h.update(np.ascontiguousarray(data).tobytes())
    else:
        h = hashlib.sha256(data)
    return h.digest()[:DIGEST_SIZE]
