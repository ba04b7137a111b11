"""timm VGG state dict -> flat flax variables of `vitsparse_jax.models.vgg.VGG` (docs/design.md)."""
from __future__ import annotations

import flax.linen as nn
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.models.vgg import feature_layers
from vitsparse_jax.weights.checkpoint import CheckpointError, check_tensors, flatten

# torch parameter name -> (flax collection, flax name), per kind of torch module
NAMES = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "linear": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "bn": {"weight": ("params", "scale"), "bias": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")},
}
# torchvision's classifier names (timm's pretrained filter renames and reshapes them the same way)
_TORCHVISION = {"classifier.0": "pre_logits.fc1", "classifier.3": "pre_logits.fc2", "classifier.6": "head.fc"}


def flax_path(module_name: str) -> str:
    """timm module name -> flax module path: 'layer1.0.downsample.0' -> 'layer1_0/downsample_0'."""
    path = ""
    for part in module_name.split("."):
        path += (f"_{part}" if part.isdigit() else f"/{part}") if path else part
    return path


def torch_to_flax(kind: str, param: str, value: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO, Linear (out, in) -> (in, out); everything else as is."""
    if param == "weight" and kind == "conv":
        return value.transpose(2, 3, 1, 0)
    if param == "weight" and kind == "linear":
        return value.T
    return value


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten(models.variable_shapes(module)).items()}


def _module_kind(name: str, kinds: tuple[str, ...]) -> str | None:
    """'conv' | 'bn' | 'linear' for a timm module name of this VGG; None if it has no such module."""
    head, _, idx = name.partition(".")
    if head == "features" and idx.isdigit() and int(idx) < len(kinds) and kinds[int(idx)] in ("conv", "bn"):
        return kinds[int(idx)]
    return {"pre_logits.fc1": "conv", "pre_logits.fc2": "conv", "head.fc": "linear"}.get(name)


def convert_state_dict(sd: dict[str, np.ndarray], module: nn.Module) -> dict[str, np.ndarray]:
    """Maps timm keys ('features.0.weight', 'pre_logits.fc1.bias', ...) to flax paths; strict."""
    model = models.model_info(module).name
    kinds = feature_layers(module.cfg, module.batch_norm)
    expected = expected_shapes(module)
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        module_name, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            continue
        module_name = _TORCHVISION.get(module_name, module_name)
        kind = _module_kind(module_name, kinds)
        if kind is None or param not in NAMES[kind]:
            raise CheckpointError(f"{model}: timm parameter {key!r} has no place in the model")
        collection, name = NAMES[kind][param]
        path = f"{collection}/{flax_path(module_name)}/{name}"
        if path not in expected:  # e.g. head.fc of a headless (num_classes=0) module
            raise CheckpointError(f"{model}: timm parameter {key!r} has no place in the model ({path})")
        value = np.asarray(value)
        if kind == "conv" and value.ndim == 2:  # torchvision Linear -> timm conv
            h, w, c_in, _ = expected[path]
            value = value.reshape(-1, c_in, h, w)
        out[path] = torch_to_flax(kind, param, value)
    check_tensors(out, expected, model)
    return out
