"""A resumable pass over a dataset: progress bar, a log line per chunk, atomic resume state, clean stop.

Experiments give a device step and a host step (`dispatch(batch)`, `complete(pending, acc) -> acc`; or one
`process(batch, acc) -> acc`) whose accumulators are numpy arrays on the host (sums, counts, or per-image
result rows). The device works on the next batch while the host step works on this one (JAX's async dispatch,
`depth` batches ahead); with a `merge` of two accumulators each process keeps those of its own rows and they
are merged in image order at each save and at the end. The loop saves `acc` and the index of the next image after every
chunk, so a run that is interrupted (Ctrl-C, SIGTERM, a preempted VM) and started again with the same
workdir and the same config continues where it stopped, without losing or double-counting an image.

Given the pass's `source` (its batches carry a per-row content `digest`, as `data.batches` gives them), the
state also keeps the digest of every image processed, and a resume re-reads and re-hashes those images (read
only, no decode) before anything else: an image replaced in place (same size, mtime restored) is refused,
never mixed with the rows computed from the old one.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np
from tqdm import tqdm

from vitsparse_jax.runtime import stopping
from vitsparse_jax.runtime.errors import StateError
from vitsparse_jax.runtime.fingerprint import DIGEST_SIZE
from vitsparse_jax.runtime.workdir import RESUME_FILE, Workdir, to_json

log = logging.getLogger(__name__)
Accumulators = dict[str, np.ndarray]
STATE_FORMAT = 2          # 2: with the content digest of every processed image (DIGESTS); 1: without
DIGESTS = "__digests__"   # (total, DIGEST_SIZE) uint8 in the state: row i = image i's digest when processed


class ImageSource(Protocol):
    """What the content check needs of a data source (a `vitsparse_jax.data.Source` is one)."""

    def digest(self, i: int) -> bytes: ...       # content digest of image i, read now (no decode)

    def file_name(self, i: int) -> str: ...      # image i's name (its file) for messages


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
    `key`, naming the fields that differ and why they may have changed. In a workdir that holds the finished
    results of another config (`note_finished_run`), the one message says that, what differs and what to do."""
    fp = fingerprint(key)
    if meta.get("fingerprint") == fp:
        say_finished_run("computing this config, reusing the saved passes that still fit")
        return
    differs = key_differences(meta.get("key"), json.loads(to_json(key))) if "key" in meta else []
    hints = sorted({h for d in differs for k, h in _HINTS.items() if d.endswith(k)})
    detail = f": {', '.join(differs[:6])}{' ...' if len(differs) > 6 else ''}" if differs else ""
    why = f" ({'; '.join(hints)})" if hints else ""
    note = _finished_note(path)
    if note is not None:
        raise StateError(
            f"{note['root']} holds the finished results of {note['what']}; the saved pass {path} cannot serve this "
            f"config (it differs in{detail or ' the config'}{why}). To compute this config there, replacing those "
            f"results, rerun with --config.resume=False; to keep them, choose another --config.workdir.")
    raise StateError(
        f"{path} holds {what} with a different config or other inputs: it was written by another config or "
        f"from other files (fingerprint {meta.get('fingerprint')} != {fp}; differs in{detail or ' the config'}"
        f"{why}). Use another --config.workdir, or --config.resume=False to start over.")


# A finished run of another config (or of other inputs) in the workdir: said once, by whoever knows what
# happens (a saved pass reused, none to reuse, or one that cannot serve: then the error says it).
_FINISHED: dict[str, Any] = {}


def note_finished_run(root: Any, what: str) -> None:
    """The workdir `root` holds the finished results of `what` (e.g. 'another config (ablation.draws: 1 -> 2)');
    the next state check says so once (Session calls this; `clear_finished_run` at its end)."""
    _FINISHED.clear()
    _FINISHED.update(root=str(root), what=what, said=False)


def clear_finished_run() -> None:
    _FINISHED.clear()


