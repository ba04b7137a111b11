"""Everything an experiment writes goes through a Workdir: atomic files, figures, metadata, resume state,
the lock and the completion marker.

A result file is either absent or complete: every write goes to a temporary file in the same folder and
is moved into place with os.replace. The set of a run's result files is complete and consistent when
`COMPLETE.json` exists: it is written last, lists every file with its size and sha256, and is removed
before anything in the workdir is written again (docs/design.md, "Guarantees").

The folder is created by the lock (or the first write), not by `Workdir(path)`; a run that wrote nothing
leaves no folder and no `.lock` at a path that did not exist. `Workdir.final_set()` makes the final write
of a run all or nothing: a write that fails part-way (a full disk) puts back every file as it was.
"""
from __future__ import annotations

import contextlib
import contextvars
import csv
import datetime
import errno
import io
import json
import logging
import os
import platform
import socket
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from vitsparse_jax.runtime.errors import StateError, WorkdirError, WorkdirLocked
from vitsparse_jax.runtime.hashing import sha256_file

log = logging.getLogger(__name__)
RESUME_FILE = "resume_state.npz"
FIGURE_DPI_ENV = "VITSPARSE_JAX_FIGURE_DPI"           # PNG resolution when config.figure_dpi is 0 (tests: 60)
FIGURE_FORMATS_ENV = "VITSPARSE_JAX_FIGURE_FORMATS"   # figure files when config.figures is '' (e.g. 'png,pdf')
DEFAULT_FIGURE_DPI = 150                              # screen and report.html; 300 for print
FIGURE_FORMATS = ("png", "pdf")                       # what save_figure can write (png: report.html inlines it)
_FIGURE_OPTIONS: contextvars.ContextVar[tuple[tuple[str, ...] | None, int | None]] = contextvars.ContextVar(
    "vitsparse_jax_figure_options", default=(None, None))   # the run's config.figures / figure_dpi (figure_options)
_FIGURE_JOBS: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "vitsparse_jax_figure_jobs", default=None)   # take(workdir, stem, make, args, kwargs) -> bool (`figure_jobs`)
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


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _invalidate_completion(path: Path) -> None:
    """Removes the completion marker of every workdir that `path` lies in (before `path` changes); during a
    final write (`Workdir.final_set`) the marker is moved aside instead, to be put back if the write fails."""
    for root in list(_ROOTS):
        marker = root / COMPLETE_FILE
        if path != marker and _inside(path, root) and marker.exists():
            journal = next((j for j in _FINAL_SETS if _inside(marker, j.root)), None)
            if journal is not None:
                journal.before_change(marker)
            else:
                marker.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, invalidate: bool = True,
                       result: bool = True) -> Path:
    """Writes `data` to `path` atomically. `invalidate`: first remove the completion marker of a workdir that
    holds `path` (False only for caches that never change results, e.g. a weights file's sha256). `result`:
    the file belongs to a run's result set, so a final write in progress (`Workdir.final_set`) can undo it
    (False for resume states and caches, which outlive a failed final write)."""
    path = Path(path)
    if invalidate:
        before_write(path, result=result)
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


def before_write(path: str | os.PathLike, *, result: bool = True) -> None:
    """What `atomic_write_bytes` does before it writes `path`: the completion marker of its workdir removed
    (or moved aside during a final write) and, for a result file, the final write's journal told. A file
    written by another process (a figure worker) is announced here first."""
    absolute = Path(os.path.abspath(path))
    if _ROOTS:
        _invalidate_completion(absolute)
    if result and _FINAL_SETS:
        for journal in _FINAL_SETS:
            if _inside(absolute, journal.root):
                journal.before_change(absolute)


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


def _check_dpi(value: Any, where: str) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 10:
        raise ValueError(f"{where}={value!r}: expected a whole number of dots per inch >= 10, e.g. 150 (300 for print)")
    return int(text)


