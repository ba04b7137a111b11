"""Model + weights by name: built-in checkpoints, converted ones, timm's weights from the hub, or untrained.

`weights` (the `--config.weights` of every experiment):

- 'auto' (default): the built-in checkpoint of a built-in name (vitsparse_jax/assets/checkpoints), else a
  converted `<checkpoint_dir>/<arch>.<tag>.safetensors`, else timm's weights on the Hugging Face hub
  (`timm/<arch>.<tag>`, the arch's default tag when none is named), downloaded into huggingface_hub's cache
  and converted once (`hub.fetch`);
- 'builtin', 'checkpoint_dir' (or ''), 'hub': only that source;
- 'untrained': timm's initialisation scheme, seeded, with the tag's pretrained_cfg (classifier, image size,
  mean/std: the same preprocessing as the trained twin);
- a path: a converted checkpoint (.safetensors with its .json), or a timm file (.safetensors, .pth, .bin,
  or a hub snapshot folder), converted in memory.

Options of every source (`config_options(config)` reads them from a run's config): `img_size` (the model
is built at that size; a ViT's position embedding is resampled as timm does, and the eval crop follows),
`num_classes` (the checkpoint's by default; 0 drops a classifier; another size needs `head_weights`, or
untrained weights) and `head_weights` (a linear classifier file for a headless tower, `weights.heads`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitsparse_jax import models
import vitsparse_jax.weights.checkpoint as checkpoint
import vitsparse_jax.weights.heads as heads
import vitsparse_jax.weights.hub as hub
import vitsparse_jax.weights.pretrained as pretrained
import vitsparse_jax.weights.timm_state as timm_state

ASSETS = Path(__file__).parents[1] / "assets" / "checkpoints"
AUTO = "auto"
UNTRAINED = "untrained"
BUILTIN = "builtin"
HUB = "hub"
CHECKPOINT_DIR = "checkpoint_dir"
KEYWORDS = (AUTO, UNTRAINED, BUILTIN, HUB, CHECKPOINT_DIR, "")


@dataclasses.dataclass
class LoadedModel:
    module: nn.Module
    variables: Any
    info: models.ModelInfo
    pretrained_cfg: dict          # input_size, crop_pct, crop_mode, interpolation, mean, std, num_classes, tag
    arch: str
    tag: str | None
    weights: str                  # where the weights came from: a path, or 'untrained (seed N)'
    source: str = ""              # 'builtin' | 'checkpoint_dir' | 'file' | 'hf-hub:<repo>@<revision>' | 'untrained'
    head: dict | None = None      # head_weights: {'weights': path, 'sha256': ...} of the classifier file, if any
    size_note: str = ""           # why the model runs at another size than its arch's default, if it does

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    @property
    def trained(self) -> bool:
        return not self.weights.startswith(UNTRAINED)

    def describe(self) -> dict:
        out = {"model": self.arch, "tag": self.tag, "weights": self.weights, "source": self.source,
               "pretrained_cfg": self.pretrained_cfg, "family": self.info.family}
        if self.head:
            out["head_weights"] = dict(self.head)
        if self.size_note:
            out["size_note"] = self.size_note
        return out

    def num_params(self) -> int:
        """Parameters (timm's count: BatchNorm statistics are not parameters)."""
        params = self.variables.get("params", self.variables) if hasattr(self.variables, "get") else self.variables
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))

    def __repr__(self) -> str:
        """One line: name and tag, family, parameters, input size, classes, where the weights came from."""
        n = self.num_params()
        params = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
        classes = f"{self.info.num_classes} classes" if self.info.num_classes else "headless (features)"
        if not self.trained or self.source.startswith("hf-hub:"):
            where = self.weights if not self.trained else self.source
        else:
            where = f"{self.source or 'file'} {self.weights}"
        head = f", head_weights {self.head['weights']}" if self.head else ""
        return (f"LoadedModel({self.name}: {self.info.family}, {params} parameters, {self.info.img_size} px, "
                f"{classes}, weights: {where}{head})")

    def apply(self, x: Any, *, capture: str | Sequence[str] = (), masks: dict[str, Any] | None = None,
              start: str | None = None, stop: str | None = None, renormalize: bool = False) -> tuple[Any, dict]:
        """`module.apply(variables, x, ...)` under `jax.jit`, compiled once per module and static arguments
        (`capture`, `start`, `stop`, `renormalize`) and cached: returns (logits, or the pooled features of a
        headless model; aux, the captured tensors in forward order). `capture` takes one pattern or several;
        `masks` values are traced (a new mask does not recompile). See docs/design.md ("Models")."""
        patterns = (capture,) if isinstance(capture, str) else tuple(capture)
        return _jitted_apply(self.module)(self.variables, x, masks=masks, capture=patterns, start=start,
                                          stop=stop, renormalize=renormalize)


