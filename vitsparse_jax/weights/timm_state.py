"""timm state dicts -> Flax variables with numpy alone (torch only to read .pth/.bin files).

A state dict is `{timm key: np.ndarray}`. The per-family key maps live in `weights/timm_keys/<family>.py`
(`convert_state_dict(sd, module) -> {flax path: array}`, numpy only); this module reads the files, cleans
the dict (BatchNorm counters, DDP / torch.compile prefixes, float32), refuses non-floating parameters, and
picks the map of the module's family. The module it builds is the one the file holds (`fit_to_file`): its
classifier as the tensors have it, and a ViT at the image size of its position embedding, unless `img_size`
is given (then resampled once, from the file's grid, as timm does).
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.runtime.errors import UserError
import vitsparse_jax.weights.pretrained as pretrained
import vitsparse_jax.weights.safetensors_io as safetensors_io
from vitsparse_jax.weights.checkpoint import CheckpointError, flatten
from vitsparse_jax.weights.timm_keys import KEY_MAPS

# Key prefixes of wrapped models (DistributedDataParallel, torch.compile), removed.
PREFIXES = ("_orig_mod.", "module.")
# Wrapper keys of training checkpoints that hold the state dict.
WRAPPER_KEYS = ("model", "state_dict")
# The weights files of a timm Hugging Face repository, in the order timm tries them.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
# Buffers some checkpoints carry that are no parameters (integer, or recomputed by the model): BatchNorm's
# counter (dropped here), Swin's relative_position_index and attn_mask (dropped by its key map). Every other
# tensor must be floating point.
BUFFERS = ("num_batches_tracked", "relative_position_index", "attn_mask")
# Other timm names of a classifier's weight (torchvision's VGG, the original Swin checkpoints).
CLASSIFIER_ALIASES = {"head.fc.weight": ("classifier.6.weight", "head.weight")}
INSTALL_TORCH = 'pip install "vitsparse_jax[convert]" (from a clone: pip install -e ".[convert]")'


class TorchMissingError(UserError, ImportError):
    """A .pth/.bin file was given but torch is not installed."""


class UnreadableFile(ValueError):
    """A torch weights file that cannot be read: truncated, damaged, or holding pickled objects."""


def _clean_key(key: str) -> str:
    for prefix in PREFIXES + PREFIXES[:1]:
        key = key.removeprefix(prefix)
    return key


def clean_state_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drops BatchNorm `num_batches_tracked` counters, strips wrapper prefixes, makes floats float32."""
    out = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        value = np.asarray(value)
        if value.dtype.kind == "f" or value.dtype.name.startswith(("bfloat", "float8")):   # ml_dtypes: kind 'V'
            value = value.astype(np.float32)
        out[_clean_key(key)] = value
    return out


