"""timm ViT state dict -> flat Flax variables of `vitsparse_jax.models.vit.VisionTransformer` (ViT, DeiT,
DeiT III, DINOv2 with and without registers, CLIP / SigLIP towers, *_gap_* ViTs).

The Flax tree mirrors timm's module tree, so every Flax path has exactly one timm key:
`params/blocks_3/attn/qkv/kernel` <- `blocks.3.attn.qkv.weight` (transposed), `.../norm1/scale` <-
`blocks.3.norm1.weight`, `.../ls1/gamma` <- `blocks.3.ls1.gamma`, `params/pos_embed` <- `pos_embed`,
`params/attn_pool/latent` <- `attn_pool.latent`.

Image size: `native_img_size` reads the size a state dict was saved at from its position embedding's grid
(a DeiT fine-tuned at 160 px, DINOv2 at 224 px), so that a file is converted as it is. When the module is
built at another size (DINOv2's 518 px weights run at 224 px, a 224 px ViT run at 384 px), the embedding is
resampled here, once, from the file's grid, exactly as timm's `checkpoint_filter_fn` does when a model is
created at another size (`vitsparse_jax.models.pos_embed`: bicubic, antialias, prefix entries kept).
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import flax.linen as nn
import numpy as np

from vitsparse_jax import models
from vitsparse_jax.models import vit
from vitsparse_jax.weights.checkpoint import CheckpointError, flatten

# Training-only parameters of some timm-format checkpoints that the eval model has no place for.
DROPPED = ("mask_token",)   # DINOv2 / iBOT masked-token embedding


def timm_key(flax_path: str) -> str:
    """'params/blocks_3/attn/qkv/kernel' -> 'blocks.3.attn.qkv.weight'."""
    collection, *parts = flax_path.split("/")
    if collection != "params":
        raise CheckpointError(f"ViT has no {collection!r} variables (got {flax_path!r})")
    *modules, leaf = parts
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]   # blocks_3 -> blocks.3
    if modules:
        leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*modules, leaf])


def to_flax(flax_path: str, value: np.ndarray) -> np.ndarray:
    """torch layout -> flax layout: Linear (out, in) -> (in, out); Conv (O, I, kh, kw) -> (kh, kw, I, O)."""
    if flax_path.endswith("/kernel"):
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
    return value


def convert_state_dict(sd: dict[str, np.ndarray], module: nn.Module) -> dict[str, np.ndarray]:
    """Strict: a Flax parameter without its timm key, a timm key left over, or a shape mismatch is a
    CheckpointError naming the key and the model."""
    model = models.model_info(module).name
    expected = flatten(models.variable_shapes(module))
    sd = {key: value for key, value in sd.items() if key not in DROPPED}
    sd = {re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", key): value   # original DeiT III names
          for key, value in sd.items()}
    if "pos_embed" in sd and "params/pos_embed" in expected:
        sd["pos_embed"] = resample_pos_embed(np.asarray(sd["pos_embed"]), module, model)
    out, used = {}, set()
    for path in sorted(expected):
        key = timm_key(path)
        if key not in sd:
            raise CheckpointError(f"{model}: timm key {key!r} (for parameter {path!r}) is missing from the "
                                  f"state dict")
        value = to_flax(path, np.asarray(sd[key]))
        if value.shape != tuple(expected[path].shape):
            raise CheckpointError(f"{model}: timm key {key!r} has shape {np.shape(sd[key])}, which does not fit "
                                  f"parameter {path!r} of shape {tuple(expected[path].shape)}")
        out[path] = np.ascontiguousarray(value, dtype=expected[path].dtype)
        used.add(key)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise CheckpointError(f"{model}: timm key {unexpected[0]!r} has no counterpart in the Flax model"
                              + (f" (and {len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1
                                 else ""))
    return out


def native_img_size(shapes: Mapping[str, tuple[int, ...]], module: nn.Module) -> int | None:
    """The image size a timm ViT state dict was saved at: its `pos_embed` grid (square) times the patch size;
    None without a position embedding or with a grid that is not square."""
    shape = tuple(shapes.get("pos_embed", ()))
    if len(shape) != 3:
        return None
    tokens = shape[1] - (0 if module.no_embed_class else module.num_prefix_tokens)
    side = math.isqrt(max(tokens, 0))
    return side * int(module.patch_size) if side and side * side == tokens else None


def resample_pos_embed(posemb: np.ndarray, module: nn.Module, model: str) -> np.ndarray:
    """The state dict's position embedding on the module's patch grid (timm's resampling at load time,
    `vitsparse_jax.models.vit.resample_pos_embed_for`); unchanged when the grids agree."""
    try:
        return vit.resample_pos_embed_for(module, posemb).astype(np.float32)
    except ValueError as e:
        prefix = 0 if module.no_embed_class else module.num_prefix_tokens
        raise CheckpointError(f"{model}: timm key 'pos_embed' of shape {np.shape(posemb)} cannot be resampled to "
                              f"the {module.grid[0]}x{module.grid[1]} patch grid of img_size={module.img_size} with "
                              f"{prefix} prefix entries: {e}") from None
