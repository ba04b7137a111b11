"""Everything an experiment writes goes through a Workdir: atomic files, figures, metadata, resume state.

A result file is either absent or complete: every write goes to a temporary file in the same folder and
is moved into place with os.replace.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

RESUME_FILE = "resume_state.npz"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
PACKAGES = ("vitsparse_jax", "jax", "jaxlib", "flax", "optax", "numpy", "ml_collections",
            "tensorflow_datasets", "pillow", "safetensors", "matplotlib")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, tuple, set)):
        return str(obj) if isinstance(obj, Path) else list(obj)
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return obj.to_dict()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n"


def versions() -> dict[str, str]:
    """Versions of Python, the main packages and the devices in use, for results metadata."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    out["xla_flags"] = os.environ.get("XLA_FLAGS", "")   # changes XLA's code generation (xla_cpu_flags.py)
    try:
        import jax
        out["devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
        out["processes"] = str(jax.process_count())
    except Exception:  # versions() must never break a run
        pass
    return out


class Workdir:
    """A run's output folder."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_bytes(self.path(name), text.encode())

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, to_json(obj))

    def read_json(self, name: str) -> Any:
        return json.loads(self.path(name).read_text())

    def write_csv(self, name: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        rows = list(rows)
        buf = io.StringIO()
        fields: list[str] = []
        for row in rows:
            fields.extend(k for k in row if k not in fields)
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        return self.write_text(name, buf.getvalue())

    def save_figure(self, fig: Any, stem: str, dpi: int = 150) -> list[Path]:
        """Writes `stem.png` and `stem.pdf` and closes the figure."""
        import matplotlib.pyplot as plt

        paths = []
        for ext in ("png", "pdf"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight")
            paths.append(atomic_write_bytes(self.path(f"{stem}.{ext}"), buf.getvalue()))
        plt.close(fig)
        return paths

    def write_metadata(self, config: Any) -> None:
        self.write_json("config.json", config)
        self.write_json("versions.json", versions())

    # Resume state: accumulators (arrays) plus a JSON-able dict, written together after each chunk.
    def save_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                   name: str = RESUME_FILE) -> Path:
        buf = io.BytesIO()
        np.savez(buf, __meta__=np.array(to_json(dict(meta))), **{k: np.asarray(v) for k, v in arrays.items()})
        return atomic_write_bytes(self.path(name), buf.getvalue())

    def load_state(self, name: str = RESUME_FILE) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        path = self.path(name)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
            meta = json.loads(str(z["__meta__"]))
        return arrays, meta

    def clear_state(self, name: str = RESUME_FILE) -> None:
        self.path(name).unlink(missing_ok=True)
