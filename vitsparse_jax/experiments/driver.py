"""The one driver of every measurement experiment (`experiments/contract.py` says what an experiment gives).

    python -m vitsparse_jax.main --config=configs/<experiment>.py   ->   driver.run(config)

It owns, for every experiment: joining a multi-process job, the workdir session (lock, 'already complete',
the completion marker with the run's input fingerprints), the checks before any work (the config, every
model name and its weights, the mesh and batch size, the data), loading each model once, the resumable pass
over the data (device step, host step, resume state, a finished pass kept for reruns), the rule for a run
whose images are all unreadable, which process writes the result files, and --dry_run.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from vitsparse_jax import experiments
from vitsparse_jax.experiments.contract import Accumulators, Context, Experiment, Item, Measured, Measurement, Plan
from vitsparse_jax.runtime.workdir import Workdir

log = logging.getLogger(__name__)


# --- one run, as the command line starts it ------------------------------------------------------------------

def run(config: Any) -> dict[str, Any]:
    """The whole run of `config`: a multi-process job joined first, then the session around `execute`."""
    from vitsparse_jax.runtime import parallel

    experiment = experiments.get(config.experiment)   # an unknown name fails before anything starts
    parallel.initialize_distributed(**config.distributed)   # before anything touches a device
    import jax

    from vitsparse_jax.runtime import session, xla_cache
    from vitsparse_jax.runtime.config_defaults import expand_config_paths

    expand_config_paths(config)   # `~` and $VARS in every path field
    xla_cache.enable(config.get("xla_cache", "auto"))   # before anything compiles
    workdir = Workdir(config.workdir)
    with session.Session(config, workdir, data_identity=_data_identity) as s:
        if s.complete is not None:
            if jax.process_index() == 0:
                print(s.describe_complete(), file=sys.stderr, flush=True)
            return s.complete
        if isinstance(experiment, Experiment):
            with s.final_write():   # all or nothing: the result files, then the marker (resume states stay)
                results, inputs = _execute(experiment, config, workdir)
                s.finish(inputs)
        else:   # its own loop (training)
            results, inputs = experiment.run(config, workdir)
            s.finish(inputs)
    return results


def _data_identity(config: Any) -> str:
    """The identity of config.data's images now (for the 'already complete' check)."""
    from vitsparse_jax import data

    return data.make_eval_source(config.data).identity


def execute(config: Any, workdir: Workdir, *, loaded: Sequence[Any] | None = None, source: Any = None,
            mesh: Any = None, write: bool = True, stop_after_batches: int | None = None) -> dict[str, Any]:
    """One measurement experiment in `workdir` without the session (no lock, no completion marker): for the
    Python API and tests. `loaded`: one LoadedModel per model of the config, in order, instead of loading them;
    `source`: the images instead of config.data's; `write`: the result files (False: only the resume states)."""
    from vitsparse_jax.runtime.workdir import figure_options_of

    experiment = experiments.get(config.experiment)
    if not isinstance(experiment, Experiment):
        raise ValueError(f"{config.experiment!r} runs its own loop; use vitsparse_jax.main.run(config)")
    with figure_options_of(config):   # config.figures / figure_dpi, as in a run (the session sets them there)
        return _execute(experiment, config, workdir, loaded=loaded, source=source, mesh=mesh, write=write,
                        stop_after_batches=stop_after_batches)[0]


# --- the checks before any work -------------------------------------------------------------------------------

@dataclasses.dataclass
class Checked:
    """A run that passed every check: its plan, each item's planned module, the mesh and the data."""

    plan: Plan
    modules: list[Any]
    mesh: Any
    source: Any