def _finished_note(path: Any) -> dict[str, Any] | None:
    if not _FINISHED:
        return None
    root, path = Path(os.path.abspath(_FINISHED["root"])), Path(os.path.abspath(str(path)))
    return dict(_FINISHED) if path == root or root in path.parents else None


def say_finished_run(action: str) -> None:
    """Logs, once, that the workdir holds the finished results of another config and what this run does."""
    if _FINISHED and not _FINISHED["said"]:
        log.info("%s holds the finished results of %s: %s; this config's results will replace them",
                 _FINISHED["root"], _FINISHED["what"], action)
        _FINISHED["said"] = True


def check_state_format(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], path: Any,
                       digests: bool) -> None:
    """Refuses a state of an older layout as such (before its key or the images are compared): format 1 kept
    no content digests, so the images it processed cannot be checked."""
    version = int(meta.get("format", 1))
    if version > STATE_FORMAT:
        raise StateError(f"{path} was written by a newer version of vitsparse_jax (resume state format {version}; "
                         f"this one reads {STATE_FORMAT}). Update vitsparse_jax, or start over with "
                         "--config.resume=False, or choose another --config.workdir.")
    if version < STATE_FORMAT or (digests and DIGESTS not in arrays):
        raise StateError(f"{path} was written by an older version of vitsparse_jax (resume state format {version}, "
                         f"without the content hashes of the images it processed), so it cannot be checked against "
                         f"the images and is not resumed. Start over with --config.resume=False (or rm {path}); "
                         "to keep the old results, choose another --config.workdir.")


def verify_images(source: ImageSource, digests: np.ndarray, path: Any, *, workers: int | None = None) -> None:
    """Re-reads images [0, len(digests)) of `source` (read only, no decode), hashes them and raises StateError
    naming a changed image when one differs from its digest. With several processes each checks every P-th
    image and all of them agree on the answer (collective: every process calls it)."""
    import jax

    count, me = jax.process_count(), jax.process_index()
    mine = np.arange(me, len(digests), count)
    workers = workers or min(32, (os.cpu_count() or 1) * 4)   # I/O bound: threads wait on reads
    t0, first, bad, error = time.monotonic(), -1, 0, None
    try:
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="rehash") as pool:
            now = np.frombuffer(b"".join(pool.map(source.digest, mine.tolist(), chunksize=64)), np.uint8)
        changed = mine[(now.reshape(-1, DIGEST_SIZE) != digests[mine]).any(axis=1)]
        first, bad = (int(changed[0]) if len(changed) else -1), len(changed)
    except Exception as e:  # noqa: BLE001  (raised after every process has answered: no one waits forever)
        error = e
    failed = error is not None
    if count > 1:
        from jax.experimental import multihost_utils

        found = np.asarray(multihost_utils.process_allgather(np.array([first, bad, failed], np.int64))).reshape(-1, 3)
        bad, failed = int(found[:, 1].sum()), bool(found[:, 2].any())
        firsts = found[found[:, 0] >= 0, 0]
        first = int(firsts.min()) if len(firsts) else -1
    if error is not None:
        raise error
    if failed:
        raise StateError(f"another process could not check the images already processed for {path} (its output "
                         "says why)")
    log.info("checked the content of the %d images already processed in %.1f s", len(digests), time.monotonic() - t0)
    if bad:
        raise StateError(
            f"{path} cannot be resumed: {bad} of the {len(digests)} images it already processed have other content "
            f"now, e.g. {source.file_name(first)} (image {first}), even if their names, sizes and times are unchanged "
            "(cp -p, rsync -t and tar keep them). Its results cannot be combined with the new images: rerun with "
            "--config.resume=False to start over on the images as they are now, or put the original files back to "
            "continue; another --config.workdir keeps the old results.")