def _check_formats(value: str, where: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in str(value).split(",") if f.strip()))
    if "png" not in formats or set(formats) - set(FIGURE_FORMATS):
        raise ValueError(f"{where}={value!r}: expected 'png' or 'png,pdf' (PDF: vector figures for print, slower to "
                         "write; the PNGs are always written: report.html shows them)")
    return formats


def figure_dpi() -> int:
    """PNG resolution of every figure: the run's `figure_dpi` (`figure_options`), else $VITSPARSE_JAX_FIGURE_DPI,
    else 150 (screen; 300 for print: about twice the time)."""
    dpi = _FIGURE_OPTIONS.get()[1]
    if dpi is not None:
        return dpi
    value = os.environ.get(FIGURE_DPI_ENV, "").strip()
    return _check_dpi(value, FIGURE_DPI_ENV) if value else DEFAULT_FIGURE_DPI


def figure_formats() -> tuple[str, ...]:
    """The files of every figure: the run's `figures` (`figure_options`), else $VITSPARSE_JAX_FIGURE_FORMATS,
    else PNG only (PDF on request: vector, for print, and the slower part of writing a figure)."""
    formats = _FIGURE_OPTIONS.get()[0]
    if formats is not None:
        return formats
    value = os.environ.get(FIGURE_FORMATS_ENV, "").strip()
    return _check_formats(value, FIGURE_FORMATS_ENV) if value else ("png",)


def write_figure(fig: Any, stem_path: Path, formats: tuple[str, ...], dpi: int) -> list[Path]:
    """Saves a matplotlib figure as `<stem_path>.<ext>` for each format (atomically) and closes it."""
    import matplotlib.pyplot as plt

    paths = []
    for ext in formats:
        buf = io.BytesIO()
        with plt.rc_context({"pdf.fonttype": 42, "pdf.compression": 9}):   # Type 42: editable, journal-safe
            fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight")
        paths.append(atomic_write_bytes(stem_path.with_name(f"{stem_path.name}.{ext}"), buf.getvalue()))
    plt.close(fig)
    return paths


@contextlib.contextmanager
def figure_jobs(take: Any) -> Iterator[None]:
    """While the block runs, `Workdir.figure` first offers each figure to `take(workdir, stem, make, args,
    kwargs)`, which returns whether it took the job (runtime/figure_pool.py: a free worker process)."""
    token = _FIGURE_JOBS.set(take)
    try:
        yield
    finally:
        _FIGURE_JOBS.reset(token)


def log_figure(name: Path, paths: list[Path], seconds: float) -> None:
    """The progress line of one figure written."""
    log.info("figure %s written (%s, %.1f s)", name, "+".join(p.suffix[1:] for p in paths), seconds)


@contextlib.contextmanager
def figure_options(formats: str = "", dpi: int = 0) -> Iterator[None]:
    """While the block runs, figures are written as `formats` ('png' or 'png,pdf'; '' = the environment's,
    else PNG) at `dpi` (0 = the environment's, else 150): a run's `config.figures` and `config.figure_dpi`."""
    options = (_check_formats(formats, "config.figures") if str(formats).strip() else None,
               _check_dpi(dpi, "config.figure_dpi") if dpi else None)
    token = _FIGURE_OPTIONS.set(options)
    try:
        yield
    finally:
        _FIGURE_OPTIONS.reset(token)


