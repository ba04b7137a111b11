"""Everything an experiment writes goes through a Workdir: atomic files, figures, metadata, resume state,
the lock and the completion marker.

A result file is either absent or complete: every write goes to a temporary file in the same folder and
is moved into place with os.replace. The set of a run's result files is complete and consistent when
`COMPLETE.json` exists: it is written last, lists every file with its size and sha256, and is removed
before anything in the workdir is written again (docs/design.md, "Guarantees").
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import hashlib
import io
import json
import os
import platform
import socket
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from vitsparse_jax.runtime.errors import StateError, WorkdirError, WorkdirLocked

RESUME_FILE = "resume_state.npz"
FIGURE_DPI_ENV = "VITSPARSE_JAX_FIGURE_DPI"   # PNG resolution of the figures (figure_dpi)
COMPLETE_FILE = "COMPLETE.json"   # the completion marker: written last, removed before any other write
LOCK_FILE = ".lock"
_ROOTS: set[Path] = set()          # every Workdir root of this process (see _invalidate_completion)
_WRITE_ERRNOS = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
                 errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
                 errno.EEXIST: "a file of that name is in the way", errno.EISDIR: "a folder of that name is in the way"}
_UMASK = os.umask(0o022)
os.umask(_UMASK)
PACKAGES = ("vitsparse_jax", "jax", "jaxlib", "flax", "optax", "numpy", "ml_collections",
            "tensorflow_datasets", "pillow", "safetensors", "matplotlib")


def _reraise(path: str | os.PathLike, e: OSError, what: str = "write") -> None:
    """Raises `e` as a WorkdirError when it is a known write failure, else as it is."""
    err = write_error(path, e, what)
    if err is e:
        raise e
    raise err from e


def write_error(path: str | os.PathLike, e: OSError, what: str = "write") -> OSError:
    """An OSError of a write as a WorkdirError naming the file, the cause and what to do (others as they are)."""
    if e.errno not in _WRITE_ERRNOS or isinstance(e, WorkdirError):
        return e
    cause = _WRITE_ERRNOS[e.errno]
    fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space"}.get(
        e.errno, "make it writable")
    err = WorkdirError(e.errno, f"cannot {what} {path}: {cause} ({e.strerror}). {fix.capitalize()}, or choose "
                                f"another folder (for a run: --config.workdir=...)")
    err.filename = str(path)
    return err


def _invalidate_completion(path: Path) -> None:
    """Removes the completion marker of every workdir that `path` lies in (before `path` changes)."""
    for root in list(_ROOTS):
        marker = root / COMPLETE_FILE
        if path != marker and (path == root or root in path.parents) and marker.exists():
            marker.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, invalidate: bool = True) -> Path:
    """Writes `data` to `path` atomically. `invalidate`: first remove the completion marker of a workdir that
    holds `path` (False only for caches that never change results, e.g. a weights file's sha256)."""
    path = Path(path)
    if invalidate and _ROOTS:
        _invalidate_completion(Path(os.path.abspath(path)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        _reraise(path, e)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            _reraise(path, e)
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


def figure_dpi() -> int:
    """PNG resolution of every figure: $VITSPARSE_JAX_FIGURE_DPI, else 300 (print). A lower value (e.g. 100)
    makes quick runs faster: rendering 300 dpi PNGs is about half of a small run's time."""
    value = os.environ.get(FIGURE_DPI_ENV, "").strip() or "300"
    if not value.isdigit() or int(value) < 10:
        raise ValueError(f"{FIGURE_DPI_ENV}={value!r}: expected a whole number of dots per inch >= 10, e.g. 300")
    return int(value)


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
        if self.root.exists() and not self.root.is_dir():
            raise WorkdirError(errno.ENOTDIR, f"the workdir {self.root} is a file, not a folder; choose another "
                                              "--config.workdir")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _reraise(self.root, e, "create the workdir")
        _ROOTS.add(Path(os.path.abspath(self.root)))

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

    def save_figure(self, fig: Any, stem: str, dpi: int | None = None) -> list[Path]:
        """Writes `stem.png` (`dpi`; default `figure_dpi()`, 300 = print resolution) and `stem.pdf` (vector;
        text as TrueType, images at their own resolution) and closes the figure."""
        import matplotlib.pyplot as plt

        dpi = dpi or figure_dpi()

        paths = []
        for ext in ("png", "pdf"):
            buf = io.BytesIO()
            with plt.rc_context({"pdf.fonttype": 42, "pdf.compression": 9}):   # Type 42: editable, journal-safe
                fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight")
            paths.append(atomic_write_bytes(self.path(f"{stem}.{ext}"), buf.getvalue()))
        plt.close(fig)
        return paths

    def write_npz(self, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """A compressed .npz of named arrays, written atomically."""
        buf = io.BytesIO()
        np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        return atomic_write_bytes(self.path(name), buf.getvalue())

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
        """(arrays, meta) of a saved state, None if there is none; StateError if it cannot be read."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
                meta = json.loads(str(z["__meta__"]))
            if not isinstance(meta, dict):
                raise ValueError("its metadata is not a JSON object")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
                _reraise(path, e, "read")
            raise StateError(f"the saved resume state {path} cannot be read ({type(e).__name__}: {e}); it is "
                             f"damaged (e.g. a full disk or a copy that stopped half-way). Delete it to start "
                             f"that part over (rm {path}), or rerun with --config.resume=False.") from e
        return arrays, meta

    def clear_state(self, name: str = RESUME_FILE) -> None:
        self.path(name).unlink(missing_ok=True)

    # The lock: one run per workdir at a time.
    @contextlib.contextmanager
    def lock(self, command: str | None = None) -> Iterator[dict[str, Any]]:
        """Holds an exclusive lock on the workdir while the block runs; WorkdirLocked (naming the holder:
        host, pid, start time, command) if another process holds it. The lock is an flock on `.lock`: the
        system releases it when the holder exits, however it exits (no stale locks)."""
        import fcntl

        path = self.path(LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            _reraise(path, e, "create the lock file")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkdirLocked(f"the workdir {self.root} is in use by another run ({describe_holder(path)}). "
                                    "Wait for it to finish (or stop it), or choose another --config.workdir.") from None
            holder = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      "command": command if command is not None else " ".join(sys.argv)}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            except OSError as e:
                _reraise(path, e)
            yield holder
        finally:
            os.close(fd)   # releases the flock

    # The completion marker: written last; its presence means the listed files are the complete set.
    def write_completion(self, info: Mapping[str, Any]) -> Path:
        """Writes COMPLETE.json: `info` (fingerprint, config, inputs) plus every file of the workdir (except
        resume states, the lock and hidden files) with its size and sha256."""
        files = {}
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if (not p.is_file() or rel.name in (COMPLETE_FILE, LOCK_FILE, RESUME_FILE)
                    or any(part.startswith(".") for part in rel.parts)):
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            files[str(rel)] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
        marker = {**info, "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "files": files}
        return atomic_write_bytes(self.path(COMPLETE_FILE), to_json(marker).encode())

    def read_completion(self) -> dict[str, Any] | None:
        """The completion marker, None if there is none (or it cannot be read: then the set is not complete)."""
        try:
            marker = json.loads(self.path(COMPLETE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None

    def clear_completion(self) -> None:
        try:
            self.path(COMPLETE_FILE).unlink(missing_ok=True)
        except OSError as e:
            _reraise(self.path(COMPLETE_FILE), e, "remove")


def describe_holder(lock_path: str | os.PathLike) -> str:
    """'pid 123 on host h since <time>: <command>' from a lock file (what its holder wrote in it)."""
    try:
        holder = json.loads(Path(lock_path).read_text())
        return (f"pid {holder['pid']} on host {holder['host']} since {holder['started']}: "
                f"{holder.get('command', '?')}")
    except (OSError, ValueError, KeyError, TypeError):
        return f"its holder is unknown: {lock_path} is locked"