PIPELINE_DEPTH = 1        # batches dispatched to the device ahead of the one the host works on (0: serial)
MERGE_BYTES = 16 << 20    # per-process accumulators grown by this much since the last merge ask for one (and a
                          # save): rows waiting for a block completed on another process are copied at every add


def run_resumable(
    workdir: Workdir,
    *,
    key: Mapping[str, Any],
    total: int,
    batches_from: Callable[[int], Iterable[Mapping[str, Any]]],
    process: Callable[[Mapping[str, Any], Accumulators], Accumulators] | None = None,
    init: Callable[[], Accumulators],
    batch_size: int,
    resume: bool = True,
    progress: bool = True,
    checkpoint_every_s: float = 30.0,
    desc: str = "",
    is_writer: bool = True,
    stop_after_batches: int | None = None,
    source: ImageSource | None = None,
    check_workers: int | None = None,
    dispatch: Callable[[Mapping[str, Any]], Any] | None = None,
    complete: Callable[[Any, Accumulators], Accumulators] | None = None,
    merge: Callable[[Accumulators, Accumulators], Accumulators] | None = None,
    depth: int = PIPELINE_DEPTH,
) -> Accumulators:
    """Runs the host step over every batch of images [0, total) and returns the accumulators.

    key: what determines the results; a saved state with another key is an error (use another workdir).
    batches_from(start): batches of images [start, start + B), [start + B, ...) in dataset order.
    process(batch, acc) -> acc: the device and host work of one batch, in one call (the serial pass). Or:
    dispatch(batch) -> pending: starts the device work of a batch and returns without waiting for it (JAX's
        async dispatch); complete(pending, acc) -> acc: the host step on its results. `depth` batches are
        dispatched ahead of the one the host works on (0: one batch at a time, as `process`).
    merge(a, b) -> acc: the accumulators of two disjoint sets of images as one. Given, every process keeps
        accumulators of the rows it holds (`complete` sees this process's rows only, and the digests are taken
        from its own rows) and they are merged in image order at each save (process 0 writes; the others go
        on from `init()`) and at the end (every process returns the merged accumulators). Without it every
        process holds the same accumulators of every row (process 0's are saved).
    stop_after_batches: stop (as if interrupted) after that many batches — for tests of resuming.
    source: the images [0, total) the batches hold (a `data.Source`; its batches must carry `digest` and
        `index`, as `data.batches` gives them): the state keeps each processed image's content digest and a
        resume re-hashes those images first (`verify_images`, `check_workers` threads per process), refusing
        changed ones. None: no content check (a state is then resumed on its key alone).

    A stop (a signal, stop_after_batches) saves exactly the batches whose host step finished; batches already
    dispatched are dropped and computed again after the resume. With several processes the stop requests
    and the wish to save are gathered after each batch without waiting and read one batch later, so every
    process stops or saves after the same batch and the pipeline never waits for the collective.
    """
    import jax

    from vitsparse_jax.runtime import parallel, timing

    if (process is None) == (dispatch is None or complete is None) or (dispatch is None) != (complete is None):
        raise TypeError("run_resumable needs either process= or both dispatch= and complete=")
    if process is not None:
        dispatch, complete, depth = (lambda batch: batch), process, 0
    local = merge is not None                 # accumulators per process, merged at saves
    several = jax.process_count() > 1
    fp = fingerprint(key)
    acc, start = init(), 0
    digests = np.zeros((total, DIGEST_SIZE), np.uint8) if source is not None else None
    state_path = workdir.path(RESUME_FILE)
    error: Exception | None = None
    if resume and is_writer:   # the writer's state decides for every process (the workdir may not be shared)
        try:
            saved = workdir.load_state()
            if saved is None:
                say_finished_run("computing this config (no saved pass to reuse)")
            else:
                arrays, meta = saved
                check_state_format(meta, arrays, state_path, digests is not None)
                check_state_key(meta, key, state_path)
                missing = sorted(set(acc) - set(arrays))
                if (missing or int(meta.get("total", total)) != total
                        or (digests is not None and arrays[DIGESTS].shape != digests.shape)):
                    raise StateError(f"{state_path} does not fit this run (arrays {missing} missing or another "
                                     "number of images); delete it, or rerun with --config.resume=False")
                acc, start = {k: arrays[k] for k in acc}, int(meta["next_index"])
                if digests is not None:
                    digests = np.array(arrays[DIGESTS], np.uint8)
        except Exception as e:  # noqa: BLE001  (raised below, on every process)
            error = e
    if resume:
        ok = parallel.from_first(np.int32(error is None))
        if error is not None:
            raise error
        if not ok:
            raise StateError(f"process 0 cannot resume from the state in {workdir.root} (its output says why)")
        start = int(parallel.from_first(np.int64(start)))
        if not local:      # per-process accumulators: process 0 goes on from the state, the others from empty
            acc = parallel.from_first(acc)    # ones (never the state on every process: the merge would count it twice)
        if digests is not None and start:
            digests[:start] = parallel.from_first(digests[:start])
            verify_images(source, digests[:start], state_path, workers=check_workers)   # before anything is written
    if start:
        log.info("resuming at image %d of %d from %s", start, total, workdir.root)
    merged_upto = start                       # images [0, merged_upto) are in process 0's accumulators

    def merge_all(next_index: int, everywhere: bool) -> None:
        """Merges every process's accumulators (and the digests of images [merged_upto, next_index)) into
        process 0's, or into every process's when `everywhere`; the others go on from empty ones. Collective."""
        nonlocal acc, merged_upto
        if local and several:
            mine = dict(acc)
            if digests is not None:
                mine[DIGESTS] = digests[merged_upto:next_index]
            states = [_from_bytes(b) for b in parallel.gather_bytes(_to_bytes(mine))]
            if everywhere or is_writer:
                merged = {k: v for k, v in states[0].items() if k != DIGESTS}
                for other in states[1:]:
                    merged = merge(merged, {k: v for k, v in other.items() if k != DIGESTS})
                if digests is not None:   # each process's rows; the rows of images it did not hold are zeros
                    digests[merged_upto:next_index] = np.bitwise_or.reduce([st[DIGESTS] for st in states])
                acc = merged
            else:
                acc = init()
        merged_upto = next_index

    def save(next_index: int) -> None:
        merge_all(next_index, everywhere=False)
        if is_writer:
            arrays = acc if digests is None else {**acc, DIGESTS: digests}
            workdir.save_state(arrays, {"format": STATE_FORMAT, "fingerprint": fp, "next_index": next_index,
                                        "total": total, "key": json.loads(to_json(key))})

    def stop(next_index: int, signum: int | None, processed: bool) -> Interrupted:
        if processed:
            save(next_index)
        _barrier("vitsparse_jax_resumable_stop")   # every process has stopped and the state is written
        how = f"{stopping.name(signum)}" if signum else "stop_after_batches"
        what = f" ({desc})" if desc else ""
        if processed:
            text = (f"stopped ({how}) at image {next_index} of {total}{what}; the state is saved in {workdir.root}: "
                    "run the same command again to continue")
        elif start:
            text = (f"stopped ({how}) at image {next_index} of {total}{what}, before this run processed any; the "
                    f"state saved earlier in {workdir.root} is kept: run the same command again to continue")
        else:
            text = (f"stopped ({how}) before the first image of {total}{what}: nothing was computed in this pass, "
                    "so nothing of it was saved; run the same command again to start it")
        return Interrupted(text, signum=signum, done=next_index, total=total, where=str(workdir.root))

    log.info("%s: images %d..%d of %d; state in %s", desc or "pass", start, total, total, workdir.root)
    bar = tqdm(total=total, initial=start, desc=desc, unit="img", disable=not progress or not is_writer,
               dynamic_ncols=True)
    next_index, done_batches, data_s = start, 0, 0.0
    t0 = last_save = time.monotonic()
    base_bytes = _nbytes(acc)
    with stopping.handle_signals(), bar:
        if start < total:
            signum = stopping.agreed_stop()          # a stop requested before this pass (loading, compiling)
            if signum:
                raise stop(next_index, signum, processed=False)
            batches = iter(batches_from(start))
            pending: collections.deque = collections.deque()   # dispatched batches whose host step is to come
            flags: collections.deque = collections.deque()     # gathered (stop, save) flags, read a batch later
            dispatched = start
            while True:
                while len(pending) <= depth and dispatched < total:
                    t_data = time.monotonic()
                    batch = next(batches, None)     # decoded ahead on the data pipeline's threads
                    data_s += time.monotonic() - t_data
                    if batch is None:
                        break
                    step = min(batch_size, total - dispatched)
                    pending.append((dispatch(batch), batch, step))
                    dispatched += step
                if not pending:
                    break
                handle, batch, step = pending.popleft()
                acc = complete(handle, acc)
                if digests is not None:
                    _keep_digests(batch, digests, local)
                next_index += step
                bar.update(step)
                done_batches += 1
                want_save = is_writer and time.monotonic() - last_save > checkpoint_every_s
                if local and several:
                    want_save = want_save or _nbytes(acc) - base_bytes > MERGE_BYTES
                signum, save_now = _decide(flags, stopping.requested() or 0, want_save, several)
                if signum or done_batches == stop_after_batches:
                    raise stop(next_index, signum, processed=True)
                if save_now and next_index < total:
                    save(next_index)
                    last_save, base_bytes = time.monotonic(), _nbytes(acc)
                    rate = (next_index - start) / (time.monotonic() - t0)
                    log.info("%s: %d/%d images (%.1f img/s), state saved", desc, next_index, total, rate)
                if next_index >= total:
                    break
    if next_index < total:
        raise RuntimeError(f"the data ended at image {next_index}, expected {total}")
    if next_index > start or not start:   # a finished state read back as it is is not written again
        save(next_index)
    merge_all(next_index, everywhere=True)   # the merged accumulators on every process (before `finish`)
    seconds = time.monotonic() - t0
    timing.note_pass(images=next_index - start, seconds=seconds, data_s=data_s)
    if next_index > start:
        log.info("%s: %d images in %.1f s (%.1f img/s)", desc or "pass", next_index - start, seconds,
                 (next_index - start) / max(seconds, 1e-9))
    return acc


