"""Experiment: sparsity of attention (ViT, DeiT, Swin) or of channels (VGG, ResNet); paper 1, sections 3-4.

  python -m vitsparse_jax.main --config=configs/sparsity.py [--config.model=...]

One streaming pass over the dataset (`resumable.run_resumable`): each batch's clean forward pass captures
the post-softmax maps (or post-ReLU maps) and reduces them on device to per-image vectors (column
means with their rounding error, channel l1 scores); the host computes each image's statistics in
float64 and adds the images in dataset order (`stats.accumulate`). Then: results.json, CSV tables,
figures (PNG + PDF) and report.md. Definitions: SPEC sections 2 and 4; our choices: docs/sparsity.md.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitsparse_jax import data
from vitsparse_jax.experiments.sparsity import compare, explorer, norms, report
from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.experiments.sparsity.probe import Example, Probe
from vitsparse_jax.models import swin as swin_models
from vitsparse_jax.runtime import fingerprint, parallel, resumable
from vitsparse_jax.runtime.workdir import Workdir, versions
from vitsparse_jax.weights.loading import LoadedModel, config_options, load_model

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
    "layers": "the ablation layers of SPEC sec. 3 (VGG: ReLUs after 3x3 convs; ResNet: bottleneck act2, "
              "basic act1 and act2)",
    "score": "a channel's l1 score = sum over positions of |a| (post-ReLU), per image; its share = score / "
             "the layer's total; nu = -log10(share), reference log10(C) (uniform share)",
    "top_share": "mean over images of the share of the layer's l1 held by the top round(p * C) channels",
}


def choices(kind: str, family: str) -> dict[str, str]:
    if kind == "cnn":
        return CNN_CHOICES
    return {**ATTENTION_CHOICES, **(SWIN_CHOICES if family == "swin" else {})}


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
                         "or 'cnn' for its channel l1 statistics (SPEC sec. 3, CNN)")
    raise ValueError(f"{model} is a transformer ({family}): sparsity.kind='cnn' needs a CNN (VGG, ResNet, ConvNeXt); "
                     "use 'auto' or 'attention'")


def resolve_index(index: int, size: int, what: str) -> int:
    """Python-style index (negative = from the end) into `size` items, with a clear error when out of range."""
    if not -size <= index < size:
        raise ValueError(f"{what} = {index} is out of range: there are {size} (valid: {-size} .. {size - 1})")
    return index % size


def _capture_shapes(loaded: LoadedModel, captures: Sequence[str]) -> dict[str, tuple[int, ...]]:
    size = loaded.info.img_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    aux = jax.eval_shape(lambda v, x: loaded.module.apply(v, x, capture=tuple(captures))[1], loaded.variables, x)
    return {k: tuple(v.shape) for k, v in aux.items()}


def _fractions(cfg: Any) -> tuple[float, ...]:
    return tuple(st.check_fraction(float(p)) for p in cfg.top_fractions)


def _nu_range(cfg: Any) -> tuple[float, float, int]:
    lo, hi, bins = float(cfg.nu_min), float(cfg.nu_max), int(cfg.nu_bins)
    if not hi > lo or bins < 1:
        raise ValueError(f"need nu_min < nu_max and nu_bins >= 1, got {lo}, {hi}, {bins}")
    return lo, hi, bins


def attention_probe(loaded: LoadedModel, cfg: Any) -> Probe:
    info = loaded.info
    names = tuple(site.removesuffix(".attn") for site in info.ablation_sites)   # every attention block
    swin = info.family == "swin"
    probs = tuple(f"{n}.attn.probs" for n in names)
    shapes = _capture_shapes(loaded, probs + (names if swin else ()))
    if swin:
        grids = tuple(shapes[n][1:3] for n in names)          # block maps (B, H, W, C)
        index = tuple(swin_models.window_token_index(loaded.module, int(n.split(".")[1]), int(n.split(".")[3]))
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
    norms = bool(cfg.get("token_norms", False)) and not swin    # SPEC sec. 7 (ViT tokens; Swin: not measured)
    factor = float(cfg.get("norm_factor", 2.0))
    if norms and not factor > 0:
        raise ValueError(f"sparsity.norm_factor must be > 0 (high-norm = norm > factor x median), got {factor}")
    layout = st.AttentionLayout(
        grids=grids, prefix=info.num_prefix_tokens, heads=heads, corr_grid=corr_grid, nu_range=_nu_range(cfg),
        top_k=st.num_top(float(cfg.top_fraction), last), top_head=top_head,
        top_fractions=_fractions(cfg), prefix_kinds=tuple(getattr(info, "prefix_kinds", ())),
        norm_factor=factor if norms else None)
    return Probe("attention", names, probs, layout, index, ("embed", *names) if norms else ())


def channel_probe(loaded: LoadedModel, cfg: Any) -> Probe:
    names = tuple(loaded.info.ablation_sites)   # SPEC sec. 3 "layers counted"
    shapes = _capture_shapes(loaded, names)
    layout = st.ChannelLayout(channels=tuple(shapes[n][-1] for n in names), nu_range=_nu_range(cfg),
                              top_fractions=_fractions(cfg))
    return Probe("cnn", names, names, layout)


def make_probe(loaded: LoadedModel, cfg: Any) -> Probe:
    kind = resolve_kind(cfg.kind, loaded.info.family, loaded.name)
    return attention_probe(loaded, cfg) if kind == "attention" else channel_probe(loaded, cfg)


def device_values_fn(loaded: LoadedModel, probe: Probe) -> Callable[..., dict[str, Any]]:
    """jit(variables, image) -> the batch's per-image vectors (`Probe.reduce`): what leaves the device."""
    cfg = loaded.pretrained_cfg

    @jax.jit
    def fn(variables: Any, image: jax.Array) -> dict[str, Any]:
        _, aux = loaded.module.apply(variables, data.normalize(image, cfg), capture=probe.all_captures)
        return probe.reduce(aux)

    return fn


