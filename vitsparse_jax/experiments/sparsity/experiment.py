"""Experiment: sparsity of attention (ViT, DeiT, Swin) or of channels (VGG, ResNet, ConvNeXt); paper 1, sections 3-4.

  python -m vitsparse_jax.main --config=configs/sparsity.py [--config.model=...]

One streaming pass over the dataset per model: the device step captures the post-softmax maps (or post-ReLU
maps) of each batch's clean forward pass and reduces them to per-image vectors (column means with their
rounding error, channel l1 scores); the host step computes each image's statistics in float64, vectorised,
and adds them in fixed blocks of images aligned to the dataset index (`Probe.totals`: exact, ordered sums,
`runtime/ordered.py`). Then: results.json, CSV tables, figures and report.md, per model
in `models/<name>/` and compared side by side when several models are listed (`compare.py`). Definitions:
docs/science.md#attention-maps and #sparsity-statistics; our choices: docs/sparsity.md.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np

from vitsparse_jax import data, models
from vitsparse_jax.experiments import dry_run
from vitsparse_jax.experiments.names import check_distinct
from vitsparse_jax.experiments.contract import Context, Experiment, Item, Measured, Measurement, Plan
from vitsparse_jax.experiments.sparsity import compare, explorer, norms, report
from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.experiments.sparsity.examples import (check_readable, example, example_choice, example_from,
                                                         example_values, resolve_index)
from vitsparse_jax.experiments.sparsity.probe import Probe
from vitsparse_jax.measures import attention_summary, locality
from vitsparse_jax.models import swin as swin_models
from vitsparse_jax.runtime import ordered
from vitsparse_jax.runtime.workdir import Workdir, versions
from vitsparse_jax.weights.loading import config_options

log = logging.getLogger(__name__)
ATTENTION_FAMILIES = ("vit", "swin")
CNN_FAMILIES = ("vgg", "resnet", "convnext")
KINDS = ("auto", "attention", "cnn")

# Written next to every result (results.json, report.md): what the statistics are, where a choice was made.
ATTENTION_CHOICES = {
    "mu": "mu[l,j] = mean over heads and all query rows (class row included) of column j of the post-softmax "
          "map; the prefix (class/distillation) columns are left out of every statistic after that",
    "correlation": "one pooled Pearson r over all (image, patch column) values (published code), merged "
                   "image by image, in dataset order, from centred float64 co-moments",
    "nu_reference": "-log10 of the mean of mu over patch columns and images",
    "top_k": "k = round(fraction * patches) (Python's round, as the ablation); ties go to the lower patch index",
}
SWIN_CHOICES = {
    "swin_mu": "mu_j = mean over heads and the query rows of the window holding token j (shift undone), so a "
               "block's mu sums to its number of windows",
    "swin_correlation": "layer-by-layer r on the last stage's grid: each block's mu summed over the tokens that "
                        "fall in each cell of that grid; heads and Fig. 3b on the last block's own grid",
    "swin_maps": "Fig. 1 / S1 draw the window that holds the brightest column",
}
CNN_CHOICES = {
    "layers": "the ablation layers (VGG: ReLUs after 3x3 convs; ResNet: bottleneck act2, "
              "basic act1 and act2)",
    "score": "a channel's l1 score = sum over positions of |a| (post-ReLU), per image; its share = score / "
             "the layer's total; nu = -log10(share), reference log10(C) (uniform share)",
    "top_share": "mean over images of the share of the layer's l1 held by the top round(p * C) channels",
}


def choices(kind: str, family: str) -> dict[str, str]:
    if kind == "cnn":
        return CNN_CHOICES
    if family == "swin":   # no class token and no prefix columns: swin_mu and the token grid replace them
        return {**{k: v.replace("patch column", "token column") for k, v in ATTENTION_CHOICES.items()
                   if k not in ("mu", "top_k")},
                "top_k": "k = round(fraction * tokens of the block's map) (Python's round, as the ablation); ties go "
                         "to the lower token index", **SWIN_CHOICES}
    return ATTENTION_CHOICES


# ---------------------------------------------------------------------------------------------------------
# What to capture and how to reduce it

def resolve_kind(requested: str, family: str, model: str) -> str:
    if requested not in KINDS:
        raise ValueError(f"sparsity.kind must be one of {KINDS}, got {requested!r}")
    natural = "attention" if family in ATTENTION_FAMILIES else "cnn"
    if requested == "auto" or requested == natural:
        return natural
    if requested == "attention":
        raise ValueError(f"{model} is a {family.upper()} CNN: it has no attention maps. Use sparsity.kind='auto' "
                         "or 'cnn' for its channel l1 statistics (docs/science.md#cnn-units)")
    raise ValueError(f"{model} is a transformer ({family}): sparsity.kind='cnn' needs a CNN (VGG, ResNet, ConvNeXt); "
                     "use 'auto' or 'attention'")


def _fractions(cfg: Any) -> tuple[float, ...]:
    return tuple(st.check_fraction(float(p)) for p in cfg.top_fractions)


def _nu_range(cfg: Any) -> tuple[float, float, int]:
    lo, hi, bins = float(cfg.nu_min), float(cfg.nu_max), int(cfg.nu_bins)
    if not hi > lo or bins < 1:
        raise ValueError(f"need nu_min < nu_max and nu_bins >= 1, got {lo}, {hi}, {bins}")
    return lo, hi, bins


def attention_probe(module: Any, cfg: Any) -> Probe:
    info = models.model_info(module)
    names = tuple(site.removesuffix(".attn") for site in info.ablation_sites)   # every attention block
    swin = info.family == "swin"
    probs = tuple(f"{n}.attn.probs" for n in names)
    shapes = models.capture_shapes(module, probs + (names if swin else ()))
    if swin:
        grids = tuple(shapes[n][1:3] for n in names)          # block maps (B, H, W, C)
        index = tuple(swin_models.window_token_index(module, int(n.split(".")[1]), int(n.split(".")[3]))
                      for n in names)
        heads = shapes[probs[-1]][2]                           # (B, nW, heads, T, T)
    else:
        grids = (tuple(info.patch_grid),) * len(names)
        index = (None,) * len(names)
        heads = shapes[probs[-1]][1]                           # (B, H, N, N)
    corr_grid = min(grids, key=lambda g: g[0] * g[1])
    if cfg.top_by not in ("head_mean", "head_index"):
        raise ValueError(f"sparsity.top_by must be 'head_mean' or 'head_index', got {cfg.top_by!r}")
    top_head = None
    if cfg.top_by == "head_index":
        top_head = resolve_index(int(cfg.top_head), heads, "sparsity.top_head (a head of the last block)")
    last = grids[-1][0] * grids[-1][1]
    norms = bool(cfg.get("token_norms", False)) and not swin    # high-norm-tokens (ViT tokens; Swin: not measured)
    factor = float(cfg.get("norm_factor", 2.0))
    if norms and not factor > 0:
        raise ValueError(f"sparsity.norm_factor must be > 0 (high-norm = norm > factor x median), got {factor}")
    layout = st.AttentionLayout(
        grids=grids, prefix=info.num_prefix_tokens, heads=heads, corr_grid=corr_grid, nu_range=_nu_range(cfg),
        top_k=st.num_top(float(cfg.top_fraction), last), top_head=top_head,
        top_fractions=_fractions(cfg), prefix_kinds=tuple(getattr(info, "prefix_kinds", ())),
        norm_factor=factor if norms else None)
    distances = attention_summary.block_measures(   # docs/science.md#attention-distance
        module, locality.DEFAULT_FRACTION, bool(cfg.get("distance_renormalize", False)), names)
    return Probe("attention", names, probs, layout, index, ("embed", *names) if norms else (), distances)


def channel_probe(module: Any, cfg: Any) -> Probe:
    names = tuple(models.model_info(module).ablation_sites)   # the ablation's layers (docs/science.md#cnn-units)
    shapes = models.capture_shapes(module, names)
    layout = st.ChannelLayout(channels=tuple(shapes[n][-1] for n in names), nu_range=_nu_range(cfg),
                              top_fractions=_fractions(cfg))
    return Probe("cnn", names, names, layout)


def make_probe(module: Any, cfg: Any, name: str = "") -> Probe:
    """The layers measured in `module` (named `name` in messages) and the layout of their statistics, checked
    against config.sparsity `cfg` (no weights needed)."""
    info = models.model_info(module)
    kind = resolve_kind(cfg.kind, info.family, name or info.name)
    return attention_probe(module, cfg) if kind == "attention" else channel_probe(module, cfg)


def device_values_fn(loaded: Any, probe: Probe) -> Callable[..., dict[str, Any]]:
    """jit(variables, image) -> the batch's per-image vectors (`Probe.reduce`): what leaves the device."""
    cfg = loaded.pretrained_cfg

    @jax.jit
    def fn(variables: Any, image: jax.Array) -> dict[str, Any]:
        _, aux = loaded.module.apply(variables, data.normalize(image, cfg), capture=probe.all_captures)
        return probe.reduce(aux)

    return fn




