"""Experiment 'train': trains a model of the project with optax, data parallel over the 'data' mesh.

AdamW (decoupled weight decay on kernels only) with linear warmup + cosine decay, optional label
smoothing and random-shift augmentation on device. Parameters are replicated, batches sharded. Every
`checkpoint_every` steps the full train state (params, batch_stats, opt_state, step, data position) is
written atomically to `<workdir>/checkpoints/` together with a converted checkpoint
(`<arch>.<tag>_step0000500.safetensors`, loadable with `loading.load_model(arch, weights=path)`), so a
run leaves a series of checkpoints: `series.json`, read with `checkpoint_series(workdir)`. Running the
same command on the same workdir resumes from the last train state at the same step and data position.
Data order: epoch e visits the training split in the order `numpy.random.default_rng([seed, e])
.permutation(n)`, so it depends on neither the device count nor on interruptions.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from vitsparse_jax import data
from vitsparse_jax.runtime import fingerprint as input_fingerprint
from vitsparse_jax.runtime import parallel, resumable
from vitsparse_jax.runtime import stopping as stop_signals
from vitsparse_jax.runtime.errors import StateError
from vitsparse_jax.runtime.workdir import Workdir, atomic_write_bytes, to_json
from vitsparse_jax.weights import checkpoint, loading

if TYPE_CHECKING:   # only the experiment's run needs ml_collections; importing the module does not
    import ml_collections

log = logging.getLogger(__name__)
Array = jax.Array
STATE_DIR = "checkpoints"
STATE_GLOB = "train_state_*.msgpack"
# config.train keys that do not change the trained weights (may differ when a run is resumed)
BOOKKEEPING = ("eval_every", "checkpoint_every", "export_dir", "tag")
EMBED_PARAMS = ("pos_embed", "cls_token", "dist_token")
LOG_EVERY = 50  # steps between train-loss log points (without an evaluation)


@flax.struct.dataclass
class TrainState:
    step: Array          # int32 scalar: number of optimizer steps done
    params: Any
    batch_stats: Any     # {} for models without BatchNorm
    opt_state: Any


# ------------------------------------------------------------------------------------------ optimizer

def decay_mask(params: Any) -> Any:
    """True for the kernels of Dense/Conv layers; biases, norms, tokens and position embeddings get no decay."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def embed_mask(params: Any) -> Any:
    """True for the position embedding and the prefix tokens (top-level ViT parameters)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[0], "key", None) in EMBED_PARAMS, params)


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW on a linear warmup (from 0) + cosine decay (to lr * end_lr_factor) schedule over tc.steps.

    tc.embed_lr_mult scales the updates of pos_embed / cls_token / dist_token: their timm init (std .02)
    is small next to the patch features, and with pixel-sized patches the model can do nothing until it
    has learnt where each patch is.
    """
    warmup = min(tc.warmup_steps, tc.steps // 2)
    if warmup != tc.warmup_steps:
        log.warning("warmup_steps=%d >= steps/2 for steps=%d: using %d warmup steps", tc.warmup_steps, tc.steps,
                    warmup)
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, 1), tc.lr * tc.end_lr_factor)
    chain = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip > 0 else []
    chain.append(optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))
    if tc.embed_lr_mult != 1:
        chain.append(optax.masked(optax.scale(tc.embed_lr_mult), embed_mask))
    return optax.chain(*chain)


# --------------------------------------------------------------------------------------- train / eval

def random_shift(images: Array, key: Array, max_shift: int) -> Array:
    """Translates each (B, H, W, C) image by up to `max_shift` pixels in each direction (edge padding)."""
    if max_shift <= 0:
        return images
    b, h, w, c = images.shape
    s = max_shift
    padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * s + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def cross_entropy(logits: Array, labels: Array, smoothing: float = 0.0) -> Array:
    """Per-example softmax cross entropy with label smoothing; labels < 0 (padding) give a finite dummy."""
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _weighted_mean(values: Array, weights: Array) -> Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _example_weights(batch: Mapping[str, Array]) -> Array:
    """1 for labelled, decoded images; 0 for padding and unreadable images."""
    return (batch["valid"] & (batch["label"] >= 0)).astype(jnp.float32)


