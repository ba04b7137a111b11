"""Stop requests (SIGTERM, SIGINT) that every process of a job agrees on.

`jax.distributed.initialize` installs its own SIGTERM handler (a preemption notifier that only records the
notice: the process runs on); `handle_signals` installs ours again on every entry, so the blocks that run
after the initialisation (the session, each pass) see SIGTERM.

A signal only sets a flag; loops over batches call `agreed_stop()` between batches. With several processes
(`jax.distributed`) that call is a collective: every process contributes its own flag and all of them get
the same answer, so a preempted host (SIGTERM to one process) stops the whole job at the same batch
instead of leaving the others waiting in the next collective. A second SIGINT (Ctrl-C twice) does not wait
for the batch: it raises KeyboardInterrupt at once (the last saved state is kept).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_lock = threading.Lock()
_requested: int | None = None   # the first signal received (its number), None = no stop requested
_depth = 0
_previous: dict[int, object] = {}


def _handler(signum: int, frame: object) -> None:  # noqa: ARG001
    global _requested
    if _requested is not None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        return
    _requested = signum
    log.warning("%s received: stopping after the current batch (the state is saved; the same command "
                "continues). Press Ctrl-C again to stop at once.", signal.Signals(signum).name)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turns SIGTERM/SIGINT into a stop request while the block runs (nested blocks share one handler).
    Outside the main thread signals cannot be caught: the block runs without handlers."""
    global _depth, _requested
    with _lock:
        if _depth == 0:
            _requested = None
        for sig in SIGNALS:   # (re)installed on every entry: jax.distributed.initialize replaces the SIGTERM
            try:              # handler with its own (a preemption notifier that lets the process run on)
                previous = signal.signal(sig, _handler)
                if _depth == 0:
                    _previous[sig] = previous
            except ValueError:   # not the main thread
                pass
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for sig, old in _previous.items():
                    signal.signal(sig, old)
                _previous.clear()


def requested() -> int | None:
    """The signal this process received (None: none)."""
    return _requested


def request(signum: int = signal.SIGTERM) -> None:
    """Requests a stop as a signal would (tests, or code that wants to stop the job cleanly)."""
    global _requested
    _requested = signum if _requested is None else _requested


def clear() -> None:
    global _requested
    _requested = None


def agreed_stop() -> int | None:
    """The stop request of any process of the job (the same answer on every process), None for none.

    Collective when there are several processes: every process must call it at the same point."""
    import jax

    local = _requested or 0
    if jax.process_count() == 1:
        return local or None
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(local)))
    chosen = int(flags.max())
    return chosen or None


def exit_code(signum: int | None) -> int:
    """The conventional exit status of a process stopped by `signum` (128 + N: 130 SIGINT, 143 SIGTERM)."""
    from vitsparse_jax.runtime.errors import EXIT_STOPPED

    return 128 + int(signum) if signum else EXIT_STOPPED


def name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "request"