# ---------------------------------------------------------------------------------------------------------
# The experiment

PER_IMAGE = "per_image__"   # prefix of the per-image rows inside the totals (sparsity.per_image)
PER_IMAGE_FILE = "per_image.npz"
SCATTER = "scatter__"       # prefix of the norm scatter's rows (a few images from example_index on), kept by the pass


def scatter_images(probe: Probe, source: Any, cfg: Any) -> tuple[int, int] | None:
    """(first image, count) of the mu-against-norm scatter (docs/science.md#high-norm-tokens), whose values the
    pass keeps as its batches go by (no forward pass of its own); None without token norms."""
    if probe.kind != "attention" or not probe.norm_captures:
        return None
    first = example_choice(probe, source, cfg).image
    return first, min(norms.SCATTER_IMAGES, len(source) - first)


def write_per_image(workdir: Workdir, rows: dict[str, np.ndarray], source: Any) -> None:
    """`per_image.npz` (compressed): one row per readable image, keyed by its global index and file name."""
    done = np.flatnonzero(rows.pop("done"))
    arrays = {"index": done.astype(np.int64), "file_name": np.array([source.key(int(i)) for i in done]),
              **{k: v[done] for k, v in rows.items()}}
    workdir.write_npz(PER_IMAGE_FILE, arrays)