@functools.lru_cache(maxsize=16)
def _jitted_apply(module: nn.Module) -> Any:
    """The jitted `apply` of a module (modules are frozen dataclasses: equal modules share it)."""
    return jax.jit(module.apply, static_argnames=("capture", "start", "stop", "renormalize"))


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where the weights of one model come from, decided without downloading or converting anything."""
    kind: str                     # 'builtin' | 'checkpoint_dir' | 'file' | 'hub' | 'untrained'
    arch: str
    tag: str | None
    path: Path | None = None      # the file (builtin, checkpoint_dir, file)
    repo_id: str | None = None    # the Hugging Face repository (hub)

    def __str__(self) -> str:
        where = self.repo_id or self.path or ""
        return f"{self.kind}: {where}" if where else self.kind


def _convert_hint(name: str, checkpoint_dir: str) -> str:
    return (f"Use --config.weights=auto (timm's weights from the Hugging Face hub), or convert a local timm file: "
            f"python -m checkpoints_convert --model {name} --from-file FILE --out {checkpoint_dir or 'checkpoints'}.")


def _glob(arch: str, tag: str | None, folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{arch}.{tag}.safetensors" if tag else f"{arch}.*.safetensors"))


def _pick(arch: str, tag: str | None, folder: Path, found: list[Path]) -> Path | None:
    """The one checkpoint of `found`; without a tag and several found, the default tag's, else an error."""
    if len(found) <= 1:
        return found[0] if found else None
    default = folder / f"{arch}.{pretrained.default_tag(arch)}.safetensors"
    if default in found:
        return default
    raise ValueError(f"several converted checkpoints for {arch} in {folder}: "
                     f"{', '.join(p.name for p in found)}; name one with --config.model={arch}.<tag>")


def _find(arch: str, tag: str | None, folder: str | Path | None) -> Path | None:
    if not folder or not Path(folder).is_dir():
        return None
    return _pick(arch, tag, Path(folder), _glob(arch, tag, Path(folder)))


def find_checkpoint(arch: str, tag: str | None, checkpoint_dir: str) -> Path:
    """The converted checkpoint of arch[.tag] in checkpoint_dir (the only one, or the default tag's, when no
    tag is given); FileNotFoundError naming the folder otherwise."""
    name = f"{arch}.{tag}" if tag else arch
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"no converted weights for {name}: checkpoint_dir {checkpoint_dir!r} is not a "
                                f"folder. " + _convert_hint(name, checkpoint_dir))
    found = _find(arch, tag, folder)
    if found is None:
        pattern = f"{arch}.{tag}.safetensors" if tag else f"{arch}.*.safetensors"
        raise FileNotFoundError(f"no converted weights matching {pattern} in {folder}. "
                                + _convert_hint(name, checkpoint_dir))
    return found


def _builtin_tags(arch: str) -> list[str]:
    return [p.name[len(arch) + 1:-len(".safetensors")] for p in _glob(arch, None, ASSETS)]


def _hub_source(arch: str, tag: str | None) -> WeightsSource:
    if not pretrained.is_timm_arch(arch):
        raise ValueError(f"{arch} is one of this project's own models: the Hugging Face hub has no weights for it "
                         f"(built-in tags: {', '.join(_builtin_tags(arch)) or 'none'})")
    tag = tag or pretrained.default_tag(arch)
    if not tag:
        raise ValueError(f"{arch} has no default pretrained tag; name one: --config.model={arch}.<tag> "
                         f"({pretrained.tags_hint(arch)})")
    pretrained.check_tag(arch, tag)
    if not pretrained.has_hub_weights(arch, tag):
        raise ValueError(f"timm has no Hugging Face weights for {arch}.{tag}; {pretrained.tags_hint(arch)}")
    return WeightsSource(HUB, arch, tag, repo_id=pretrained.hub_location(arch, tag)[0])