def figure_options_of(config: Any) -> contextlib.AbstractContextManager[None]:
    """`figure_options` of a run's config (fields `figures` and `figure_dpi`; configs without them: defaults)."""
    get = config.get if hasattr(config, "get") else (lambda name, default: getattr(config, name, default))
    return figure_options(get("figures", "") or "", int(get("figure_dpi", 0) or 0))


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
        """Checks that the folder exists or can be created, without creating it (the lock or the first write
        does): a run refused before it writes leaves nothing at a new path."""
        self.root = Path(path)
        if self.root.exists() and not self.root.is_dir():
            raise WorkdirError(errno.ENOTDIR, f"the workdir {self.root} is a file, not a folder; choose another "
                                              "--config.workdir")
        if not self.root.exists():
            _check_creatable(self.root)
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
        """Writes the figure as `figure_formats()`: `stem.png` (`dpi`; default `figure_dpi()`) and, on request,
        `stem.pdf` (vector; text as TrueType, images at their own resolution); closes the figure and logs one
        line (the progress of a run's figures)."""
        start = time.perf_counter()
        paths = write_figure(fig, self.path(stem), figure_formats(), dpi or figure_dpi())
        log_figure(self.path(stem).relative_to(self.root), paths, time.perf_counter() - start)
        return paths

    def figure(self, stem: str, make: Any, /, *args: Any, **kwargs: Any) -> None:
        """Draws `make(*args, **kwargs)` (a module-level function that returns a matplotlib Figure) and saves
        it as `save_figure` does; during a run's `figure_pool.drawing()` block in a free worker process (the
        files are complete when the block ends, or at `figure_pool.wait()`), else here and now."""
        take = _FIGURE_JOBS.get()
        if take is None or not take(self, stem, make, args, kwargs):
            self.save_figure(make(*args, **kwargs), stem)

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
        return atomic_write_bytes(self.path(name), buf.getvalue(), result=False)

    def load_state(self, name: str = RESUME_FILE) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(arrays, meta) of a saved state, None if there is none; StateError if it cannot be read."""
        path = self.path(name)
        if not path.exists():
            return None
        return self.read_state_bytes(path, path)

    @staticmethod
    def read_state_bytes(data: bytes | os.PathLike, path: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, meta) of a saved state given as its file (or the file's bytes, read on another process);
        StateError naming `path` if it cannot be read."""
        try:
            with np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False) as z:
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
        path = self.path(LOCK_FILE)
        created_dirs = _missing_dirs(self.root)
        fd, created_lock = self._acquire(path)
        try:
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
            try:   # a run that wrote nothing leaves nothing: no .lock, no folder it created
                if created_lock and _holds_no_file(self.root, LOCK_FILE):
                    for folder, _, _ in sorted(os.walk(self.root), reverse=True):
                        if folder != str(self.root):
                            os.rmdir(folder)
                    os.unlink(path)   # while still locked; a process that opened it sees another inode
            except OSError:
                pass
            os.close(fd)   # releases the flock
            for folder in created_dirs:    # deepest first; stops at the first that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break

    def _acquire(self, path: Path) -> tuple[int, bool]:
        """(fd, whether this call created the lock file) of the locked `.lock`; creates the folder."""
        import fcntl

        for _ in range(100):
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                _reraise(self.root, e, "create the workdir")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666 & ~_UMASK)
                created = True
            except FileExistsError:
                try:
                    fd, created = os.open(path, os.O_RDWR), False
                except FileNotFoundError:   # removed in between by a holder that finished: try again
                    continue
                except OSError as e:
                    _reraise(path, e, "open the lock file")
            except FileNotFoundError:   # the folder was removed in between by a holder that finished
                continue
            except OSError as e:
                _reraise(path, e, "create the lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkdirLocked(f"the workdir {self.root} is in use by another run ({describe_holder(path)}). "
                                    "Wait for it to finish (or stop it), or choose another --config.workdir.") from None
            try:   # the holder before us may have removed the file as it finished: lock the current one
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd, created
            except FileNotFoundError:
                pass
            os.close(fd)
        raise WorkdirLocked(f"cannot lock the workdir {self.root}: its {LOCK_FILE} keeps being replaced; "
                            "another run is starting and stopping there. Choose another --config.workdir.")

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
            files[str(rel)] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
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
        marker = Path(os.path.abspath(self.path(COMPLETE_FILE)))
        try:
            journal = next((j for j in _FINAL_SETS if _inside(marker, j.root)), None)
            if journal is not None:
                journal.before_change(marker)
            else:
                marker.unlink(missing_ok=True)
        except OSError as e:
            _reraise(self.path(COMPLETE_FILE), e, "remove")

    @contextlib.contextmanager
    def final_set(self) -> Iterator[FinalSet]:
        """The final write of a run, all or nothing: every result file written in the block (anywhere in the
        workdir, by any Workdir) is recorded; if the block raises (a full disk part-way, an error, a second
        Ctrl-C), the files it created are removed and the ones it replaced (the completion marker too) are
        put back, so the workdir holds what it held before plus the resume states. Resume states and caches
        are not part of it. Use it around the result files and `write_completion` (Session.final_write)."""
        journal = FinalSet(Path(os.path.abspath(self.root)))
        _FINAL_SETS.append(journal)
        try:
            yield journal
        except BaseException:
            journal.rollback()
            raise
        else:
            journal.commit()
        finally:
            _FINAL_SETS.remove(journal)