def _decide(flags: collections.deque, signum: int, want_save: bool, several: bool) -> tuple[int | None, bool]:
    """The stop request and the wish to save of every process, agreed: with one process, this one's now; with
    several, every process's flags of the batch before (gathered without waiting, read one batch later), so
    that all of them stop or save after the same batch."""
    if not several:
        return signum or None, want_save
    from vitsparse_jax.runtime import parallel

    flags.append(parallel.Gathered(np.array([signum, int(want_save)], np.int64)))
    if len(flags) < 2:
        return None, False
    agreed = flags.popleft().result()
    return int(agreed[:, 0].max()) or None, bool(agreed[:, 1].max())


def _nbytes(acc: Accumulators) -> int:
    return sum(np.asarray(v).nbytes for v in acc.values())


def _to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _from_bytes(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _keep_digests(batch: Mapping[str, Any], digests: np.ndarray, local: bool = False) -> None:
    """Stores each real row's content digest at its image index: this process's rows (`local`), else every row
    (all-gathered with several processes)."""
    if "digest" not in batch:
        raise RuntimeError("run_resumable(source=...) needs batches with a 'digest' field (data.batches gives it)")
    from vitsparse_jax.runtime import parallel

    pair = (batch["digest"], batch["index"])
    digest, index = parallel.local_rows(pair) if local else parallel.to_host(pair)
    index = np.asarray(index)
    rows = index >= 0
    digests[index[rows]] = np.asarray(digest)[rows]


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
