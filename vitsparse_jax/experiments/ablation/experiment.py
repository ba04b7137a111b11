"""Experiment: the ablation grid of paper 1, section 5 — A0, A_t(p, n), A_r(p, n) and psi, in one pass.

  python -m vitsparse_jax.main --config=configs/ablate.py [--config.model=... --config.ablation.p=0.05,0.1]

The device step is `Evaluator` (evaluator.py): one jitted program per model computes, for every image of a
batch, whether the clean model and every variant predict its label. The host keeps one row of booleans per
image (indexed by the global image index), so an interrupted run resumes exactly; metrics and tables come
from those rows (`report.summarize`). Definitions: docs/science.md#ablation-units, #ablation-metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Sequence

import numpy as np

from vitsparse_jax import data, models
from vitsparse_jax.experiments import dry_run
from vitsparse_jax.experiments.ablation import explorer as ablation_explorer
from vitsparse_jax.experiments.ablation import report as ablation_report
from vitsparse_jax.experiments.ablation import units as ablation_units
from vitsparse_jax.experiments.ablation.evaluator import Evaluator
from vitsparse_jax.experiments.contract import Context, Experiment, Item, Measured, Measurement, Plan
from vitsparse_jax.experiments.names import check_distinct
from vitsparse_jax.runtime.workdir import Workdir, versions
from vitsparse_jax.weights import loading, pretrained

log = logging.getLogger(__name__)

# Our reading of docs/science.md#ablation-units to #ablation-metrics, written next to every result.
DECISIONS = (
    "k = round(p * U) per ablated layer (Python round, halves to even); U = candidate units of that layer",
    "ViT/DeiT: units = patch-token attention columns (prefix tokens never ranked, dropped or drawn); "
    "mu = mean over heads and all query rows of the clean-pass post-softmax attention",
    "Swin: units = tokens of each block's input map; mu per token from its own window; each block ranked "
    "by its own clean-pass mu",
    "CNN: units = channels (cnn_unit=channel) or spatial positions (cnn_unit=spatial) of the post-ReLU map; "
    "score = l1 over the other axes; each layer ranked by its own clean-pass scores",
    "drop = multiply the unit by 0 after softmax / after the ReLU in each of the last n layers; the ranking "
    "is never recomputed on the ablated network",
    "random sets: per image and draw, uniform without replacement, keyed by (seed, global image index, "
    "draw, U, k): layers with the same U use the same set; A_r = mean over the draws",
    "psi = (A0 - A_t) / (A0 - A_r); percentile bootstrap over images; a cell is flagged (n.s.) when the "
    "interval of A0 - A_r reaches 0",
    "whole-layer reference: every candidate unit of the last n layers dropped",
)

# A real tag with a classifier on a tower that timm also ships headless (CLIP), named in the headless error.
HEADED_EXAMPLE = "vit_base_patch16_clip_224.openai_ft_in1k"


# --- config ------------------------------------------------------------------------------------------------

def _items(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [str(value)]
    return [str(v).strip() for v in value]


def parse_floats(value: Any, name: str) -> tuple[float, ...]:
    """'0.05,0.1' | (0.05, 0.1) | 0.05 -> (0.05, 0.1)."""
    try:
        return tuple(float(v) for v in _items(value))
    except ValueError:
        raise ValueError(f"{name} must be numbers separated by commas, got {value!r}") from None


def parse_ints(value: Any, name: str) -> tuple[int, ...]:
    try:
        out = tuple(float(v) for v in _items(value))
    except ValueError:
        out = ()
    if not out or any(v != int(v) for v in out):
        raise ValueError(f"{name} must be integers separated by commas, got {value!r}")
    return tuple(int(v) for v in out)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The experiment's switches (config.ablation), checked and parsed."""

    ps: tuple[float, ...]
    ns: tuple[int, ...]
    draws: int
    rank_by: str
    cnn_unit: str
    renormalize: bool
    whole_layer: bool

    @classmethod
    def from_config(cls, ab: Any) -> Grid:
        return cls(parse_floats(ab.p, "ablation.p"), parse_ints(ab.n, "ablation.n"), int(ab.draws),
                   str(ab.rank_by), str(ab.cnn_unit), bool(ab.renormalize), bool(ab.whole_layer_reference))

    def plan(self, module: Any) -> ablation_units.Plan:
        """The grid against `module` (an abstract evaluation of the model: worked out once per grid and module,
        whether the checks, --dry_run or the pass ask)."""
        return _unit_plan(self, module)