def make_train_step(module: flax.linen.Module, tx: optax.GradientTransformation, pretrained_cfg: Mapping,
                    tc: ml_collections.ConfigDict, seed: int) -> Callable[[TrainState, dict], tuple]:
    """(state, batch) -> (state, {'loss', 'accuracy'}); `module` in training mode (BatchNorm batch stats)."""
    mean_std = {"mean": pretrained_cfg["mean"], "std": pretrained_cfg["std"]}

    def train_step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)   # augmentation keyed by (seed, step)
        shift_key, dropout_key = jax.random.split(key)
        images = data.normalize(random_shift(batch["image"], shift_key, tc.shift), mean_std)
        weights = _example_weights(batch)

        def loss_fn(params: Any) -> tuple[Array, tuple[Any, Array]]:
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
                (logits, _), updated = module.apply(variables, images, mutable=["batch_stats"],
                                                    rngs={"dropout": dropout_key})
                batch_stats = updated["batch_stats"]
            else:
                logits, _ = module.apply(variables, images, rngs={"dropout": dropout_key})
                batch_stats = state.batch_stats
            loss = _weighted_mean(cross_entropy(logits, batch["label"], tc.label_smoothing), weights)
            return loss, (batch_stats, logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = _weighted_mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32), weights)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return train_step


def make_eval_step(module: flax.linen.Module, pretrained_cfg: Mapping) -> Callable[[Any, dict], dict]:
    """(variables, batch) -> sums {'correct', 'count', 'loss'} over the batch's labelled images."""
    mean_std = {"mean": pretrained_cfg["mean"], "std": pretrained_cfg["std"]}

    def eval_step(variables: Any, batch: dict[str, Array]) -> dict[str, Array]:
        logits, _ = module.apply(variables, data.normalize(batch["image"], mean_std))
        weights = _example_weights(batch)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * weights), "count": jnp.sum(weights),
                "loss": jnp.sum(cross_entropy(logits, batch["label"]) * weights)}

    return eval_step


def evaluate(eval_step: Callable, variables: Any, batches: Iterator[dict]) -> dict[str, float]:
    """Top-1 accuracy and mean loss over all batches (padding and unreadable images excluded)."""
    total: dict[str, Array] | None = None
    for batch in batches:
        sums = eval_step(variables, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ValueError("the evaluation split is empty")
    total = parallel.to_host(total)
    count = float(total["count"])
    if count == 0:
        raise ValueError("the evaluation split has no labelled, readable images")
    return {"accuracy": float(total["correct"]) / count, "loss": float(total["loss"]) / count,
            "images": int(count)}


# ------------------------------------------------------------------------------------------ data order

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the n training images."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(source: data.Source, pretrained_cfg: Mapping, batch_size: int, mesh: Mesh, seed: int,
                  start_step: int, **kwargs: Any) -> Iterator[dict[str, Array]]:
    """Full batches from step `start_step` on, forever; each epoch drops its last incomplete batch."""
    steps_per_epoch = len(source) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training split {source.name} has {len(source)} images, fewer than "
                         f"train.batch_size={batch_size}")
    epoch, position = divmod(start_step, steps_per_epoch)
    while True:
        shuffled = data.Subset(source, epoch_order(seed, epoch, len(source)), f"epoch {epoch}")
        yield from data.batches(shuffled, pretrained_cfg, batch_size, mesh, start=position * batch_size,
                                stop=steps_per_epoch * batch_size, **kwargs)
        epoch, position = epoch + 1, 0


# ---------------------------------------------------------------------------------------- checkpoints

def _state_path(workdir: Workdir, step: int) -> Path:
    return workdir.path(STATE_DIR) / f"train_state_{step:07d}.msgpack"


def saved_states(workdir: Workdir) -> list[Path]:
    """Train-state files in the workdir, oldest first."""
    return sorted(workdir.path(STATE_DIR).glob(STATE_GLOB))


def save_state(workdir: Workdir, state: TrainState, meta: Mapping[str, Any]) -> Path:
    """Writes the train state + meta (JSON) atomically in one msgpack file; removes older ones."""
    host = jax.device_get(state)
    payload = {"state": flax.serialization.to_state_dict(host), "meta": json.dumps(meta)}
    step = int(host.step)
    path = atomic_write_bytes(_state_path(workdir, step), flax.serialization.msgpack_serialize(payload))
    for old in saved_states(workdir):
        if old != path:
            old.unlink()
    return path


