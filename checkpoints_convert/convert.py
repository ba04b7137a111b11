"""timm weights -> this project's converted checkpoints (safetensors + JSON, see docs/design.md).

Sources: the Hugging Face hub (`timm/<arch>.<tag>`), a local .safetensors/.pth/.bin, or a live timm
module. The per-family key mapping lives in `checkpoints_convert/<family>.py` as
`convert_state_dict(sd: dict[str, np.ndarray], module) -> dict[str, np.ndarray]` (flat Flax paths).
torch is imported lazily, only where a torch file or module is read.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.weights import checkpoint
from vitsparse_jax.weights.checkpoint import CheckpointError

# The pretrained_cfg fields kept in the JSON (timm's names).
CFG_KEYS = ("tag", "input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "num_classes")
# Wrapper keys of training checkpoints that hold the state dict.
WRAPPER_KEYS = ("model", "state_dict")


# --- state dicts ---------------------------------------------------------------------------------------

def state_dict_to_numpy(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torch tensors -> numpy (floating point as float32). BatchNorm's `num_batches_tracked` counters are
    training bookkeeping and are dropped; DDP / torch.compile key prefixes are removed."""
    import torch

    out = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        for prefix in ("_orig_mod.", "module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.is_floating_point() else value).numpy()
        out[key] = np.asarray(value)
    return out


def load_state_dict_file(path: str | Path) -> dict[str, np.ndarray]:
    """A timm state dict from .safetensors, or from .pth/.pt/.bin via torch.load(weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        import safetensors.torch  # torch-backed: reads bfloat16 / float16 too

        sd = safetensors.torch.load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        import torch

        sd = torch.load(str(path), map_location="cpu", weights_only=True)   # never unpickles objects
        for key in WRAPPER_KEYS:
            if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
                sd = sd[key]
                break
    else:
        raise ValueError(f"{path}: expected a .safetensors, .pth, .pt or .bin file")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return state_dict_to_numpy(sd)


def convert_state_dict(sd: Mapping[str, np.ndarray], module: nn.Module) -> dict[str, np.ndarray]:
    """Dispatches to `checkpoints_convert.<family>.convert_state_dict`; returns flat Flax paths."""
    family = models.model_info(module).family
    mapper = importlib.import_module(f"checkpoints_convert.{family}")
    return mapper.convert_state_dict(dict(sd), module)


# --- pretrained_cfg ---------------------------------------------------------------------------------------

def clean_cfg(cfg: Mapping[str, Any], **updates: Any) -> dict[str, Any]:
    """The CFG_KEYS of a timm pretrained_cfg (dict or PretrainedCfg), tuples as lists, plus `updates`."""
    if not isinstance(cfg, Mapping):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    out = {k: cfg[k] for k in CFG_KEYS if cfg.get(k) is not None}
    out.update({k: v for k, v in updates.items() if v is not None})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def timm_registry_cfg(arch: str, tag: str | None) -> dict[str, Any] | None:
    """timm's pretrained_cfg for arch.tag when timm is installed and knows it, else None."""
    try:
        import timm
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except (ImportError, RuntimeError):
        return None
    return None if cfg is None else clean_cfg(cfg)


def default_cfg(arch: str) -> dict[str, Any]:
    return clean_cfg(models.model_info(models.create_model(arch)).default_cfg)


def resolve_cfg(arch: str, tag: str | None, hub_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """pretrained_cfg from, in order: a timm hub config.json, timm's registry, the arch's default cfg."""
    if hub_config is not None and "pretrained_cfg" in hub_config:
        cfg = clean_cfg(hub_config["pretrained_cfg"], num_classes=hub_config.get("num_classes"))
    else:
        cfg = timm_registry_cfg(arch, tag) or default_cfg(arch)
    if tag:
        cfg["tag"] = tag
    return cfg


def build_module(arch: str, cfg: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """The Flax module of `arch` with the classifier (and image size) that the weights have."""
    default = models.model_info(models.create_model(arch))
    if cfg.get("num_classes") is not None and int(cfg["num_classes"]) != default.num_classes:
        overrides.setdefault("num_classes", int(cfg["num_classes"]))
    if cfg.get("input_size") and int(cfg["input_size"][-1]) != default.img_size:
        overrides.setdefault("img_size", int(cfg["input_size"][-1]))
    return models.create_model(arch, **overrides)


# --- sources ----------------------------------------------------------------------------------------------

def hub_repo_id(arch: str, tag: str) -> str:
    return f"timm/{arch}.{tag}"


def download_from_hub(arch: str, tag: str, cache_dir: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Downloads timm's weights (model.safetensors, else pytorch_model.bin) and config.json."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = hub_repo_id(arch, tag)
    try:
        weights = hf_hub_download(repo, "model.safetensors", cache_dir=cache_dir)
    except EntryNotFoundError:
        weights = hf_hub_download(repo, "pytorch_model.bin", cache_dir=cache_dir)
    config = json.loads(Path(hf_hub_download(repo, "config.json", cache_dir=cache_dir)).read_text())
    return Path(weights), config


def convert(name: str, out_dir: str | Path, *, from_file: str | Path | None = None,
            num_classes: int | None = None, cache_dir: str | None = None, **overrides: Any) -> Path:
    """Converts `arch[.tag]` from the hub, or from `from_file`, and writes it to `out_dir`.

    The tag defaults to the arch's default tag (hub) or 'local' (file). A `config.json` next to
    `from_file` (a hub snapshot) supplies the pretrained_cfg. Returns the .safetensors path.
    """
    arch, tag = models.split_name(name)
    if from_file is not None:
        from_file = Path(from_file)
        sidecar = from_file.parent / "config.json"
        hub_config = json.loads(sidecar.read_text()) if sidecar.exists() else None
        cfg = resolve_cfg(arch, tag, hub_config)
        tag = tag or (hub_config or {}).get("pretrained_cfg", {}).get("tag") or "local"
        cfg["tag"] = tag
        sd, source = load_state_dict_file(from_file), f"file:{from_file.resolve()}"
    else:
        tag = tag or default_cfg(arch).get("tag")
        if not tag:
            raise ValueError(f"{arch} has no default tag; name one: {arch}.<tag>")
        weights, hub_config = download_from_hub(arch, tag, cache_dir)
        cfg = resolve_cfg(arch, tag, hub_config)
        sd, source = load_state_dict_file(weights), f"hf-hub:{hub_repo_id(arch, tag)}"
    if num_classes is not None:
        cfg["num_classes"] = int(num_classes)
    module = build_module(arch, cfg, **overrides)
    variables = convert_state_dict(sd, module)
    return checkpoint.save(out_dir, arch, tag, variables, cfg, source)


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
