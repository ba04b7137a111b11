"""A series of training checkpoints for the receptive-field experiment (`receptive_field.checkpoints`): paths,
globs, train.py's series.json or a training workdir, each checkpoint with its training step."""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Iterable


def as_list(value: str | Iterable[str] | None) -> list[str]:
    """'a, b' or ('a', 'b') -> ['a', 'b']."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()]


def _find(path: Path, folder: Path) -> Path:
    """`path` as written by train.py (relative to where it ran), else the same file next to `folder`."""
    for candidate in (path, folder / path, folder / "checkpoints" / path.name, folder / path.name):
        if candidate.exists():
            return candidate
    return path


def _series_entries(item: str) -> list[tuple[int | None, Path]]:
    """(step or None, path) of one entry of receptive_field.checkpoints."""
    path = Path(item)
    if path.is_dir():   # a training workdir: its series.json, else the checkpoints in it
        listing = path / "series.json"
        if listing.exists():
            return _series_entries(str(listing))
        found = sorted((path / "checkpoints").glob("*.safetensors")) or sorted(path.glob("*.safetensors"))
        if not found:
            raise FileNotFoundError(f"receptive_field.checkpoints: no series.json and no .safetensors in {path}")
        return [(None, p) for p in found]
    if path.suffix == ".json" and path.exists():
        listing = json.loads(path.read_text())
        if isinstance(listing, list):   # train.py's series.json: [{"step": s, "path": p, ...}, ...]
            return [(int(e["step"]), _find(Path(e["path"]), path.parent)) for e in listing]
    found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    if not found:
        raise FileNotFoundError(f"receptive_field.checkpoints: {item!r} matches no file")
    return [(None, Path(p)) for p in found]


def checkpoint_series(spec: str | Iterable[str]) -> list[tuple[int, Path]]:
    """(training step, .safetensors path) of a series, sorted by step. `spec`: comma-separated paths, globs,
    train.py's series.json or a training workdir. The step is the one in series.json, else the JSON
    sidecar's 'step', else the last number in the file name (`<arch>.<tag>_step0000500.safetensors`)."""
    series: dict[Path, int] = {}
    for item in as_list(spec):
        for step, path in _series_entries(item):
            path = path.with_suffix(".safetensors")   # a checkpoint's .json names its weights
            if not path.exists():
                raise FileNotFoundError(f"receptive_field.checkpoints: {path} does not exist")
            if step is None:
                meta_path = path.with_suffix(".json")
                meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
                step = meta.get("step")
            if step is None:
                numbers = re.findall(r"\d+", path.stem.split(".")[-1]) or re.findall(r"\d+", path.stem)
                if not numbers:
                    raise ValueError(f"{path}: no training step in series.json, in its .json ('step') "
                                     f"or in the file name")
                step = numbers[-1]
            series[path] = int(step)
    return sorted((step, path) for path, step in series.items())


def checkpoint_model(path: Path, default: str) -> str:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return meta.get("model") or default
