"""A resumable pass over a dataset: progress bar, a log line per chunk, atomic resume state, clean stop.

Experiments give a `process(batch, acc) -> acc` function whose accumulators are numpy arrays on the host
(sums, counts, or per-image result rows). The loop saves `acc` and the index of the next image after every
chunk, so a run that is interrupted (Ctrl-C, SIGTERM, a preempted VM) and started again with the same
workdir and the same config continues where it stopped, without losing or double-counting an image.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from vitsparse_jax.runtime.workdir import Workdir, to_json

log = logging.getLogger(__name__)
Accumulators = dict[str, np.ndarray]


class Interrupted(RuntimeError):
    """The run was stopped by a signal; its state up to the last finished batch is saved."""


def fingerprint(obj: Any) -> str:
    """A stable hash of what determines a run's results (config sections, model, data)."""
    return hashlib.sha256(to_json(obj).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """Turns SIGTERM/SIGINT into a flag that the loop checks between batches."""
    flag = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001
        flag["stop"] = True
        log.warning("signal %d received: stopping after the current batch", signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals cannot be caught here
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_resumable(
    workdir: Workdir,
    *,
    key: Mapping[str, Any],
    total: int,
    batches_from: Callable[[int], Iterable[Mapping[str, Any]]],
    process: Callable[[Mapping[str, Any], Accumulators], Accumulators],
    init: Callable[[], Accumulators],
    batch_size: int,
    resume: bool = True,
    progress: bool = True,
    checkpoint_every_s: float = 30.0,
    desc: str = "",
    is_writer: bool = True,
    stop_after_batches: int | None = None,
) -> Accumulators:
    """Runs `process` over every batch of images [0, total) and returns the accumulators.

    key: what determines the results; a saved state with another key is an error (use another workdir).
    batches_from(start): batches of images [start, start + B), [start + B, ...) in dataset order.
    stop_after_batches: stop (as if interrupted) after that many batches — for tests of resuming.
    """
    fp = fingerprint(key)
    acc, start = init(), 0
    saved = workdir.load_state() if resume else None
    if saved is not None:
        arrays, meta = saved
        if meta.get("fingerprint") != fp:
            raise ValueError(
                f"{workdir.root} holds an unfinished run with a different config (fingerprint "
                f"{meta.get('fingerprint')} != {fp}); use another --config.workdir, or --config.resume=False "
                "to start over")
        acc, start = {k: arrays[k] for k in acc}, int(meta["next_index"])
        log.info("resuming at image %d of %d from %s", start, total, workdir.root)

    def save(next_index: int) -> None:
        if is_writer:
            workdir.save_state(acc, {"fingerprint": fp, "next_index": next_index, "total": total,
                                     "key": json.loads(to_json(key))})

    bar = tqdm(total=total, initial=start, desc=desc, unit="img", disable=not progress or not is_writer,
               dynamic_ncols=True)
    next_index, done_batches = start, 0
    t0 = last_save = time.monotonic()
    with _stop_on_signals() as flag, bar:
        if start < total:
            for batch in batches_from(start):
                acc = process(batch, acc)
                step = min(batch_size, total - next_index)
                next_index += step
                bar.update(step)
                done_batches += 1
                if flag["stop"] or done_batches == stop_after_batches:
                    save(next_index)
                    raise Interrupted(f"stopped at image {next_index} of {total}; run the same command "
                                      f"again to resume from {workdir.root}")
                if time.monotonic() - last_save > checkpoint_every_s and next_index < total:
                    save(next_index)
                    last_save = time.monotonic()
                    rate = (next_index - start) / (time.monotonic() - t0)
                    log.info("%s: %d/%d images (%.1f img/s), state saved", desc, next_index, total, rate)
                if next_index >= total:
                    break
    if next_index < total:
        raise RuntimeError(f"the data ended at image {next_index}, expected {total}")
    save(next_index)
    return acc
