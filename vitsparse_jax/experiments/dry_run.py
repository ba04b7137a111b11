"""`--dry_run`: what a run would do (models, where their weights come from, data, images and passes over
the network), checked against the files that exist, without loading weights or computing anything.

    python -m vitsparse_jax.main --config=configs/ablate.py:paper --dry_run
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from vitsparse_jax import data, models
from vitsparse_jax.weights import loading

# Sizes of datasets the paper presets use, to count a run's passes before the data is prepared.
KNOWN_SIZES = {("tfds", "imagenet2012", "validation"): 50_000, ("tfds", "imagenet_v2", "test"): 10_000}


def _n(x: int) -> str:
    return f"{x:,}"


def _module(name: str, config: Any, weights: str | None = None) -> Any:
    """The module `load_model` would build for `name` (its classifier and image size: the tag's, or those of
    config.img_size / num_classes / head_weights), best effort."""
    options = loading.config_options(config)
    weights = config.weights if weights is None else weights
    try:
        loading.resolve_weights(name, weights, config.checkpoint_dir)
    except FileNotFoundError:
        pass                # counted as the tag's; weights_source says what is missing
    except ValueError:      # an unknown tag: weights_source says so; the arch's default layout is shown
        arch, _ = models.split_name(name)
        return models.create_model(arch, **({"img_size": options["img_size"]} if "img_size" in options else {}))
    return loading.planned_module(name, weights, config.checkpoint_dir, missing_ok=True, **options)


def weights_source(name: str, weights: str, checkpoint_dir: str, seed: int) -> str:
    """Where `load_model(name, weights, checkpoint_dir, seed)` would take the weights from, or what is missing."""
    try:
        src = loading.resolve_weights(name, weights, checkpoint_dir)
    except (FileNotFoundError, ValueError) as e:
        return "MISSING: " + " ".join(str(e).split())
    if src.kind == loading.UNTRAINED:
        return f"untrained (timm's initialisation, seed {seed})"
    if src.kind == loading.HUB:
        cached = ""
        try:
            from vitsparse_jax.weights import hub
            cached = " (in the local cache)" if hub.is_cached(src.arch, src.tag) else " (to download)"
        except Exception:
            pass
        return f"timm's weights from the Hugging Face hub, {src.repo_id}{cached}"
    kinds = {loading.BUILTIN: "built-in checkpoint", loading.CHECKPOINT_DIR: "converted checkpoint"}
    text = f"{kinds.get(src.kind, src.kind)} {src.path}"
    meta_path = Path(src.path).with_suffix(".json") if src.path else None
    if src.kind != loading.BUILTIN and meta_path is not None and meta_path.exists():   # e.g. 'hf-hub:timm/...'
        try:
            source = json.loads(meta_path.read_text()).get("source") or ""
        except (OSError, ValueError):
            source = ""
        text += f" (from {source[:120]})" if source else ""
    return text


def _data(data_cfg: Any, batch_size: int) -> tuple[int | None, list[str]]:
    """(number of images or None when the data cannot be opened, lines)."""
    try:
        source = data.make_eval_source(data_cfg)
    except Exception as e:   # a dataset that is not prepared, a folder that does not exist, ...
        why = "\n".join("    " + line for line in (str(e) or type(e).__name__).splitlines())
        what = " ".join(str(v) for v in (data_cfg.source, data_cfg.name or data_cfg.folder, data_cfg.split) if v)
        n = int(data_cfg.num_images) or None
        counted = f"; counted below as data.num_images = {n} images" if n else ""
        full = KNOWN_SIZES.get((data_cfg.source, data_cfg.name, data_cfg.split))
        if n is None and full and int(data_cfg.per_class) == 0 and int(data_cfg.every_kth_class) <= 1:
            n, counted = full, f"; counted below as its {_n(full)} images"
        return n, [f"data: {what}: NOT AVAILABLE{counted}:", why]
    n = len(source)
    classes = f", {source.num_classes} classes" if source.num_classes else ", unlabelled"
    return n, [f"data: {source.name} ({source.identity}): {_n(n)} images{classes}; global batch {batch_size} -> "
               f"{_n(math.ceil(n / batch_size)) if batch_size else '?'} batches"]


def _images(n: int | None) -> str:
    return "N" if n is None else _n(n)


def _times(n: int | None, per_image: int) -> str:
    return "?" if n is None else _n(n * per_image)


def _ablate(config: Any) -> list[str]:
    from vitsparse_jax.experiments.ablation import run as ablation

    grid = ablation.Grid.from_config(config.ablation)
    names = ablation.model_names(config)
    n, lines = _data(config.data, int(config.data.batch_size))
    lines.append(f"grid: p = {', '.join(f'{p:g}' for p in grid.ps)}; n = {', '.join(map(str, grid.ns))}; "
                 f"{grid.draws} random draws; ranking {grid.rank_by}"
                 + ("; whole-layer reference" if grid.whole_layer else ""))
    lines.append(f"models ({len(names)}):")
    total_full = total_partial = 0
    for name in names:
        module = _module(name, config)
        ablation.check_classifier(name, module, loading.config_options(config))
        plan = grid.plan(module)
        variants = plan.variants_per_group * len(plan.groups)
        lines.append(f"  {name}: weights: {weights_source(name, config.weights, config.checkpoint_dir, config.seed)}")
        lines.append(f"    per image: 1 clean forward pass + {variants} ablated passes through the last n "
                     f"of its {len(plan.groups[-1].sites)} ablation layers")
        total_full += 1
        total_partial += variants
    lines.append(f"total: {_times(n, total_full)} clean forward passes and {_times(n, total_partial)} partial "
                 f"(ablated) passes over {_images(n)} images" if n else
                 f"total per image: {total_full} clean forward passes and {total_partial} partial (ablated) passes")
    return lines


def _sparsity(config: Any) -> list[str]:
    name = config.model
    info = models.model_info(_module(name, config))
    kind = config.sparsity.kind
    if kind == "auto":
        kind = "attention" if info.family in ("vit", "swin") else "cnn"
    n, lines = _data(config.data, int(config.data.batch_size))
    what = (f"post-softmax attention of {len(info.ablation_sites)} blocks" if kind == "attention"
            else f"channel l1 of {len(info.ablation_sites)} post-ReLU layers")
    lines.append(f"model: {name} ({info.family}): {what}")
    lines.append(f"  weights: {weights_source(name, config.weights, config.checkpoint_dir, config.seed)}")
    extra = " + 1 for the example maps (Fig. 1, S1)" if kind == "attention" else ""
    lines.append(f"total: {_times(n, 1)} forward passes (1 per image){extra}")
    return lines


def _receptive_field(config: Any) -> list[str]:
    from vitsparse_jax.experiments.receptive_field import run as rf

    pairs = rf.model_variants(config)
    patterns = rf.as_list(config.receptive_field.layers)
    n, lines = _data(config.data, int(config.data.batch_size))
    lines.append(f"models ({len(pairs)} = models x variants {config.receptive_field.variants!r}):")
    forward = backward = 0
    for name, weights in pairs:
        info = models.model_info(_module(name, config, weights))
        layers = len(rf.select_layers(info, patterns))
        lines.append(f"  {name} ({'untrained' if weights == loading.UNTRAINED else 'trained'}): weights: "
                     f"{weights_source(name, weights, config.checkpoint_dir, config.seed)}")
        lines.append(f"    {layers} layers: per image 1 forward pass + {layers} gradient (backward) passes")
        forward += 1
        backward += layers
    if rf.as_list(config.receptive_field.checkpoints):
        try:
            series = rf.checkpoint_series(config.receptive_field.checkpoints)
            lines.append(f"training series: {len(series)} checkpoints (steps "
                         f"{', '.join(str(step) for step, _ in series)}), each measured like a model")
        except (FileNotFoundError, ValueError) as e:
            lines.append(f"training series: NOT AVAILABLE: {str(e).splitlines()[0]}")
    lines.append((f"total: {_times(n, forward)} forward and {_times(n, backward)} backward passes over "
                  f"{_images(n)} images" if n else
                  f"total per image: {forward} forward and {backward} backward passes")
                 + (" (checkpoint series not counted)" if rf.as_list(config.receptive_field.checkpoints) else ""))
    return lines


def _train(config: Any) -> list[str]:
    tc = config.train
    overrides = {"num_classes": tc.num_classes} if tc.num_classes else {}
    info = models.model_info(models.create_model(config.model, **overrides))
    train_cfg = config.data.copy_and_resolve_references()
    train_cfg.split = tc.split
    n_train, lines = _data(train_cfg, int(tc.batch_size))
    n_eval, eval_lines = _data(config.data, int(config.data.batch_size))
    lines = [line.replace("data:", "training data:", 1) for line in lines]
    lines += [line.replace("data:", "evaluation data:", 1) for line in eval_lines]
    lines.append(f"model: {config.model} ({info.family}, {info.num_classes} classes); start from: "
                 f"{weights_source(config.model, config.weights, config.checkpoint_dir, config.seed)}")
    evals = tc.steps // tc.eval_every + 1 if tc.eval_every else 1
    lines.append(f"total: {_n(tc.steps)} steps x batch {tc.batch_size} = {_n(tc.steps * tc.batch_size)} forward + "
                 f"backward passes; about {evals} evaluations x {_images(n_eval)} images")
    return lines


DESCRIBE: dict[str, Callable[[Any], list[str]]] = {
    "ablate": _ablate, "sparsity": _sparsity, "receptive_field": _receptive_field, "train": _train}


def describe(config: Any) -> str:
    """The dry-run text of a config (what `main --dry_run` prints)."""
    import jax

    if config.experiment not in DESCRIBE:
        raise ValueError(f"unknown experiment {config.experiment!r}; one of {', '.join(DESCRIBE)}")
    lines = [f"dry run of experiment {config.experiment!r}: nothing is loaded, computed or written",
             f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
             f"{jax.process_count()} process(es)"]
    lines += DESCRIBE[config.experiment](config)
    workdir = Path(config.workdir)
    state = "does not exist yet" if not workdir.exists() else (
        "holds " + ", ".join(sorted(p.name for p in workdir.iterdir())[:8]) + (", ..." if len(list(
            workdir.iterdir())) > 8 else "") if any(workdir.iterdir()) else "is empty")
    lines.append(f"workdir: {workdir} ({state})")
    return "\n".join(lines) + "\n"
