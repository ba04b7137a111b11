"""timm ResNet state dict -> flat flax variables of `vitsparse_jax.models.resnet.ResNet` (docs/design.md)."""
from __future__ import annotations

import re

import flax.linen as nn
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.weights.checkpoint import CheckpointError, check_tensors
from vitsparse_jax.weights.timm_keys.vgg import NAMES, expected_shapes, flax_path, torch_to_flax

# timm module name -> kind; block modules are 'layer{s}.{b}.<name>'
_KINDS = {"conv1": "conv", "bn1": "bn", "fc": "linear"}
_BLOCK_KINDS = {"conv1": "conv", "conv2": "conv", "conv3": "conv", "bn1": "bn", "bn2": "bn", "bn3": "bn",
                "downsample.0": "conv", "downsample.1": "bn"}
_BLOCK = re.compile(r"layer\d+\.\d+\.(.+)")


def convert_state_dict(sd: dict[str, np.ndarray], module: nn.Module) -> dict[str, np.ndarray]:
    """Maps timm keys ('layer1.0.bn2.running_var', 'fc.weight', ...) to flax paths; strict."""
    model = models.model_info(module).name
    expected = expected_shapes(module)
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        module_name, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            continue
        block = _BLOCK.fullmatch(module_name)
        kind = _BLOCK_KINDS.get(block.group(1)) if block else _KINDS.get(module_name)
        if kind is None or param not in NAMES[kind]:
            raise CheckpointError(f"{model}: timm parameter {key!r} has no place in the model")
        collection, name = NAMES[kind][param]
        path = f"{collection}/{flax_path(module_name)}/{name}"
        if path not in expected:  # e.g. a block or downsample this depth does not have
            raise CheckpointError(f"{model}: timm parameter {key!r} has no place in the model ({path})")
        out[path] = torch_to_flax(kind, param, np.asarray(value))
    check_tensors(out, expected, model)
    return out