def _torch_error(path: Path, e: Exception) -> UnreadableFile:
    """What a file that torch.load(weights_only=True) cannot read is, and what to do."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return UnreadableFile(
            f"{path} holds pickled Python objects besides tensors{what}, which torch's safe loader "
            f"(torch.load(weights_only=True)) refuses to run. If you trust the file, save its weights again as a "
            f"plain state dict and convert that: python -c \"import torch; c = torch.load('{path}', "
            f"weights_only=False); torch.save(c.get('model', c.get('state_dict', c)), 'state_dict.pth')\" (a "
            f"training checkpoint keeps them under 'model' or 'state_dict'). A truncated file can look the same: "
            f"if the file is incomplete, download or copy it again")
    detail = (text.splitlines() or [""])[0][:200]
    return UnreadableFile(f"cannot read {path} as a torch file ({type(e).__name__}{': ' + detail if detail else ''}): "
                      f"it is truncated, damaged or not a .pth/.bin state dict; download or copy it again")


def _torch_load(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise TorchMissingError(f"reading {path} needs torch, which is not installed: {INSTALL_TORCH}. "
                                f".safetensors files need neither torch nor timm") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)   # never unpickles objects
    except Exception as e:  # noqa: BLE001  (whatever the file holds: one message naming it)
        raise _torch_error(path, e) from None
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


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{cleaned timm key: shape} of a weights file: the header alone of a .safetensors, the whole of a torch file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        header, _ = safetensors_io.read_header(path)
        return {_clean_key(k): tuple(int(d) for d in v["shape"]) for k, v in header.items()
                if k != "__metadata__" and not k.endswith("num_batches_tracked")}
    return {k: tuple(np.shape(v)) for k, v in read_state_dict(path).items()}


def check_floating(sd: Mapping[str, np.ndarray], model: str, source: str = "") -> None:
    """CheckpointError naming the first tensor that is not floating point (an integer or bool tensor where the
    model has float parameters would load as wrong numbers), the known integer buffers (`BUFFERS`) aside."""
    for key in sorted(sd):
        dtype = np.asarray(sd[key]).dtype
        if key.rsplit(".", 1)[-1] in BUFFERS or dtype.kind == "f":
            continue
        where = f"{source}: " if source else ""
        raise CheckpointError(
            f"{where}tensor {key!r} {tuple(np.shape(sd[key]))} is {dtype}, but {model} has only floating-point "
            f"parameters: this is not a float timm state dict (an integer-quantised or damaged export?). Use the "
            f"original float weights")


def convert_state_dict(sd: Mapping[str, np.ndarray], module: nn.Module, source: str = "") -> dict[str, np.ndarray]:
    """Refuses non-floating tensors (`check_floating`), then dispatches to `timm_keys.<family>.convert_state_dict`;
    returns flat Flax paths. `source` (the file) names where a refused tensor came from."""
    info = models.model_info(module)
    mapper = KEY_MAPS.get(info.family)
    if mapper is None:
        raise CheckpointError(f"no timm key map for the {info.family!r} family (vitsparse_jax/weights/timm_keys/)")
    check_floating(sd, info.name, source)
    return mapper.convert_state_dict(dict(sd), module)


def build_module(arch: str, cfg: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """The Flax module of `arch` with the classifier (and image size) that the weights have."""
    for key, value in pretrained.module_overrides(arch, cfg).items():
        overrides.setdefault(key, value)
    return models.create_model(arch, **overrides)


def _timm_key(path: str) -> str:
    """'params/head_dist/kernel' -> 'head_dist.weight', 'params/head/fc/kernel' -> 'head.fc.weight'."""
    *modules, leaf = path.split("/")[1:]
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*modules, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def classifier_size(shapes: Mapping[str, tuple[int, ...]], module: nn.Module) -> int:
    """The number of classes of the classifier a timm state dict holds (0: none, a headless tower), read from
    the shape of its weight: the variables `module` has only with a classifier, under their timm names."""
    with_head = flatten(models.variable_shapes(module.clone(num_classes=1)))
    without = flatten(models.variable_shapes(module.clone(num_classes=0)))
    kernels = sorted(k for k, v in with_head.items() if k.endswith("/kernel")
                     and (k not in without or without[k].shape != v.shape))
    for path in kernels:
        key = _timm_key(path)
        for name in (key, *CLASSIFIER_ALIASES.get(key, ())):
            if name in shapes and len(shapes[name]) >= 1:
                return int(shapes[name][0])
    return 0


def fit_to_file(arch: str, cfg: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(module, cfg) of the weights a file holds, as they are: the classifier its tensors have, and (unless
    `img_size` is given) a ViT at the image size of its position embedding's grid, so that nothing is resampled;
    the cfg's `num_classes` and `input_size` say so."""
    cfg = dict(cfg)
    module = build_module(arch, cfg, **overrides)
    cfg["num_classes"] = classifier_size(shapes, module)
    native = getattr(KEY_MAPS.get(models.model_info(module).family), "native_img_size", None)
    size = native(shapes, module) if native is not None and "img_size" not in overrides else None
    if size:
        cfg["input_size"] = [3, size, size]
    module = build_module(arch, cfg, **overrides)
    info = models.model_info(module)
    if cfg.get("input_size"):
        cfg["input_size"] = [3, info.img_size, info.img_size]
    return module, cfg


