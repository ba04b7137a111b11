"""timm state dicts -> Flax variables with numpy alone (torch only to read .pth/.bin files).

A state dict is `{timm key: np.ndarray}`. The per-family key maps live in `weights/timm_keys/<family>.py`
(`convert_state_dict(sd, module) -> {flax path: array}`, numpy only); this module reads the files, cleans
the dict (BatchNorm counters, DDP / torch.compile prefixes, float32) and picks the map of the module's family.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.weights import pretrained, safetensors_io
from vitsparse_jax.weights.checkpoint import CheckpointError
from vitsparse_jax.weights.timm_keys import KEY_MAPS

# Key prefixes of wrapped models (DistributedDataParallel, torch.compile), removed.
PREFIXES = ("_orig_mod.", "module.")
# Wrapper keys of training checkpoints that hold the state dict.
WRAPPER_KEYS = ("model", "state_dict")
# The weights files of a timm Hugging Face repository, in the order timm tries them.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def clean_state_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drops BatchNorm `num_batches_tracked` counters, strips wrapper prefixes, makes floats float32."""
    out = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        for prefix in PREFIXES + PREFIXES[:1]:
            key = key.removeprefix(prefix)
        value = np.asarray(value)
        if value.dtype.kind == "f" or value.dtype.name.startswith(("bfloat", "float8")):   # ml_dtypes: kind 'V'
            value = value.astype(np.float32)
        out[key] = value
    return out


def _torch_load(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path.name} needs torch (pip install -e '.[convert]'); .safetensors files "
                          f"need neither torch nor timm") from None
    sd = torch.load(str(path), map_location="cpu", weights_only=True)   # never unpickles objects
    for key in WRAPPER_KEYS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    out = {}
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.is_floating_point() else value).numpy()
        out[key] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A timm state dict from .safetensors (numpy; float32/float16/bfloat16) or .pth/.pt/.bin (torch),
    cleaned by `clean_state_dict`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        sd = safetensors_io.read(path)
    elif path.suffix in TORCH_SUFFIXES:
        sd = _torch_load(path)
    else:
        raise ValueError(f"{path}: expected a .safetensors, .pth, .pt or .bin file")
    return clean_state_dict(sd)


def convert_state_dict(sd: Mapping[str, np.ndarray], module: nn.Module) -> dict[str, np.ndarray]:
    """Dispatches to `timm_keys.<family>.convert_state_dict`; returns flat Flax paths."""
    family = models.model_info(module).family
    mapper = KEY_MAPS.get(family)
    if mapper is None:
        raise CheckpointError(f"no timm key map for the {family!r} family (vitsparse_jax/weights/timm_keys/)")
    return mapper.convert_state_dict(dict(sd), module)


def build_module(arch: str, cfg: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """The Flax module of `arch` with the classifier (and image size) that the weights have."""
    for key, value in pretrained.module_overrides(arch, cfg).items():
        overrides.setdefault(key, value)
    return models.create_model(arch, **overrides)


def weights_in(folder: Path) -> Path:
    """The timm weights file of a snapshot folder (model.safetensors, else pytorch_model.bin)."""
    for name in HUB_WEIGHTS:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder} holds neither {' nor '.join(HUB_WEIGHTS)}")


def sidecar_config(path: Path) -> dict[str, Any] | None:
    """The timm `config.json` next to a weights file (a hub snapshot), or None."""
    config = path.parent / "config.json"
    return json.loads(config.read_text()) if config.exists() else None


def convert_file(arch: str, tag: str | None, path: str | Path, hub_config: Mapping[str, Any] | None = None,
                 num_classes: int | None = None, **overrides: Any) -> tuple[nn.Module, dict[str, np.ndarray], dict]:
    """timm weights file (or snapshot folder) -> (module, flat Flax variables, pretrained_cfg).

    The cfg comes from `hub_config`, else a `config.json` next to the file, else the shipped table, else
    the arch's default; the tag defaults to the config's, else 'local'."""
    path = Path(path)
    if path.is_dir():
        path = weights_in(path)
    if hub_config is None:
        hub_config = sidecar_config(path)
    cfg = pretrained.resolve_cfg(arch, tag, hub_config)
    if tag is None:
        cfg["tag"] = ((hub_config or {}).get("pretrained_cfg") or {}).get("tag") or "local"
    if num_classes is not None:
        cfg["num_classes"] = int(num_classes)
    module = build_module(arch, cfg, **overrides)
    sd = read_state_dict(path)
    if any("/" in k for k in sd) and not any("." in k for k in sd):
        raise CheckpointError(f"{path} holds converted (Flax) weights, not timm's, but its .json is missing")
    return module, convert_state_dict(sd, module), cfg
