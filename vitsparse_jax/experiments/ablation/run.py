"""Experiment: the ablation grid of paper 1, section 5 — A0, A_t(p, n), A_r(p, n) and psi, in one pass.

  python -m vitsparse_jax.main --config=configs/ablate.py [--config.model=... --config.ablation.p=0.05,0.1]

Per batch, on device and inside one jitted program (`Evaluator`): the clean pass gives A0's predictions,
the ranking inputs (attention probabilities / post-ReLU maps, SPEC section 3) and the input of every stage
a variant group starts from; then for each n the variants (every p x {top set, random draws} and the
whole-layer reference) re-run only the last stages, vmapped over the variant axis. The host keeps one
row of booleans per image (indexed by the global image index) through `resumable.run_resumable`, so an
interrupted run resumes exactly; metrics and tables come from those rows (`ablation_report`).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import data, models
from vitsparse_jax.experiments.ablation import explorer as ablation_explorer
from vitsparse_jax.experiments.ablation import report as ablation_report
from vitsparse_jax.experiments.ablation import units as ablation_units
from vitsparse_jax.experiments.ablation.units import Plan
from vitsparse_jax.runtime import fingerprint, parallel, resumable
from vitsparse_jax.runtime.workdir import Workdir, versions
from vitsparse_jax.weights import loading, pretrained
from vitsparse_jax.weights.loading import LoadedModel

log = logging.getLogger(__name__)

# Our reading of SPEC section 3, written next to every result.
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

    def plan(self, module: Any) -> Plan:
        return ablation_units.make_plan(module, ps=self.ps, ns=self.ns, draws=self.draws, rank_by=self.rank_by,
                                        cnn_unit=self.cnn_unit, renormalize=self.renormalize,
                                        whole_layer=self.whole_layer)


def model_names(config: Any) -> list[str]:
    """config.ablation.models (comma-separated) or else config.model."""
    names = _items(config.ablation.models) or [config.model]
    if len(set(names)) != len(names):
        raise ValueError(f"a model is listed twice in ablation.models: {names}")
    return names


# --- on device ---------------------------------------------------------------------------------------------

class Evaluator:
    """The per-batch step: clean pass, ranking, masks and every variant, in one jitted program.

    `evaluator(batch)` returns device arrays (B = batch rows, Nn = len(n), P = len(p), D = draws):
    clean (B,), top (B, Nn, P), rand (B, Nn, P, D), whole (B, Nn) booleans (prediction == label); with
    `predictions=True` also what report.html's explorer shows: the predicted classes clean_pred (B,) and
    pred (B, Nn, V) int32 and the dropped units drops {site: (B, V, U) bool} (V = the variants of a group,
    in units.py's order), the very values the step computes anyway (the pass leaves them on the device).
    Time it with `jax.block_until_ready(evaluator(batch))`; `evaluator.variants` counts the re-runs of
    the ablated stages per image.
    """

    def __init__(self, module: Any, variables: Any, plan: Plan, pretrained_cfg: dict, *, seed: int = 0,
                 variant_batch: int = 0, mesh: jax.sharding.Mesh | None = None, predictions: bool = False):
        self.module, self.plan, self.cfg, self.predictions = module, plan, pretrained_cfg, bool(predictions)
        self.variant_batch = int(variant_batch)
        self.variables = variables if mesh is None else parallel.replicate(variables, mesh)
        self.key = jax.random.key(seed)
        self.variants = plan.variants_per_group * len(plan.groups)
        self._step = jax.jit(self.step)

    def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return self._step(self.variables, batch["image"], batch["label"], batch["index"], self.key)

    def forward(self, variables: Any, x: jax.Array, index: jax.Array,
                key: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Normalised images -> clean logits (B, C) and, per group (sorted by n), variant logits (V, B, C)."""
        return self._forward(variables, x, index, key)[:2]

    def _forward(self, variables: Any, x: jax.Array, index: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, list[jax.Array], dict[str, jax.Array]]:
        """`forward`, and the keep factors (V, B, U) of every ablated site."""
        plan = self.plan
        logits, aux = self.module.apply(variables, x, capture=plan.captures)
        keeps = ablation_units.all_keeps(plan, aux, key, index)
        variant_logits = []
        for group in plan.groups:
            x0 = x if group.start_input is None else aux[group.start_input]

            def run_from(masks: dict[str, jax.Array], x0=x0, group=group) -> jax.Array:
                return self.module.apply(variables, x0, masks=masks, start=group.start,
                                         renormalize=plan.renormalize)[0]

            masks = ablation_units.group_masks(group, keeps)
            if self.variant_batch > 0:
                variant_logits.append(jax.lax.map(run_from, masks, batch_size=self.variant_batch))
            else:
                variant_logits.append(jax.vmap(run_from)(masks))
        return logits, variant_logits, keeps

    def step(self, variables: Any, images: jax.Array, labels: jax.Array, index: jax.Array,
             key: jax.Array) -> dict[str, jax.Array]:
        plan = self.plan
        clean, variant_logits, keeps = self._forward(variables, data.normalize(images, self.cfg), index, key)
        correct = jnp.stack([jnp.argmax(v, -1) == labels for v in variant_logits])   # (Nn, V, B)
        nn_, b = correct.shape[0], correct.shape[-1]
        grid = correct[:, :len(plan.ps) * (1 + plan.draws)].reshape(nn_, len(plan.ps), 1 + plan.draws, b)
        out = {"clean": jnp.argmax(clean, -1) == labels,
               "top": grid[:, :, 0].transpose(2, 0, 1),             # (B, Nn, P)
               "rand": grid[:, :, 1:].transpose(3, 0, 1, 2)}        # (B, Nn, P, D)
        if plan.whole_layer:
            out["whole"] = correct[:, -1].T                          # (B, Nn)
        if self.predictions:
            out["clean_pred"] = jnp.argmax(clean, -1).astype(jnp.int32)
            out["pred"] = jnp.stack([jnp.argmax(v, -1) for v in variant_logits]).astype(jnp.int32).transpose(2, 0, 1)
            out["drops"] = {site: (k < 0.5).transpose(1, 0, 2) for site, k in keeps.items()}
        return out


# --- the pass over the data --------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _init_rows(total: int, plan: Plan) -> dict[str, np.ndarray]:
    n_n, n_p = len(plan.groups), len(plan.ps)
    rows = {"done": np.zeros(total, bool), "clean": np.zeros(total, bool),
            "top": np.zeros((total, n_n, n_p), bool), "rand": np.zeros((total, n_n, n_p, plan.draws), bool)}
    if plan.whole_layer:
        rows["whole"] = np.zeros((total, n_n), bool)
    return rows


def evaluate(config: Any, loaded: LoadedModel, plan: Plan, source: Any, mesh: jax.sharding.Mesh,
             workdir: Workdir, evaluator: Evaluator | None = None) -> dict[str, np.ndarray]:
    """Per-image correctness rows of one model over every image of `source` (resumable)."""
    batch_size = int(config.data.batch_size)
    evaluator = evaluator or Evaluator(loaded.module, loaded.variables, plan, loaded.pretrained_cfg,
                                       seed=int(config.seed), variant_batch=int(config.ablation.variant_batch),
                                       mesh=mesh)

    def process(batch: dict[str, Any], rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = evaluator(batch)
        out = parallel.to_host({**{k: out[k] for k in rows if k != "done"}, "index": batch["index"],
                                "valid": batch["valid"]})
        idx = out["index"][out["valid"]]
        for name in rows:
            rows[name][idx] = True if name == "done" else out[name][out["valid"]]
        return rows

    key = {"model": loaded.describe(), "weights": fingerprint.weights(loaded.weights),
           "grid": dataclasses.asdict(Grid.from_config(config.ablation)),
           "ablation_sites": [s.site for s in plan.groups[-1].sites], "seed": int(config.seed),
           "data": _data_key(config.data), "images": fingerprint.data(source)}
    stop = int(config.ablation.stop_after_batches) or None
    return resumable.run_resumable(
        workdir, key=key, total=len(source), batch_size=batch_size, resume=config.resume,
        progress=config.progress, desc=f"ablate {loaded.name}", is_writer=jax.process_index() == 0,
        batches_from=lambda start: data.batches(source, loaded.pretrained_cfg, batch_size, mesh, start=start,
                                                cache_dir=config.data.cache_dir or None,
                                                num_workers=config.data.num_workers or None),
        init=lambda: _init_rows(len(source), plan), process=process, stop_after_batches=stop)


def _data_key(data_cfg: Any) -> dict[str, Any]:
    """The data fields that decide which images are evaluated (not batch size, caches or workers)."""
    ignore = {"batch_size", "cache_dir", "num_workers", "data_dir", "manual_dir"}
    return {k: v for k, v in data_cfg.to_dict().items() if k not in ignore}


# --- run ---------------------------------------------------------------------------------------------------

def _check_weights(config: Any, names: Sequence[str]) -> None:
    """Every model's weights can be found (before any compute); shapes are checked when each is loaded."""
    loading.check_weights(names, config.weights, config.checkpoint_dir)


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


def planned_modules(config: Any, names: Sequence[str]) -> list[Any]:
    """The module each model will be loaded as (classifier, image size; no weights are read): a headless
    model, a size that does not divide or a head file that does not fit is an error here, before any work."""
    options = loading.config_options(config)
    if options.get("head_weights") and len(names) > 1:
        raise ValueError(f"head_weights {options['head_weights']} is the classifier of one model, but "
                         f"{len(names)} are listed in ablation.models; run them one at a time")
    modules = []
    for name in names:
        module = loading.planned_module(name, config.weights, config.checkpoint_dir, missing_ok=True, **options)
        check_classifier(name, module, options)
        modules.append(module)
    return modules


def prepare(config: Any) -> tuple[Grid, list[str]]:
    """Checks the whole run before any compute: config, model names, classifiers, grid against each model,
    weights."""
    ab = config.ablation
    grid = Grid.from_config(ab)
    if not 0.0 < float(ab.confidence) < 1.0:
        raise ValueError(f"ablation.confidence must lie in (0, 1), got {ab.confidence}")
    if int(ab.bootstrap) < 1:
        raise ValueError(f"ablation.bootstrap (resamples) must be at least 1, got {ab.bootstrap}")
    names = model_names(config)
    for module in planned_modules(config, names):   # unknown names (with suggestions) and bad grids error here
        grid.plan(module)
    _check_weights(config, names)
    return grid, names


def run(config: Any, workdir: Workdir) -> dict[str, Any]:
    grid, names = prepare(config)
    mesh = parallel.make_mesh()
    batch_size = int(config.data.batch_size)
    parallel.check_batch_size(mesh, batch_size)
    source = data.make_eval_source(config.data)
    if source.num_classes == 0:
        raise ValueError(f"the ablation needs labelled images; {source.name} has no labels. Use "
                         "data.source='folder' with one subfolder per class, or a labelled TFDS dataset")

    results, explore = [], []
    for name in names:
        loaded = loading.load_model(name, config.weights, config.checkpoint_dir, config.seed,
                                    **loading.config_options(config))
        data.check_labels(source, loaded.info.num_classes)
        plan = grid.plan(loaded.module)     # the loaded module may differ (e.g. the checkpoint's classes)
        explore_k = int(config.ablation.get("explore_images", 0))
        evaluator = Evaluator(loaded.module, loaded.variables, plan, loaded.pretrained_cfg, seed=int(config.seed),
                              variant_batch=int(config.ablation.variant_batch), mesh=mesh, predictions=explore_k > 0)
        rows = evaluate(config, loaded, plan, source, mesh, Workdir(workdir.root / _slug(loaded.name)), evaluator)
        results.append(model_result(config, loaded, plan, rows, source))
        # report.html's explorer: the first k images once more through the pass's compiled step (every process)
        explore.append((results[-1], plan, loaded.info.patch_grid, ablation_explorer.collect(
            explore_k, evaluator, rows, lambda start, stop, cfg=loaded.pretrained_cfg: data.batches(
                source, cfg, batch_size, mesh, start=start, stop=stop, cache_dir=config.data.cache_dir or None))))
        log.info("%s: A0 = %.4f on %d images", loaded.name, results[-1]["A0"], results[-1]["images_used"])

    out = {"experiment": "ablate", "decisions": list(DECISIONS), "models": results,
           "data": {**source.describe(), "config": config.data.to_dict()}, "config": config.to_dict(),
           "versions": versions()}
    if jax.process_index() == 0:
        explorer = ablation_explorer.explorer(explore, source.class_names)
        ablation_report.write_outputs(workdir, out, config,   # also the sanity warnings (logged, in report.md)
                                      explorers=[explorer] if explorer else [])
    return out


def model_result(config: Any, loaded: LoadedModel, plan: Plan, rows: dict[str, np.ndarray],
                 source: Any) -> dict[str, Any]:
    ab = config.ablation
    stats = ablation_report.summarize(rows, plan.ps, [g.n for g in plan.groups], samples=int(ab.bootstrap),
                                      confidence=float(ab.confidence), seed=int(config.seed))
    sites = plan.groups[-1].sites
    skipped = int(len(source) - rows["done"].sum())
    return {
        **loaded.describe(), "name": loaded.name, "label": loaded.arch,
        "grid": {"p": list(plan.ps), "n": [g.n for g in plan.groups], "draws": plan.draws,
                 "rank_by": plan.rank_by, "cnn_unit": plan.cnn_unit, "renormalize": plan.renormalize,
                 "whole_layer_reference": plan.whole_layer},
        "sites": [{"site": s.site, "kind": s.kind, "units": s.units} for s in sites],
        "k": {str(p): [plan.ks[s.site][i] for s in sites] for i, p in enumerate(plan.ps)},
        "images_total": len(source), "images_skipped": skipped,
        "skipped_reasons": {str(i): why for i, why in sorted(source.skipped.items())[:20]},
        **stats,
    }
