"""Experiment: gradient receptive fields of every layer and their locality (paper 2; SPEC section 5).

`run` measures every model of the config (trained and untrained twins) and, optionally, a series of
training checkpoints, over the images of config.data; the gradient program is in
`receptive_field_grad`, the result files in `receptive_field_report`, the figures in
`figures/receptive_field`.
"""
from __future__ import annotations

import glob
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import data, models
from vitsparse_jax.experiments.receptive_field import locality
from vitsparse_jax.experiments.receptive_field.grad import (  # noqa: F401  (re-exported: the public API of the experiment)
    LOGITS,
    Layer,
    default_layers,
    layer_group,
    layer_specs,
    make_rf_fn,
    receptive_field_maps,
    relative_depth,
    select_layers,
    valid_layers,
)
from vitsparse_jax.experiments.receptive_field.report import DECISIONS, Measured, result_json, write_outputs
from vitsparse_jax.runtime import fingerprint as input_fingerprint
from vitsparse_jax.runtime import parallel, resumable
from vitsparse_jax.runtime.workdir import Workdir, to_json, versions
from vitsparse_jax.weights.loading import UNTRAINED, LoadedModel, config_options, load_model, planned_module

log = logging.getLogger(__name__)

# config.data fields that do not change the results (a run may resume with other values)
DATA_FIELDS_NOT_IN_RESULTS = ("batch_size", "cache_dir", "num_workers", "data_dir", "manual_dir", "prefetch")
DONE_DIR = "rf_done"            # finished per-model accumulators, so that an interrupted run resumes


# ------------------------------------------------------------------------------------------------------
# One model over the dataset (resumable)

