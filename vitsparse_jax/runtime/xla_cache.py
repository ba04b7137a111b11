"""jax's persistent compilation cache, on by default for every run.

A run compiles the same few programs as the last run of the same model and batch (the forward with its
captures, the extras' programs, the untrained initialisation): with the cache, a second run reads them from
disk instead of compiling them again (BENCHMARKS.md, "The pass and the fixed cost of a run"). Every program is
cached, the small ones too (jax's default keeps only those that took a second or more to compile).

Folder: `config.xla_cache`; 'auto' = jax's own setting where there is one ($JAX_COMPILATION_CACHE_DIR or
`jax.config`), else `$XDG_CACHE_HOME/vitsparse_jax/xla` (`~/.cache/vitsparse_jax/xla`); '' = off. jax keys each
program by its code, the devices and the jax/XLA version: a cache shared between machines or versions only
misses. Entries are never removed by the project; delete the folder to reclaim the space.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def default_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vitsparse_jax" / "xla"


def enable(setting: str = "auto") -> str | None:
    """Turns the cache on as `setting` says (before the run compiles anything); returns its folder (None: off)."""
    import jax

    setting = str(setting).strip()
    if not setting:
        return None
    current = jax.config.jax_compilation_cache_dir
    if setting == "auto" and current:
        folder = current
    else:
        folder = str(default_folder() if setting == "auto" else Path(setting).expanduser())
        if folder != current:
            problem = _unwritable(Path(folder))
            if problem:
                log.warning("the XLA compilation cache %s cannot be used (%s): this run compiles every program; "
                            "set --config.xla_cache to a writable folder, or to '' to turn the cache off", folder,
                            problem)
                return None
            jax.config.update("jax_compilation_cache_dir", folder)
    if MIN_COMPILE_TIME_ENV not in os.environ:   # every program, not only those over a second
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


def _unwritable(folder: Path) -> str:
    """Why `folder` cannot hold the cache ('' when it can), creating it if needed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    return "" if os.access(folder, os.W_OK | os.X_OK) else "not writable"
