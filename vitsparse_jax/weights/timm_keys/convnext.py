"""timm ConvNeXt state dict -> flat Flax variables of `vitsparse_jax.models.convnext.ConvNeXt`.

timm `stages.2.blocks.4.mlp.fc1.weight` -> `params/stages_2/blocks_4/mlp/fc1/kernel` (transposed), the
depthwise `conv_dw.weight` (C, 1, 7, 7) -> (7, 7, 1, C), `stem.0` / `stages.{s}.downsample.1` convs OIHW -> HWIO,
LayerNorm `weight` -> `scale`, layer scale `gamma` as is, `head.norm` / `head.fc`. Strict: a missing,
unexpected or mis-shaped key is a CheckpointError naming it.
"""
from __future__ import annotations

import re

import flax.linen as nn
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.weights.checkpoint import CheckpointError, check_tensors, flatten


def flax_path(key: str, ndim: int) -> str:
    """timm key + the tensor's rank -> flax path: 'stages.1.downsample.0.weight' (1-d) -> 'params/stages_1/
    downsample_0/scale', 'head.fc.weight' (2-d) -> 'params/head/fc/kernel'."""
    module, _, leaf = key.rpartition(".")
    path = "params/" + re.sub(r"\.(\d+)(?=\.|$)", r"_\1", module).replace(".", "/") if module else "params"
    if leaf == "weight":
        leaf = "scale" if ndim == 1 else "kernel"
    return f"{path}/{leaf}"


def to_flax(value: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO (depthwise: (C, 1, k, k) -> (k, k, 1, C)); Linear (out, in) -> (in, out)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def convert_state_dict(sd: dict[str, np.ndarray], module: nn.Module) -> dict[str, np.ndarray]:
    model = models.model_info(module).name
    expected = {k: tuple(v.shape) for k, v in flatten(models.variable_shapes(module)).items()}
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        value = np.asarray(value, np.float32)
        path = flax_path(key, value.ndim)
        if path not in expected or not key.endswith((".weight", ".bias", ".gamma")):
            raise CheckpointError(f"{model}: timm key {key!r} {value.shape} has no counterpart in the Flax model"
                                  f" ({path})")
        out[path] = np.ascontiguousarray(to_flax(value))
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(f"{model}: timm key {timm_key(missing[0])!r} (for parameter {missing[0]!r}) is missing "
                              "from the state dict" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    check_tensors(out, expected, model)
    return out


def timm_key(path: str) -> str:
    """The inverse of `flax_path`: 'params/stages_2/blocks_4/norm/scale' -> 'stages.2.blocks.4.norm.weight'."""
    *modules, leaf = path.split("/")[1:]
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*modules, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