@functools.lru_cache(maxsize=64)
def _unit_plan(grid: Grid, module: Any) -> ablation_units.Plan:
    return ablation_units.make_plan(module, ps=grid.ps, ns=grid.ns, draws=grid.draws, rank_by=grid.rank_by,
                                    cnn_unit=grid.cnn_unit, renormalize=grid.renormalize,
                                    whole_layer=grid.whole_layer)


def model_names(config: Any) -> list[str]:
    """config.ablation.models (comma-separated) or else config.model."""
    names = _items(config.ablation.models) or [config.model]
    if len(set(names)) != len(names):
        raise ValueError(f"a model is listed twice in ablation.models: {names}")
    return names


def check_figure_models(ab: Any, names: Sequence[str]) -> None:
    """ablation.figure_models and figure_b_model name listed models: an arch (every tag of it listed) or an
    arch.tag (that tag; also a model listed without a tag, whose tag is known once it is loaded)."""
    listed = [models.split_name(name) for name in names]
    for field in ("figure_models", "figure_b_model"):
        for pattern in _items(ab.get(field, "")):
            arch, tag = models.split_name(pattern)
            if not any(arch == a and (tag is None or t is None or tag == t) for a, t in listed):
                raise ValueError(f"ablation.{field}: {pattern} is not among the models of the run ({', '.join(names)})"
                                 f"; name a listed model: its arch (every tag of it) or arch.tag (one tag)")


def headless_error(name: str) -> ValueError:
    """The ablation of a model without a classifier: what is wrong and the ways out, with real tags."""
    arch, _ = models.split_name(name)
    with_head = [t for t, cfg in pretrained.table().get("models", {}).get(arch, {}).get("tags", {}).items()
                 if cfg.get("num_classes") and not _clip_embedding(arch, t)]
    tag = (f"one of {arch}'s tags with a classifier, e.g. --config.model={arch}.{with_head[0]}" if with_head else
           f"a fine-tuned tag with a head, e.g. --config.model={HEADED_EXAMPLE} ({arch} has none in timm)")
    return ValueError(
        f"{name} has no classifier (num_classes=0: a headless tower, its output is the pooled features); the "
        f"ablation measures top-1 accuracy, so it needs one. Use {tag}; or --config.head_weights=PATH, a linear "
        f"classifier on its pooled features (.npz or .safetensors with 'weight' (num_classes, dim) and 'bias' "
        f"(num_classes,)); or --config.weights=untrained --config.num_classes=N for a smoke test. Sparsity and "
        f"receptive fields need no classifier")


def _clip_embedding(arch: str, tag: str) -> bool:
    """CLIP's image-text tags (`openai`, `laion2b`, ...; not the `*_ft_*` ones): timm's 'classifier' is the
    projection into the joint image-text embedding (num_classes = its width, e.g. 512), not class logits."""
    return "clip" in arch and "_ft_" not in f"_{tag}_"


def check_classifier(name: str, module: Any, options: dict[str, Any]) -> None:
    """The ablation needs class logits: a model without a classifier (or with only CLIP's embedding
    projection, unless num_classes / head_weights replace it) is a ValueError naming the ways out."""
    info = models.model_info(module)
    if info.num_classes <= 0:
        raise headless_error(name)
    arch, tag = models.split_name(name)
    if ("num_classes" not in options and "head_weights" not in options
            and _clip_embedding(arch, tag or pretrained.default_tag(arch) or "")):
        raise ValueError(str(headless_error(name)).replace(
            "has no classifier (num_classes=0: a headless tower, its output is the pooled features)",
            f"has no classifier: its {info.num_classes} outputs (timm's num_classes={info.num_classes}) are the "
            f"projection into CLIP's image-text embedding, not classes", 1))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _data_key(data_cfg: Any) -> dict[str, Any]:
    """The data fields that decide which images are evaluated (not batch size, caches or workers)."""
    ignore = {"batch_size", "cache_dir", "num_workers", "data_dir", "manual_dir"}
    return {k: v for k, v in data_cfg.to_dict().items() if k not in ignore}