def resolve_weights(name: str, weights: str = AUTO, checkpoint_dir: str = "") -> WeightsSource:
    """Which source `load_model(name, weights, checkpoint_dir)` will use; checks names, tags and files but
    downloads nothing. Unknown arch or tag: ValueError (with timm's tags); missing file: FileNotFoundError."""
    arch, tag = models.split_name(name)
    models.create_model(arch)                           # an unknown arch fails here, with suggestions
    weights = str(weights)
    if weights == UNTRAINED:
        if tag:
            pretrained.check_tag(arch, tag)
        return WeightsSource(UNTRAINED, arch, tag)
    if weights == BUILTIN:
        path = _find(arch, tag, ASSETS)
        if path is None:
            have = ", ".join(p.stem for p in sorted(ASSETS.glob("*.safetensors")))
            raise FileNotFoundError(f"no built-in checkpoint for {name}: the built-in ones are {have}. Use "
                                    f"--config.weights=auto for timm's weights of a timm model.")
        return WeightsSource(BUILTIN, arch, tag, path=path)
    if weights in ("", CHECKPOINT_DIR):
        return WeightsSource(CHECKPOINT_DIR, arch, tag, path=find_checkpoint(arch, tag, checkpoint_dir))
    if weights == HUB:
        return _hub_source(arch, tag)
    if weights == AUTO:
        for kind, folder in ((BUILTIN, ASSETS), (CHECKPOINT_DIR, checkpoint_dir)):
            path = _find(arch, tag, folder)
            if path is not None:
                return WeightsSource(kind, arch, tag, path=path)
        if not pretrained.is_timm_arch(arch):
            raise FileNotFoundError(
                f"no weights for {name}: it is one of this project's own models, not on the hub, and neither the "
                f"built-in checkpoints (tags: {', '.join(_builtin_tags(arch)) or 'none'}) nor checkpoint_dir "
                f"{checkpoint_dir!r} has it. Train it (configs/train.py), or pass --config.weights=/path/to/"
                f"checkpoint.safetensors or --config.weights=untrained.")
        return _hub_source(arch, tag)
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist. " + _convert_hint(name, checkpoint_dir))
    return WeightsSource("file", arch, tag, path=path)


def check_weights(names: Sequence[str], weights: str, checkpoint_dir: str) -> list[WeightsSource]:
    """Resolves every model's weights before any compute (and, offline, that hub weights are cached)."""
    if str(weights) not in KEYWORDS and len(names) > 1:
        raise ValueError(f"weights={weights!r} names one file but {len(names)} models are listed; use "
                         f"weights='auto' (built-in, checkpoint_dir, then the Hugging Face hub)")
    sources, missing = [], []
    for name in names:
        try:
            sources.append(resolve_weights(name, weights, checkpoint_dir))
        except FileNotFoundError as e:
            missing.append((name, e))
    if hub.offline():
        for s in sources:
            if s.kind == HUB and not hub.is_cached(s.arch, s.tag):
                missing.append((f"{s.arch}.{s.tag}", hub.unavailable(s.arch, s.tag, s.repo_id, hub.hub_cache_dir())))
    if len(missing) == 1:
        raise missing[0][1]
    if missing:
        raise FileNotFoundError(f"no weights for {len(missing)} of the {len(names)} models: "
                                f"{', '.join(name for name, _ in missing)}. The first one's message: {missing[0][1]}")
    return sources


def _is_converted(path: Path) -> bool:
    """A converted checkpoint: a .safetensors / .json pair whose .json is ours (has 'format_version')."""
    if path.suffix not in (".safetensors", ".json") or not path.with_suffix(".json").exists():
        return False
    try:
        return "format_version" in checkpoint.read_meta(path)
    except checkpoint.CheckpointError:
        raise   # a damaged .json beside the weights: say so, with the fix
    except ValueError:
        return False


def _untrained(arch: str, tag: str | None, seed: int, overrides: dict) -> LoadedModel:
    cfg = pretrained.resolve_cfg(arch, tag)               # the tag's cfg: the trained twin's preprocessing
    for key, value in pretrained.module_overrides(arch, cfg).items():
        overrides.setdefault(key, value)
    module = models.create_model(arch, **overrides)
    info = models.model_info(module)
    cfg["num_classes"] = info.num_classes
    if cfg.get("input_size") and int(cfg["input_size"][-1]) != info.img_size:
        cfg["input_size"] = [3, info.img_size, info.img_size]
    variables = models.init_untrained(module, seed)
    return LoadedModel(module, variables, info, cfg, arch, tag, f"{UNTRAINED} (seed {seed})", UNTRAINED)


def _recorded_size(cfg: dict) -> int | None:
    return int(cfg["input_size"][-1]) if cfg.get("input_size") else None