def model_names(config: Any) -> list[str]:
    """`sparsity.models` (comma-separated, duplicates an error) or else `config.model`."""
    listed = [m.strip() for m in str(config.sparsity.get("models", "") or "").split(",") if m.strip()]
    if len(set(listed)) != len(listed):
        raise ValueError(f"sparsity.models names a model twice: {','.join(listed)}")
    return listed or [config.model]


@dataclasses.dataclass
class Spec:
    """The run's switches (config.sparsity) and each model's probe, as checked before any work."""

    cfg: Any
    per_image: bool
    several: bool                                              # several models: per-model folders + comparison
    probes: dict[str, Probe] = dataclasses.field(default_factory=dict)   # by listed name (check_model)
    modules: dict[str, Any] = dataclasses.field(default_factory=dict)    # the planned module of each probe


@dataclasses.dataclass
class ModelPass:
    """One model's pass: the layers measured, the totals and the per-image rows (sparsity.per_image)."""

    probe: Probe
    totals: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]
    scatter: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)   # the norm scatter's images' rows


@dataclasses.dataclass
class Extras:
    """The example maps (Fig. 1, S1, the norm scatter) and report.html's explorer data of one model."""

    example: Any = None
    explore: Any = None


def _statistics(result: ModelPass) -> dict[str, Any]:
    if result.probe.kind == "attention":
        res = st.attention_results(result.totals, result.probe.layout)
        if result.probe.distances is not None:   # docs/science.md#attention-distance
            res["attention_distance"] = result.probe.distances.results(result.totals, int(result.totals["images"]))
        return res
    return st.channel_results(result.totals, result.probe.layout)


