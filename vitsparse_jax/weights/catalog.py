"""`list_models(filter, pretrained=True)` as timm has it: the names a run can load, with their tags.

    from vitsparse_jax.weights import list_models
    list_models("vit_small_patch16_224*", pretrained=True)
    # ['vit_small_patch16_224.augreg_in1k', 'vit_small_patch16_224.augreg_in21k', ..., 'vit_small_patch16_224.dino']

Without `pretrained` it lists the registered architectures (`vitsparse_jax.models.list_models`); with it,
every `arch.tag` whose weights `load_model` can find by name: the built-in checkpoints and the tags timm
publishes on the Hugging Face hub (the shipped table, `pretrained.py`). A filter without a '.' matches every
tag of the archs it matches (timm's rule); names sort as timm sorts them (digits as numbers).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from vitsparse_jax import models
import vitsparse_jax.weights.loading as loading
import vitsparse_jax.weights.pretrained as cfg_table   # not `pretrained`: list_models' argument


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _builtin_names() -> list[str]:
    """`arch.tag` of every checkpoint shipped in vitsparse_jax/assets/checkpoints."""
    return [path.name.removesuffix(".safetensors") for path in sorted(loading.ASSETS.glob("*.safetensors"))]


def _pretrained_names(archs: Iterable[str]) -> list[str]:
    archs = set(archs)
    names = [name for name in _builtin_names() if models.split_name(name)[0] in archs]
    for arch in archs:
        names += [f"{arch}.{tag}" for tag in cfg_table.known_tags(arch) if cfg_table.has_hub_weights(arch, tag)]
    return names


def list_models(filter: str | Iterable[str] = "", pretrained: bool = False) -> list[str]:  # noqa: A002 (timm's name)
    """Registered architectures matching `filter` (fnmatch patterns, '' = all), or, with `pretrained=True`,
    every `arch.tag` with weights to load by name (see the module docstring), sorted as timm sorts."""
    patterns = [filter] if isinstance(filter, str) else list(filter)
    patterns = [p for p in patterns if p] or ["*"]
    archs = models.list_models()
    if not pretrained:
        names = archs
    else:
        names = _pretrained_names(archs)
        patterns = [p if "." in p else f"{p}.*" for p in patterns]
    found = {name for p in patterns for name in fnmatch.filter(names, p)}
    return sorted(found, key=_natural_key)
