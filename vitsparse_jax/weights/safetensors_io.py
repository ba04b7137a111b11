"""Reads any `.safetensors` file with numpy alone (no torch): float32, float16 and bfloat16 alike.

safetensors' own numpy reader cannot hold bfloat16 (numpy has no such type); this reader parses the file
format (8-byte little-endian header length, a JSON header of `{name: {dtype, shape, data_offsets}}`, then
the raw little-endian bytes) and views bfloat16 / float8 tensors through `ml_dtypes` (a jax dependency).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


AGAIN = "is the file complete? Download or copy it again"


class SafetensorsError(ValueError):
    """The file is not a readable .safetensors file."""


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header without '__metadata__' plus that key if present, offset of the data section)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: too short to be a .safetensors file; {AGAIN}")
        (size,) = struct.unpack("<Q", head)
        if size > os.path.getsize(path) - 8:
            raise SafetensorsError(f"{path}: header length {size} runs past the end of the file; {AGAIN}")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise SafetensorsError(f"{path}: the header is not JSON ({e}); {AGAIN}") from None
    entries = header.items() if isinstance(header, dict) else [(None, None)]
    for name, entry in entries:
        if name != "__metadata__" and not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                                           and isinstance(entry.get("shape"), list)
                                           and isinstance(entry.get("data_offsets"), list)
                                           and len(entry["data_offsets"]) == 2):
            raise SafetensorsError(f"{path}: the header's entry {name!r} is not a tensor's (dtype, shape, "
                                   f"data_offsets); not a .safetensors file, or a damaged one: {AGAIN}")
    return header, 8 + size


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return dict(read_header(path)[0].get("__metadata__") or {})


def read(path: str | os.PathLike, float32: bool = True) -> dict[str, np.ndarray]:
    """{name: array} of every tensor; with `float32`, floating tensors of any width come back as float32
    (bfloat16 and float16 values are exactly representable, so nothing is rounded)."""
    path = Path(path)
    header, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which this reader "
                                   f"does not know ({', '.join(DTYPES)})")
        begin, end = (start + int(o) for o in entry["data_offsets"])
        shape = tuple(int(s) for s in entry["shape"])
        dtype = np.dtype(dtype)
        if dtype.kind in "fiub":   # the file is little-endian (ml_dtypes' types are host order, i.e. little)
            dtype = dtype.newbyteorder("<")
        if end > data.size or (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise SafetensorsError(f"{path}: tensor {name!r} {entry['dtype']}{list(shape)} does not fit its "
                                   f"byte range {entry['data_offsets']}; {AGAIN}")
        array = data[begin:end].view(dtype).reshape(shape)
        if float32 and entry["dtype"].startswith(("F", "BF")):
            array = array.astype(np.float32)
        else:
            array = array.astype(dtype.newbyteorder("="))   # a copy in native order: the file may close
        out[name] = array
    del data
    return out
