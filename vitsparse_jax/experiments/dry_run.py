"""The shared parts of `--dry_run` (`driver.describe`): where a model's weights would come from, the data
line, counts, the workdir line. Each experiment describes its own passes (`Experiment.describe`); nothing here
loads weights or computes anything.

    python -m vitsparse_jax.main --config=configs/ablate.py:paper --dry_run
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from vitsparse_jax import data, models
from vitsparse_jax.weights import loading

# Sizes of datasets the paper presets use, to count a run's passes before the data is prepared.
KNOWN_SIZES = {("tfds", "imagenet2012", "validation"): 50_000, ("tfds", "imagenet_v2", "test"): 10_000}


def _n(x: int) -> str:
    return f"{x:,}"


def planned(name: str, config: Any, weights: str | None = None, options: Mapping[str, Any] | None = None) -> Any:
    """The module `load_model` would build for `name` (its classifier and image size: the tag's, or those of
    config.img_size / num_classes / head_weights), best effort."""
    options = dict(loading.config_options(config) if options is None else options)
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


def data_lines(data_cfg: Any, batch_size: int) -> tuple[int | None, list[str]]:
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


def images(n: int | None) -> str:
    return "N" if n is None else _n(n)


def times(n: int | None, per_image: int) -> str:
    return "?" if n is None else _n(n * per_image)


def finished_run(config: Any) -> str | None:
    """The line that says the workdir holds a finished run of this config with unchanged inputs (so the run
    would compute nothing: `runtime.session`'s 'already complete' check, without the lock), else None."""
    from vitsparse_jax.runtime import session
    from vitsparse_jax.runtime.workdir import COMPLETE_FILE, Workdir

    if not (Path(config.workdir) / COMPLETE_FILE).is_file():
        return None
    s = session.Session(config, Workdir(config.workdir),
                        data_identity=lambda c: data.make_eval_source(c.data).identity)
    return None if s.check_complete() is None else f"nothing would run: {s.describe_complete()}"


def workdir_line(path: Any) -> str:
    """What the workdir holds now."""
    workdir = Path(path)
    state = "does not exist yet" if not workdir.exists() else (
        "holds " + ", ".join(sorted(p.name for p in workdir.iterdir())[:8]) + (", ..." if len(list(
            workdir.iterdir())) > 8 else "") if any(workdir.iterdir()) else "is empty")
    return f"workdir: {workdir} ({state})"
