"""Model registry: timm architecture name -> Flax module.

Each family file (vit.py, swin.py, vgg.py, resnet.py, convnext.py) exposes
  ARCHS: dict[str, dict]            arch name -> {"kwargs": constructor kwargs, "default_cfg": {...}}
  build(arch: str, **overrides) -> flax.linen.Module   (module has an `info()` method -> ModelInfo)
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from types import ModuleType

import flax.linen as nn

FAMILIES = ("vit", "swin", "vgg", "resnet", "convnext")


def _family_modules() -> dict[str, ModuleType]:
    mods = {}
    for fam in FAMILIES:
        try:
            mods[fam] = importlib.import_module(f"vitsparse_jax.models.{fam}")
        except ModuleNotFoundError as e:  # a family not written yet; only our own modules may be missing
            if e.name != f"vitsparse_jax.models.{fam}":
                raise
    return mods


def split_name(name: str) -> tuple[str, str | None]:
    """'vit_base_patch16_224.augreg_in21k' -> ('vit_base_patch16_224', 'augreg_in21k')."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def list_models(pattern: str = "*") -> list[str]:
    """The registered architectures matching `pattern` (fnmatch). With their pretrained tags, as timm's
    `list_models(filter, pretrained=True)`: `vitsparse_jax.weights.list_models` (the tags are the weights')."""
    names = []
    for mod in _family_modules().values():
        names.extend(mod.ARCHS)
    return sorted(fnmatch.filter(names, pattern))


def family_of(arch: str) -> ModuleType:
    for mod in _family_modules().values():
        if arch in mod.ARCHS:
            return mod
    close = difflib.get_close_matches(arch, list_models(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {arch!r}.{hint} `vitsparse_jax.models.list_models()` lists all.")


def create_model(name: str, **overrides) -> nn.Module:
    """Builds the Flax module for a timm model name (a '.tag' suffix is accepted and ignored)."""
    arch, _ = split_name(name)
    return family_of(arch).build(arch, **overrides)
