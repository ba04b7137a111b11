"""The overlapped pass (runtime/resumable.py, experiments/driver.py `_pass`; issue 26, points 1 and 3).

- The device step of the next batch is dispatched before the host step of this one (`depth` batches ahead), and
  a stop saves exactly the batches whose host step finished: the in-flight ones are computed again after the
  resume, never lost or counted twice.
- Every experiment gives bitwise the same results overlapped as serially (depth 0), at several batch sizes and
  device counts (4 fake CPU devices: tests/conftest.py); per-image values summed in image order do not depend
  on when the host gets them.
- The run's timing (results.json's `timing`): phases, compilations counted once per program.
Tiny: vit_pico and vgg_pico on 12 digits, untrained.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import ablate as ablate_config
from configs import locality as locality_config
from configs import receptive_field as rf_config
from configs import sparsity as sparsity_config
from vitsparse_jax import data
from vitsparse_jax.experiments import driver
from vitsparse_jax.runtime import parallel, resumable, stopping
from vitsparse_jax.runtime.workdir import Workdir
from vitsparse_jax.weights import loading

IMAGES = 12


# --- the pipeline itself, with a fake device step --------------------------------------------------------------

def fake_pass(tmp_path, *, depth, events, stop_in=None, stop_after=None, resume=True):
    """Images [0, 12) in batches of 4: dispatch records it, complete adds each image's index once."""
    def batches_from(start):
        for lo in range(start, IMAGES, 4):
            yield {"index": np.arange(lo, lo + 4)}

    def dispatch(batch):
        events.append(("dispatch", int(batch["index"][0])))
        return batch["index"]

    def complete(index, acc):
        events.append(("complete", int(index[0])))
        if stop_in is not None and int(index[0]) == stop_in:
            stopping.request()          # as a SIGTERM during this batch's host step would
        counts = acc["counts"].copy()
        counts[index] += 1
        return {"counts": counts}

    return resumable.run_resumable(
        Workdir(tmp_path), key={"test": "pipeline"}, total=IMAGES, batches_from=batches_from, dispatch=dispatch,
        complete=complete, init=lambda: {"counts": np.zeros(IMAGES, np.int64)}, batch_size=4, depth=depth,
        progress=False, stop_after_batches=stop_after, resume=resume)


@pytest.mark.parametrize("depth, order", [
    (0, ["d0", "c0", "d4", "c4", "d8", "c8"]),
    (1, ["d0", "d4", "c0", "d8", "c4", "c8"]),
    (2, ["d0", "d4", "d8", "c0", "c4", "c8"])])
def test_the_next_batches_are_dispatched_before_the_host_step_of_this_one(tmp_path, depth, order):
    """A serial loop (dispatch, complete, dispatch, ...) at depth 1 or 2 would fail here."""
    events = []
    acc = fake_pass(tmp_path, depth=depth, events=events, resume=False)
    assert [f"{kind[0]}{first}" for kind, first in events] == order
    assert (acc["counts"] == 1).all()


@pytest.mark.parametrize("depth", [1, 2])
def test_a_stop_saves_exactly_the_finished_host_steps_and_recomputes_the_in_flight_batches(tmp_path, depth):
    """A stop requested in batch 0's host step: the state holds batch 0 only, though batch 1 (and 2) were already
    dispatched; the resume computes them, and every image is counted exactly once."""
    events = []
    with pytest.raises(resumable.Interrupted) as stopped:
        fake_pass(tmp_path, depth=depth, events=events, stop_in=0)
    assert stopped.value.done == 4 and stopped.value.exit_code == 143
    assert ("dispatch", 4) in events and ("complete", 4) not in events      # batch 1 was in flight, dropped
    arrays, meta = Workdir(tmp_path).load_state()
    assert meta["next_index"] == 4 and arrays["counts"].tolist() == [1] * 4 + [0] * 8
    events.clear()
    acc = fake_pass(tmp_path, depth=depth, events=events)
    assert events[0] == ("dispatch", 4) and (acc["counts"] == 1).all()


def test_stop_after_batches_counts_finished_host_steps_not_dispatches(tmp_path):
    with pytest.raises(resumable.Interrupted):
        fake_pass(tmp_path, depth=2, events=[], stop_after=2)
    arrays, meta = Workdir(tmp_path).load_state()
    assert meta["next_index"] == 8 and arrays["counts"].tolist() == [1] * 8 + [0] * 4


def test_process_and_dispatch_are_exclusive(tmp_path):
    with pytest.raises(TypeError, match="either process= or both dispatch= and complete="):
        resumable.run_resumable(Workdir(tmp_path), key={}, total=1, batches_from=lambda s: [], init=dict,
                                batch_size=1, process=lambda b, a: a, dispatch=lambda b: b)


# --- every experiment: overlapped == serial, bitwise ------------------------------------------------------------

def digits():
    return data.subset(data.DigitsSource("test"), num_images=IMAGES)


