"""Experiment: gradient receptive fields of every layer and their locality (paper 2;
docs/science.md#receptive-fields).

Every model of the config (trained and untrained twins) and, optionally, a series of training checkpoints,
each over the images of config.data: the device step is the gradient program of `measures/gradient_fields.py` (per-image maps of
every requested layer), the host step adds the maps image by image. The models share one resume state; a
finished model's mean maps are kept under `rf_done/` so that an interrupted run does not measure it again.
Result files: `report.py`; figures: `figures.py`.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.experiments import dry_run
from vitsparse_jax.experiments.contract import Context, Experiment, Finished, Item, Measured, Measurement, Plan
from vitsparse_jax.experiments.names import check_distinct, series_name
from vitsparse_jax.experiments.receptive_field.figures import check_scale
from vitsparse_jax.experiments.receptive_field.host import MapTotals
from vitsparse_jax.experiments.receptive_field.report import DECISIONS, Measured as RFMeasured
from vitsparse_jax.experiments.receptive_field.report import result_json, write_outputs
from vitsparse_jax.experiments.receptive_field.series import as_list, checkpoint_model, checkpoint_series
from vitsparse_jax.measures import locality
from vitsparse_jax.measures.gradient_fields import layer_specs, make_rf_fn, select_layers
from vitsparse_jax.runtime.workdir import Workdir, versions
from vitsparse_jax.weights.loading import UNTRAINED, config_options

log = logging.getLogger(__name__)

# config.data fields that do not change the results (a run may resume with other values)
DATA_FIELDS_NOT_IN_RESULTS = ("batch_size", "cache_dir", "num_workers", "data_dir", "manual_dir", "prefetch")
DONE_DIR = "rf_done"            # finished per-model mean maps, so that an interrupted run resumes


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


class ReceptiveField(Experiment):
    name = "receptive_field"
    result_files = ("results.json", "receptive_fields.csv")

    def check(self, config: Any) -> Plan:
        rf = config.receptive_field
        fraction = locality.check_fraction(rf.fraction)
        check_scale(rf.get("map_scale", "per_map"))   # the figure's option, checked before any compute
        options = config_options(config)   # the image size and classifier asked for (a bad size errors here)
        items = [Item(name, weights, options, label=name) for name, weights in model_variants(config)]
        series = checkpoint_series(rf.checkpoints) if as_list(rf.checkpoints) else []
        items += [Item(checkpoint_model(path, config.model), str(path), options, step=step) for step, path in series]
        check_distinct(items, config.checkpoint_dir)
        return Plan(tuple(items), spec={"fraction": fraction, "layers": as_list(rf.layers),
                                        "pairs": len(items) - len(series)})

    def check_model(self, plan: Plan, item: Item, module: Any) -> None:
        select_layers(models.model_info(module), plan.spec["layers"])   # a pattern some model lacks fails here

    def describe(self, plan: Plan, config: Any, images: int | None, modules: Sequence[Any]) -> list[str]:
        pairs = plan.items[:plan.spec["pairs"]]
        lines = [f"models ({len(pairs)} = models x variants {config.receptive_field.variants!r}):"]
        forward = backward = 0
        for item, module in zip(pairs, modules):
            layers = len(select_layers(models.model_info(module), plan.spec["layers"]))
            lines.append(f"  {item.name} ({'untrained' if item.weights == UNTRAINED else 'trained'}): weights: "
                         f"{dry_run.weights_source(item.name, item.weights, config.checkpoint_dir, config.seed)}")
            lines.append(f"    {layers} layers: per image 1 forward pass + {layers} gradient (backward) passes")
            forward += 1
            backward += layers
        series = plan.items[plan.spec["pairs"]:]
        if series:
            lines.append(f"training series: {len(series)} checkpoints (steps "
                         f"{', '.join(str(item.step) for item in series)}), each measured like a model")
        lines.append((f"total: {dry_run.times(images, forward)} forward and {dry_run.times(images, backward)} "
                      f"backward passes over {dry_run.images(images)} images" if images else
                      f"total per image: {forward} forward and {backward} backward passes")
                     + (" (checkpoint series not counted)" if series else ""))
        return lines

    def measure(self, plan: Plan, item: Item, loaded: Any, ctx: Context) -> Measurement:
        config, source = ctx.config, ctx.source
        rf, fraction = config.receptive_field, plan.spec["fraction"]
        cfg = loaded.pretrained_cfg
        size = int(cfg.get("input_size", (3, loaded.info.img_size, loaded.info.img_size))[-1])
        image_hw = (size, size)
        names = select_layers(loaded.info, plan.spec["layers"])
        layers = layer_specs(loaded.module, loaded.variables, loaded.info, names, fraction, image_hw)
        if item.step is None:
            listed, label = item.label, f"{loaded.name} ({'trained' if loaded.trained else 'untrained'})"
            resume_label = label
        else:   # a checkpoint series: named after its training run (the name with its tag, less `_step<N>`)
            listed, label = series_name(loaded.name), f"{series_name(loaded.name)} step {item.step}"
            # the resume key keeps the label it had before names carried their tag (its `model` names the tag),
            # so that an interrupted series resumes
            resume_label = f"{loaded.arch} step {item.step}"
        data_key = {k: v for k, v in config.data.to_dict().items() if k not in DATA_FIELDS_NOT_IN_RESULTS}
        key = {"model": loaded.describe(), "weights": ctx.weights_key(loaded), "label": resume_label,
               "layers": names, "fraction": fraction, "data": data_key, "images": ctx.data_key(),
               "step": item.step}
        norm = (tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])))
        fn = make_rf_fn(loaded.module, tuple(layers), loaded.info.num_prefix_tokens, int(rf.chunk_size), norm,
                        per_image=True)
        variables = ctx.replicate(loaded.variables)
        model = {**loaded.describe(), "name": loaded.name, "listed": listed, "arch": loaded.arch,
                 "trained": loaded.trained}

        totals = MapTotals(len(layers), image_hw, len(source))   # exact, ordered sums of the per-image maps

        def finish(acc: dict[str, np.ndarray]) -> RFMeasured:
            count, skipped = totals.count(acc), totals.skipped(acc)
            if skipped:
                log.warning("%s: %d of %d images could not be read and are left out", label, skipped, len(source))
            return RFMeasured(model, label, layers, totals.mean(acc), count, image_hw, item.step, skipped=skipped)

        done, before = f"{DONE_DIR}/{_slug(label)}.npz", f"{DONE_DIR}/{_slug(resume_label)}.npz"

        def merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            """Two processes' accumulators (disjoint images): the ordered sums merged in image order."""
            return {**totals.sums.merge(a, b), "skipped": a["skipped"] + b["skipped"]}

        return Measurement(
            key=key, device=lambda batch: fn(variables, batch["image"], batch["valid"].astype(jnp.float32)),
            init=totals.init, host=totals.add, merge=merge, readable=totals.count, desc=f"receptive fields {label}",
            renamed=((before, done),) if before != done else (), finish=finish, finished=Finished(
                done,
                save=lambda r: ({"maps": r.maps}, {"num_images": r.num_images, "num_skipped": r.skipped}),
                load=lambda arrays, meta: RFMeasured(model, label, layers, np.asarray(arrays["maps"], np.float64),
                                                     int(meta["num_images"]), image_hw, item.step,
                                                     skipped=int(meta.get("num_skipped", 0)))))

    def results(self, plan: Plan, measured: Sequence[Measured], ctx: Context) -> dict[str, Any]:
        config = ctx.config
        models_ = [m.result for m in measured if m.item.step is None]
        series = [m.result for m in measured if m.item.step is not None]
        return {"experiment": "receptive_field", "fraction": plan.spec["fraction"], "decisions": list(DECISIONS),
                "models": [result_json(r) for r in models_], "training": [result_json(r) for r in series],
                "data": ctx.source.describe(), "config": config.to_dict(), "versions": versions()}

    def report(self, plan: Plan, measured: Sequence[Measured], results: dict[str, Any], ctx: Context,
               workdir: Workdir) -> dict[str, Any]:
        models_ = [m.result for m in measured if m.item.step is None]
        series = [m.result for m in measured if m.item.step is not None]
        write_outputs(workdir, models_, series, results, plan.spec["fraction"],
                      int(ctx.config.receptive_field.max_columns))
        return results


EXPERIMENT = ReceptiveField()
