"""timm weights -> this project's converted checkpoints (safetensors + JSON, see docs/design.md).

Sources: the Hugging Face hub (`timm/<arch>.<tag>`), a local .safetensors/.pth/.bin (a training checkpoint,
a hub snapshot), or a live timm module. The per-family key mapping lives in
`vitsparse_jax/weights/timm_keys/<family>.py` as `convert_state_dict(sd: dict[str, np.ndarray], module) ->
dict[str, np.ndarray]` (flat Flax paths, numpy only). Reading .safetensors and converting needs neither torch
nor timm (`vitsparse_jax.weights.timm_state`); torch is imported lazily, only where a .pth/.bin file or a live
module is read, and timm only for its registry.

Experiments do not need this step: `--config.model=<arch>.<tag>` fetches and converts hub weights itself
(`vitsparse_jax.weights.hub`). This CLI is for local files and training checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.weights import checkpoint, hub, pretrained, timm_state
from vitsparse_jax.weights.checkpoint import CheckpointError
from vitsparse_jax.weights.pretrained import CFG_KEYS, clean_cfg
from vitsparse_jax.weights.timm_state import build_module, convert_state_dict

# --- state dicts ---------------------------------------------------------------------------------------


def state_dict_to_numpy(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torch tensors (or arrays) -> numpy, floating point as float32. BatchNorm's `num_batches_tracked`
    counters are training bookkeeping and are dropped; DDP / torch.compile key prefixes are removed."""
    out = {}
    for key, value in sd.items():
        if hasattr(value, "detach"):   # a torch.Tensor; torch is already imported by whoever made it
            value = value.detach().cpu()
            value = (value.float() if value.is_floating_point() else value).numpy()
        out[key] = value
    return timm_state.clean_state_dict(out)


def load_state_dict_file(path: str | Path) -> dict[str, np.ndarray]:
    """A timm state dict from .safetensors (numpy, no torch) or .pth/.pt/.bin (torch.load(weights_only=True))."""
    return timm_state.read_state_dict(path)


# --- pretrained_cfg ---------------------------------------------------------------------------------------

def timm_registry_cfg(arch: str, tag: str | None) -> dict[str, Any] | None:
    """timm's pretrained_cfg for arch.tag when timm is installed and knows it, else None."""
    try:
        import timm
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except (ImportError, RuntimeError):
        return None
    return None if cfg is None else clean_cfg(cfg)


def default_cfg(arch: str) -> dict[str, Any]:
    return pretrained.arch_default_cfg(arch)


def resolve_cfg(arch: str, tag: str | None, hub_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """pretrained_cfg from, in order: a timm hub config.json, the shipped table, timm's registry (an arch the
    table does not list yet), the arch's default cfg."""
    cfg = (pretrained.from_hub_config(hub_config) or pretrained.table_cfg(arch, tag)
           or (None if pretrained.in_table(arch) else timm_registry_cfg(arch, tag)) or default_cfg(arch))
    if tag:
        cfg["tag"] = tag
    return cfg


# --- sources ----------------------------------------------------------------------------------------------

def hub_repo_id(arch: str, tag: str) -> str:
    return pretrained.hub_location(arch, tag)[0]


def download_from_hub(arch: str, tag: str, cache_dir: str | None = None) -> tuple[Path, dict[str, Any] | None]:
    """timm's weights (model.safetensors, else pytorch_model.bin) and config.json, via huggingface_hub's cache."""
    files = hub.download(arch, tag, cache_dir)
    return files.weights, files.config


def convert(name: str, out_dir: str | Path, *, from_file: str | Path | None = None,
            num_classes: int | None = None, cache_dir: str | None = None, **overrides: Any) -> Path:
    """Converts `arch[.tag]` from the hub, or from `from_file`, and writes it to `out_dir`.

    The tag defaults to the arch's default tag (hub) or the snapshot's / 'local' (file). A `config.json` next
    to `from_file` (a hub snapshot) supplies the pretrained_cfg. The weights are kept as the file holds them: its
    classifier (`num_classes=0` drops it) and, for a ViT, its position embedding's grid, whose image size the
    JSON records as `input_size` (a DeiT fine-tuned at 160 px stays at 160 px; `img_size=` resamples it once).
    Returns the .safetensors path.
    """
    arch, tag = models.split_name(name)
    models.create_model(arch)   # unknown arch: ValueError with suggestions
    if from_file is not None:
        from_file = Path(from_file)
        weights = timm_state.weights_in(from_file) if from_file.is_dir() else from_file
        hub_config = timm_state.sidecar_config(weights)
        source = f"file:{from_file.resolve()}"
    else:
        tag = tag or pretrained.default_tag(arch)
        if not tag:
            raise ValueError(f"{arch} has no default tag; name one: {arch}.<tag>")
        pretrained.check_tag(arch, tag)
        files = hub.download(arch, tag, cache_dir)
        hub.check_download(files, arch, tag)   # a damaged download: which folder to delete
        weights, hub_config, source = files.weights, files.config, f"hf-hub:{files.repo_id}@{files.revision}"
    cfg = resolve_cfg(arch, tag, hub_config)
    tag = tag or ((hub_config or {}).get("pretrained_cfg") or {}).get("tag") or "local"
    cfg["tag"] = tag
    _, flat, cfg = timm_state.convert_file(arch, tag, weights, {"pretrained_cfg": cfg}, num_classes=num_classes,
                                           **overrides)
    return checkpoint.save(out_dir, arch, tag, flat, cfg, source)


def convert_timm_module(timm_model: Any, module: nn.Module | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A live timm model -> (Flax variables, pretrained_cfg). `module` defaults to the registered arch
    with the timm model's num_classes; pass it for timm models built with other overrides (depth=...)."""
    raw = dict(getattr(timm_model, "pretrained_cfg", None) or {})
    arch = raw.get("architecture")
    cfg = clean_cfg(raw, num_classes=int(timm_model.num_classes))
    if module is None:
        if not arch:
            raise ValueError("the timm model has no pretrained_cfg['architecture']; pass `module`")
        module = build_module(arch, cfg)
    flat = convert_state_dict(state_dict_to_numpy(timm_model.state_dict()), module)
    return checkpoint.unflatten(flat), cfg


__all__ = ["CFG_KEYS", "CheckpointError", "build_module", "clean_cfg", "convert", "convert_state_dict",
           "convert_timm_module", "download_from_hub", "hub_repo_id", "load_state_dict_file", "resolve_cfg",
           "state_dict_to_numpy"]