class Sparsity(Experiment):
    name = "sparsity"
    result_files = ("results.json", "results.csv")

    def check(self, config: Any) -> Plan:
        names = model_names(config)
        options = config_options(config)
        spec = Spec(config.sparsity, bool(config.sparsity.get("per_image", False)), len(names) > 1)
        items = tuple(Item(name, config.weights, options) for name in names)
        check_distinct(items, config.checkpoint_dir)
        return Plan(items, spec=spec)

    def check_model(self, plan: Plan, item: Item, module: Any) -> None:
        probe = make_probe(module, plan.spec.cfg, item.name)
        if plan.spec.per_image and probe.kind != "attention":
            raise ValueError("sparsity.per_image writes the last block's mu and token norms: it needs a transformer "
                             f"(got {item.name}, a CNN); leave it False")
        plan.spec.probes[item.name], plan.spec.modules[item.name] = probe, module

    def check_data(self, plan: Plan, source: Any, modules: Sequence[Any]) -> None:
        for probe in plan.spec.probes.values():
            if probe.kind == "attention":
                example_choice(probe, source, plan.spec.cfg)   # Fig. 1 / S1 options against the data

    def describe(self, plan: Plan, config: Any, images: int | None, modules: Sequence[Any]) -> list[str]:
        item, module = plan.items[0], modules[0]
        info = models.model_info(module)
        kind = config.sparsity.kind
        if kind == "auto":
            kind = "attention" if info.family in ("vit", "swin") else "cnn"
        what = (f"post-softmax attention of {len(info.ablation_sites)} blocks" if kind == "attention"
                else f"channel l1 of {len(info.ablation_sites)} post-ReLU layers")
        extra = " + 1 for the example maps (Fig. 1, S1)" if kind == "attention" else ""
        return [f"model: {item.name} ({info.family}): {what}",
                f"  weights: {dry_run.weights_source(item.name, item.weights, config.checkpoint_dir, config.seed)}",
                f"total: {dry_run.times(images, 1)} forward passes (1 per image){extra}"]

    def measure(self, plan: Plan, item: Item, loaded: Any, ctx: Context) -> Measurement:
        s, source = plan.spec.cfg, ctx.source
        probe = plan.spec.probes.get(item.name)   # checked before loading: the same module needs no new probe
        if probe is None or plan.spec.modules.get(item.name) != loaded.module:
            probe = make_probe(loaded.module, s, loaded.name)
        fn = device_values_fn(loaded, probe)
        variables = ctx.replicate(loaded.variables)
        per_image = plan.spec.per_image
        shapes = jax.eval_shape(fn, variables, ctx.image_batch_spec(loaded))   # the pass's trace, made here
        one = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
        totals = probe.totals(probe.host_values(one), len(source))   # exact, ordered sums (runtime/ordered.py)

        scatter = scatter_images(probe, source, s)

        def empty() -> dict[str, np.ndarray]:
            acc = {**totals.init(), "skipped": np.zeros((), np.int64)}
            if scatter:     # the scatter's rows: the last block's mu and the norms of its input tokens
                n, tokens = scatter[1], one["norms"].shape[-1]
                acc.update({f"{SCATTER}mu": np.zeros((n, tokens)), f"{SCATTER}norm_in": np.zeros((n, tokens), np.float32),
                            f"{SCATTER}done": np.zeros(n, bool)})
            if per_image:   # one row per image of the dataset, filled as its batch passes (kept in the resume state)
                acc.update({f"{PER_IMAGE}{k}": np.zeros((len(source), *v.shape[1:]), v.dtype)
                            for k, v in probe.image_rows(one).items()})
                acc[f"{PER_IMAGE}done"] = np.zeros(len(source), bool)
            return acc

        def host(reduced: dict[str, Any], valid: np.ndarray, index: np.ndarray,
                 acc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            acc["skipped"] = acc["skipped"] + np.sum((index >= 0) & ~valid)   # unreadable images
            if scatter:
                sel = np.flatnonzero(valid & (index >= scatter[0]) & (index < scatter[0] + scatter[1]))
                if sel.size:
                    slot = index[sel] - scatter[0]
                    acc[f"{SCATTER}mu"][slot] = st.hi_lo(tuple(np.asarray(x)[sel] for x in reduced["mu"][-1]))
                    acc[f"{SCATTER}norm_in"][slot] = np.asarray(reduced["norms"])[sel, -2]
                    acc[f"{SCATTER}done"][slot] = True
            if per_image:
                for k, v in probe.image_rows(reduced).items():
                    acc[f"{PER_IMAGE}{k}"][index[valid]] = v[valid]
                acc[f"{PER_IMAGE}done"][index[valid]] = True
            return totals.add(acc, probe.host_values(reduced), valid, index)

        def merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            """Two processes' accumulators (disjoint images): ordered totals merged in image order, counts
            added, per-image rows taken where each side filled them."""
            out = {**totals.merge(a, b), "skipped": a["skipped"] + b["skipped"]}
            for prefix in (PER_IMAGE, SCATTER):
                done = b.get(f"{prefix}done")
                for k, rows in a.items():
                    if done is not None and k.startswith(prefix):
                        out[k] = np.array(rows)
                        out[k][done] = b[k][done]
            return out

        def finish(acc: dict[str, np.ndarray]) -> ModelPass:
            rows = {k.removeprefix(PER_IMAGE): acc[k] for k in acc if k.startswith(PER_IMAGE)}
            kept = {k.removeprefix(SCATTER): acc[k] for k in acc if k.startswith(SCATTER)}
            return ModelPass(probe, {**totals.result(acc), "skipped": acc["skipped"]}, rows, kept)

        key = {"experiment": "sparsity", "model": loaded.name, "weights": ctx.weights_key(loaded),
               "data": {"identity": source.identity, "name": source.name, "images": len(source)},
               "statistics": {"kind": probe.kind, "layers": probe.names, "top_fraction": s.top_fraction,
                              "top_by": s.top_by, "top_head": s.top_head, "nu": _nu_range(s),
                              "top_fractions": tuple(s.top_fractions),
                              "norm_factor": getattr(probe.layout, "norm_factor", None),
                              "per_image": per_image, "totals_format": ordered.FORMAT,
                              "attention_distance": None if probe.distances is None else {
                                  "fraction": probe.distances.fraction,
                                  "renormalize": probe.distances.renormalize}}}
        return Measurement(
            key=key, device=lambda batch: fn(variables, batch["image"]), init=empty, host=host,
            readable=lambda acc: int(totals.current(acc, "images")), desc=f"sparsity {loaded.name}", finish=finish,
            folder=self._folder(plan, loaded), renamed=self._renamed(plan, item, loaded), merge=merge)

    @staticmethod
    def _folder(plan: Plan, loaded: Any) -> str:
        """models/<name with its tag> of a several-model run ('' for one model)."""
        return compare.model_dir(loaded.name) if plan.spec.several else ""

    @staticmethod
    def _renamed(plan: Plan, item: Item, loaded: Any) -> tuple[tuple[str, str], ...]:
        """The folder's name before names carried their tag (the name as listed), moved to `_folder` first."""
        old, new = compare.model_dir(item.name), Sparsity._folder(plan, loaded)
        return ((old, new),) if plan.spec.several and old != new else ()

    def extras(self, plan: Plan, item: Item, loaded: Any, result: ModelPass, ctx: Context) -> Extras:
        """Fig. 1 / S1's maps and report.html's explorer (images from example_index on): attention only."""
        probe, s = result.probe, plan.spec.cfg
        if probe.kind != "attention":
            return Extras()
        choice, images = example_choice(probe, ctx.source, s), int(s.get("explore_images", 4))
        if images > 0 and explorer.supported(probe) and not explorer.is_swin(probe):   # one forward pass for both
            fwd = explorer.forward(loaded, probe, ctx, choice.image, images, also=example_values(probe, choice))
            check_readable(fwd.batch, ctx, choice)
            ex = example_from(loaded, probe, choice, fwd.batch["image"][0], fwd.out["also"])
            explore = explorer.page_data(loaded, probe, fwd, float(s.top_fraction))
        else:
            ex = example(loaded, probe, ctx, choice)
            explore = explorer.collect(loaded, probe, ctx, choice.image, images, float(s.top_fraction))
        if result.scatter:   # kept by the pass
            ex.norm_scatter = norms.scatter_values(result.scatter)
        return Extras(ex, explore)

    def _summary(self, m: Measured, ctx: Context) -> dict[str, Any]:
        result, loaded, source = m.result, m.loaded, ctx.source
        skipped = int(result.totals["skipped"])
        return {"experiment": "sparsity", "kind": result.probe.kind, "name": loaded.name, "model": loaded.describe(),
                "data": {**source.describe(), "skipped": skipped}, "images": int(result.totals["images"]),
                "images_skipped": skipped, "layers": list(result.probe.names),
                "choices": choices(result.probe.kind, loaded.info.family), "config": ctx.config.to_dict(),
                "versions": versions()}

    def results(self, plan: Plan, measured: Sequence[Measured], ctx: Context) -> dict[str, Any]:
        if plan.spec.several:
            return {"models": [m.loaded.name for m in measured]}
        (m,) = measured
        return {**self._summary(m, ctx), "statistics": _statistics(m.result)}

    def report(self, plan: Plan, measured: Sequence[Measured], results: dict[str, Any], ctx: Context,
               workdir: Workdir) -> dict[str, Any]:
        summaries = []
        for m in measured:   # the same images for every model; several models: each in its own folder
            folder = compare.model_dir(m.loaded.name) if plan.spec.several else ""
            wd = Workdir(workdir.path(folder)) if folder else workdir
            log.info("sparsity of %s over %d images: writing to %s", m.loaded.name, int(m.result.totals["images"]),
                     wd.root)
            if m.result.rows:
                write_per_image(wd, dict(m.result.rows), ctx.source)
            extras = m.extras or Extras()
            summary = report.write_outputs(wd, self._summary(m, ctx), m.result.probe, _statistics(m.result),
                                           extras.example, extras.explore)
            summaries.append({**summary, "folder": folder} if folder else summary)
        if not plan.spec.several:
            return summaries[0]
        return compare.write_comparison(workdir, summaries, ctx.config.to_dict())


EXPERIMENT = Sparsity()