def weights_in(folder: Path) -> Path:
    """The timm weights file of a snapshot folder (model.safetensors, else pytorch_model.bin)."""
    for name in HUB_WEIGHTS:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder} holds neither {' nor '.join(HUB_WEIGHTS)}")


def sidecar_config(path: Path) -> dict[str, Any] | None:
    """The timm `config.json` next to a weights file (a hub snapshot), or None."""
    config = path.parent / "config.json"
    if not config.exists():
        return None
    try:
        out = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} (the timm config next to {path.name}) is not valid JSON ({e}); copy it again "
                         f"or remove it (then the shipped table's cfg is used)") from None
    if not isinstance(out, dict):
        raise ValueError(f"{config} holds {type(out).__name__}, not a timm config (a JSON object); copy it again "
                         f"or remove it (then the shipped table's cfg is used)")
    return out


def _file_cfg(arch: str, tag: str | None, path: Path,
              hub_config: Mapping[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    """(the weights file, its pretrained_cfg): `hub_config`, else a config.json next to the file, else the
    shipped table, else the arch's default; the tag defaults to the config's, else 'local'."""
    if path.is_dir():
        path = weights_in(path)
    if hub_config is None:
        hub_config = sidecar_config(path)
    cfg = pretrained.resolve_cfg(arch, tag, hub_config)
    if tag is None:
        cfg["tag"] = ((hub_config or {}).get("pretrained_cfg") or {}).get("tag") or "local"
    return path, cfg


def file_module(arch: str, tag: str | None, path: str | Path, hub_config: Mapping[str, Any] | None = None,
                **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(module, cfg) that `convert_file` gives for this file, from the tensors' shapes alone (a .safetensors'
    header; a torch file is read whole)."""
    path, cfg = _file_cfg(arch, tag, Path(path), hub_config)
    return fit_to_file(arch, cfg, tensor_shapes(path), **overrides)


def convert_file(arch: str, tag: str | None, path: str | Path, hub_config: Mapping[str, Any] | None = None,
                 num_classes: int | None = None, **overrides: Any) -> tuple[nn.Module, dict[str, np.ndarray], dict]:
    """timm weights file (or snapshot folder) -> (module, flat Flax variables, pretrained_cfg).

    The module holds the file's weights as they are (`fit_to_file`: its classifier, a ViT at its position
    embedding's size unless `img_size` is given). `num_classes`: None or the file's keeps its classifier, 0
    drops it; another size is a ValueError (a classifier cannot come from weights that lack it)."""
    path, cfg = _file_cfg(arch, tag, Path(path), hub_config)
    sd = read_state_dict(path)
    if any("/" in k for k in sd) and not any("." in k for k in sd):
        raise CheckpointError(f"{path} holds converted (Flax) weights, not timm's, but its .json is missing")
    module, cfg = fit_to_file(arch, cfg, {k: tuple(np.shape(v)) for k, v in sd.items()}, **overrides)
    flat = convert_state_dict(sd, module, str(path))
    have = models.model_info(module).num_classes
    if num_classes is None or int(num_classes) == have:
        return module, flat, cfg
    if int(num_classes) != 0:
        raise ValueError(f"{path} holds " + (f"a classifier of {have} classes" if have else "no classifier")
                         + f", not one of num_classes={num_classes}: leave num_classes out (the file's) or use 0 to "
                         f"drop the classifier")
    headless = module.clone(num_classes=0)
    keep = flatten(models.variable_shapes(headless))
    return headless, {k: flat[k] for k in keep}, {**cfg, "num_classes": 0}
