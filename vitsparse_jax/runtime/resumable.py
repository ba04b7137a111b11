"""A resumable pass over a dataset: progress bar, a log line per chunk, atomic resume state, clean stop.

Experiments give a `process(batch, acc) -> acc` function whose accumulators are numpy arrays on the host
(sums, counts, or per-image result rows). The loop saves `acc` and the index of the next image after every
chunk, so a run that is interrupted (Ctrl-C, SIGTERM, a preempted VM) and started again with the same
workdir and the same config continues where it stopped, without losing or double-counting an image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from vitsparse_jax.runtime import fingerprint as input_fingerprints
from vitsparse_jax.runtime import stopping
from vitsparse_jax.runtime.errors import StateError
from vitsparse_jax.runtime.workdir import Workdir, to_json

log = logging.getLogger(__name__)
Accumulators = dict[str, np.ndarray]


class Interrupted(RuntimeError):
    """The run was stopped (a signal, or stop_after_batches); its state up to the last finished batch is
    saved, and the same command continues. `signum`: the signal (None: stopped on request)."""

    def __init__(self, message: str, *, signum: int | None = None, done: int | None = None,
                 total: int | None = None, where: str | None = None):
        super().__init__(message)
        self.signum, self.done, self.total, self.where = signum, done, total, where

    @property
    def exit_code(self) -> int:
        return stopping.exit_code(self.signum)


def fingerprint(obj: Any) -> str:
    """A stable hash of what determines a run's results (config sections, model, data)."""
    return hashlib.sha256(to_json(obj).encode()).hexdigest()[:16]


def key_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like keys differ (at most a few levels deep)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(path)
            else:
                out += key_differences(old[k], new[k], path)
        return out
    return [] if old == new else [prefix or "(everything)"]


_HINTS = {"sha256": "the weights file was replaced", "identity": "the images changed (files added, removed, "
          "replaced or touched, or another dataset version)", "num_images": "the number of images changed"}


def check_state_key(meta: Mapping[str, Any], key: Mapping[str, Any], path: Any, what: str = "an unfinished run") -> None:
    """Raises StateError when a saved state's key (`meta['key']`, fingerprint `meta['fingerprint']`) is not
    `key`, naming the fields that differ and why they may have changed."""
    fp = fingerprint(key)
    if meta.get("fingerprint") == fp:
        return
    differs = key_differences(meta.get("key"), json.loads(to_json(key))) if "key" in meta else []
    hints = sorted({h for d in differs for k, h in _HINTS.items() if d.endswith(k)})
    detail = f": {', '.join(differs[:6])}{' ...' if len(differs) > 6 else ''}" if differs else ""
    why = f" ({'; '.join(hints)})" if hints else ""
    raise StateError(
        f"{path} holds {what} with a different config or other inputs: it was written by another config or "
        f"from other files (fingerprint {meta.get('fingerprint')} != {fp}; differs in{detail or ' the config'}"
        f"{why}). Use another --config.workdir, or --config.resume=False to start over.")


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
    input_fingerprints.record(json.loads(to_json(key)))
    acc, start = init(), 0
    error: Exception | None = None
    if resume and is_writer:   # the writer's state decides for every process (the workdir may not be shared)
        try:
            saved = workdir.load_state()
            if saved is not None:
                arrays, meta = saved
                check_state_key(meta, key, workdir.path("resume_state.npz"))
                missing = sorted(set(acc) - set(arrays))
                if missing or int(meta.get("total", total)) != total:
                    raise StateError(f"{workdir.path('resume_state.npz')} does not fit this run (arrays {missing} "
                                     "missing or another number of images); delete it, or rerun with "
                                     "--config.resume=False")
                acc, start = {k: arrays[k] for k in acc}, int(meta["next_index"])
        except Exception as e:  # noqa: BLE001  (raised below, on every process)
            error = e
    if resume:
        from vitsparse_jax.runtime import parallel

        ok = parallel.from_first(np.int32(error is None))
        if error is not None:
            raise error
        if not ok:
            raise StateError(f"process 0 cannot resume from the state in {workdir.root} (its output says why)")
        start = int(parallel.from_first(np.int64(start)))
        acc = parallel.from_first(acc)
    if start:
        log.info("resuming at image %d of %d from %s", start, total, workdir.root)

    def save(next_index: int) -> None:
        if is_writer:
            workdir.save_state(acc, {"fingerprint": fp, "next_index": next_index, "total": total,
                                     "key": json.loads(to_json(key))})

    def stop(next_index: int, signum: int | None, processed: bool) -> Interrupted:
        if processed:
            save(next_index)
        _barrier("vitsparse_jax_resumable_stop")   # every process has stopped and the state is written
        how = f"{stopping.name(signum)}" if signum else "stop_after_batches"
        return Interrupted(f"stopped ({how}) at image {next_index} of {total}{f' ({desc})' if desc else ''}; the "
                           f"state is saved in {workdir.root}: run the same command again to continue",
                           signum=signum, done=next_index, total=total, where=str(workdir.root))

    log.info("%s: images %d..%d of %d; state in %s", desc or "pass", start, total, total, workdir.root)
    bar = tqdm(total=total, initial=start, desc=desc, unit="img", disable=not progress or not is_writer,
               dynamic_ncols=True)
    next_index, done_batches = start, 0
    t0 = last_save = time.monotonic()
    with stopping.handle_signals(), bar:
        if start < total:
            signum = stopping.agreed_stop()          # a stop requested before this pass (loading, compiling)
            if signum:
                raise stop(next_index, signum, processed=False)
            for batch in batches_from(start):
                acc = process(batch, acc)
                step = min(batch_size, total - next_index)
                next_index += step
                bar.update(step)
                done_batches += 1
                signum = stopping.agreed_stop()      # collective: every process takes the same decision
                if signum or done_batches == stop_after_batches:
                    raise stop(next_index, signum, processed=True)
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


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
