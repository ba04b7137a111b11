"""The shared resumable pass: exact resume, config guard, clean stop on signals."""
import os
import signal

import numpy as np
import pytest

from vitsparse_jax.runtime.resumable import Interrupted, run_resumable
from vitsparse_jax.runtime.workdir import Workdir

TOTAL, BATCH = 10, 3


def batches_from(start):
    for lo in range(start, TOTAL, BATCH):
        idx = np.arange(lo, lo + BATCH)
        yield {"index": idx, "valid": idx < TOTAL}


def process(batch, acc):
    idx = batch["index"][batch["valid"]]
    acc = dict(acc)
    acc["sum"] = acc["sum"] + idx.sum()
    acc["seen"] = acc["seen"].copy()
    acc["seen"][idx] += 1
    return acc


def init():
    return {"sum": np.zeros((), np.float64), "seen": np.zeros(TOTAL, np.int64)}


def run(workdir, **kw):
    return run_resumable(workdir, key={"exp": "toy"}, total=TOTAL, batches_from=batches_from,
                         process=process, init=init, batch_size=BATCH, progress=False, **kw)


def test_interrupted_run_resumes_without_losing_or_double_counting(tmp_path):
    full = run(Workdir(tmp_path / "full"))
    assert full["sum"] == sum(range(TOTAL)) and (full["seen"] == 1).all()
    wd = Workdir(tmp_path / "resumed")
    with pytest.raises(Interrupted, match="resume"):
        run(wd, stop_after_batches=2)
    _, meta = wd.load_state()
    assert meta["next_index"] == 2 * BATCH
    resumed = run(wd)
    np.testing.assert_array_equal(resumed["seen"], full["seen"])
    assert resumed["sum"] == full["sum"]


def test_state_of_another_config_is_an_error(tmp_path):
    wd = Workdir(tmp_path)
    with pytest.raises(Interrupted):
        run(wd, stop_after_batches=1)
    with pytest.raises(ValueError, match="different config"):
        run_resumable(wd, key={"exp": "other"}, total=TOTAL, batches_from=batches_from, process=process,
                      init=init, batch_size=BATCH, progress=False)
    assert run(wd, resume=False)["seen"].sum() == TOTAL  # resume=False starts over


def test_sigterm_stops_after_the_current_batch_with_state_saved(tmp_path):
    wd = Workdir(tmp_path)

    def process_and_signal(batch, acc):
        if batch["index"][0] == BATCH:  # the second batch: a preemption notice arrives mid-batch
            os.kill(os.getpid(), signal.SIGTERM)
        return process(batch, acc)

    with pytest.raises(Interrupted):
        run_resumable(wd, key={"exp": "toy"}, total=TOTAL, batches_from=batches_from,
                      process=process_and_signal, init=init, batch_size=BATCH, progress=False)
    arrays, meta = wd.load_state()
    assert meta["next_index"] == 2 * BATCH
    np.testing.assert_array_equal(arrays["seen"][:2 * BATCH], 1)
    assert run(wd)["seen"].sum() == TOTAL