def describe_holder(lock_path: str | os.PathLike) -> str:
    """'pid 123 on host h since <time>: <command>' from a lock file (what its holder wrote in it)."""
    try:
        holder = json.loads(Path(lock_path).read_text())
        return (f"pid {holder['pid']} on host {holder['host']} since {holder['started']}: "
                f"{holder.get('command', '?')}")
    except (OSError, ValueError, KeyError, TypeError):
        return f"its holder is unknown: {lock_path} is locked"


def _missing_dirs(root: Path) -> list[Path]:
    """`root` and those of its parents that do not exist, deepest first."""
    missing, p = [], Path(os.path.abspath(root))
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _holds_no_file(root: Path, lock: str) -> bool:
    """True when `root` holds nothing but its lock file and empty folders."""
    for folder, _, files in os.walk(root):
        if any(not (folder == str(root) and name == lock) for name in files):
            return False
    return True


def _check_creatable(root: Path) -> None:
    """WorkdirError when `root` (absent) cannot be created: a part of its path is a file, or its nearest
    existing folder is read-only or not writable. Creates nothing."""
    missing = _missing_dirs(root)
    existing = (missing[-1] if missing else Path(os.path.abspath(root))).parent
    if not existing.is_dir():
        code = errno.ENOTDIR
    elif not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
    else:
        return
    _reraise(root, OSError(code, os.strerror(code), str(root)), "create the workdir")


class FinalSet:
    """The journal of a final write (`Workdir.final_set`): what it created and what it replaced."""

    def __init__(self, root: Path):
        self.root = root
        self.created: list[Path] = []                 # files and folders that did not exist, in order
        self.replaced: dict[Path, Path] = {}          # path -> the previous file, moved aside (hidden name)

    def before_change(self, path: Path) -> None:
        """Called before `path` (absolute, in the workdir) is written or removed."""
        if path in self.replaced or path in self.created:
            return
        if os.path.lexists(path):
            backup = path.with_name(f".{path.name}{_BACKUP_TAG}{os.getpid()}")
            try:
                os.replace(path, backup)   # a rename: needs no space on a full disk
            except OSError as e:
                _reraise(path, e, "move aside")
            self.replaced[path] = backup
        else:
            self.created += reversed(_missing_dirs(path.parent))
            self.created.append(path)

    def rollback(self) -> None:
        """Removes what was created, puts back what was replaced (best effort: each step is tried)."""
        for path in reversed(self.created):
            try:
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
            except OSError:
                pass
        for path, backup in self.replaced.items():
            try:
                os.replace(backup, path)
            except OSError as e:
                sys.stderr.write(f"warning: could not put back {path} (it is in {backup}): {e}\n")
        self.created, self.replaced = [], {}

    def commit(self) -> None:
        """Drops the replaced files (the final write is complete), and those a killed final write left."""
        for backup in [*self.replaced.values(), *self.root.rglob(f".*{_BACKUP_TAG}*")]:
            try:
                os.unlink(backup)
            except OSError:
                pass
        self.created, self.replaced = [], {}


_FINAL_SETS: list[FinalSet] = []     # final writes in progress in this process
_BACKUP_TAG = ".before-final-write-"  # a file the final write in progress replaced: .<name>.before-final-write-<pid>
