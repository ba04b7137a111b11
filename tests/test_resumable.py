"""The shared resumable pass: exact resume, config guard, clean stop on signals."""
import json
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


# ------------------------------------------------------------------ issue 16: inputs, stops, exit codes

from vitsparse_jax.runtime import stopping  # noqa: E402
from vitsparse_jax.runtime.errors import StateError  # noqa: E402


def keyed(workdir, key, **kw):
    return run_resumable(workdir, key=key, total=TOTAL, batches_from=batches_from, process=process, init=init,
                         batch_size=BATCH, progress=False, **kw)


@pytest.mark.parametrize("change, named, why", [
    (lambda k: k["images"].update(identity="folder:/x:1111"), "images.identity", "the images changed"),
    (lambda k: k["images"].update(num_images=11), "images.num_images", "number of images changed"),
    (lambda k: k["weights"].update(sha256="b" * 64), "weights.sha256", "weights file was replaced"),
    (lambda k: k.update(seed=1), "seed", ""),
])
def test_a_state_of_other_inputs_is_refused_naming_what_changed(tmp_path, change, named, why):
    key = {"images": {"identity": "folder:/x:0000", "name": "folder:/x", "num_images": 10},
           "weights": {"weights": "/w.safetensors", "sha256": "a" * 64}, "seed": 0}
    wd = Workdir(tmp_path)
    with pytest.raises(Interrupted):
        keyed(wd, key, stop_after_batches=1)
    other = json.loads(json.dumps(key))
    change(other)
    with pytest.raises(StateError) as info:
        keyed(wd, other)
    text = str(info.value)
    assert named in text and why in text and "different config" in text and "--config.resume=False" in text
    assert keyed(wd, key)["seen"].sum() == TOTAL          # the right inputs still resume


def test_a_damaged_state_is_an_error_that_names_it(tmp_path):
    wd = Workdir(tmp_path)
    wd.path("resume_state.npz").write_bytes(b"garbage")
    with pytest.raises(StateError, match="resume_state.npz cannot be read"):
        run(wd)
    assert run(wd, resume=False)["seen"].sum() == TOTAL


def test_a_stop_requested_before_the_pass_stops_before_the_first_batch(tmp_path):
    seen = []
    with stopping.handle_signals():
        stopping.request(signal.SIGTERM)
        with pytest.raises(Interrupted) as info:
            run_resumable(Workdir(tmp_path), key={"exp": "toy"}, total=TOTAL,
                          batches_from=lambda s: (seen.append(s) or b for b in batches_from(s)),
                          process=process, init=init, batch_size=BATCH, progress=False)
    assert seen == [] and info.value.signum == signal.SIGTERM and info.value.exit_code == 143
    assert info.value.done == 0 and "same command" in str(info.value)
    assert "nothing" in str(info.value) and "state is saved" not in str(info.value)   # nothing was saved
    assert Workdir(tmp_path).load_state() is None
    with pytest.raises(Interrupted):                       # a state saved by an earlier run ...
        run(Workdir(tmp_path), stop_after_batches=1)
    with stopping.handle_signals():
        stopping.request(signal.SIGTERM)
        with pytest.raises(Interrupted) as info:
            run(Workdir(tmp_path))
    assert f"at image {BATCH} of {TOTAL}" in str(info.value) and "saved earlier" in str(info.value)   # ... is kept
    assert Workdir(tmp_path).load_state()[1]["next_index"] == BATCH


def test_exit_codes_and_a_second_ctrl_c(tmp_path):
    assert stopping.exit_code(signal.SIGINT) == 130 and stopping.exit_code(signal.SIGTERM) == 143
    wd = Workdir(tmp_path)
    with pytest.raises(Interrupted) as info:
        run(wd, stop_after_batches=1)
    assert info.value.signum is None and info.value.exit_code == 75

    def ctrl_c_twice(batch, acc):
        if batch["index"][0] == BATCH:
            os.kill(os.getpid(), signal.SIGINT)     # first: stop after this batch
            os.kill(os.getpid(), signal.SIGINT)     # second: at once
        return process(batch, acc)

    with pytest.raises(KeyboardInterrupt):
        run_resumable(Workdir(tmp_path / "b"), key={"exp": "toy"}, total=TOTAL, batches_from=batches_from,
                      process=ctrl_c_twice, init=init, batch_size=BATCH, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored


def test_a_finished_run_of_other_inputs_is_said_once_in_the_refusal(tmp_path, caplog):
    """issue 28, point 3: the session notes what the workdir's finished run differs in; the state check that
    cannot reuse its pass says it in the one error (not 'an unfinished run'), one that can says it once."""
    from vitsparse_jax.runtime import resumable

    key = {"images": {"identity": "folder:/x:0000", "num_images": 10}, "seed": 0}
    wd = Workdir(tmp_path / "run" / "model")
    keyed(wd, key)                                            # the finished run's saved pass
    resumable.note_finished_run(tmp_path / "run", "this config from other inputs (data changed since)")
    try:
        with pytest.raises(StateError) as info:
            keyed(wd, {**key, "images": {"identity": "folder:/x:1111", "num_images": 10}})
        text = str(info.value)
        assert text.startswith(f"{tmp_path / 'run'} holds the finished results of this config from other inputs "
                               "(data changed since)") and "images.identity" in text, text
        assert "unfinished" not in text and "--config.resume=False" in text and "--config.workdir" in text
        caplog.set_level("INFO")
        keyed(wd, key)                                        # the same key: reused, and said once
        keyed(wd, key)
        said = [r.getMessage() for r in caplog.records if "holds the finished results" in r.getMessage()]
        assert len(said) == 1 and "reusing the saved passes" in said[0], said
    finally:
        resumable.clear_finished_run()