def small(config, batch_size):
    config.weights = "untrained"
    config.progress = False
    config.data.batch_size = batch_size
    config.data.num_images = IMAGES
    return config


def sparsity_case(batch_size, model="vit"):
    config = small(sparsity_config.get_config(None if model == "vit" else "vgg"), batch_size)
    config.sparsity.per_image = model == "vit"
    return config, lambda r: {**r.totals, **{f"row_{k}": v for k, v in r.rows.items()}}


def ablation_case(batch_size):
    config = small(ablate_config.get_config(), batch_size)
    config.ablation.update(p=(0.1, 0.25), n=(1, 2), draws=1, explore_images=0)
    return config, lambda r: r.rows


def rf_case(batch_size):
    config = small(rf_config.get_config(), batch_size)
    config.receptive_field.update(layers="blocks.0,blocks.1.attn", variants="untrained")
    return config, lambda r: {"maps": r.maps, "images": np.int64(r.num_images)}


def locality_case(batch_size):
    config = small(locality_config.get_config(), batch_size)
    config.locality.update(models="", variants="untrained", blocks="blocks.0")
    return config, lambda r: {**r.totals, "maps": r.maps}


CASES = {"sparsity": sparsity_case, "sparsity_cnn": lambda b: sparsity_case(b, "vgg"), "ablate": ablation_case,
         "receptive_field": rf_case, "locality": locality_case}


def arrays_of(config, tmp_path, mesh, depth, pick):
    (m,) = driver.measure(config, Workdir(tmp_path / f"d{depth}"), source=digits(), mesh=mesh, depth=depth)
    return {k: np.asarray(v) for k, v in pick(m.result).items()}


@pytest.mark.parametrize("experiment", list(CASES))
@pytest.mark.parametrize("batch_size, devices", [(4, 1), (8, 4)])
def test_the_overlapped_pass_gives_bitwise_the_serial_results(experiment, batch_size, devices, tmp_path):
    """Depth 2 (two batches in flight while the host adds this one) against depth 0; 12 images: the last batch is
    padded. A pipeline that mixed up batches (a host step fed the next batch's outputs, or one batch twice)
    changes the sums, the rows or the counts."""
    config, pick = CASES[experiment](batch_size)
    mesh = parallel.make_mesh(jax.devices()[:devices])
    serial = arrays_of(config, tmp_path, mesh, 0, pick)
    overlapped = arrays_of(config, tmp_path, mesh, 2, pick)
    assert serial.keys() == overlapped.keys() and serial
    for key, value in serial.items():
        assert value.dtype == overlapped[key].dtype and np.array_equal(value, overlapped[key]), key
    counted = serial.get("images", serial.get("done"))
    if counted is not None:
        assert int(np.sum(counted)) == IMAGES   # every image once


# --- timing ------------------------------------------------------------------------------------------------------

def test_results_json_says_where_the_time_went(tmp_path):
    """results.json's `timing`: start-up, the phases (report.html apart from the other files), the compilations and
    what no phase covers add up to the wall time; the fixed cost is all but the pass."""
    config = small(sparsity_config.get_config(), 8)
    config.workdir = str(tmp_path / "run")
    vit = loading.load_model(config.model, "untrained", seed=0)
    driver.execute(config, Workdir(config.workdir), loaded=[vit], source=digits())
    t = Workdir(config.workdir).read_json("results.json")["timing"]
    assert {"checks", "loading", "pass", "extras", "figures", "report_html"} <= set(t["phases_s"]), t["phases_s"]
    assert t["pass"]["images"] == IMAGES and t["pass"]["host_s"] > 0 and t["pass"]["wait_s"] >= 0
    parts = t["startup_s"] + sum(t["phases_s"].values()) + t["compilation"]["seconds"] + t["other_s"]
    assert abs(parts - t["wall_s"]) < 0.05 and abs(t["fixed_s"] - (t["wall_s"] - t["phases_s"]["pass"])) < 0.01
    c = t["compilation"]
    assert c["programs"] == sum(c["by_program"].values()) == sum(c["by_phase"].values()) >= 1


@pytest.mark.parametrize("experiment", ["sparsity", "ablate", "receptive_field"])
def test_the_pass_compiles_its_programs_once_whatever_the_number_of_batches(experiment, tmp_path):
    """A jit made per batch (or a program recompiled for the padded last batch) compiles in every batch: the pass
    of 3 batches would then compile more programs than that of 1 batch."""
    counts = []
    for images in (4, IMAGES):
        jax.clear_caches()   # each run compiles its programs (or reads them from the persistent cache)
        config, _ = CASES[experiment](4)
        config.data.num_images = images
        t = driver.execute(config, Workdir(tmp_path / str(images)), write=False,
                           source=data.subset(data.DigitsSource("test"), num_images=images))["timing"]
        counts.append(t["compilation"]["by_phase"].get("pass", 0))
    assert counts[0] == counts[1] >= 1, counts