def restore_state(path: Path, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """The host train state and meta saved in `path`; `template` gives the tree structure."""
    payload = flax.serialization.msgpack_restore(path.read_bytes())
    return flax.serialization.from_state_dict(template, payload["state"]), json.loads(payload["meta"])


def checkpoint_series(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The converted checkpoints a training run wrote, by step: [{'step', 'path' (absolute), 'accuracy',
    'loss', 'images'}], from `<workdir>/series.json`."""
    root = Path(workdir)
    index = root / "series.json"
    if not index.exists():
        raise FileNotFoundError(f"{index} does not exist: {root} is not the workdir of a training run "
                                "(python -m vitsparse_jax.main --config=configs/train.py --config.workdir=...)")
    series = json.loads(index.read_text())
    return sorted(({**e, "path": str((root / e["path"]).resolve())} for e in series), key=lambda e: e["step"])


# ---------------------------------------------------------------------------------------------- run

@dataclasses.dataclass
class _Setup:
    """Everything `run` builds from the config before the first step."""
    loaded: loading.LoadedModel
    train_module: flax.linen.Module
    pretrained_cfg: dict
    tx: optax.GradientTransformation
    mesh: Mesh
    train_source: data.Source
    eval_source: data.Source


def _data_config(config: ml_collections.ConfigDict, split: str) -> ml_collections.ConfigDict:
    import ml_collections

    cfg = ml_collections.ConfigDict(config.data.to_dict())
    cfg.split = split
    return cfg


def _setup(config: ml_collections.ConfigDict) -> _Setup:
    tc = config.train
    overrides = loading.config_options(config)   # img_size, num_classes, head_weights of the shared config
    if tc.num_classes:
        if overrides.get("num_classes", tc.num_classes) != tc.num_classes:
            raise ValueError(f"train.num_classes={tc.num_classes} and num_classes={overrides['num_classes']} "
                             f"disagree; set one of them")
        overrides["num_classes"] = tc.num_classes
    loaded = loading.load_model(config.model, weights=config.weights, checkpoint_dir=config.checkpoint_dir,
                                seed=config.seed, **overrides)
    module = loaded.module
    train_module = module.clone(train=True) if "train" in {f.name for f in dataclasses.fields(module)} else module
    pretrained_cfg = {**loaded.pretrained_cfg, "tag": tc.tag, "num_classes": loaded.info.num_classes}
    mesh = parallel.make_mesh()
    parallel.check_batch_size(mesh, tc.batch_size)
    parallel.check_batch_size(mesh, config.data.batch_size)
    train_source = data.make_eval_source(_data_config(config, tc.split))
    eval_source = data.make_eval_source(_data_config(config, config.data.split))
    return _Setup(loaded, train_module, pretrained_cfg, make_optimizer(tc), mesh, train_source, eval_source)


def _train_key(config: ml_collections.ConfigDict, s: _Setup) -> dict[str, Any]:
    """What determines the trained weights (config, the starting weights' content, the images); a resumed
    run must match it."""
    skip_data = ("batch_size", "num_workers", "cache_dir")
    return json.loads(to_json({
        "model": config.model, "weights": config.weights, "seed": config.seed,
        "start": input_fingerprint.weights(s.loaded.weights),
        "train": {k: v for k, v in config.train.items() if k not in BOOKKEEPING},
        "data": {k: v for k, v in config.data.items() if k not in skip_data},
        "images": {"train": input_fingerprint.data(s.train_source), "eval": input_fingerprint.data(s.eval_source)}}))


def _describe_training(config: ml_collections.ConfigDict, s: _Setup, step: int,
                       result: Mapping[str, float]) -> str:
    """The `source` text of an exported checkpoint: how it was trained, and its held-out accuracy."""
    tc = config.train
    embed = f", x{tc.embed_lr_mult} on pos_embed/cls_token" if tc.embed_lr_mult != 1 else ""
    return (f"trained by vitsparse_jax.experiments.train.run (configs/train.py) from {s.loaded.weights} "
            f"on {s.train_source.name} "
            f"({len(s.train_source)} images): seed {config.seed}, step {step} of {tc.steps}, batch {tc.batch_size} "
            f"on {jax.device_count()} {jax.default_backend()} device(s), AdamW lr {tc.lr} (warmup {tc.warmup_steps}, "
            f"cosine{embed}), weight decay {tc.weight_decay}, label smoothing {tc.label_smoothing}, shift "
            f"{tc.shift}, optax {metadata.version('optax')}; held-out {s.eval_source.name} top-1 "
            f"{result['accuracy']:.4f} ({result['images']} images)")


def _initial_state(config: ml_collections.ConfigDict, s: _Setup, workdir: Workdir,
                   is_writer: bool, inputs: list[dict[str, Any]]) -> tuple[TrainState, dict[str, Any]]:
    """The last saved train state and its meta when resuming, else a fresh state at step 0; `inputs` gets the
    weights and data fingerprints of the run's key (for the completion marker)."""
    variables = s.loaded.variables
    host_state = TrainState(step=np.zeros((), np.int32), params=variables["params"],
                            batch_stats=variables.get("batch_stats", {}), opt_state=s.tx.init(variables["params"]))
    key = _train_key(config, s)
    fingerprint = resumable.fingerprint(key)
    inputs.extend(input_fingerprint.inputs(key))
    existing = saved_states(workdir)
    if existing and config.resume:
        try:
            host_state, meta = restore_state(existing[-1], jax.device_get(host_state))
        except Exception as e:  # noqa: BLE001  (msgpack / flax errors of a damaged file)
            raise StateError(f"the saved train state {existing[-1]} cannot be read ({type(e).__name__}: {e}); "
                             f"it is damaged. Delete it to resume from the one before or start over "
                             f"(rm {existing[-1]}), or rerun with --config.resume=False.") from e
        resumable.check_state_key(meta, key, existing[-1])
        log.info("resuming from %s at step %d", existing[-1], int(host_state.step))
        return host_state, meta
    if existing and is_writer:  # starting over: the old states must not be resumed later
        for path in existing:
            path.unlink()
    return host_state, {"fingerprint": fingerprint, "key": key, "history": [], "series": []}


def run(config: ml_collections.ConfigDict, workdir: Workdir, *, stop_after_steps: int | None = None,
        inputs: list[dict[str, Any]] | None = None) -> dict:
    """Trains config.model per config.train; returns the results (also written to the workdir).

    stop_after_steps: stop as if interrupted after that many steps of this call (saving the state and
    raising `resumable.Interrupted`); for tests of resuming and for time-sliced jobs.
    inputs: a list that gets the weights and data fingerprints of the run (for the completion marker).
    """
    tc = config.train
    if tc.steps <= 0:
        raise ValueError(f"train.steps must be positive, got {tc.steps}")
    s = _setup(config)
    is_writer = jax.process_index() == 0
    data_kwargs = {"num_workers": config.data.get("num_workers") or None,
                   "cache_dir": config.data.get("cache_dir") or None}

    host_state, meta = _initial_state(config, s, workdir, is_writer, [] if inputs is None else inputs)
    start_step = int(host_state.step)

    repl = parallel.replicated_sharding(s.mesh)
    state = parallel.replicate(host_state, s.mesh)
    train_step = jax.jit(make_train_step(s.train_module, s.tx, s.pretrained_cfg, tc, config.seed),
                         out_shardings=(repl, repl), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(s.loaded.module, s.pretrained_cfg), out_shardings=repl)

    def eval_variables(state: TrainState) -> dict[str, Any]:
        return {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}

    def run_eval(state: TrainState) -> dict[str, float]:
        batches = data.batches(s.eval_source, s.pretrained_cfg, config.data.batch_size, s.mesh, **data_kwargs)
        return evaluate(eval_step, eval_variables(state), batches)

    steps_per_epoch = len(s.train_source) // tc.batch_size

    def save(state: TrainState, step: int, result: Mapping[str, float]) -> None:
        """Train state + a converted checkpoint of this step (the series for locality over training)."""
        tag = f"{tc.tag}_step{step:07d}"
        path = f"{STATE_DIR}/{s.loaded.arch}.{tag}.safetensors"   # relative to the workdir
        entry = {"step": step, "path": path, **result}
        meta["series"] = [e for e in meta["series"] if e["step"] != step] + [entry]
        meta["data_position"] = dict(zip(("epoch", "step_in_epoch"), divmod(step, steps_per_epoch)))
        if is_writer:
            checkpoint.save(workdir.path(STATE_DIR), s.loaded.arch, tag, jax.device_get(eval_variables(state)),
                            s.pretrained_cfg, _describe_training(config, s, step, result))
            save_state(workdir, state, meta)
            workdir.write_json("series.json", meta["series"])
            workdir.write_csv("metrics.csv", meta["history"])

    if start_step == 0:  # the initialisation is the first point of the series
        save(state, 0, run_eval(state))

    batches = train_batches(s.train_source, s.pretrained_cfg, tc.batch_size, s.mesh, config.seed, start_step,
                            **data_kwargs)
    pending: list[dict[str, Array]] = []   # train metrics since the last log point, still on device
    bar = tqdm(total=tc.steps, initial=start_step, desc=f"train {s.loaded.arch}", unit="step",
               disable=not (config.progress and is_writer), dynamic_ncols=True)
    t0, step = time.monotonic(), start_step
    with stop_signals.handle_signals(), bar:
        while step < tc.steps:
            state, metrics = train_step(state, next(batches))
            pending.append(metrics)
            step += 1
            bar.update(1)
            signum = stop_signals.agreed_stop()   # SIGTERM / Ctrl-C on any process: all stop at this step
            stopping = bool(signum) or (stop_after_steps is not None and step - start_step >= stop_after_steps)
            do_save = step == tc.steps or stopping or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
            do_eval = do_save or (tc.eval_every and step % tc.eval_every == 0)
            if not (do_eval or step % LOG_EVERY == 0):
                continue
            avg = jax.tree.map(lambda *x: float(np.mean(x)), *parallel.to_host(pending))
            pending = []
            row = {"step": step, "train_loss": avg["loss"], "train_accuracy": avg["accuracy"]}
            if do_eval:
                result = run_eval(state)
                row.update(eval_loss=result["loss"], eval_accuracy=result["accuracy"])
                log.info("step %d: train loss %.4f, held-out top-1 %.4f", step, avg["loss"], result["accuracy"])
            meta["history"].append(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "step"})
            if do_save:
                save(state, step, result)
            if stopping and step < tc.steps:
                raise resumable.Interrupted(f"stopped ({stop_signals.name(signum)}) at step {step} of {tc.steps}; the "
                                            f"state is saved in {workdir.root}: run the same command again to "
                                            "continue", signum=signum, done=step, total=tc.steps,
                                            where=str(workdir.root))
    wall_s = time.monotonic() - t0

    final = meta["series"][-1]   # the state at tc.steps (also when a finished run is started again)
    results = {"model": s.loaded.arch, "tag": tc.tag, "steps": tc.steps, "start_step": start_step,
               "seed": config.seed, "train_images": len(s.train_source), "eval_split": s.eval_source.name,
               "eval_images": final["images"], "accuracy": final["accuracy"], "eval_loss": final["loss"],
               "wall_s_this_run": wall_s, "devices": jax.device_count(), "series": meta["series"]}
    if is_writer:
        export_dir = tc.export_dir or str(workdir.root)
        results["checkpoint"] = str(checkpoint.save(export_dir, s.loaded.arch, tc.tag,
                                                    jax.device_get(eval_variables(state)), s.pretrained_cfg,
                                                    _describe_training(config, s, tc.steps, final)))
        workdir.write_json("results.json", results)
        workdir.write_text("report.md", _report(results))
    return results


def _report(r: Mapping[str, Any]) -> str:
    return (f"# Training {r['model']}.{r['tag']}\n\n"
            f"- {r['steps']} steps (this run started at step {r['start_step']}), seed {r['seed']}, "
            f"{r['train_images']} training images, {r['devices']} device(s)\n"
            f"- held-out top-1 on {r['eval_split']} ({r['eval_images']} images): **{r['accuracy']:.4f}**\n"
            f"- checkpoint: `{r.get('checkpoint', '')}`; series of {len(r['series'])} checkpoints in "
            f"`series.json` (for locality over training)\n")
