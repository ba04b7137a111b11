"""The contract of a measurement experiment. The driver (`experiments/driver.py`) owns everything else: the
mesh and batch check, the data source, loading each model once, the resumable pass, which process writes,
the input fingerprints of the completion marker, and --dry_run.

An experiment is one package `experiments/<name>/` whose `EXPERIMENT` is an `Experiment`:

    class Sharpness(Experiment):
        name = "sharpness"
        result_files = ("results.json", "sharpness.csv")

        def check(self, config):                          # every validation; no weights, no compute
            return Plan(items=(Item(config.model, config.weights),), spec=float(config.sharpness.scale))

        def measure(self, plan, item, loaded, ctx):       # one model: its device step and host step
            fn = jax.jit(lambda v, image: per_image_values(loaded, image, plan.spec))
            variables = ctx.replicate(loaded.variables)
            return Measurement(
                key={"model": loaded.describe(), "weights": ctx.weights_key(loaded), "data": ctx.data_key()},
                device=lambda batch: fn(variables, batch["image"]),     # per-image vectors, never full maps
                init=lambda: {"sum": np.zeros(()), "images": np.zeros((), np.int64)},
                host=add_images,                                         # (reduced, valid, index, acc) -> acc
                readable=lambda acc: int(acc["images"]), desc=f"sharpness {loaded.name}")

        def report(self, plan, measured, ctx):            # process 0 only: the result files
            ...

and one registry entry in `experiments/__init__.py`. The device step runs jitted on global batches (dispatched
ahead: the device computes the next batch while the host works on this one); the host step gets the step's
output as numpy, the `valid` flags (False: padding or an unreadable image) and the global image `index` of each
row, and returns the updated accumulators (numpy arrays only: they are the resume state). With `merge` the host
step gets the rows that live on this process's devices (its share of every batch; every row with one process)
and the driver merges the processes' accumulators; without it, every row of the global batch. `finish(acc)`
turns them into the model's result after the pass.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np

Accumulators = dict[str, np.ndarray]
RESUME_STATE = "resume_state.npz"


@dataclasses.dataclass(frozen=True)
class Item:
    """One model a run measures: one pass over the data."""

    name: str                                   # as listed in the config: arch or arch.tag
    weights: str                                # config.weights, 'untrained', or a checkpoint path
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # load_model keyword arguments
    label: str = ""                             # the experiment's own name for it ('' = the loaded model's)
    step: int | None = None                     # training step of a checkpoint series


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `Experiment.check` found: the models to measure, in order, and the experiment's parsed switches."""

    items: tuple[Item, ...]
    spec: Any = None                            # the experiment's own (Grid, layers, probe options, ...)
    labelled: bool = False                      # the run needs labelled images


@dataclasses.dataclass
class Finished:
    """A finished pass kept in a file of its own, for experiments whose models share one resume state (it is
    dropped when the pass ends): `save(result) -> (arrays, meta)` is what the file keeps, `load(arrays, meta)`
    the model's result again."""

    name: str                                   # file name in the workdir, e.g. 'rf_done/<label>.npz'
    save: Callable[[Any], tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]
    load: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], Any]


@dataclasses.dataclass
class Measurement:
    """One model's pass: what determines it, the device step, the host step and what the pass returns."""

    key: Mapping[str, Any]                      # results-relevant config, weights and data fingerprints
    device: Callable[[Mapping[str, Any]], Any]  # jitted: global batch -> per-image values (leading axis = rows)
    init: Callable[[], Accumulators]
    host: Callable[[Any, np.ndarray, np.ndarray, Accumulators], Accumulators]   # (values, valid, index, acc)
    readable: Callable[[Accumulators], int]     # images read so far (0 at the end: the run stops, says why)
    desc: str = ""                              # progress bar and log lines
    finish: Callable[[Accumulators], Any] = lambda acc: acc
    folder: str = ""                            # workdir subfolder of its resume state ('' = the workdir)
    renamed: tuple[tuple[str, str], ...] = ()   # (old, new) paths in the workdir of this pass's files under
                                                # an older naming: the driver moves them before the pass
    finished: Finished | None = None
    # (a, b) -> the accumulators of the images of a and of b together (disjoint images, e.g. two processes'
    # shares of the same batches), exact and in image order (ordered sums: `OrderedSums.merge`; rows indexed by
    # the global image index: by their done flags; counts add). Given, each process's host step gets only the
    # rows on its own devices and the driver merges the accumulators at each save and at the end; None: every
    # process's host step gets every row of every batch (an all-gather per batch).
    merge: Callable[[Accumulators, Accumulators], Accumulators] | None = None