def _model_meta(loaded: LoadedModel, listed: str) -> dict[str, Any]:
    """What results record about a model; `listed` = its name in the config (the same for both twins)."""
    return {**loaded.describe(), "name": loaded.name, "listed": listed, "arch": loaded.arch,
            "trained": loaded.trained}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def measure(loaded: LoadedModel, listed: str, label: str, config: Any, workdir: Workdir, source: Any,
            mesh: Any, step: int | None = None) -> Measured:
    """Mean receptive-field maps of every requested layer of one model over the images of `source`."""
    rf = config.receptive_field
    fraction = locality.check_fraction(rf.fraction)
    cfg = loaded.pretrained_cfg
    size = int(cfg.get("input_size", (3, loaded.info.img_size, loaded.info.img_size))[-1])
    image_hw = (size, size)
    names = select_layers(loaded.info, as_list(rf.layers))
    layers = layer_specs(loaded.module, loaded.variables, loaded.info, names, fraction, image_hw)
    data_key = {k: v for k, v in config.data.to_dict().items() if k not in DATA_FIELDS_NOT_IN_RESULTS}
    key = {"model": loaded.describe(), "weights": input_fingerprint.weights(loaded.weights), "label": label,
           "layers": names, "fraction": fraction, "data": data_key, "images": input_fingerprint.data(source),
           "step": step}
    fingerprint = resumable.fingerprint(key)
    done_name = f"{DONE_DIR}/{_slug(label)}.npz"
    model = _model_meta(loaded, listed)

    # a finished measurement: the same key, or a refusal naming what differs (process 0 decides for all)
    saved, error = None, None
    if config.resume and jax.process_index() == 0:
        try:
            saved = workdir.load_state(done_name)
            if saved is not None:
                resumable.check_state_key(saved[1], key, workdir.path(done_name), "a finished measurement")
        except Exception as e:  # noqa: BLE001  (raised below, on every process)
            error = e
    if not parallel.from_first(np.int32(error is None)):
        raise error or resumable.StateError(f"process 0 refused {workdir.path(done_name)} (its output says why)")
    if parallel.from_first(np.int32(saved is not None)):
        maps = np.zeros((len(layers), *image_hw)) if saved is None else np.asarray(saved[0]["maps"], np.float64)
        meta = {} if saved is None else saved[1]
        maps, counts = parallel.from_first((maps, np.array([meta.get("num_images", 0), meta.get("num_skipped", 0)])))
        input_fingerprint.record(json.loads(to_json(key)))
        log.info("%s: already measured, read from %s", label, done_name)
        return Measured(model, label, layers, maps, int(counts[0]), image_hw, step, skipped=int(counts[1]))

    batch_size = int(config.data.batch_size)
    norm = (tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])))
    fn = make_rf_fn(loaded.module, tuple(layers), loaded.info.num_prefix_tokens, int(rf.chunk_size), norm,
                    per_image=True)
    variables = parallel.replicate(loaded.variables, mesh)

    def process(batch: dict[str, Any], acc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        maps, valid = parallel.to_host((fn(variables, batch["image"], batch["valid"].astype(jnp.float32)),
                                        batch["valid"]))
        for i in np.flatnonzero(valid):   # one image at a time, in dataset order: any batch split, same sums
            acc["maps"] += maps[:, i]
            acc["count"] += 1
        index = parallel.to_host(batch["index"])
        acc["skipped"] += np.sum((index >= 0) & ~np.asarray(valid))   # unreadable images: counted, not dropped
        return acc

    total = len(source)
    acc = resumable.run_resumable(
        workdir, key=key, total=total, batch_size=batch_size, resume=config.resume, progress=config.progress,
        batches_from=lambda start: data.batches(source, cfg, batch_size, mesh, start=start,
                                                cache_dir=config.data.get("cache_dir") or None,
                                                num_workers=config.data.get("num_workers") or None),
        init=lambda: {"maps": np.zeros((len(layers), *image_hw)), "count": np.zeros(()), "skipped": np.zeros(())},
        process=process, desc=f"receptive fields {label}", is_writer=jax.process_index() == 0)
    count, skipped = int(acc["count"]), int(acc["skipped"])
    if count == 0:
        reasons = "; ".join(f"image {i}: {why}" for i, why in sorted(source.skipped.items())[:3])
        raise ValueError(f"none of the {total} images of {source.name} could be read ({skipped} unreadable"
                         f"{': ' + reasons if reasons else ''}); check the files, or choose other data "
                         "(--config.data.*)" if total else f"no images in {source.name}")
    if skipped:
        log.warning("%s: %d of %d images could not be read and are left out", label, skipped, total)
    maps = acc["maps"] / count
    if jax.process_index() == 0:
        workdir.save_state({"maps": maps}, {"fingerprint": fingerprint, "num_images": count, "num_skipped": skipped,
                                            "key": json.loads(to_json(key))}, name=done_name)
        workdir.clear_state()
    return Measured(model, label, layers, maps, count, image_hw, step, skipped=skipped)


# ------------------------------------------------------------------------------------------------------
# Config parsing: models, variants, checkpoint series

def as_list(value: str | Iterable[str] | None) -> list[str]:
    """'a, b' or ('a', 'b') -> ['a', 'b']."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()]


def model_variants(config: Any) -> list[tuple[str, str]]:
    """(model name, weights) pairs: every model of receptive_field.models (default: config.model), trained
    (config.weights) and/or untrained (timm init, config.seed), as receptive_field.variants says."""
    names = as_list(config.receptive_field.models) or [config.model]
    variants = as_list(config.receptive_field.variants)
    unknown = set(variants) - {"trained", "untrained"}
    if unknown or not variants:
        raise ValueError(f"receptive_field.variants={config.receptive_field.variants!r}: use 'trained', "
                         f"'untrained' or both, comma-separated")
    return [(name, config.weights if v == "trained" else UNTRAINED) for name in names for v in variants]


def _find(path: Path, folder: Path) -> Path:
    """`path` as written by train.py (relative to where it ran), else the same file next to `folder`."""
    for candidate in (path, folder / path, folder / "checkpoints" / path.name, folder / path.name):
        if candidate.exists():
            return candidate
    return path


def _series_entries(item: str) -> list[tuple[int | None, Path]]:
    """(step or None, path) of one entry of receptive_field.checkpoints."""
    path = Path(item)
    if path.is_dir():   # a training workdir: its series.json, else the checkpoints in it
        listing = path / "series.json"
        if listing.exists():
            return _series_entries(str(listing))
        found = sorted((path / "checkpoints").glob("*.safetensors")) or sorted(path.glob("*.safetensors"))
        if not found:
            raise FileNotFoundError(f"receptive_field.checkpoints: no series.json and no .safetensors in {path}")
        return [(None, p) for p in found]
    if path.suffix == ".json" and path.exists():
        listing = json.loads(path.read_text())
        if isinstance(listing, list):   # train.py's series.json: [{"step": s, "path": p, ...}, ...]
            return [(int(e["step"]), _find(Path(e["path"]), path.parent)) for e in listing]
    found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    if not found:
        raise FileNotFoundError(f"receptive_field.checkpoints: {item!r} matches no file")
    return [(None, Path(p)) for p in found]


def checkpoint_series(spec: str | Iterable[str]) -> list[tuple[int, Path]]:
    """(training step, .safetensors path) of a series, sorted by step. `spec`: comma-separated paths, globs,
    train.py's series.json or a training workdir. The step is the one in series.json, else the JSON
    sidecar's 'step', else the last number in the file name (`<arch>.<tag>_step0000500.safetensors`)."""
    series: dict[Path, int] = {}
    for item in as_list(spec):
        for step, path in _series_entries(item):
            path = path.with_suffix(".safetensors")   # a checkpoint's .json names its weights
            if not path.exists():
                raise FileNotFoundError(f"receptive_field.checkpoints: {path} does not exist")
            if step is None:
                meta_path = path.with_suffix(".json")
                meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
                step = meta.get("step")
            if step is None:
                numbers = re.findall(r"\d+", path.stem.split(".")[-1]) or re.findall(r"\d+", path.stem)
                if not numbers:
                    raise ValueError(f"{path}: no training step in series.json, in its .json ('step') "
                                     f"or in the file name")
                step = numbers[-1]
            series[path] = int(step)
    return sorted((step, path) for path, step in series.items())


def check_layers(config: Any) -> None:
    """Fails fast, before any weights are loaded, on a layer pattern that some model of the run lacks."""
    patterns = as_list(config.receptive_field.layers)
    options = config_options(config)   # the image size and classifier asked for (a bad size errors here)
    for name, weights in dict.fromkeys(model_variants(config)):
        module = planned_module(name, weights, config.checkpoint_dir, missing_ok=True, **options)
        select_layers(models.model_info(module), patterns)


def checkpoint_model(path: Path, default: str) -> str:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return meta.get("model") or default


def run(config: Any, workdir: Workdir) -> dict[str, Any]:
    rf = config.receptive_field
    fraction = locality.check_fraction(rf.fraction)
    from vitsparse_jax.experiments.receptive_field.figures import check_scale
    check_scale(rf.get("map_scale", "per_map"))   # the figure's option, checked before any compute
    pairs = model_variants(config)
    check_layers(config)
    series_spec = checkpoint_series(rf.checkpoints) if as_list(rf.checkpoints) else []
    mesh = parallel.make_mesh()
    parallel.check_batch_size(mesh, int(config.data.batch_size))
    source = data.make_eval_source(config.data)

    results = []
    for name, weights in pairs:
        loaded = load_model(name, weights, config.checkpoint_dir, config.seed, **config_options(config))
        label = f"{loaded.name} ({'trained' if loaded.trained else 'untrained'})"
        results.append(measure(loaded, name, label, config, workdir, source, mesh))
    series = []
    for step, path in series_spec:
        loaded = load_model(checkpoint_model(path, config.model), str(path), config.checkpoint_dir, config.seed,
                            **config_options(config))
        series.append(measure(loaded, loaded.arch, f"{loaded.arch} step {step}", config, workdir, source, mesh,
                              step=step))

    summary = {"experiment": "receptive_field", "fraction": fraction, "decisions": list(DECISIONS),
               "models": [result_json(r) for r in results], "training": [result_json(r) for r in series],
               "data": source.describe(), "config": config.to_dict(), "versions": versions()}
    if jax.process_index() == 0:
        write_outputs(workdir, results, series, summary, fraction, int(rf.max_columns))
    return summary