def _size_note(arch: str, info: models.ModelInfo, saved: int | None, asked: bool) -> str:
    """Why `info.img_size` (for the provenance): the size the weights were saved at, or img_size over it."""
    default = models.model_info(models.create_model(arch)).img_size
    if asked and saved and saved != info.img_size:
        how = ", position embedding resampled once from its grid" if info.family == "vit" else ""
        return f"runs at {info.img_size} px (img_size); the weights were saved at {saved} px{how}"
    if not asked and info.img_size != default:
        return (f"runs at {info.img_size} px, the input size recorded with its weights (the arch's default is "
                f"{default} px)")
    return ""


def _load_converted(path: Path, arch: str, tag: str | None, source: str, overrides: dict) -> LoadedModel:
    meta = checkpoint.read_meta(path)
    recorded = meta.get("pretrained_cfg", {})
    asked = "img_size" in overrides
    # build what the checkpoint holds: its classifier (e.g. none for DINO) and the size it was saved at
    for key, value in pretrained.module_overrides(arch, recorded).items():
        overrides.setdefault(key, value)
    module = models.create_model(arch, **overrides)
    info = models.model_info(module)
    variables, meta = checkpoint.load(path, module)
    tag = meta.get("tag", tag)
    cfg = dict(pretrained.table_cfg(arch, tag) or pretrained.clean_cfg(info.default_cfg))
    cfg.update(recorded)
    cfg = _eval_size(cfg, info)                # run at another size: crop it
    return LoadedModel(module, variables, info, cfg, arch, tag, str(path.with_suffix(".safetensors")), source,
                       size_note=_size_note(arch, info, _recorded_size(recorded), asked))


def _requested_classes(num_classes: Any, head: heads.Head | None) -> int | None:
    """The classifier size asked for (None: the checkpoint's); a head file decides it when given."""
    requested = None if num_classes is None or int(num_classes) < 0 else int(num_classes)
    if head is not None and requested not in (None, head.num_classes):
        raise ValueError(f"num_classes={requested} but head_weights {head.path} is a classifier of "
                         f"{head.num_classes} classes; leave num_classes at -1 (the head's) or make them agree")
    return requested


def _final_classes(name: str, have: int, requested: int | None, head: heads.Head | None, kind: str) -> int:
    """The classifier the loaded model ends with: `have` (the weights'), replaced by a head file, dropped with
    num_classes=0, or (untrained weights, timm files: built so already) the requested size."""
    if head is not None:
        return head.num_classes
    if requested is None or requested == have:
        return have
    if requested == 0:                          # trained weights: timm's num_classes=0, the pooled features
        return 0
    raise ValueError(
        f"num_classes={requested}, but the weights of {name} have " + (f"a classifier of {have} classes"
        if have else "no classifier (a headless tower: their output is the pooled features)") + ". A classifier of "
        f"another size cannot come from these weights: give one with --config.head_weights=PATH (a linear "
        f"classifier: .npz or .safetensors with {heads.LAYOUT}), use num_classes=0 to drop the classifier, or "
        f"--config.weights=untrained --config.num_classes={requested} (random weights) for a smoke test")


def _fit_classifier(loaded: LoadedModel, requested: int | None, head: heads.Head | None, kind: str) -> LoadedModel:
    final = _final_classes(loaded.name, loaded.info.num_classes, requested, head, kind)
    if head is not None:
        module, variables = heads.attach(loaded.module, loaded.variables, head)
    elif final != loaded.info.num_classes:
        module, variables = heads.drop(loaded.module, loaded.variables)
    else:
        return loaded
    info = models.model_info(module)
    cfg = {**loaded.pretrained_cfg, "num_classes": info.num_classes}
    return dataclasses.replace(loaded, module=module, variables=variables, info=info, pretrained_cfg=cfg,
                               head=head.describe() if head is not None else None)


def _eval_size(cfg: dict, info: models.ModelInfo) -> dict:
    """The cfg whose eval crop is the module's input size (a model run at another size: crop it)."""
    if cfg.get("input_size") and int(cfg["input_size"][-1]) != info.img_size:
        cfg["input_size"] = [*cfg["input_size"][:-2], info.img_size, info.img_size]
    return cfg