# ---------------------------------------------------------------------------------------------------------
# The pass over the dataset

def collect(loaded: LoadedModel, probe: Probe, source: data.Source, mesh: jax.sharding.Mesh, config: Any,
            workdir: Workdir, stop_after_batches: int | None = None) -> dict[str, np.ndarray]:
    """Totals (float64 / int64) of the per-image statistics over every image of `source` (resumable)."""
    batch_size = int(config.data.batch_size)
    fn = device_values_fn(loaded, probe)
    variables = parallel.replicate(loaded.variables, mesh)

    per_image = bool(config.sparsity.get("per_image", False))
    if per_image and probe.kind != "attention":
        raise ValueError("sparsity.per_image writes the last block's mu and token norms: it needs a transformer "
                         f"(got {loaded.name}, a CNN); leave it False")

    def empty() -> dict[str, np.ndarray]:
        size = loaded.info.img_size
        shapes = jax.eval_shape(fn, variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8))
        one = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        acc = {**st.empty_totals(probe.host_values(one)), "skipped": np.zeros((), np.int64)}
        if per_image:   # one row per image of the dataset, filled as its batch passes (kept in the resume state)
            acc.update({f"{PER_IMAGE}{k}": np.zeros((len(source), *v.shape[1:]), v.dtype)
                        for k, v in probe.image_rows(one).items()})
            acc[f"{PER_IMAGE}done"] = np.zeros(len(source), bool)
        return acc

    def process(batch: dict[str, jax.Array], acc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reduced = parallel.to_host(fn(variables, batch["image"]))
        valid, index = parallel.to_host((batch["valid"], batch["index"]))
        acc["skipped"] = acc["skipped"] + np.sum((index >= 0) & ~valid)   # unreadable images
        if per_image:
            for k, v in probe.image_rows(reduced).items():
                acc[f"{PER_IMAGE}{k}"][index[valid]] = v[valid]
            acc[f"{PER_IMAGE}done"][index[valid]] = True
        return st.accumulate(acc, probe.host_values(reduced), valid)

    s = config.sparsity
    key = {"experiment": "sparsity", "model": loaded.name, "weights": fingerprint.weights(loaded.weights),
           "data": {"identity": source.identity, "name": source.name, "images": len(source)},
           "statistics": {"kind": probe.kind, "layers": probe.names, "top_fraction": s.top_fraction,
                          "top_by": s.top_by, "top_head": s.top_head, "nu": _nu_range(s),
                          "top_fractions": tuple(s.top_fractions),
                          "norm_factor": getattr(probe.layout, "norm_factor", None),
                          "per_image": bool(s.get("per_image", False))}}
    return resumable.run_resumable(
        workdir, key=key, total=len(source), batch_size=batch_size, resume=config.resume,
        progress=config.progress, desc=f"sparsity {loaded.name}", is_writer=jax.process_index() == 0,
        batches_from=lambda start: data.batches(source, loaded.pretrained_cfg, batch_size, mesh, start=start,
                                                cache_dir=config.data.get("cache_dir") or None,
                                                num_workers=config.data.get("num_workers") or None),
        init=empty, process=process, stop_after_batches=stop_after_batches)


# ---------------------------------------------------------------------------------------------------------
# Fig. 1 / S1: the maps of one image

def _window(maps: np.ndarray, index: np.ndarray | None, token: int) -> tuple[np.ndarray, str]:
    """One image's maps of a block -> (heads, rows, cols) to draw and a title suffix. ViT: the maps as they
    are; Swin (nW, heads, T, T): those of the window that holds raster token `token`."""
    if index is None:
        return maps, ""
    window = int(np.argwhere(index == token)[0, 0])
    return maps[window], f", window {window}"


@dataclasses.dataclass(frozen=True)
class ExampleChoice:
    image: int   # index in the dataset
    head: int    # Fig. 1: head of the last block
    block: int   # Fig. S1


def example_choice(probe: Probe, source: data.Source, cfg: Any) -> ExampleChoice:
    """Checks the Fig. 1 / S1 options against the model and the data (before the long pass)."""
    return ExampleChoice(
        image=resolve_index(int(cfg.example_index), len(source), "sparsity.example_index (an image of the dataset)"),
        head=resolve_index(int(cfg.head), probe.layout.heads, "sparsity.head (a head of the last block)"),
        block=resolve_index(int(cfg.s1_block), len(probe.names), "sparsity.s1_block (a block)"))


def example(loaded: LoadedModel, probe: Probe, source: data.Source, mesh: jax.sharding.Mesh,
            choice: ExampleChoice) -> Example:
    """The maps of one image for Fig. 1 (one head of the last block) and S1 (every head of a block)."""
    lay: st.AttentionLayout = probe.layout
    i, head, s1, last = choice.image, choice.head, choice.block, len(probe.names) - 1
    batch = next(iter(data.batches(source, loaded.pretrained_cfg, mesh.size, mesh, start=i, stop=i + 1)))
    batch = parallel.to_host(batch)
    if not batch["valid"][0]:
        raise ValueError(f"image {i} of {source.name} could not be read ({source.skipped.get(i)}); "
                         "choose another sparsity.example_index")
    captures = (probe.captures[last], probe.captures[s1])
    _, aux = jax.jit(lambda v, x: loaded.module.apply(v, x, capture=captures))(
        loaded.variables, data.normalize(batch["image"][:1], loaded.pretrained_cfg))
    mu_h = st.hi_lo(probe.column_means(aux, last)[1])
    mu_s1 = st.hi_lo(probe.column_means(aux, s1)[0])
    p, grid = lay.prefix, lay.grids[last]
    # Fig. 1: the brightest patch columns of this head (its mu_h); S1: around the block's brightest column
    top = np.argsort(-np.asarray(mu_h)[0, head, p:], kind="stable")[:3]
    last_maps, where = _window(np.asarray(aux[captures[0]][0]), probe.token_index[last], int(top[0]))
    s1_maps, s1_where = _window(np.asarray(aux[captures[1]][0]), probe.token_index[s1],
                                int(np.argmax(np.asarray(mu_s1)[0, p:])))
    names = (probe.names[last], probe.names[s1])
    return Example(
        index=i, image=batch["image"][0], head_map=last_maps[head], head_title=f"{names[0]} head {head}{where}",
        top_cells=[divmod(int(j), grid[1]) for j in top], heads=s1_maps,
        heads_title=f"{loaded.name}: every head of {names[1]}{s1_where}, image {i}")


# ---------------------------------------------------------------------------------------------------------
# The experiment

def check_not_empty(source: data.Source) -> data.Source:
    if len(source) == 0:
        raise ValueError(f"the dataset {source.name} is empty: no images to measure (check data.source, "
                         "data.split and the subset options)")
    return source


PER_IMAGE = "per_image__"   # prefix of the per-image rows inside the totals (sparsity.per_image)
PER_IMAGE_FILE = "per_image.npz"


def write_per_image(workdir: Workdir, rows: dict[str, np.ndarray], source: data.Source) -> None:
    """`per_image.npz` (compressed): one row per readable image, keyed by its global index and file name."""
    done = np.flatnonzero(rows.pop("done"))
    arrays = {"index": done.astype(np.int64), "file_name": np.array([source.key(int(i)) for i in done]),
              **{k: v[done] for k, v in rows.items()}}
    workdir.write_npz(PER_IMAGE_FILE, arrays)


def measure(config: Any, workdir: Workdir, loaded: LoadedModel, source: data.Source, mesh: jax.sharding.Mesh,
            outputs: bool = True, stop_after_batches: int | None = None) -> dict[str, Any]:
    """Statistics of one model over `source`; returns the results.json content.

    outputs: write the tables, figures, results.json and report.md to `workdir` (False: only the resume
    state, for callers that want the numbers).
    """
    cfg = config.sparsity
    probe = make_probe(loaded, cfg)
    choice = example_choice(probe, source, cfg) if probe.kind == "attention" else None
    totals = collect(loaded, probe, source, mesh, config, workdir, stop_after_batches)
    rows = {k.removeprefix(PER_IMAGE): totals.pop(k) for k in list(totals) if k.startswith(PER_IMAGE)}
    if int(totals["images"]) == 0:
        raise ValueError(f"none of the {len(source)} images of {source.name} could be read")
    ex = example(loaded, probe, source, mesh, choice) if choice and outputs else None
    if ex is not None and probe.norm_captures:
        ex.norm_scatter = norms.scatter_values(loaded, probe, source, mesh, choice.image)
    explore = None
    if choice and outputs:   # report.html's explorer: images from example_index on
        explore = explorer.collect(loaded, probe, source, mesh, choice.image, int(cfg.get("explore_images", 4)),
                                   float(cfg.top_fraction))
    if probe.kind == "attention":
        res = st.attention_results(totals, probe.layout)
    else:
        res = st.channel_results(totals, probe.layout)
    skipped = int(totals["skipped"])
    summary = {"experiment": "sparsity", "kind": probe.kind, "name": loaded.name, "model": loaded.describe(),
               "data": {**source.describe(), "skipped": skipped}, "images": res["images"],
               "images_skipped": skipped, "layers": list(probe.names),
               "choices": choices(probe.kind, loaded.info.family), "config": config.to_dict(),
               "versions": versions()}
    if outputs and jax.process_index() == 0:
        log.info("sparsity of %s over %d images: writing to %s", loaded.name, res["images"], workdir.root)
        if rows:
            write_per_image(workdir, rows, source)
        return report.write_outputs(workdir, summary, probe, res, ex, explore)
    return {**summary, "statistics": res}


def model_names(config: Any) -> list[str]:
    """`sparsity.models` (comma-separated, duplicates an error) or else `config.model`."""
    listed = [m.strip() for m in str(config.sparsity.get("models", "") or "").split(",") if m.strip()]
    if len(set(listed)) != len(listed):
        raise ValueError(f"sparsity.models names a model twice: {','.join(listed)}")
    return listed or [config.model]


def run(config: Any, workdir: Workdir) -> dict[str, Any]:
    mesh = parallel.make_mesh()
    parallel.check_batch_size(mesh, int(config.data.batch_size))
    names = model_names(config)
    source = check_not_empty(data.make_eval_source(config.data))
    if len(names) == 1:
        loaded = load_model(names[0], config.weights, config.checkpoint_dir, config.seed, **config_options(config))
        return measure(config, workdir, loaded, source, mesh)
    summaries = []
    for name in names:   # the same images for every model; each model resumes in its own folder
        loaded = load_model(name, config.weights, config.checkpoint_dir, config.seed, **config_options(config))
        where = compare.model_dir(name)
        summaries.append({**measure(config, Workdir(workdir.path(where)), loaded, source, mesh), "folder": where})
    if jax.process_index() != 0:
        return {"models": names}
    return compare.write_comparison(workdir, summaries, config.to_dict())