class Context(abc.ABC):
    """What the driver gives an experiment: the config, the data and the mesh, without deciding anything about
    processes (every call is made by every process in the same order)."""

    config: Any
    source: Any                                 # vitsparse_jax.data.Source

    @abc.abstractmethod
    def replicate(self, tree: Any) -> Any:
        """Host arrays (the same on every process) placed on every device."""

    @abc.abstractmethod
    def to_host(self, tree: Any) -> Any:
        """Global arrays -> numpy, whole, on every process."""

    @abc.abstractmethod
    def batches(self, loaded: Any, start: int, stop: int, batch_size: int | None = None) -> Iterator[dict]:
        """Global batches of images [start, stop) preprocessed for `loaded` (run's batch size by default)."""

    @abc.abstractmethod
    def host_batch(self, loaded: Any, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Images [start, stop) as one numpy batch (padded to the mesh) and the rows that hold readable images."""

    @abc.abstractmethod
    def image_batch_spec(self, loaded: Any) -> Any:
        """The pass's image batch in the abstract (jax.ShapeDtypeStruct: global shape, uint8, sharding): an
        abstract evaluation of the device step with it is the one the pass then reuses (no second trace)."""

    @abc.abstractmethod
    def weights_key(self, loaded: Any) -> dict[str, Any]:
        """The weights' content fingerprint for resume keys."""

    @abc.abstractmethod
    def data_key(self) -> dict[str, Any]:
        """The images' identity for resume keys."""


@dataclasses.dataclass
class Measured:
    """One item after its pass: the loaded model's description, the pass's result and the extras."""

    item: Item
    loaded: Any                                 # LoadedModel (variables may be dropped after the run)
    result: Any                                 # Measurement.finish(acc)
    extras: Any = None


class Experiment(abc.ABC):
    """A measurement experiment (see the module docstring)."""

    name: ClassVar[str]
    result_files: ClassVar[tuple[str, ...]] = ("results.json",)   # named by the line that ends a run, in order

    @abc.abstractmethod
    def check(self, config: Any) -> Plan:
        """Every check of the config that needs no model and no data; the models to measure."""

    def check_model(self, plan: Plan, item: Item, module: Any) -> None:
        """Checks against the module the item will be loaded as (its classifier, size, layers), before any
        weights are read."""

    def check_data(self, plan: Plan, source: Any, modules: Sequence[Any]) -> None:
        """Checks against the data (e.g. an example index in range), before any weights are read."""

    def describe(self, plan: Plan, config: Any, images: int | None, modules: Sequence[Any]) -> list[str]:
        """--dry_run: what the run would do, beyond the data line (`modules`: each item's planned module)."""
        return []

    @abc.abstractmethod
    def measure(self, plan: Plan, item: Item, loaded: Any, ctx: Context) -> Measurement:
        """The pass of one loaded model."""

    def extras(self, plan: Plan, item: Item, loaded: Any, result: Any, ctx: Context) -> Any:
        """Small device work after the pass (example maps, explorer data); every process calls it."""
        return None

    def stop_after_batches(self, config: Any) -> int | None:
        """Test hook: stop as if interrupted after this many batches of each pass."""
        return None

    @abc.abstractmethod
    def results(self, plan: Plan, measured: Sequence[Measured], ctx: Context) -> dict[str, Any]:
        """The run's results (what results.json holds), on every process."""

    @abc.abstractmethod
    def report(self, plan: Plan, measured: Sequence[Measured], results: dict[str, Any], ctx: Context,
               workdir: Any) -> dict[str, Any]:
        """Writes the result files (process 0 only); returns the results as written."""


class Standalone(abc.ABC):
    """An experiment with its own loop (training): the driver only finds it, dry-runs it and runs it."""

    name: ClassVar[str]
    result_files: ClassVar[tuple[str, ...]] = ("results.json",)

    @abc.abstractmethod
    def describe(self, config: Any) -> list[str]:
        """--dry_run lines."""

    @abc.abstractmethod
    def run(self, config: Any, workdir: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The whole run: its results and the fingerprints of its inputs (`runtime.fingerprint.inputs` of its
        keys), for the completion marker."""