def load_model(name: str, weights: str = AUTO, checkpoint_dir: str = "", seed: int = 0,
               head_weights: str | None = None, **overrides: Any) -> LoadedModel:
    """Builds `name` ('arch' or 'arch.tag') with its weights (see the module docstring for `weights`).

    `overrides` go to `models.create_model` (e.g. `img_size`); `num_classes` is the classifier the weights
    have (default: the checkpoint's; 0 drops it); `head_weights` puts a linear classifier file on the model
    (`weights.heads`). Bad sizes and files are ValueErrors naming what fits."""
    src = resolve_weights(name, weights, checkpoint_dir)
    arch, tag = src.arch, src.tag
    head = heads.read_head(head_weights) if head_weights else None   # a bad file fails before the weights load
    requested = _requested_classes(overrides.pop("num_classes", None), head)
    if src.kind == UNTRAINED:
        if requested is not None:
            overrides["num_classes"] = requested
        loaded = _untrained(arch, tag, seed, overrides)
    elif src.kind == HUB:
        path = hub.fetch(arch, src.tag)
        loaded = _load_converted(path, arch, tag, checkpoint.read_meta(path).get("source", HUB), overrides)
    elif src.kind != "file" or _is_converted(src.path):
        loaded = _load_converted(src.path, arch, tag, src.kind, overrides)
    else:   # a timm file, as it is (its classifier; a ViT at its position embedding's size unless img_size)
        asked = "img_size" in overrides
        module, flat, cfg = timm_state.convert_file(arch, tag, src.path, **overrides)
        info = models.model_info(module)
        expected = checkpoint.flatten(models.variable_shapes(module))
        variables = checkpoint.unflatten({k: jnp.asarray(flat[k], dtype=expected[k].dtype) for k in expected})
        saved = None if asked else _recorded_size(cfg)
        loaded = LoadedModel(module, variables, info, _eval_size(cfg, info), arch, cfg.get("tag"), str(src.path),
                             "file", size_note=_size_note(arch, info, saved, asked))
    return _fit_classifier(loaded, requested, head, src.kind)


def planned_module(name: str, weights: str = AUTO, checkpoint_dir: str = "", head_weights: str | None = None,
                   missing_ok: bool = False, **overrides: Any) -> nn.Module:
    """The module `load_model(name, weights, checkpoint_dir, head_weights=..., **overrides)` will build (its
    classifier and image size), decided without loading or downloading weights: experiments check their
    plan against it before any work. The same errors as `load_model` for a size that does not divide, a
    classifier the weights cannot give or a head file that does not fit. `missing_ok`: weights that cannot
    be found (reported elsewhere) count as the tag's."""
    arch, tag = models.split_name(name)
    try:
        src = resolve_weights(name, weights, checkpoint_dir)
    except FileNotFoundError:
        if not missing_ok:
            raise
        src = WeightsSource(UNTRAINED, arch, tag)
    head = heads.read_head(head_weights) if head_weights else None
    requested = _requested_classes(overrides.pop("num_classes", None), head)
    kwargs = dict(overrides)
    if src.kind == "file" and not _is_converted(src.path):   # a timm file: its classifier and size, from its shapes
        module, _ = timm_state.file_module(arch, tag, src.path, **kwargs)
    else:   # the tag's cfg (untrained: with the classifier asked for), or what a converted checkpoint records
        cfg = (checkpoint.read_meta(src.path).get("pretrained_cfg", {}) if src.kind in (BUILTIN, CHECKPOINT_DIR, "file")
               else pretrained.resolve_cfg(arch, tag))
        if src.kind == UNTRAINED and requested is not None:
            cfg = {**cfg, "num_classes": requested}
        for key, value in pretrained.module_overrides(arch, cfg).items():
            kwargs.setdefault(key, value)
        module = models.create_model(arch, **kwargs)
    have = models.model_info(module).num_classes
    final = _final_classes(f"{arch}.{src.tag}" if src.tag else arch, have, requested, head, src.kind)
    if head is not None:
        heads.check(module, head)
    return module.clone(num_classes=final) if final != have else module


def config_options(config: Any) -> dict[str, Any]:
    """`load_model` / `planned_module` keyword arguments from a run config's shared fields `img_size` (0: the
    checkpoint's), `num_classes` (-1: the checkpoint's) and `head_weights` ('': none); defaults are left out."""
    get = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
    out: dict[str, Any] = {}
    img_size, num_classes = int(get("img_size", 0) or 0), int(get("num_classes", -1))
    if img_size < 0:
        raise ValueError(f"img_size must be 0 (the checkpoint's input size) or a size in pixels, got {img_size}")
    if num_classes < -1:
        raise ValueError(f"num_classes must be -1 (the checkpoint's), 0 (no classifier) or a number of classes, "
                         f"got {num_classes}")
    if img_size:
        out["img_size"] = img_size
    if num_classes >= 0:
        out["num_classes"] = num_classes
    if str(get("head_weights", "") or ""):
        out["head_weights"] = str(get("head_weights"))
    return out