def check(config: Any, *, loaded: Sequence[Any] | None = None, source: Any = None, mesh: Any = None) -> Checked:
    """Every check of a run, before any weights are read or anything is computed: the config, every model
    (unknown names, classifier and size against the experiment, weights reachable), the mesh and the batch
    size, the data (not empty, labelled when the experiment needs labels, the experiment's own checks)."""
    from vitsparse_jax import data
    from vitsparse_jax.runtime import parallel

    experiment = experiments.get(config.experiment)
    plan, modules = plan_models(config, loaded=loaded)
    if loaded is None:
        _check_weights(plan.items, config)
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(mesh, int(config.data.batch_size))
    source = data.make_eval_source(config.data) if source is None else source
    if len(source) == 0:
        raise ValueError(f"the dataset {source.name} is empty: no images to measure (check data.source, "
                         "data.split and the subset options)")
    if plan.labelled and source.num_classes == 0:
        raise ValueError(f"the {experiment.name} experiment needs labelled images; {source.name} has no labels. Use "
                         "data.source='folder' with one subfolder per class, or a labelled TFDS dataset")
    experiment.check_data(plan, source, modules)
    return Checked(plan, modules, mesh, source)


def plan_models(config: Any, *, loaded: Sequence[Any] | None = None) -> tuple[Plan, list[Any]]:
    """The experiment's plan of a run and the module each of its models will be loaded as (`loaded`: the
    modules of these), checked against the experiment; no weights are read."""
    from vitsparse_jax.weights import loading

    experiment = experiments.get(config.experiment)
    plan = experiment.check(config)
    if loaded is not None:
        if len(loaded) != len(plan.items):
            raise ValueError(f"{len(loaded)} loaded models given for the {len(plan.items)} models of the config")
        modules = [m.module for m in loaded]
    else:
        modules = [loading.planned_module(item.name, item.weights, config.checkpoint_dir, missing_ok=True,
                                          **item.options) for item in plan.items]
    for item, module in zip(plan.items, modules):
        experiment.check_model(plan, item, module)
    return plan, modules


def _check_weights(items: Sequence[Item], config: Any) -> None:
    """Every model's weights can be found (shapes are checked when each is loaded): the models that share
    config.weights together (one file cannot serve several), the others one by one."""
    from vitsparse_jax.weights import loading

    shared = [item.name for item in items if item.weights == config.weights]
    if shared:
        loading.check_weights(list(dict.fromkeys(shared)), config.weights, config.checkpoint_dir)
    for item in items:
        if item.weights != config.weights and item.weights != loading.UNTRAINED:
            loading.check_weights([item.name], item.weights, config.checkpoint_dir)


# --- the run ----------------------------------------------------------------------------------------------------

