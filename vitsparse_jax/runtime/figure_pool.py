"""A run's figures drawn beside it: worker processes that draw and save figures while the run goes on.

The figures of a run cost more than its compilations (BENCHMARKS.md, "The pass and the fixed cost of a run"). A
figure is a job: a module-level function that returns a matplotlib Figure, its arguments and the file stem
(`Workdir.figure`). Inside the driver's `drawing()` block each job goes to a free worker process, or is drawn
here when every worker is busy, so a run's figures take up to `workers() + 1` cores while this process goes
on with its tables and report.md; `wait()` (report.html reads the PNGs) and the end of the block collect them
and raise the first error. The workers are started with the run (`start`), so that their imports (numpy,
matplotlib, the figure modules) overlap its checks and loading. This process announces every file a worker
writes before the job is sent (`workdir.before_write`): a failed final write undoes them like its own files,
and it waits for the workers before that happens.

    figure_pool.start()                         # the driver, as a run starts (no-op with 0 workers)
    with figure_pool.drawing():                 # the result files
        workdir.figure("fig1", figures.example, image, maps)
        figure_pool.wait()                      # every figure so far is on disk
    figure_pool.stop()                          # the driver, at the end of the run

Workers: $VITSPARSE_JAX_FIGURE_WORKERS, else min(4, CPUs - 1); 0: every figure in this process (the tests).
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

WORKERS_ENV = "VITSPARSE_JAX_FIGURE_WORKERS"
MAX_WORKERS = 4
WARM_MODULES = ("matplotlib.pyplot", "jax", "vitsparse_jax.runtime.workdir")   # imported by each worker as it
                                                                               # starts (figure modules need jax)

_lock = threading.Lock()
_pool: futures.ProcessPoolExecutor | None = None
_size = 0
_broken = False                    # a worker died: this run draws its figures itself
_pending: list[_Job] = []          # figures sent to a worker, in order


def workers() -> int:
    """Worker processes for a run's figures: $VITSPARSE_JAX_FIGURE_WORKERS, else min(4, CPUs - 1)."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"{WORKERS_ENV}={value!r}: expected a whole number of worker processes (0 = none)")
        return int(value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_WORKERS, cpus - 1))


def start(count: int | None = None) -> None:
    """Starts the workers (in the background: each imports matplotlib and the figure code as it comes up)."""
    global _pool, _size
    count = workers() if count is None else count
    with _lock:
        if _pool is not None or count <= 0:
            return
        _pool = futures.ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_start)
        _size = count
        for _ in range(count):   # each call starts a worker now, not at the first figure
            _pool.submit(_ready)


def stop() -> None:
    """Stops the workers: those not started are dropped; the processes end in the background (a job in progress
    still finishes, and this process waits for them when it exits)."""
    global _pool, _size, _broken
    with _lock:
        pool, _pool, _size, _broken = _pool, None, 0, False
        _pending.clear()
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def drawing() -> Iterator[None]:
    """While the block runs, `Workdir.figure` sends jobs to free workers. At its end every figure is on disk
    (or the first error is raised); if the block fails, the jobs in progress finish before the error goes on
    (a final write that fails then undoes their files too)."""
    from vitsparse_jax.runtime import workdir as wd

    try:
        with wd.figure_jobs(_take):
            yield
        wait()
    except BaseException:
        _cancel()
        raise


@dataclasses.dataclass
class _Job:
    """A figure sent to a worker, with what it takes to draw it here instead."""

    stem: str
    future: futures.Future
    workdir: Any
    make: Callable[..., Any]
    args: tuple
    kwargs: dict


def _take(workdir: Any, stem: str, make: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    """`Workdir.figure` inside `drawing()`: the job to a free worker (True), or False (drawn by the caller)."""
    from vitsparse_jax.runtime import workdir as wd

    global _broken
    formats, dpi, stem_path = wd.figure_formats(), wd.figure_dpi(), workdir.path(stem)
    with _lock:
        if _pool is None or _broken or sum(not job.future.done() for job in _pending) >= _size:
            return False
        for ext in formats:   # announced here: the completion marker, the final write's journal
            wd.before_write(stem_path.with_name(f"{stem_path.name}.{ext}"))
        try:
            future = _pool.submit(_draw, str(stem_path), make, args, kwargs, formats, dpi)
        except BrokenProcessPool as e:
            _broken = True
            _warn_broken(e)
            return False
        _pending.append(_Job(stem, future, workdir, make, args, kwargs))
        name = stem_path.relative_to(workdir.root)
        future.add_done_callback(lambda f: f.exception() is None and wd.log_figure(name, *f.result()))
        return True


def wait() -> None:
    """Blocks until every figure sent to a worker is on disk; raises the first job's error (with its figure). A
    figure whose worker process died (killed, out of memory) is drawn here instead, with a warning."""
    global _broken
    jobs = list(_pending)   # (only the run's thread adds jobs)
    futures.wait([job.future for job in jobs])   # all of them, before any error goes on (no file written after)
    with _lock:   # an interrupted wait leaves them to `_cancel`
        del _pending[:len(jobs)]
    for job in jobs:
        error = job.future.exception()
        if isinstance(error, BrokenProcessPool):
            if not _broken:
                _broken = True
                _warn_broken(error)
            job.workdir.save_figure(job.make(*job.args, **job.kwargs), job.stem)
        elif error is not None:
            if hasattr(error, "add_note"):   # Python 3.11+
                error.add_note(f"(drawing figure {job.stem} in a figure worker process)")
            raise error


def _warn_broken(error: BaseException) -> None:
    log.warning("a figure worker process stopped unexpectedly (%s): the run draws its remaining figures itself "
                "(%s=0 does so from the start)", error, WORKERS_ENV)


def _cancel() -> None:
    """Drops the jobs not started and waits for those in progress."""
    with _lock:
        jobs = list(_pending)
        _pending.clear()
    for job in jobs:
        job.future.cancel()
    futures.wait([job.future for job in jobs])


# --- in the worker processes -----------------------------------------------------------------------------------

def _worker_start() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C stops the run, which stops its workers
    parent = multiprocessing.parent_process()
    if parent is not None:   # a run killed outright (kill -9) leaves no worker behind
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    os.environ.setdefault("MPLBACKEND", "Agg")
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])   # ready when the run's process has ended
    os._exit(0)


def _ready() -> None:
    """Nothing: a job that makes the pool start a worker."""


def _draw(stem_path: str, make: Callable[..., Any], args: tuple, kwargs: dict, formats: tuple[str, ...],
          dpi: int) -> tuple[list[Path], float]:
    from vitsparse_jax.runtime.workdir import write_figure

    start = time.perf_counter()
    paths = write_figure(make(*args, **kwargs), Path(stem_path), formats, dpi)
    return paths, time.perf_counter() - start