# --- the experiment ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelPass:
    """One model's pass: its unit plan, its per-image rows, and the compiled step (for the explorer)."""

    units: ablation_units.Plan
    rows: dict[str, np.ndarray]
    evaluator: Evaluator


def _init_rows(total: int, plan: ablation_units.Plan) -> dict[str, np.ndarray]:
    n_n, n_p = len(plan.groups), len(plan.ps)
    rows = {"done": np.zeros(total, bool), "clean": np.zeros(total, bool),
            "top": np.zeros((total, n_n, n_p), bool), "rand": np.zeros((total, n_n, n_p, plan.draws), bool)}
    if plan.whole_layer:
        rows["whole"] = np.zeros((total, n_n), bool)
    return rows


def _add_rows(out: dict[str, np.ndarray], valid: np.ndarray, index: np.ndarray,
              rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The host step: each readable image's row, at its global index."""
    idx = index[valid]
    for name in rows:
        rows[name][idx] = True if name == "done" else out[name][valid]
    return rows


def _merge_rows(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two processes' rows (disjoint images) as one: each image's row from the side that computed it."""
    done = b["done"]
    out = {}
    for name, rows in a.items():
        out[name] = np.array(rows)
        out[name][done] = b[name][done]
    return out


class Ablation(Experiment):
    name = "ablate"
    result_files = ("results.json", "results.csv", "tables.md")

    def check(self, config: Any) -> Plan:
        ab = config.ablation
        grid = Grid.from_config(ab)
        if not 0.0 < float(ab.confidence) < 1.0:
            raise ValueError(f"ablation.confidence must lie in (0, 1), got {ab.confidence}")
        if int(ab.bootstrap) < 1:
            raise ValueError(f"ablation.bootstrap (resamples) must be at least 1, got {ab.bootstrap}")
        names = model_names(config)
        check_figure_models(ab, names)
        options = loading.config_options(config)
        if options.get("head_weights") and len(names) > 1:
            raise ValueError(f"head_weights {options['head_weights']} is the classifier of one model, but "
                             f"{len(names)} are listed in ablation.models; run them one at a time")
        items = tuple(Item(name, config.weights, options) for name in names)
        check_distinct(items, config.checkpoint_dir)
        return Plan(items, spec=grid, labelled=True)

    def check_model(self, plan: Plan, item: Item, module: Any) -> None:
        check_classifier(item.name, module, dict(item.options))   # headless models, CLIP embeddings
        plan.spec.plan(module)                                   # the grid against the model's layers

    def describe(self, plan: Plan, config: Any, images: int | None, modules: Sequence[Any]) -> list[str]:
        grid = plan.spec
        lines = [f"grid: p = {', '.join(f'{p:g}' for p in grid.ps)}; n = {', '.join(map(str, grid.ns))}; "
                 f"{grid.draws} random draws; ranking {grid.rank_by}"
                 + ("; whole-layer reference" if grid.whole_layer else ""),
                 f"models ({len(plan.items)}):"]
        total_full = total_partial = 0
        for item, module in zip(plan.items, modules):
            units = grid.plan(module)
            variants = units.variants_per_group * len(units.groups)
            lines.append(f"  {item.name}: weights: "
                         f"{dry_run.weights_source(item.name, item.weights, config.checkpoint_dir, config.seed)}")
            lines.append(f"    per image: 1 clean forward pass + {variants} ablated passes through the last n "
                         f"of its {len(units.groups[-1].sites)} ablation layers")
            total_full += 1
            total_partial += variants
        lines.append(f"total: {dry_run.times(images, total_full)} clean forward passes and "
                     f"{dry_run.times(images, total_partial)} partial (ablated) passes over "
                     f"{dry_run.images(images)} images" if images else
                     f"total per image: {total_full} clean forward passes and {total_partial} partial (ablated) "
                     "passes")
        return lines

    def stop_after_batches(self, config: Any) -> int | None:
        return int(config.ablation.stop_after_batches) or None

    def measure(self, plan: Plan, item: Item, loaded: Any, ctx: Context) -> Measurement:
        config, source = ctx.config, ctx.source
        data.check_labels(source, loaded.info.num_classes)
        units = plan.spec.plan(loaded.module)     # the loaded module may differ (e.g. the checkpoint's classes)
        evaluator = Evaluator(loaded.module, ctx.replicate(loaded.variables), units, loaded.pretrained_cfg,
                              seed=int(config.seed), variant_batch=int(config.ablation.variant_batch),
                              predictions=int(config.ablation.get("explore_images", 0)) > 0)
        key = {"model": loaded.describe(), "weights": ctx.weights_key(loaded),
               "grid": dataclasses.asdict(plan.spec), "ablation_sites": [s.site for s in units.groups[-1].sites],
               "seed": int(config.seed), "data": _data_key(config.data), "images": ctx.data_key()}
        outputs = ("clean", "top", "rand") + (("whole",) if units.whole_layer else ())
        return Measurement(
            key=key, device=lambda batch: {k: v for k, v in evaluator(batch).items() if k in outputs},
            init=lambda: _init_rows(len(source), units), host=_add_rows,
            readable=lambda rows: int(rows["done"].sum()), desc=f"ablate {loaded.name}",
            finish=lambda rows: ModelPass(units, rows, evaluator), folder=_slug(loaded.name), merge=_merge_rows)

    def extras(self, plan: Plan, item: Item, loaded: Any, result: ModelPass, ctx: Context) -> Any:
        """report.html's explorer: the first images once more through the pass's compiled step."""
        k = int(ctx.config.ablation.get("explore_images", 0))
        return ablation_explorer.collect(k, result.evaluator, result.rows,
                                         lambda start, stop: ctx.batches(loaded, start, stop), ctx.to_host)

    def results(self, plan: Plan, measured: Sequence[Measured], ctx: Context) -> dict[str, Any]:
        config, source = ctx.config, ctx.source
        models_out = []
        for m in measured:
            models_out.append(model_result(config, m.loaded, m.result.units, m.result.rows, source))
            log.info("%s: A0 = %.4f on %d images", m.loaded.name, models_out[-1]["A0"], models_out[-1]["images_used"])
        return {"experiment": "ablate", "decisions": list(DECISIONS), "models": models_out,
                "data": {**source.describe(), "config": config.data.to_dict()}, "config": config.to_dict(),
                "versions": versions()}

    def report(self, plan: Plan, measured: Sequence[Measured], results: dict[str, Any], ctx: Context,
               workdir: Workdir) -> dict[str, Any]:
        explore = [(r, m.result.units, m.loaded.info.patch_grid, m.extras) for r, m in zip(results["models"], measured)]
        explorer = ablation_explorer.explorer(explore, ctx.source.class_names)
        ablation_report.write_outputs(workdir, results, ctx.config,   # also the sanity warnings (logged, in report.md)
                                      explorers=[explorer] if explorer else [])
        return results


def model_result(config: Any, loaded: Any, plan: ablation_units.Plan, rows: dict[str, np.ndarray],
                 source: Any) -> dict[str, Any]:
    ab = config.ablation
    stats = ablation_report.summarize(rows, plan.ps, [g.n for g in plan.groups], samples=int(ab.bootstrap),
                                      confidence=float(ab.confidence), seed=int(config.seed))
    sites = plan.groups[-1].sites
    skipped = int(len(source) - rows["done"].sum())
    return {
        **loaded.describe(), "name": loaded.name, "label": loaded.name,   # tables, legends: the name with its tag
        "grid": {"p": list(plan.ps), "n": [g.n for g in plan.groups], "draws": plan.draws,
                 "rank_by": plan.rank_by, "cnn_unit": plan.cnn_unit, "renormalize": plan.renormalize,
                 "whole_layer_reference": plan.whole_layer},
        "sites": [{"site": s.site, "kind": s.kind, "units": s.units} for s in sites],
        "k": {str(p): [plan.ks[s.site][i] for s in sites] for i, p in enumerate(plan.ps)},
        "images_total": len(source), "images_skipped": skipped,
        "skipped_reasons": {str(i): why for i, why in sorted(source.skipped.items())[:20]},
        **stats,
    }


EXPERIMENT = Ablation()
