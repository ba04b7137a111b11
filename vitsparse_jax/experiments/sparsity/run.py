"""Experiment: sparsity of attention (ViT, DeiT, Swin) or of channels (VGG, ResNet); paper 1, sections 3-4.

  python -m vitsparse_jax.main --config=configs/sparsity.py [--config.model=...]

One streaming pass over the dataset (`resumable.run_resumable`): each batch's clean forward pass captures
the post-softmax maps (or post-ReLU maps), reduces them on device to float32 sums
(`sparsity_stats.*_batch_sums`) and the host adds those in float64. Then: results.json, CSV tables,
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
from vitsparse_jax.experiments.sparsity import report
from vitsparse_jax.experiments.sparsity import stats as st
from vitsparse_jax.experiments.sparsity.probe import Example, Probe
from vitsparse_jax.models import swin as swin_models
from vitsparse_jax.runtime import parallel, resumable
from vitsparse_jax.runtime.workdir import Workdir, versions
from vitsparse_jax.weights.loading import LoadedModel, load_model

log = logging.getLogger(__name__)
ATTENTION_FAMILIES = ("vit", "swin")
CNN_FAMILIES = ("vgg", "resnet")
KINDS = ("auto", "attention", "cnn")

# Written next to every result (results.json, report.md): what the statistics are, where a choice was made.
ATTENTION_CHOICES = {
    "mu": "mu[l,j] = mean over heads and all query rows (class row included) of column j of the post-softmax "
          "map; the prefix (class/distillation) columns are left out of every statistic after that",
    "correlation": "one pooled Pearson r over all (image, patch column) values (published code), merged "
                   "batch by batch from centred float64 co-moments",
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
    raise ValueError(f"{model} is a transformer ({family}): sparsity.kind='cnn' needs a VGG or ResNet; "
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
    layout = st.AttentionLayout(
        grids=grids, prefix=info.num_prefix_tokens, heads=heads, corr_grid=corr_grid, nu_range=_nu_range(cfg),
        top_k=st.num_top(float(cfg.top_fraction), last), top_head=top_head,
        top_fractions=_fractions(cfg))
    return Probe("attention", names, probs, layout, index)


def channel_probe(loaded: LoadedModel, cfg: Any) -> Probe:
    names = tuple(loaded.info.ablation_sites)   # SPEC sec. 3 "layers counted"
    shapes = _capture_shapes(loaded, names)
    layout = st.ChannelLayout(channels=tuple(shapes[n][-1] for n in names), nu_range=_nu_range(cfg),
                              top_fractions=_fractions(cfg))
    return Probe("cnn", names, names, layout)


def make_probe(loaded: LoadedModel, cfg: Any) -> Probe:
    kind = resolve_kind(cfg.kind, loaded.info.family, loaded.name)
    return attention_probe(loaded, cfg) if kind == "attention" else channel_probe(loaded, cfg)


def batch_sums_fn(loaded: LoadedModel, probe: Probe) -> Callable[..., dict[str, jax.Array]]:
    """jit(variables, batch) -> the batch's float32/int32 sums (replicated over the mesh)."""
    cfg = loaded.pretrained_cfg

    @jax.jit
    def fn(variables: Any, image: jax.Array, valid: jax.Array, index: jax.Array) -> dict[str, jax.Array]:
        _, aux = loaded.module.apply(variables, data.normalize(image, cfg), capture=probe.captures)
        w = valid.astype(jnp.float32)
        if probe.kind == "attention":
            mus, mu_h = probe.reduce(aux)
            sums = st.attention_batch_sums(mus, mu_h, w, probe.layout)
        else:
            sums = st.channel_batch_sums([aux[n] for n in probe.names], w, probe.layout)
        sums["skipped"] = jnp.sum((index >= 0) & ~valid).astype(jnp.int32)   # unreadable images
        return sums

    return fn


# ---------------------------------------------------------------------------------------------------------
# The pass over the dataset

def collect(loaded: LoadedModel, probe: Probe, source: data.Source, mesh: jax.sharding.Mesh, config: Any,
            workdir: Workdir, stop_after_batches: int | None = None) -> dict[str, np.ndarray]:
    """Totals (float64 / int64) of the per-batch sums over every image of `source` (resumable)."""
    batch_size = int(config.data.batch_size)
    fn = batch_sums_fn(loaded, probe)
    variables = parallel.replicate(loaded.variables, mesh)
    shapes = jax.eval_shape(fn, variables, *(jax.ShapeDtypeStruct(s, d) for s, d in (
        ((batch_size, loaded.info.img_size, loaded.info.img_size, 3), jnp.uint8), ((batch_size,), jnp.bool_),
        ((batch_size,), jnp.int32))))

    def process(batch: dict[str, jax.Array], acc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sums = fn(variables, batch["image"], batch["valid"], batch["index"])
        return st.accumulate(acc, parallel.to_host(sums))

    s = config.sparsity
    key = {"experiment": "sparsity", "model": loaded.name, "weights": loaded.weights,
           "data": {"identity": source.identity, "name": source.name, "images": len(source)},
           "statistics": {"kind": probe.kind, "layers": probe.names, "top_fraction": s.top_fraction,
                          "top_by": s.top_by, "top_head": s.top_head, "nu": _nu_range(s),
                          "top_fractions": tuple(s.top_fractions)}}
    return resumable.run_resumable(
        workdir, key=key, total=len(source), batch_size=batch_size, resume=config.resume,
        progress=config.progress, desc=f"sparsity {loaded.name}", is_writer=jax.process_index() == 0,
        batches_from=lambda start: data.batches(source, loaded.pretrained_cfg, batch_size, mesh, start=start,
                                                cache_dir=config.data.get("cache_dir") or None,
                                                num_workers=config.data.get("num_workers") or None),
        init=lambda: st.zeros_like_sums(shapes), process=process, stop_after_batches=stop_after_batches)


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
    _, mu_h = probe.column_means(aux, last)
    mu_s1, _ = probe.column_means(aux, s1)
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
    if int(totals["images"]) == 0:
        raise ValueError(f"none of the {len(source)} images of {source.name} could be read")
    ex = example(loaded, probe, source, mesh, choice) if choice and outputs else None
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
        return report.write_outputs(workdir, summary, probe, res, ex)
    return {**summary, "statistics": res}


def run(config: Any, workdir: Workdir) -> dict[str, Any]:
    mesh = parallel.make_mesh()
    parallel.check_batch_size(mesh, int(config.data.batch_size))
    source = check_not_empty(data.make_eval_source(config.data))
    loaded = load_model(config.model, config.weights, config.checkpoint_dir, config.seed)
    return measure(config, workdir, loaded, source, mesh)