class _RunContext(Context):
    def __init__(self, config: Any, source: Any, mesh: Any):
        self.config, self.source, self.mesh = config, source, mesh

    def replicate(self, tree: Any) -> Any:
        from vitsparse_jax.runtime import parallel

        return parallel.replicate(tree, self.mesh)

    def to_host(self, tree: Any) -> Any:
        from vitsparse_jax.runtime import parallel

        return parallel.to_host(tree)

    def batches(self, loaded: Any, start: int, stop: int | None = None,
                batch_size: int | None = None) -> Iterator[dict]:
        from vitsparse_jax import data

        d = self.config.data
        return data.batches(self.source, loaded.pretrained_cfg, int(batch_size or d.batch_size), self.mesh,
                            start=start, stop=stop, cache_dir=d.get("cache_dir") or None,
                            num_workers=d.get("num_workers") or None)

    def image_batch_spec(self, loaded: Any) -> Any:
        import jax

        from vitsparse_jax.runtime import parallel

        size = int(loaded.info.img_size)
        return jax.ShapeDtypeStruct((int(self.config.data.batch_size), size, size, 3), np.uint8,
                                    sharding=parallel.batch_sharding(self.mesh))

    def host_batch(self, loaded: Any, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        size = -(-(stop - start) // self.mesh.size) * self.mesh.size
        batch = self.to_host(next(iter(self.batches(loaded, start, stop, size))))
        return batch, np.flatnonzero(np.asarray(batch["valid"]))

    def weights_key(self, loaded: Any) -> dict[str, Any]:
        from vitsparse_jax.runtime import fingerprint

        return fingerprint.weights(loaded.weights)

    def data_key(self) -> dict[str, Any]:
        from vitsparse_jax.runtime import fingerprint

        return fingerprint.data(self.source)


def context(config: Any, source: Any = None, mesh: Any = None) -> Context:
    """The context an experiment's steps get (config.data's images and every device by default): for the Python
    API and tests of an experiment's parts."""
    from vitsparse_jax import data
    from vitsparse_jax.runtime import parallel

    return _RunContext(config, data.make_eval_source(config.data) if source is None else source,
                       parallel.make_mesh() if mesh is None else mesh)


def _execute(experiment: Experiment, config: Any, workdir: Workdir, *, loaded: Sequence[Any] | None = None,
             source: Any = None, mesh: Any = None, write: bool = True,
             stop_after_batches: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Checks, runs each model's pass and writes the results (process 0); returns the results and the input
    fingerprints of every pass (for the completion marker)."""
    import jax

    from vitsparse_jax.runtime import figure_pool, timing

    timing.start_run()   # where the run's time goes: results.json's `timing`, and one log line
    writer = write and jax.process_index() == 0
    if writer:
        figure_pool.start()   # figure workers come up during the checks and the pass
    try:
        plan, ctx, measured, inputs = _measure(experiment, config, workdir, loaded=loaded, source=source,
                                               mesh=mesh, extras=write, stop_after_batches=stop_after_batches)
        with timing.phase("results"):
            results = experiment.results(plan, measured, ctx)
        if writer:
            with timing.phase("figures"), figure_pool.drawing():   # the result files; report.html: its own phase
                results = experiment.report(plan, measured, results, ctx, workdir)
    finally:
        figure_pool.stop()
    results = {**results, "timing": timing.summary()}
    log.info("%s", timing.describe(results["timing"]))
    if write and jax.process_index() == 0 and workdir.path("results.json").is_file():   # with its timing
        workdir.write_json("results.json", {**workdir.read_json("results.json"), "timing": results["timing"]})
    timing.end_run()
    return results, inputs


def measure(config: Any, workdir: Workdir, *, loaded: Sequence[Any] | None = None, source: Any = None,
            mesh: Any = None, stop_after_batches: int | None = None, depth: int | None = None) -> list[Measured]:
    """Each model's pass of a measurement experiment (resumable in `workdir`), without extras or result files:
    for the Python API and tests (`Measured.result` is the experiment's per-model result). `depth`: batches the
    device runs ahead of the host step (0: the serial pass; default `resumable.PIPELINE_DEPTH`)."""
    experiment = experiments.get(config.experiment)
    return _measure(experiment, config, workdir, loaded=loaded, source=source, mesh=mesh, extras=False,
                    stop_after_batches=stop_after_batches, depth=depth)[2]


def _measure(experiment: Experiment, config: Any, workdir: Workdir, *, loaded: Sequence[Any] | None,
             source: Any, mesh: Any, extras: bool, stop_after_batches: int | None, depth: int | None = None
             ) -> tuple[Plan, Context, list[Measured], list[dict[str, Any]]]:
    """Checks, loads each model once and runs its pass (and its extras)."""
    from vitsparse_jax.runtime import fingerprint, timing

    with timing.phase("checks"):
        checked = check(config, loaded=loaded, source=source, mesh=mesh)
    plan = checked.plan
    ctx = _RunContext(config, checked.source, checked.mesh)
    stop = stop_after_batches if stop_after_batches is not None else experiment.stop_after_batches(config)
    models: dict[tuple, Any] = {}
    measured, inputs = [], {}
    for i, item in enumerate(plan.items):
        with timing.phase("loading"):
            model = loaded[i] if loaded is not None else _load(models, item, config)
            m = experiment.measure(plan, item, model, ctx)
        for entry in fingerprint.inputs(m.key):
            inputs[to_key(entry)] = entry
        result = _pass(m, model, ctx, workdir, stop, depth)
        with timing.phase("extras"):
            more = experiment.extras(plan, item, model, result, ctx) if extras else None
        measured.append(Measured(item, model, result, more))
    return plan, ctx, measured, [inputs[k] for k in sorted(inputs)]


def to_key(entry: Mapping[str, Any]) -> str:
    return "\0".join(f"{k}={entry[k]}" for k in sorted(entry))


def _load(models: dict[tuple, Any], item: Item, config: Any) -> Any:
    """The item's model, loaded once per run (the same name, weights and options are not loaded twice)."""
    from vitsparse_jax.weights.loading import load_model

    key = (item.name, item.weights, tuple(sorted(item.options.items())))
    if key not in models:
        models[key] = load_model(item.name, item.weights, config.checkpoint_dir, config.seed, **item.options)
    return models[key]


def _pass(m: Measurement, model: Any, ctx: _RunContext, workdir: Workdir, stop_after_batches: int | None,
          depth: int | None = None) -> Any:
    """The resumable pass of one model over every image: `m.device` on each global batch, `m.host` on its
    output; returns `m.finish` of the accumulators. A finished pass kept under `m.finished` is read instead. A
    pass in which no image could be read stops the run with the reasons and leaves no state behind. The device
    step of the next batch is dispatched before the host step of this one (`depth` batches ahead, default
    `resumable.PIPELINE_DEPTH`; 0: one batch at a time); with `m.merge` each process's host step takes only its
    own rows."""
    import jax

    from vitsparse_jax.runtime import parallel, resumable, timing

    config, source = ctx.config, ctx.source
    wd = Workdir(workdir.path(m.folder)) if m.folder else workdir
    writer = jax.process_index() == 0
    if writer:
        for old, new in m.renamed:
            _move_renamed(workdir, old, new, m.desc)
    if m.finished:
        result = _read_finished(m, wd, source, resume=bool(config.resume))
        if result is not None:
            log.info("%s: already measured, read from %s", m.desc, m.finished.name)
            return result

    rows, axes = [0], []   # images this process's host step got; the image axis of each output

    def dispatch(batch: Mapping[str, Any]) -> Any:   # returns at once: the device works while the host goes on
        values = m.device(batch)
        if m.merge and jax.process_count() > 1 and not axes:   # for outputs XLA leaves whole on every device
            axes.append((0, 0, parallel.row_axes(m.device, batch, values)))
        return parallel.start_copy_to_host((batch["valid"], batch["index"], values))

    def complete(pending: Any, acc: Accumulators) -> Accumulators:
        t0 = time.perf_counter()
        jax.block_until_ready(pending)
        # with `merge`, this process's rows only (no cross-host copy); else every row (an all-gather)
        valid, index, values = (parallel.local_rows(pending, axes[0] if axes else None) if m.merge
                                else ctx.to_host(pending))
        index = np.asarray(index)
        rows[0] += int((index >= 0).sum())
        t1 = time.perf_counter()
        acc = m.host(values, np.asarray(valid), index, acc)
        timing.note_pass(wait_s=t1 - t0, host_s=time.perf_counter() - t1)
        return acc

    with timing.phase("pass"):
        acc = resumable.run_resumable(
            wd, key=m.key, total=len(source), batch_size=int(config.data.batch_size), resume=config.resume,
            progress=config.progress, desc=m.desc, is_writer=writer, stop_after_batches=stop_after_batches,
            batches_from=lambda start: ctx.batches(model, start), init=m.init, dispatch=dispatch,
            complete=complete, merge=m.merge, depth=resumable.PIPELINE_DEPTH if depth is None else depth,
            source=source)   # each processed image's content digest is kept, and re-checked at resume
    if jax.process_count() > 1:
        log.info("%s: the host step of process %d took %d of the %d images", m.desc, jax.process_index(), rows[0],
                 len(source))
    if m.readable(acc) == 0:
        if writer:
            wd.clear_state()
        raise ValueError(no_readable_image(source))
    result = m.finish(acc)
    if m.finished and writer:   # with the images' content digests, re-checked when it is read back
        arrays, meta = m.finished.save(result)
        digests = wd.load_state()[0][resumable.DIGESTS]
        wd.save_state({**arrays, resumable.DIGESTS: digests},
                      {**meta, "format": resumable.STATE_FORMAT, "fingerprint": resumable.fingerprint(m.key),
                       "key": _json(m.key)}, name=m.finished.name)
        wd.clear_state()
    return result


def _move_renamed(workdir: Workdir, old: str, new: str, desc: str) -> None:
    """Moves a pass's file or folder kept under an older name (`Measurement.renamed`) to its name now, so that
    an interrupted run resumes there (said in the log). When both exist, `new` (written since) is used and
    `old` named as left over."""
    import shutil

    src, dst = workdir.path(old), workdir.path(new)
    if not src.exists():
        return
    if dst.exists():
        log.warning("%s: %s (its name before names carried their tag) is left over beside %s, which is used; "
                    "delete it", desc, src, dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))
    log.info("%s: moved %s to %s (names now carry the tag) and resuming from there", desc, src, dst)


def _json(obj: Any) -> Any:
    import json

    from vitsparse_jax.runtime.workdir import to_json

    return json.loads(to_json(obj))


def _read_finished(m: Measurement, wd: Workdir, source: Any, *, resume: bool) -> Any:
    """The result of a finished pass of this key kept under `m.finished` (process 0 reads the file and sends its
    bytes to every process), or None. One kept with another key, or by an older version, is refused, naming
    what differs; so is one whose images changed since (their content is checked again first)."""
    from vitsparse_jax.runtime import parallel, resumable

    path = wd.path(m.finished.name)
    data, error = b"", None
    if resume and parallel.is_writer():
        try:
            state = wd.load_state(m.finished.name)
            if state is not None:
                resumable.check_state_format(state[1], state[0], path, digests=True)
                resumable.check_state_key(state[1], m.key, path, "a finished measurement")
                data = path.read_bytes()
        except Exception as e:  # noqa: BLE001  (raised below, on every process)
            error = e
    if not parallel.agree(error is None):
        raise error or resumable.StateError(f"process 0 refused {path} (its output says why)")
    size = int(parallel.from_first(np.int64(len(data))))
    if not size:
        return None
    raw = parallel.from_first(np.frombuffer(data, np.uint8) if data else np.zeros(size, np.uint8))
    arrays, meta = Workdir.read_state_bytes(bytes(np.asarray(raw)), path)
    resumable.verify_images(source, arrays.pop(resumable.DIGESTS), path)   # before anything is written
    return m.finished.load(arrays, meta)


def no_readable_image(source: Any) -> str:
    """The message of a pass in which no image could be read: why (the first files and reasons), what to do."""
    skipped = sorted(source.skipped.items())
    reasons = "; ".join(f"{source.key(i)}: {why}" for i, why in skipped[:3])
    return (f"none of the {len(source)} images of {source.name} could be read ({len(skipped)} unreadable"
            f"{': ' + reasons if reasons else ''}{' ...' if len(skipped) > 3 else ''}); check the files (or replace "
            "them), or choose other data (--config.data.*). Nothing was saved: the same command starts over once "
            "the images can be read")


# --- --dry_run ---------------------------------------------------------------------------------------------------

def describe(config: Any) -> str:
    """What a run of `config` would do (`main --dry_run`): nothing is loaded, computed or written."""
    import jax

    from vitsparse_jax.experiments import dry_run

    experiment = experiments.get(config.experiment)
    lines = [f"dry run of experiment {config.experiment!r}: nothing is loaded, computed or written",
             f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
             f"{jax.process_count()} process(es)"]
    done = dry_run.finished_run(config)
    if done is not None:   # a finished run of this config, inputs unchanged: the run would only say so
        return "\n".join([*lines, done, dry_run.workdir_line(config.workdir)]) + "\n"
    if isinstance(experiment, Experiment):
        plan = experiment.check(config)
        modules = [dry_run.planned(item.name, config, item.weights, item.options) for item in plan.items]
        for item, module in zip(plan.items, modules):
            experiment.check_model(plan, item, module)
        n, data_lines = dry_run.data_lines(config.data, int(config.data.batch_size))
        lines += data_lines + experiment.describe(plan, config, n, modules)
    else:
        lines += experiment.describe(config)
    lines.append(dry_run.workdir_line(config.workdir))
    return "\n".join(lines) + "\n"
