"""timm Swin Transformer state dict -> flat flax variables of `vitsparse_jax.models.swin.SwinTransformer`.

timm `layers.1.blocks.0.attn.qkv.weight` -> `params/layers_1/blocks_0/attn/qkv/kernel` (transposed);
LayerNorm `weight` -> `scale`; the patch-embedding conv OIHW -> HWIO. Buffers are skipped.
"""
from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from vitsparse_jax.models import variable_shapes
from vitsparse_jax.weights.checkpoint import CheckpointError

# Non-persistent buffers that some checkpoints still carry; recomputed by the model, never parameters.
BUFFERS = ("relative_position_index", "attn_mask")


def _legacy_to_timm(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Original Microsoft checkpoints merge patches at the END of a stage; timm at the start of the next."""
    if "layers.0.downsample.reduction.weight" not in sd:
        return sd
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        out[re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)] = value
    return out


def convert_state_dict(sd: dict[str, np.ndarray], module) -> dict[str, np.ndarray]:
    """Maps a timm Swin state dict to `{'params/...': array}` for `module`; strict about every key."""
    model = module.info().name
    expected = {k: tuple(v.shape)
                for k, v in traverse_util.flatten_dict(variable_shapes(module), sep="/").items()}
    out: dict[str, np.ndarray] = {}
    for key, value in _legacy_to_timm(sd).items():
        if key.rsplit(".", 1)[-1] in BUFFERS:
            continue
        value = np.asarray(value, np.float32)
        module_path, _, leaf = key.rpartition(".")
        path = "params/" + re.sub(r"\.(\d+)(?=\.|$)", r"_\1", module_path).replace(".", "/")
        if leaf == "weight" and value.ndim == 4:          # conv OIHW -> HWIO
            target, value = f"{path}/kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:        # Linear (out, in) -> (in, out)
            target, value = f"{path}/kernel", value.T
        elif leaf == "weight" and value.ndim == 1:        # LayerNorm
            target = f"{path}/scale"
        elif leaf in ("bias", "relative_position_bias_table"):
            target = f"{path}/{leaf}"
        else:
            raise CheckpointError(f"{model}: timm key {key!r} {value.shape} has no counterpart in the Flax model")
        if target not in expected:
            raise CheckpointError(f"{model}: timm key {key!r} maps to {target!r}, which the Flax model lacks")
        if value.shape != expected[target]:
            raise CheckpointError(f"{model}: timm key {key!r} has shape {value.shape} after conversion, "
                                  f"{target!r} expects {expected[target]}")
        out[target] = np.ascontiguousarray(value)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(f"{model}: Flax parameter {missing[0]!r} has no timm key in the state dict"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return out
