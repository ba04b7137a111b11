"""Experiment: attention distance against gradient receptive fields, per block (docs/science.md#attention-distance).

  python -m vitsparse_jax.main --config=configs/locality.py

Every model of locality.models, trained and/or untrained, over the images of config.data. One device step per
batch (`measures.gradient_fields.make_rf_fn` with `measures.attention_summary` as its side): the receptive-field
maps of each block's attention sub-stage (`{block}.attn`, before its residual add) and of its output
(`{block}`) and, from the same forward pass, the attention distance, prefix mass and entropy of every block and
head, so only (blocks, heads) vectors of the maps leave the device; CNNs give the receptive fields of their
stage outputs only. The host adds each image's maps and values in fixed blocks of images aligned to the image
index (`runtime.ordered.OrderedSums`), so the totals are the same for any batch size or device count. A finished
model's totals are kept under `locality_done/`. Result files: `report.py`; the figure: `figures.py`.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.experiments import dry_run
from vitsparse_jax.experiments.contract import Context, Experiment, Finished, Item, Measured, Measurement, Plan
from vitsparse_jax.experiments.names import check_distinct
from vitsparse_jax.experiments.locality.report import Block, ModelResult, result_json, write_outputs
from vitsparse_jax.measures import attention_distance, attention_summary, locality
from vitsparse_jax.measures.gradient_fields import default_layers, layer_specs, make_rf_fn
from vitsparse_jax.runtime import ordered
from vitsparse_jax.runtime.config_defaults import BUILTIN_VIT
from vitsparse_jax.runtime.workdir import Workdir, versions
from vitsparse_jax.weights.loading import UNTRAINED, config_options

log = logging.getLogger(__name__)

ATTENTION_FAMILIES = ("vit", "swin")
CNN_FAMILIES = ("vgg", "resnet", "convnext")
VARIANTS = ("trained", "untrained")
DONE_DIR = "locality_done"       # finished per-model totals, so that an interrupted run resumes
BLOCK = 4                        # images per ordered block: the state holds one block of per-image maps
# config.data fields that do not change the results (a run may resume with other values)
DATA_FIELDS_NOT_IN_RESULTS = ("batch_size", "cache_dir", "num_workers", "data_dir", "manual_dir", "prefetch")


def _list(value: Any) -> list[str]:
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


def model_names(config: Any) -> list[str]:
    """locality.models ('' = config.model). A config.model other than the default that the list leaves out is an
    error (it would not be measured)."""
    names = _list(config.locality.models) or [config.model]
    if len(set(names)) != len(names):
        raise ValueError(f"locality.models names a model twice: {config.locality.models}")
    if config.model != BUILTIN_VIT and config.model not in names:
        raise ValueError(f"config.model={config.model!r} is not among locality.models ({', '.join(names)}), which "
                         f"are the models measured: set --config.locality.models={config.model} (comma-separated "
                         "for several)")
    return names


def variants(config: Any) -> list[str]:
    chosen = _list(config.locality.variants)
    if not chosen or set(chosen) - set(VARIANTS):
        raise ValueError(f"locality.variants={config.locality.variants!r}: use 'trained', 'untrained' or both, "
                         "comma-separated")
    return chosen


def blocks_of(info: models.ModelInfo, patterns: Sequence[str]) -> list[Block]:
    """The rows of the table: each attention block of a ViT / Swin (its `attn` sub-stage and its output), or each
    stage output of a CNN, matching any of `patterns` (fnmatch; none = all)."""
    if info.family in ATTENTION_FAMILIES:
        found = [Block(b, f"{b}.attn", b) for b in attention_distance.attention_blocks(info)]
    elif info.family in CNN_FAMILIES:
        found = [Block(n, None, n) for n in default_layers(info)]
    else:
        raise ValueError(f"{info.name} is a {info.family} model: the locality experiment measures ViT / Swin "
                         f"blocks and the stages of CNNs ({', '.join(ATTENTION_FAMILIES + CNN_FAMILIES)})")
    if not patterns:
        return found
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(b.name, pattern) for b in found):
            raise ValueError(f"locality.blocks: {pattern!r} matches no block of {info.name}; its blocks: "
                             f"{', '.join(b.name for b in found)}")
    return [b for b in found if any(fnmatch.fnmatchcase(b.name, p) for p in patterns)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


class Locality(Experiment):
    name = "locality"
    result_files = ("results.json", "locality.csv")

    def check(self, config: Any) -> Plan:
        loc = config.locality
        fraction = locality.check_fraction(loc.fraction)
        if int(loc.chunk_size) < 0:
            raise ValueError(f"locality.chunk_size must be >= 0 (0 = every layer at once), got {loc.chunk_size}")
        options = config_options(config)
        items = tuple(Item(name, config.weights if v == "trained" else UNTRAINED, options, label=name)
                      for name in model_names(config) for v in variants(config))
        check_distinct(items, config.checkpoint_dir)
        return Plan(items, spec={"fraction": fraction, "renormalize": bool(loc.renormalize),
                                 "blocks": _list(loc.blocks), "chunk_size": int(loc.chunk_size)})

    def check_model(self, plan: Plan, item: Item, module: Any) -> None:
        blocks_of(models.model_info(module), plan.spec["blocks"])   # a family or pattern that does not fit fails here

    def describe(self, plan: Plan, config: Any, images: int | None, modules: Sequence[Any]) -> list[str]:
        rows = "renormalised" if plan.spec["renormalize"] else "as they are"
        lines = [f"models ({len(plan.items)} = models x variants {config.locality.variants!r}), central fraction "
                 f"{plan.spec['fraction']:.4g}, attention rows {rows}:"]
        forward = backward = 0
        for item, module in zip(plan.items, modules):
            info = models.model_info(module)
            blocks = blocks_of(info, plan.spec["blocks"])
            layers = sum(1 + (b.attn is not None) for b in blocks)
            what = (f"{len(blocks)} attention blocks (distances per head) + receptive fields of {layers} layers"
                    if info.family in ATTENTION_FAMILIES else f"receptive fields of {layers} stage outputs (a CNN)")
            source = dry_run.weights_source(item.name, item.weights, config.checkpoint_dir, config.seed)
            lines.append(f"  {item.name} ({'untrained' if item.weights == UNTRAINED else 'trained'}, {info.family}): "
                         f"weights: {source}")
            lines.append(f"    {what}: per image 1 forward pass + {layers} gradient (backward) passes")
            forward += 1
            backward += layers
        lines.append(f"total: {dry_run.times(images, forward)} forward and {dry_run.times(images, backward)} backward "
                     f"passes over {dry_run.images(images)} images" if images else
                     f"total per image: {forward} forward and {backward} backward passes")
        return lines

    def measure(self, plan: Plan, item: Item, loaded: Any, ctx: Context) -> Measurement:
        config, source, spec = ctx.config, ctx.source, plan.spec
        info, cfg = loaded.info, loaded.pretrained_cfg
        size = int(cfg.get("input_size", (3, info.img_size, info.img_size))[-1])
        image_hw = (size, size)
        blocks = blocks_of(info, spec["blocks"])
        names = [n for b in blocks for n in (b.attn, b.out) if n is not None]
        layers = layer_specs(loaded.module, loaded.variables, info, names, spec["fraction"], image_hw)
        side = (attention_summary.block_measures(loaded.module, spec["fraction"], spec["renormalize"],
                                                 tuple(b.name for b in blocks))
                if info.family in ATTENTION_FAMILIES else None)
        norm = (tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])))
        fn = make_rf_fn(loaded.module, tuple(layers), info.num_prefix_tokens, spec["chunk_size"], norm,
                        per_image=True, side=side)
        variables = ctx.replicate(loaded.variables)
        label = f"{loaded.name} ({'trained' if loaded.trained else 'untrained'})"
        model = {**loaded.describe(), "name": loaded.name, "listed": item.label, "arch": loaded.arch,
                 "trained": loaded.trained}

        one = {"maps": np.zeros((1, len(layers), *image_hw), np.float32), "count": np.zeros(1, np.int64)}
        if side is not None:
            zeros = {k: np.zeros((1, len(side.blocks), side.max_heads), np.float32)
                     for k in attention_summary.DEVICE_VALUES}
            one.update(side.host_values(zeros))
        totals = ordered.OrderedSums.like(one, len(source), block=BLOCK, prefix="loc__")

        def device(batch: dict) -> dict[str, Any]:
            out = fn(variables, batch["image"], batch["valid"].astype(jnp.float32))
            maps, values = out if side is not None else (out, {})
            return {"maps": maps, "attention": values}

        def init() -> dict[str, np.ndarray]:
            return {**totals.init(), "skipped": np.zeros((), np.int64)}

        def host(values: dict[str, Any], valid: np.ndarray, index: np.ndarray,
                 acc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            per_image = {"maps": np.moveaxis(np.asarray(values["maps"]), 1, 0), "count": valid.astype(np.int64)}
            if side is not None:
                per_image.update(side.host_values(values["attention"]))
            acc["skipped"] = acc["skipped"] + np.sum((index >= 0) & ~valid)   # unreadable images: counted, not added
            return totals.add(acc, per_image, valid, index)

        def readable(acc: dict[str, np.ndarray]) -> int:
            return int(totals.current(acc, "count"))

        def merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            """Two processes' accumulators (disjoint images): the ordered sums merged in image order."""
            return {**totals.merge(a, b), "skipped": a["skipped"] + b["skipped"]}

        def result(total: dict[str, np.ndarray], skipped: int) -> ModelResult:
            count = int(total["count"])
            attention = side.results(total, count) if side is not None else None
            return ModelResult(model, label, blocks, layers, np.asarray(total["maps"]) / max(count, 1), image_hw,
                               count, skipped, attention, totals=dict(total))

        def finish(acc: dict[str, np.ndarray]) -> ModelResult:
            skipped = int(acc["skipped"])
            if skipped:
                log.warning("%s: %d of %d images could not be read and are left out", label, skipped, len(source))
            return result(totals.result(acc), skipped)

        data_key = {k: v for k, v in config.data.to_dict().items() if k not in DATA_FIELDS_NOT_IN_RESULTS}
        key = {"experiment": "locality", "model": loaded.describe(), "weights": ctx.weights_key(loaded),
               "label": label, "layers": names, "fraction": spec["fraction"], "renormalize": spec["renormalize"],
               "data": data_key, "images": ctx.data_key(), "state_format": ordered.FORMAT}
        return Measurement(key=key, device=device, init=init, host=host, readable=readable, merge=merge,
                           desc=f"locality {label}", finish=finish, finished=Finished(
                               f"{DONE_DIR}/{_slug(label)}.npz", save=lambda r: (r.totals, {"skipped": r.skipped}),
                               load=lambda arrays, meta: result(dict(arrays), int(meta["skipped"]))))

    def results(self, plan: Plan, measured: Sequence[Measured], ctx: Context) -> dict[str, Any]:
        return {"experiment": "locality", "fraction": plan.spec["fraction"], "renormalize": plan.spec["renormalize"],
                "models": [result_json(m.result) for m in measured], "data": ctx.source.describe(),
                "config": ctx.config.to_dict(), "versions": versions()}

    def report(self, plan: Plan, measured: Sequence[Measured], results: dict[str, Any], ctx: Context,
               workdir: Workdir) -> dict[str, Any]:
        return write_outputs(workdir, [m.result for m in measured], results)


EXPERIMENT = Locality()
